"""PEFTCallback in real Trainer runs: injection, optimizer, checkpoints, exact resume, refusals."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import state
from tests import tiny
from tests.lightning.modules import DeferredLM, TinyLM, token_loader, trainer


def adapter(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lp.trainable_state_dict(module).items()}


def test_fit_trains_only_the_adapter(tmp_path: Path) -> None:
    module = TinyLM()
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = PEFTCallback("lora", r=4, verbose=False)
    t = trainer(tmp_path, max_steps=3, callbacks=[callback])
    t.fit(module, token_loader())
    declared = {n for n, _ in state.adapter_parameters(module)}
    assert declared and all("lora_" in n for n in declared)
    for name, param in module.named_parameters():
        if name in declared:
            assert not torch.equal(param, frozen_before.get(name, torch.zeros(0))), f"{name} did not train"
        else:
            key = name.replace(".base_layer", "")
            assert torch.equal(param, frozen_before[key]), f"frozen {name} changed"
    # The optimizer holds exactly the trainable parameters although configure_optimizers passed all.
    (optimizer,) = t.optimizers
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for _, p in state.adapter_parameters(module)}


def test_param_groups_and_scheduler_survive(tmp_path: Path) -> None:
    module = TinyLM(param_groups=True)
    t = trainer(tmp_path, max_steps=4, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(module, token_loader())
    decay, no_decay = t.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.requires_grad for g in (decay, no_decay) for p in g["params"])
    assert len(decay["params"]) == len(no_decay["params"]) == 4  # lora_A / lora_B of q, v in 2 layers
    assert no_decay["lr"] == pytest.approx(5e-3 * 0.25) and decay["lr"] == pytest.approx(1e-2 * 0.25)


def test_model_built_in_configure_model_is_injected_before_optimizers(tmp_path: Path) -> None:
    module = DeferredLM()
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(module, token_loader())
    assert lp.get_info(module).method == "lora"
    assert {id(p) for g in t.optimizers[0].param_groups for p in g["params"]} == {
        id(p) for _, p in state.adapter_parameters(module)
    }
    assert "configure_model" not in module.__dict__  # the hook wrapper is removed at teardown


def test_summary_is_printed_and_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = CSVLogger(tmp_path)
    t = trainer(tmp_path, max_steps=1, logger=logger, callbacks=[PEFTCallback("lora", r=4)])
    t.fit(TinyLM(), token_loader())
    hparams = (Path(logger.log_dir) / "hparams.yaml").read_text()
    assert "method: lora" in hparams and "trainable_params: 896" in hparams and "total_params:" in hparams
    assert "q_proj (LoRALinear)" in hparams


def test_fit_twice_and_validate_reuse_the_injection(tmp_path: Path) -> None:
    module = TinyLM()
    callback = PEFTCallback("lora", r=4, verbose=False)
    trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, token_loader())
    first = lp.get_info(module)
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(module, token_loader())
    t.validate(module, token_loader(shuffle=False))
    assert lp.get_info(module) is first
    with pytest.raises(ValueError, match=r"already has a lora adapter .*this PEFTCallback would add lora"):
        trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback("lora", r=2)]).fit(module, token_loader())


def test_checkpoint_holds_only_trainable_state_and_is_small(tmp_path: Path) -> None:
    module = TinyLM()
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(module, token_loader())
    path = tmp_path / "adapter.ckpt"
    t.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == {n for n, _ in state.adapter_state(module)}
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(checkpoint)
    trainable_bytes = sum(p.numel() * p.element_size() for _, p in state.adapter_parameters(module))
    adamw_bytes = 2 * trainable_bytes  # exp_avg and exp_avg_sq
    assert path.stat().st_size <= 1.1 * (trainable_bytes + adamw_bytes) + 64 * 1024
    full = sum(p.numel() * p.element_size() for p in module.parameters())
    assert path.stat().st_size < full  # the frozen backbone is not in it


def _run(root: Path, epochs: int, ckpt_path: Path | None = None, **options: object) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = TinyLM()
    callbacks = [
        PEFTCallback("lora", **({"r": 4, "dropout": 0.1, "verbose": False} | options)),
        ModelCheckpoint(dirpath=root, save_last=True),
    ]
    t = trainer(root, max_epochs=epochs, callbacks=callbacks, num_sanity_val_steps=2)
    t.fit(module, token_loader(shuffle=True), token_loader(n=8, shuffle=False), ckpt_path=ckpt_path)
    return adapter(module)


def test_resume_is_exact(tmp_path: Path) -> None:
    """fit 2N steps == fit N, stop, resume, fit N more; with shuffling and dropout on."""
    straight = _run(tmp_path / "straight", epochs=2)
    _run(tmp_path / "first", epochs=1)
    resumed = _run(tmp_path / "second", epochs=2, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 8}, r"trained with other lora options: r=4 in the state dict, r=8 here"),
        ({"target_modules": ["q_proj"]}, r"target_modules=\['q_proj', 'v_proj'\] in the state dict"),
        ({"seed": 3}, r"does not fit this base model: it was trained on another base model"),
    ],
)
def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path: Path, change: dict, message: str) -> None:
    t = trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(TinyLM(), token_loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    seed = change.pop("seed", 0)
    callback = PEFTCallback("lora", **({"r": 4, "verbose": False} | change))
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(
            TinyLM(seed=seed), token_loader(), ckpt_path=tmp_path / "a.ckpt"
        )


def test_resume_refuses_a_checkpoint_missing_adapter_keys(tmp_path: Path) -> None:
    t = trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(TinyLM(), token_loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    del checkpoint["state_dict"]["model.model.layers.0.self_attn.q_proj.lora_A"]
    torch.save(checkpoint, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"lacks adapter weights: model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", r=4, verbose=False)]).fit(
            TinyLM(), token_loader(), ckpt_path=tmp_path / "b.ckpt"
        )


def test_a_checkpoint_loads_into_the_bare_model_for_inference(tmp_path: Path) -> None:
    module = TinyLM()
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", r=4, verbose=False)])
    t.fit(module, token_loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    from tests import tiny

    bare = lp.load_adapter(tiny.build("llama"), tmp_path / "a.ckpt")
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(bare, batch), tiny.logits(module.model.eval(), batch), rtol=0, atol=0)


def test_unfrozen_parameters_outside_the_adapter_are_refused(tmp_path: Path) -> None:
    class Unfreezes(TinyLM):
        def on_fit_start(self) -> None:
            self.model.model.norm.weight.requires_grad_(True)

    with pytest.raises(RuntimeError, match=r"model\.model\.norm\.weight require grad but belong to no adapter"):
        # The module's on_fit_start runs after the callback's; the check runs again at train start.
        trainer(tmp_path, max_steps=1, callbacks=[PEFTCallback("lora", verbose=False)]).fit(Unfreezes(), token_loader())


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=r"method must be one of 'lora'.*got 'lorax'"):
        PEFTCallback("lorax")
    with pytest.raises(ValueError, match=r"LoRAConfig.r must be a positive integer; got 0"):
        PEFTCallback("lora", r=0)


@pytest.mark.parametrize(
    ("strategy", "instead"),
    [
        ("DeepSpeedStrategy", r"Use strategy='peft_deepspeed_stage_2' or 'peft_deepspeed_stage_3'"),
        ("FSDPStrategy", r"Use strategy='peft_fsdp' \(PEFTFSDPStrategy\)"),
        ("ModelParallelStrategy", r"Use strategy='peft_fsdp2' \(PEFTFSDP2Strategy\)"),
    ],
)
def test_unsupported_strategy_is_refused(strategy: str, instead: str) -> None:
    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, strategy)

    class FakeTrainer:
        strategy = cls.__new__(cls)

    with pytest.raises(
        ValueError,
        match=rf"PEFTCallback does not support strategy {strategy}; supported: SingleDeviceStrategy, DDPStrategy, "
        rf"PEFTFSDPStrategy, PEFTFSDP2Strategy, PEFTDeepSpeedStrategy \(by name: 'ddp', .*'peft_fsdp'.*\)\. {instead}",
    ):
        PEFTCallback("lora").check_strategy(FakeTrainer())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- gradient flow


class UnusedLayer(TinyLM):
    """A TinyLM with a Linear inside layer 1's MLP that the forward never calls (``sometimes``:
    called on odd batches only)."""

    def __init__(self, sometimes: bool = False, skip_first: bool = False) -> None:
        super().__init__()
        self.sometimes, self.skip_first = sometimes, skip_first
        self.model.model.layers[1].mlp.unused = torch.nn.Linear(32, 32)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self.skip_first and self.trainer.global_step == 0 and batch_idx == 0:
            return None  # no backward: this step says nothing about gradient flow
        loss = super().training_step(batch, batch_idx)
        if self.sometimes and batch_idx % 2 == 1:
            loss = loss + self.model.model.layers[1].mlp.unused(torch.ones(1, 32)).sum() * 0
        return loss


DEAD = "model.model.layers.1.mlp.unused (LoRALinear): lora_A, lora_B"
TARGETS = ["q_proj", "v_proj", "unused"]


def test_a_wrapped_layer_the_forward_never_calls_is_refused(tmp_path: Path) -> None:
    module = UnusedLayer()
    t = trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback("lora", r=4, target_modules=TARGETS, verbose=False)])
    with pytest.raises(RuntimeError) as err:
        t.fit(module, token_loader())
    message = str(err.value)
    assert message.startswith("PEFTCallback: 2 of the 10 trainable tensors of lora got no gradient in the first")
    assert f"\n  {DEAD}\n" in message
    assert "the forward never calls its module" in message and "exclude_modules" in message
    assert "on_dead_params='warn'" in message
    assert "q_proj" not in message.split("A tensor gets")[0]  # only the dead ones are listed
    assert t.global_step == 0  # before the step


def test_with_warn_training_goes_on(tmp_path: Path) -> None:
    module = UnusedLayer()
    callback = PEFTCallback("lora", r=4, target_modules=TARGETS, on_dead_params="warn", verbose=False)
    t = trainer(tmp_path, max_steps=3, callbacks=[callback])
    with pytest.warns(UserWarning, match=r"2 of the 10 trainable tensors of lora got no gradient") as record:
        t.fit(module, token_loader())
    assert t.global_step == 3
    assert sum("got no gradient" in str(w.message) for w in record) == 1  # once, at the first step
    assert DEAD in str(next(w.message for w in record if "got no gradient" in str(w.message)))
    q = module.model.model.layers[0].self_attn.q_proj
    assert q.lora_B.abs().sum() > 0  # the rest trained


def test_ignore_says_nothing(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    callback = PEFTCallback("lora", r=4, target_modules=TARGETS, on_dead_params="ignore", verbose=False)
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(UnusedLayer(), token_loader())
    assert not any("got no gradient" in str(w.message) for w in recwarn)


def test_the_check_follows_gradient_accumulation(tmp_path: Path) -> None:
    # The layer gets a gradient on odd batches only: a step after two batches has it.
    callback = PEFTCallback("lora", r=4, target_modules=TARGETS, verbose=False)
    t = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[callback])
    t.fit(UnusedLayer(sometimes=True), token_loader())
    assert t.global_step == 2
    # One batch per step: the first step has none.
    callback = PEFTCallback("lora", r=4, target_modules=TARGETS, verbose=False)
    with pytest.raises(RuntimeError, match=r"got no gradient"):
        trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(UnusedLayer(sometimes=True), token_loader())


def test_a_step_without_backward_is_not_judged(tmp_path: Path) -> None:
    # training_step returns None on the first batch: Lightning still calls the optimizer-step hook,
    # with no gradient anywhere. The check waits for a step that had a backward pass.
    callback = PEFTCallback("lora", r=4, verbose=False)
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(UnusedLayer(skip_first=True), token_loader())
    callback = PEFTCallback("lora", r=4, target_modules=TARGETS, verbose=False)
    with pytest.raises(RuntimeError, match=r"got no gradient"):
        trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(UnusedLayer(skip_first=True), token_loader())


def test_the_check_runs_again_after_resume(tmp_path: Path) -> None:
    warn = PEFTCallback("lora", r=4, target_modules=TARGETS, on_dead_params="warn", verbose=False)
    t = trainer(tmp_path, max_steps=1, callbacks=[warn])
    with pytest.warns(UserWarning, match=r"got no gradient"):
        t.fit(UnusedLayer(), token_loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    t = trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback("lora", r=4, target_modules=TARGETS, verbose=False)])
    with pytest.raises(RuntimeError, match=r"got no gradient"):
        t.fit(UnusedLayer(), token_loader(), ckpt_path=tmp_path / "a.ckpt")
    assert t.global_step == 1  # the first step after resuming


def test_without_grad_groups_tensors_by_module() -> None:
    module = UnusedLayer()
    lp.inject(module, "lora", r=2, target_modules=TARGETS)
    params = [p for _, p in state.adapter_parameters(module)]
    everything = PEFTCallback.without_grad(module, params)
    assert len(everything) == 5 and everything[DEAD.split(":")[0]] == ["lora_A", "lora_B"]
    for p in params:
        p.grad = torch.zeros_like(p)  # a zero gradient is a gradient
    assert PEFTCallback.without_grad(module, params) == {}
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert PEFTCallback.without_grad(plain, list(plain.parameters())) == {"0 (Linear)": ["weight", "bias"]}


@pytest.mark.parametrize("sharding", ["fsdp", "zero2"])
def test_the_check_is_skipped_where_gradients_are_flat(sharding: str, caplog: pytest.LogCaptureFixture) -> None:
    from lightning_peft.lightning.strategies import PEFTDeepSpeedStrategy, PEFTFSDPStrategy

    cls = {"fsdp": PEFTFSDPStrategy, "zero2": PEFTDeepSpeedStrategy}[sharding]
    strategy = cls.__new__(cls)
    strategy.config = {"zero_optimization": {"stage": 2}}

    class FakeTrainer:
        pass

    fake = FakeTrainer()
    fake.strategy = strategy  # type: ignore[attr-defined]
    module = UnusedLayer()
    lp.inject(module, "lora", r=2, target_modules=TARGETS)
    optimizer = torch.optim.SGD([p for _, p in state.adapter_parameters(module)], lr=0.1)  # no .grad anywhere
    with caplog.at_level(logging.DEBUG, logger="lightning.pytorch.utilities.rank_zero"):
        PEFTCallback("lora").check_gradients(fake, module, optimizer)  # type: ignore[arg-type]
    assert f"gradient-flow check skipped under {cls.__name__} ({sharding})" in caplog.text
    fake.strategy = L.pytorch.strategies.SingleDeviceStrategy()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match=r"10 of the 10 trainable tensors of lora got no gradient"):
        PEFTCallback("lora").check_gradients(fake, module, optimizer)  # type: ignore[arg-type]


def test_on_dead_params_is_validated() -> None:
    with pytest.raises(
        ValueError,
        match=r"PEFTCallback.on_dead_params must be one of 'raise', 'warn', 'ignore'; "
        r"got 'warning'",
    ):
        PEFTCallback("lora", on_dead_params="warning")  # type: ignore[arg-type]


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path: Path) -> None:
    """PEFTCallback(gradient_checkpointing=True): the layers recompute in backward, and the trained
    adapter equals the one trained without checkpointing (no dropout: nothing random to replay)."""

    def fit(checkpointing: bool) -> tuple[dict[str, torch.Tensor], TinyLM]:
        L.seed_everything(0)
        module = TinyLM()
        callback = PEFTCallback("lora", r=4, verbose=False, gradient_checkpointing=checkpointing)
        trainer(tmp_path / str(checkpointing), max_steps=3, callbacks=[callback]).fit(module, token_loader())
        return adapter(module), module

    plain, _ = fit(False)
    checkpointed, module = fit(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in module.modules())
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"PEFTCallback.gradient_checkpointing must be True or False; got 'yes'"):
        PEFTCallback("lora", gradient_checkpointing="yes")


class PlainLM(L.LightningModule):
    """No transformers model: embeddings, a ModuleList of residual MLP blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(tiny.VOCAB, 32)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(32, 64), torch.nn.Dropout(0.1), torch.nn.GELU(), torch.nn.Linear(64, 32)
            )
            for _ in range(3)
        )
        self.head = torch.nn.Linear(32, tiny.VOCAB)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return F.cross_entropy(self.head(hidden).flatten(0, 1), ids.flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_checkpoint_blocks_checkpoint_the_named_blocks_and_train_the_same_adapter(tmp_path: Path) -> None:
    """PEFTCallback(checkpoint_blocks=[...]) on a module that is not a transformers model (dropout replayed)."""
    from lightning_peft.core.checkpointing import checkpointed_blocks

    def fit(blocks: list[str] | None) -> tuple[dict[str, torch.Tensor], PlainLM]:
        L.seed_everything(0)
        module = PlainLM()
        callback = PEFTCallback(
            "lora",
            r=4,
            target_modules=r"blocks\.\d\.[03]",  # each block's two linear layers
            verbose=False,
            gradient_checkpointing=blocks is not None,
            checkpoint_blocks=blocks,
        )
        trainer(tmp_path / str(blocks), max_steps=3, callbacks=[callback]).fit(module, token_loader())
        return adapter(module), module

    plain, _ = fit(None)
    checkpointed, module = fit(["blocks"])
    assert checkpointed_blocks(module) == ["blocks.0", "blocks.1", "blocks.2"]
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"checkpoint_blocks=\['layers'\] names blocks .* gradient_checkpointing is False"
    ):
        PEFTCallback("lora", checkpoint_blocks=["layers"])


