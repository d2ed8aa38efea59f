"""AdaLoRA: parity with peft (forward, penalty, allocation), the budget schedule, the rank pattern."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.core import state
from lightning_peft.methods import adalora
from lightning_peft.methods.adalora import AdaLoRAConfig, SVDLinear
from tests import tiny


def _peft_model(ours: nn.Module, arch: str, **options: object) -> nn.Module:
    """peft's AdaLoRA on the same base and targets as ``ours``, with ``ours``' adapter weights."""
    config = lp.get_info(ours).config
    reference = peft.get_peft_model(
        tiny.build(arch),
        peft.AdaLoraConfig(
            init_r=config.init_r,
            target_r=config.target_r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            tinit=config.tinit,
            tfinal=config.tfinal,
            deltaT=config.delta_t,
            orth_reg_weight=config.orth_reg_weight,
            total_step=config.total_step,
            target_modules=config.target_modules,
            **options,
        ),
    )
    targets = dict(reference.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in state.adapter_parameters(ours):
            module, _, local = name.rpartition(".")  # lora_A / lora_E / lora_B: peft's names too
            key = f"base_model.model.{module}.{local}.default"
            targets[key].copy_(param.reshape(targets[key].shape))
            copied += 1
    assert copied == 3 * len(adalora.svd_layers(ours))
    return reference


def _randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in state.adapter_parameters(model):
            param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * std)


def _labels(arch: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = "decoder_input_ids" if tiny.FAMILIES[arch] == "seq2seq" else "input_ids"
    return batch | {"labels": batch[key]}


@pytest.mark.parametrize("arch", tiny.PARITY_ARCHS)
def test_parity_with_peft(arch: str) -> None:
    ours = lp.inject(tiny.build(arch), "adalora", init_r=4, target_r=2, alpha=8, dropout=0.1, total_step=10)
    _randomize(ours)
    reference = _peft_model(ours, arch).eval()
    batch = tiny.inputs(arch)
    # peft divides by (init_r + 1e-5) where we divide by init_r: a relative 2.5e-6 of the update.
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(reference, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", tiny.PARITY_ARCHS)
def test_orthogonality_penalty_matches_peft(arch: str) -> None:
    """peft adds the penalty to ``outputs.loss`` in its forward; we return it from the hook."""
    ours = lp.inject(tiny.build(arch), "adalora", init_r=4, target_r=2, orth_reg_weight=0.3, total_step=10)
    _randomize(ours, seed=1)
    reference = _peft_model(ours, arch).eval()
    batch = _labels(arch, tiny.inputs(arch))
    ours_loss = ours.eval()(**batch).loss + lp.regularization(ours)
    # PeftModel.forward calls the transformers model directly; AdaLoraModel.forward adds the penalty.
    torch.testing.assert_close(ours_loss, reference.base_model(**batch).loss, rtol=0, atol=1e-5)


def test_orthogonality_penalty_follows_the_formula() -> None:
    """R = w * mean over the 2n matrices of ||Q Q^T - I||_F and ||P^T P - I||_F."""
    model = lp.inject(tiny.build("llama"), "adalora", init_r=3, target_r=2, orth_reg_weight=0.7)
    _randomize(model)
    layers = [layer for _, layer in adalora.svd_layers(model)]
    terms = []
    for layer in layers:
        q, p = layer.lora_A.detach(), layer.lora_B.detach()  # Q: r x in, P: out x r
        terms.append(torch.sqrt(((q @ q.T - torch.eye(3)) ** 2).sum()))
        terms.append(torch.sqrt(((p.T @ p - torch.eye(3)) ** 2).sum()))
    torch.testing.assert_close(lp.regularization(model), 0.7 * sum(terms) / (2 * len(layers)))
    assert lp.regularization(lp.inject(tiny.build("llama"), "adalora", orth_reg_weight=0.0)) is None


def test_linear_follows_the_formula() -> None:
    """h = W x + b + (alpha / init_r) P diag(lambda) Q x."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = SVDLinear(copy.deepcopy(base), AdaLoRAConfig(init_r=3, target_r=2, alpha=6))
    assert torch.count_nonzero(layer.lora_E) == 0  # lambda = 0: the model starts unchanged
    nn.init.normal_(layer.lora_E)
    x = torch.randn(4, 7, 6)
    p, lam, q = layer.lora_B, layer.lora_E, layer.lora_A
    expected = x @ base.weight.T + base.bias + (6 / 3) * (x @ q.T @ torch.diag(lam) @ p.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def _train(
    model: nn.Module, arch: str, steps: int, *, total_steps: int | None = None, lr: float = 0.05, seed: int = 0
) -> list[dict[str, int]]:
    """A plain PyTorch loop driving the hooks; returns the rank pattern after every step."""
    optimizer = torch.optim.AdamW([p for _, p in state.adapter_parameters(model)], lr=lr)
    patterns = []
    model.train()
    for step in range(1, steps + 1):
        batch = _labels(arch, tiny.inputs(arch, batch=4, seed=seed + step))
        loss = model(**batch).loss
        penalty = lp.regularization(model)
        if penalty is not None:
            loss = loss + penalty
        loss.backward()
        optimizer.step()
        lp.on_step(model, step, total_steps)
        optimizer.zero_grad()
        patterns.append(adalora.rank_pattern(model))
    return patterns


def test_budget_follows_the_cubic_schedule() -> None:
    """The total number of kept triplets at each step, against the paper's schedule written out here."""
    T, tinit, tfinal, delta_t, init_r, target_r = 16, 2, 3, 2, 6, 2
    model = lp.inject(
        tiny.build("llama"),
        "adalora",
        init_r=init_r,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        delta_t=delta_t,
        total_step=T,
    )
    n = len(adalora.svd_layers(model))  # q_proj, v_proj in 2 layers
    assert n == 4
    b0, bT = init_r * n, target_r * n

    def scheduled(t: int) -> int:  # b(t) of the paper, floored to whole triplets
        if t <= tinit:
            return b0
        if t >= T - tfinal:
            return bT
        return math.floor(bT + (b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit)) ** 3)

    def allocates(t: int) -> bool:  # every delta_t steps of the budgeting phase, and at T - tfinal
        return (tinit < t < T - tfinal and t % delta_t == 0) or t == T - tfinal

    patterns = _train(model, "llama", T + 1)
    for t, pattern in enumerate(patterns, start=1):
        last = max((s for s in range(1, t + 1) if allocates(s)), default=None)
        expected = b0 if last is None else scheduled(last)
        assert sum(pattern.values()) == expected, f"step {t}: kept {sum(pattern.values())}, schedule says {expected}"
        assert adalora.budget(lp.get_info(model).config, t, T, n) == scheduled(t)
    # Chosen steps, by hand: warm-up, the first cut, mid-way, the final phase.
    kept = {t: sum(p.values()) for t, p in enumerate(patterns, start=1)}
    assert (kept[2], kept[3], kept[4], kept[9], kept[13], kept[17]) == (24, 24, 16, 9, 8, 8)
    # Pruned singular values are exactly zero, and stay zero through the final phase.
    for _, layer in adalora.svd_layers(model):
        assert torch.all(layer.lora_E[~layer.rank_mask] == 0)
    # The allocation is adaptive: layers end with different ranks although the budget is uniform.
    assert len(set(patterns[-1].values())) > 1


