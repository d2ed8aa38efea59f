"""EVA's rank redistribution (rho > 1) in a Trainer: the optimizer holds the resized tensors, a fit
resumes exactly from a mid-run checkpoint, and the peft folders beside the checkpoints load in peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_peft import PEFTCallback
from lightning_peft.core import state
from tests import tiny
from tests.interop.parity import assert_parity
from tests.lightning.modules import TinyLM, fit_stop_resume, token_loader, trainer

#: peft's default rho=2: o_proj/down_proj of the tiny LLaMA at r=2 get ranks 3, 1, 4 and 0 on these batches.
OPTIONS = {"target_modules": ["o_proj", "down_proj"], "r": 2, "alpha": 8, "init": "eva", "eva_config": {"tau": 0.9}}
RANKS = {"model.layers.0.self_attn.o_proj": 3, "model.layers.0.mlp.down_proj": 1, "model.layers.1.self_attn.o_proj": 4}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_redistributing_fit_resumes_exactly_and_its_peft_folders_load(tmp_path: Path) -> None:
    """Two param groups (their own weight decay and lr) and a StepLR: after the calibration at train
    start the optimizer holds exactly the resized A/B (the dead-tensor check passes: each got a
    gradient), in the groups they were in, with the groups' options and the schedule as before."""
    peft = pytest.importorskip("peft")
    full, resumed, last = fit_stop_resume(
        tmp_path, lambda: TinyLM(param_groups=True), lambda: token_loader(n=8, shuffle=False), OPTIONS
    )
    for module in (full, resumed):  # calibrated (straight) and adopted from the checkpoint's record (resumed)
        config = state.require_info(module).config
        assert config.rank_pattern == RANKS  # names inside the transformers model, as peft writes them
        assert "model.model.layers.1.mlp.down_proj" not in dict(state.adapter_modules(module))
        optimizer = module.trainer.optimizers[0]
        trainable = {id(p) for p in module.parameters() if p.requires_grad}
        held = [p for group in optimizer.param_groups for p in group["params"]]
        assert len(held) == len(trainable) == 2 * len(RANKS) and {id(p) for p in held} == trainable
        decay, no_decay = optimizer.param_groups
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
        assert all(
            n.endswith("lora_B") for n, p in module.named_parameters() if any(p is q for q in no_decay["params"])
        )
        # StepLR(step_size=2, gamma=0.5) after 4 steps: each group's own lr, halved twice
        assert (decay["lr"], no_decay["lr"]) == pytest.approx((1e-2 / 4, 5e-3 / 4))
        assert module.trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    # A later stage with the same options (the user's r) takes the calibrated adapter as the same one.
    check = trainer(tmp_path / "validate", callbacks=[PEFTCallback("lora", verbose=False, **OPTIONS)])
    check.validate(resumed, token_loader(n=4, shuffle=False))
    assert state.require_info(resumed).config.rank_pattern == RANKS
    folder = last.with_suffix(".peft")
    assert folder.is_dir()
    ids = token_loader(n=4, shuffle=False).dataset.tensors[0]
    theirs = peft.PeftModel.from_pretrained(tiny.build("llama", seed=0), folder).eval()
    resumed.model.eval()
    with torch.no_grad():
        assert_parity(theirs(input_ids=ids).logits, resumed.model(input_ids=ids).logits, "peft loading last.peft")


def test_swapping_refuses_an_optimizer_with_state_for_the_old_tensors() -> None:
    old, kept, new = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    optimizer = torch.optim.AdamW([{"params": [old, kept], "lr": 0.5}])
    assert PEFTCallback.swap_parameters(optimizer, {id(old): new}) == 1
    assert optimizer.param_groups[0]["params"] == [new, kept] and optimizer.param_groups[0]["lr"] == 0.5
    assert PEFTCallback.swap_parameters(optimizer, {id(new): None}) == 1
    assert optimizer.param_groups[0]["params"] == [kept]
    kept.grad = torch.ones(2)
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"already holds state for 1 of the old ones"):
        PEFTCallback.swap_parameters(optimizer, {id(kept): new})
    assert optimizer.param_groups[0]["params"] == [kept]