@pytest.mark.gpu
def test_lightnings_bitsandbytes_precision_is_refused_with_what_to_use_instead(tmp_path: Path) -> None:
    """On CUDA, where Lightning runs the plugin: refused before anything is injected, naming the options to use."""
    pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = TinyLM()
    t = trainer(
        tmp_path,
        accelerator="cuda",
        max_steps=1,
        plugins=[BitsandbytesPrecision("nf4")],
        callbacks=[PEFTCallback("lora")],
    )
    with pytest.raises(ValueError, match=r"BitsandbytesPrecision \(nf4\).*quantization='nf4'.*lightning_peft.quantize"):
        t.fit(module, token_loader())
    assert not lp.adapters(module)


def test_lightnings_bitsandbytes_precision_does_not_run_on_cpu(tmp_path: Path) -> None:
    """Without CUDA, Lightning itself refuses the plugin, with its own clear message (QLoRA on CPU: quantization=)."""
    pytest.importorskip("bitsandbytes", reason='needs bitsandbytes: pip install "lightning-peft[quant]"')
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    from lightning.pytorch.plugins import BitsandbytesPrecision

    with pytest.raises(RuntimeError, match="only supported on CUDA"):
        trainer(tmp_path, max_steps=1, plugins=[BitsandbytesPrecision("nf4")], callbacks=[PEFTCallback("lora")])