def test_allocation_matches_peft() -> None:
    """Same weights and gradients: the same importance scores, budget and pruned triplets as peft."""
    T, tinit, tfinal = 12, 2, 3
    ours = lp.inject(
        tiny.build("llama").double(),  # the importance ranking is then far from float rounding
        "adalora",
        init_r=4,
        target_r=2,
        tinit=tinit,
        tfinal=tfinal,
        total_step=T,
        orth_reg_weight=0.2,
    )
    _randomize(ours, seed=4, std=0.1)
    reference = _peft_model(ours, "llama")
    reference.double()
    ours_opt = torch.optim.SGD([p for _, p in state.adapter_parameters(ours)], lr=0.5)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    ours.train(), reference.train()
    for step in range(1, T - tfinal):  # peft finalizes one step differently (see the module doc)
        batch = _labels("llama", tiny.inputs("llama", batch=4, seed=step))
        (ours(**batch).loss + lp.regularization(ours)).backward()
        reference.base_model(**batch).loss.backward()  # AdaLoraModel.forward adds the penalty
        ours_opt.step(), ref_opt.step()
        lp.on_step(ours, step, T)
        reference.base_model.update_and_allocate(step)
        ours_opt.zero_grad(), ref_opt.zero_grad()
        ref_params = dict(reference.named_parameters())
        for name, layer in adalora.svd_layers(ours):
            ref_e = ref_params[f"base_model.model.{name}.lora_E.default"].reshape(-1)
            assert torch.equal(layer.lora_E == 0, ref_e == 0), f"step {step}: {name} pruned other triplets"
            # Close, not equal: transformers computes the loss in float32, and peft scales by
            # alpha / (init_r + 1e-5) where we scale by alpha / init_r.
            torch.testing.assert_close(layer.lora_E, ref_e, rtol=0, atol=1e-6)
    assert sum(adalora.rank_pattern(ours).values()) < 4 * 4  # something was pruned


