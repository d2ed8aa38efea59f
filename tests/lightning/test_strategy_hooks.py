"""Strategy hooks without processes: names, refusals, the FSDP wrap policy, the optimizer hook."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import lightning_peft as lp
from lightning_peft import PEFTCallback, registry
from lightning_peft.core import state
from lightning_peft.lightning import strategies
from tests import optional, tiny
from tests.lightning.modules import DeferredLM, TinyLM, token_loader, trainer


@pytest.mark.parametrize(
    ("name", "cls", "options"),
    [
        ("peft_fsdp", strategies.PEFTFSDPStrategy, {}),
        ("peft_fsdp2", strategies.PEFTFSDP2Strategy, {}),
        ("peft_fsdp2_full", strategies.PEFTFSDP2Strategy, {"save_distributed_checkpoint": False}),
        ("peft_deepspeed_stage_2", strategies.PEFTDeepSpeedStrategy, {"stage": 2}),
        ("peft_deepspeed_stage_3", strategies.PEFTDeepSpeedStrategy, {"stage": 3}),
    ],
)
def test_strategies_are_registered_by_name(name: str, cls: type, options: dict) -> None:
    """A YAML ``strategy: <name>`` reaches the PEFT strategy with no other change."""
    entry = StrategyRegistry[name]
    assert entry["strategy"] is cls and entry["init_params"] == options
    assert name in strategies.NAMES


def test_peft_fsdp_builds_from_its_name_on_cpu() -> None:
    t = L.Trainer(accelerator="cpu", devices=2, strategy="peft_fsdp", logger=False)
    assert isinstance(t.strategy, strategies.PEFTFSDPStrategy)
    PEFTCallback("lora").check_strategy(t)


def test_fsdp1_sharded_state_dicts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"state_dict_type='sharded'\) is not supported.*strategy='peft_fsdp2'"):
        strategies.PEFTFSDPStrategy(state_dict_type="sharded")
    with pytest.raises(ValueError, match=r"needs use_orig_params=True"):
        strategies.PEFTFSDPStrategy(use_orig_params=False)


def test_adapter_units_separate_trainable_from_frozen() -> None:
    """Wrapped bottom-up, each unit's own parameters are all trainable or all frozen."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = lp.inject(tiny.build("llama"), "lora", r=4)
    units = strategies.adapter_units(model)
    wrapped = {id(m) for m in units} | {id(m) for m in model.modules() if isinstance(m, LlamaDecoderLayer)}
    wrapped.add(id(model))
    for module in model.modules():
        if id(module) not in wrapped:
            continue
        own, stack = [], [module]
        while stack:  # this unit's parameters: not those of a nested unit
            m = stack.pop()
            own += list(m.parameters(recurse=False))
            stack += [c for c in m.children() if id(c) not in wrapped]
        assert len({p.requires_grad for p in own}) <= 1, type(module).__name__
    lora_layers = [m for _, m in state.adapter_modules(model)]
    assert len(units) == 2 * len(lora_layers)  # each base layer and each adapter layer


def test_adapter_wrap_policy_keeps_the_users_units() -> None:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = lp.inject(tiny.build("llama"), "lora", r=4)
    for policy in ({LlamaDecoderLayer}, ModuleWrapPolicy({LlamaDecoderLayer})):
        targets = strategies.adapter_wrap_policy(model, policy)._run_policy(model, set(), {})
        assert sum(isinstance(m, LlamaDecoderLayer) for m in targets) == 2
        assert {id(m) for m in strategies.adapter_units(model)} <= {id(m) for m in targets}

    def legacy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return isinstance(module, LlamaDecoderLayer)

    either = strategies.adapter_wrap_policy(model, legacy)
    layer = model.model.layers[0]
    assert either(layer, False, 0) and either(layer.self_attn.q_proj.base_layer, False, 0)
    assert not either(layer.mlp, False, 0)


