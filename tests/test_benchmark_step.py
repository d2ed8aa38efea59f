"""The step benchmark's modes all set up and step on a tiny model, per process and paired (no timings checked)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("peft")

from benchmarks import step  # noqa: E402


@pytest.fixture
def tiny_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    small = dict(step.MODEL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    monkeypatch.setattr(step, "MODEL", small | {"num_key_value_heads": 4, "vocab_size": 64})
    monkeypatch.setattr(step, "BATCH", 2)
    monkeypatch.setattr(step, "SEQ", 8)


@pytest.mark.parametrize("mode", [m for m in step.modes() if not m.endswith("_trainer")])
def test_every_mode_sets_up_and_trains(tiny_bench: None, mode: str) -> None:
    import torch

    run = step.prepare(mode, step._build_model(torch.float32).train(), step._batch())
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    run.step()
    run.step()
    assert (run.optimizer is None) == (mode == "floor") and (not before) == (mode == "floor")
    changed = [n for n, p in run.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed or mode == "floor", f"{mode}: no trainable tensor changed in two steps"


def test_paired_reports_every_mode_and_its_ratios(tiny_bench: None) -> None:
    modes = ["floor", "peft_lora", "lp_lora"]
    result = step.run_paired(modes, warmup=1, steps=3, dtype_name="float32")
    assert list(result["modes"]) == modes and all(len(result["times"][m]) == 3 for m in modes)
    assert set(result["modes"]["lp_lora"]) == {"step_s", "x_floor", "x_peft_lora"}
    assert "x_floor" not in result["modes"]["floor"] and "x_peft_lora" not in result["modes"]["peft_lora"]
    lp, floor = result["times"]["lp_lora"], result["times"]["floor"]
    assert math.isclose(result["modes"]["lp_lora"]["x_floor"], sorted(a / b for a, b in zip(lp, floor, strict=True))[1])
    assert "| lp_lora |" in step.paired_table(result)


def test_the_paired_command_writes_its_table(tiny_bench: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step, "RESULTS", tmp_path)
    text = step.main(["paired", "--modes", "floor", "lp_lora", "--steps", "2", "--warmup", "0", "--name", "t"])
    assert (tmp_path / "t-paired-cpu.md").read_text() == text
    assert "| lp_lora |" in text and (tmp_path / "t-paired-cpu.json").exists()
    with pytest.raises(SystemExit, match="lp_lora_trainer"):
        step.main(["paired", "--modes", "lp_lora_trainer"])