def test_rank_pattern_is_saved_with_the_adapter_and_restored(tmp_path: Path) -> None:
    model = lp.inject(tiny.build("llama"), "adalora", init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8)
    _train(model, "llama", 8)
    pattern = adalora.rank_pattern(model)
    assert sum(pattern.values()) == 2 * 4 and pattern != dict.fromkeys(pattern, 2)
    lp.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"lora_A", "lora_E", "lora_B", "rank_mask"}  # no statistics
    loaded = lp.load_adapter(tiny.build("llama"), tmp_path / "adapter")
    assert adalora.rank_pattern(loaded) == pattern
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(loaded, batch), tiny.logits(model.eval(), batch), rtol=0, atol=0)
    # A checkpoint (the trainable state dict) also carries the importance statistics, for resuming.
    checkpoint = lp.trainable_state_dict(model)
    stats = [k for k in checkpoint if ".sensitivity_" in k or ".uncertainty_" in k]
    assert len(stats) == 6 * 4 and any(checkpoint[k].abs().sum() > 0 for k in stats)
    resumed = lp.inject(tiny.build("llama"), "adalora", init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8)
    resumed.load_state_dict(checkpoint)
    for name, tensor in state.training_state(resumed):
        assert torch.equal(tensor, checkpoint[name]), name


def test_final_phase_keeps_pruned_triplets_at_zero() -> None:
    model = lp.inject(tiny.build("gpt2"), "adalora", init_r=4, target_r=1, tfinal=2, total_step=4)
    patterns = _train(model, "gpt2", 6, lr=0.1)
    assert all(p == patterns[1] for p in patterns[1:])  # fixed from T - tfinal = 2 on
    for _, layer in adalora.svd_layers(model):
        assert int(layer.rank_mask.sum()) == int(torch.count_nonzero(layer.lora_E))


def test_total_steps_come_from_the_loop_when_not_configured() -> None:
    model = lp.inject(tiny.build("llama"), "adalora", init_r=4, target_r=2)
    patterns = _train(model, "llama", 4, total_steps=4)
    assert sum(patterns[-1].values()) == 2 * 4
    with pytest.raises(ValueError, match=r"adalora needs the number of training steps .* set AdaLoRAConfig.total_step"):
        _train(lp.inject(tiny.build("llama"), "adalora"), "llama", 1)
    with pytest.raises(
        ValueError,
        match=r"AdaLoRAConfig.tinit \+ tfinal must be smaller than the number of training steps \(total_steps=5\).*"
        r"got tinit=3, tfinal=2",
    ):
        _train(lp.inject(tiny.build("llama"), "adalora", tinit=3, tfinal=2), "llama", 1, total_steps=5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_r": 16, "init_r": 12}, r"AdaLoRAConfig.target_r must be at most init_r \(12\); got 16"),
        ({"init_r": 0}, r"AdaLoRAConfig.init_r must be a positive integer; got 0"),
        ({"target_r": 1.5}, r"AdaLoRAConfig.target_r must be a positive integer; got 1.5"),
        (
            {"tinit": 6, "tfinal": 4, "total_step": 10},
            r"AdaLoRAConfig.tinit \+ tfinal must be smaller than the number of training steps \(total_step=10\), "
            r"so that the budget has steps to fall from init_r to target_r; got tinit=6, tfinal=4",
        ),
        ({"tinit": -1}, r"AdaLoRAConfig.tinit must be a non-negative integer; got -1"),
        ({"tfinal": 2.0}, r"AdaLoRAConfig.tfinal must be a non-negative integer; got 2.0"),
        ({"delta_t": 0}, r"AdaLoRAConfig.delta_t must be a positive integer; got 0"),
        ({"beta1": 1.0}, r"AdaLoRAConfig.beta1 must be a number in \(0, 1\); got 1.0"),
        ({"beta2": 0}, r"AdaLoRAConfig.beta2 must be a number in \(0, 1\); got 0"),
        ({"orth_reg_weight": -0.1}, r"AdaLoRAConfig.orth_reg_weight must be a number >= 0; got -0.1"),
        ({"total_step": 0}, r"AdaLoRAConfig.total_step must be a positive integer; got 0"),
        ({"alpha": 0}, r"AdaLoRAConfig.alpha must be a positive number; got 0"),
        ({"dropout": 1.0}, r"AdaLoRAConfig.dropout must be a number in \[0, 1\); got 1.0"),
    ],
)
def test_invalid_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaLoRAConfig(**options)


def test_only_linear_layers_are_wrapped() -> None:
    with pytest.raises(TypeError, match=r"selected 'model.embed_tokens': it is a Embedding, which adalora cannot wrap"):
        lp.inject(tiny.build("llama"), "adalora", target_modules=["embed_tokens"])