def test_optimizer_is_restricted_when_configure_optimizers_returns(tmp_path: Path) -> None:
    """Before any strategy (DeepSpeed builds its engine from it) sees the optimizer."""
    seen: list[int] = []

    class Spy(TinyLM):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Spy()
    callback = PEFTCallback("lora", r=4, verbose=False)
    t = trainer(tmp_path, max_steps=1, callbacks=[callback])
    original = t.strategy.setup_optimizers

    def spy_setup(trainer: L.Trainer) -> None:
        original(trainer)
        seen.append(sum(len(g["params"]) for g in trainer.strategy.optimizers[0].param_groups))

    t.strategy.setup_optimizers = spy_setup  # type: ignore[method-assign]
    t.fit(module, token_loader())
    assert seen == [len(list(state.adapter_parameters(module)))]
    assert "configure_optimizers" not in module.__dict__  # the wrapper is removed at teardown


def test_injecting_into_an_already_sharded_model_is_refused(tmp_path: Path) -> None:
    """A model partitioned in configure_model before the callback injects: the adapter would be left out."""

    class ShardsItself(DeferredLM):
        def configure_model(self) -> None:
            super().configure_model()
            for param in self.model.parameters():
                param.ds_id = 0  # what deepspeed.zero.Init tags each partitioned parameter with

    with pytest.raises(ValueError, match=r"already sharded \(FSDP or ZeRO-3\) when PEFTCallback injects lora"):
        trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback("lora", verbose=False)]).fit(
            ShardsItself(), token_loader()
        )


@pytest.mark.parametrize("sharding", sorted(registry.ALL_SHARDINGS))
def test_a_sharding_the_method_does_not_declare_is_refused(sharding: str) -> None:
    """Every registered method now declares every sharding: a copy of one that declares all but
    ``sharding`` stands in for a method that cannot train under it."""
    if sharding.startswith("zero"):
        optional.importorskip("deepspeed")  # Lightning's DeepSpeedStrategy refuses to exist without it
    strategy = {
        "fsdp": lambda: strategies.PEFTFSDPStrategy(),
        "fsdp2": lambda: strategies.PEFTFSDP2Strategy(),
        "zero1": lambda: strategies.PEFTDeepSpeedStrategy(stage=1),
        "zero2": lambda: strategies.PEFTDeepSpeedStrategy(stage=2),
        "zero3": lambda: strategies.PEFTDeepSpeedStrategy(stage=3),
    }[sharding]()
    assert strategy.sharding == sharding
    method = dataclasses.replace(registry.get("lora"), sharding=registry.ALL_SHARDINGS - {sharding})
    others = [m.name for m in registry.all_methods() if sharding in m.sharding]
    with pytest.raises(
        ValueError,
        match=rf"PEFTCallback\(method='lora'\) does not support {type(strategy).__name__} "
        rf"\(sharding '{sharding}'\): "
        rf"lora trains correctly on one device and DDP, and shardings .*Use strategy='ddp', or a method that "
        rf"supports '{sharding}': {', '.join(others)}\.",
    ):
        strategies.check_supported(strategy, method)


def test_every_method_is_accepted_under_the_shardings_it_declares() -> None:
    for method in registry.all_methods():
        for sharding in method.sharding - {"zero1", "zero2", "zero3"}:
            strategy = {"fsdp": strategies.PEFTFSDPStrategy, "fsdp2": strategies.PEFTFSDP2Strategy}[sharding]()
            strategies.check_supported(strategy, method)


def test_method_hooks_under_deepspeed_refuse_gradient_accumulation() -> None:
    """Lightning hands accumulation to the engine and calls on_before_optimizer_step on every
    micro-batch, before DeepSpeed has reduced the gradients: a penalty or per-step work would be
    run on incomplete gradients (and more than once per step), so it is refused."""
    optional.importorskip("deepspeed")
    strategy = strategies.PEFTDeepSpeedStrategy(stage=2)
    strategy.config["gradient_accumulation_steps"] = 2  # what the strategy's setup writes from the Trainer
    with (
        pytest.raises(ValueError, match=r"hooks .* accumulate_grad_batches=2: .*Use accumulate_grad_batches=1"),
        strategies.adapter_gradients(strategy),
    ):
        pass
