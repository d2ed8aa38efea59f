"""README's "What loading checks" table is what lightning_peft says: each row's error is produced here
and matched against the row's text (``<...>`` and ``…`` stand for what varies), and every row has a case."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import lightning_peft as lp
from lightning_peft.api import io
from lightning_peft.lightning import strategies
from tests import tiny
from tests.core.test_io import _rewrite, _tamper, trained
from tests.interop.test_peft_format import _edit_config, _peft_adapter, _wider_llama
from tests.lightning.test_strategy_loading import _attached, _sharded
from tests.payload import Payload, poison

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _rows() -> dict[tuple[str, str], str]:
    start, end = "<!-- load-checks:start -->\n", "<!-- load-checks:end -->"
    assert README.count(start) == 1 and README.count(end) == 1
    header, rule, *lines = README.split(start)[1].split(end)[0].strip().splitlines()
    assert header == "| input | check | the error says |" and rule == "|---|---|---|"
    rows = {}
    for line in lines:
        what, check, says = (cell.strip() for cell in line.strip("|").split(" | "))
        rows[(what, check)] = says.strip("`")
    return rows


def _pattern(says: str) -> str:
    parts = re.split(r"<[^>]+>|…", says)
    return ".*?".join(re.escape(part) for part in parts)


def _adapter(tmp_path: Path, **options: Any) -> Path:
    return lp.save_adapter(trained(**options), tmp_path / "adapter")


def _record(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def run(tmp_path: Path) -> None:
        folder = _adapter(tmp_path)
        _rewrite(folder, change)
        lp.load_adapter(tiny.build("llama"), folder)

    return run


def _cut(tmp_path: Path, name: str, keep: int) -> Path:
    folder = _adapter(tmp_path)
    path = folder / name
    path.write_bytes(path.read_bytes()[:keep])
    return folder


def _tampered(change: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[Path], None]:
    def run(tmp_path: Path) -> None:
        folder = _adapter(tmp_path)
        _tamper(folder, change)
        lp.load_adapter(tiny.build("llama"), folder)

    return run


def _format_1(tmp_path: Path) -> None:
    source = trained()
    folder = lp.save_adapter(source, tmp_path / "v1")
    structure, checksums = lp.get_info(source).fingerprint.legacy
    old_base = {"model_type": "llama", "structure": structure, "checksums": checksums}
    _rewrite(folder, lambda r: r.update(format=1, base=old_base))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.load_adapter(tiny.build("llama"), folder)


def _other_architecture(tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    other = tiny.BUILDERS["llama"]("lm")
    other.model.layers = other.model.layers[:1]
    lp.load_adapter(other, folder)


def _dcp_metadata(tmp_path: Path) -> None:
    path = _sharded(tmp_path / "sharded.ckpt")
    (path / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "marker")))
    strategy, _ = _attached(strategies.PEFTFSDP2Strategy())
    strategy.load_checkpoint(path)


def _not_lightning(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    strategy, _ = _attached(strategies.PEFTFSDPStrategy())
    strategy.load_checkpoint(tmp_path / "list.ckpt")


def _no_record(tmp_path: Path) -> None:
    strategy, _ = _attached(strategies.PEFTFSDP2Strategy())
    strategy.load_checkpoint(_sharded(tmp_path / "bare.ckpt", record=False))


def _peft(change: Callable[[dict[str, Any]], Any] | None = None, **lora: Any) -> Callable[[Path], None]:
    def run(tmp_path: Path) -> None:
        if lora:
            theirs = peft.get_peft_model(tiny.build("llama"), peft.LoraConfig(target_modules=["q_proj"], **lora))
            theirs.save_pretrained(tmp_path / "p")
            folder = tmp_path / "p"
        else:
            folder = _peft_adapter(tmp_path)
        if change is not None:
            _edit_config(folder, change)
        lp.load_peft_adapter(tiny.build("llama"), folder)

    return run


def _peft_other_architecture(tmp_path: Path) -> None:
    other = tiny.BUILDERS["llama"]("lm")
    other.model.layers = other.model.layers[:1]
    lp.load_peft_adapter(other, _peft_adapter(tmp_path))


def _nan_option(tmp_path: Path) -> None:
    model = trained()
    lp.get_info(model).config.dropout = float("nan")
    lp.save_adapter(model, tmp_path / "out")


def _merged(tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    lp.load_adapter(lp.merge(lp.inject(tiny.build("llama"), "lora", r=4)), folder)


def _other_method(tmp_path: Path) -> None:
    sd = lp.trainable_state_dict(trained())
    sd._metadata[""]["lightning_peft"]["method"] = "ia3"
    lp.inject(tiny.build("llama"), "lora", r=4).load_state_dict(sd)


def _random_bytes(tmp_path: Path) -> None:
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(256)) * 8)
    lp.load_adapter(tiny.build("llama"), tmp_path / "noise.ckpt")


def _truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": lp.trainable_state_dict(trained())}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    lp.load_adapter(tiny.build("llama"), path)


CASES: dict[tuple[str, str], Callable[[Path], None]] = {
    ("checkpoint", "pickled object in a torch file"): lambda tmp: lp.load_adapter(
        tiny.build("llama"), poison(tmp / "evil.ckpt", tmp / "marker")
    ),
    ("checkpoint", "pickled object in DCP's `.metadata`"): _dcp_metadata,
    ("checkpoint", "truncated"): _truncated_checkpoint,
    ("checkpoint", "not a torch file"): _random_bytes,
    ("checkpoint", "not a Lightning checkpoint"): _not_lightning,
    ("checkpoint", "FSDP2 folder without a record"): _no_record,
    ("file", "missing"): lambda tmp: lp.load_adapter(
        tiny.build("llama"), (_adapter(tmp) / io.WEIGHTS_NAME).unlink() or tmp / "adapter"
    ),
    ("file", "truncated or foreign safetensors"): lambda tmp: lp.load_adapter(
        tiny.build("llama"), _cut(tmp, io.WEIGHTS_NAME, -10)
    ),
    ("file", "truncated JSON"): lambda tmp: lp.load_adapter(tiny.build("llama"), _cut(tmp, io.CONFIG_NAME, 300)),
    ("record", "unknown key"): _record(lambda r: r.update(bsae={})),
    ("record", "missing key"): _record(lambda r: r.pop("base")),
    ("record", "wrong type"): _record(lambda r: r.update(format="2")),
    ("record", "newer format"): _record(lambda r: r.update(format=99)),
    ("record", "format 1 (a warning)"): _format_1,
    ("record", "unknown method"): _record(lambda r: r.update(method="lorax")),
    ("record", "another method"): _other_method,
    ("record", "unknown option"): _record(lambda r: r["config"].update(rnak=4)),
    ("record", "other options"): lambda tmp: lp.load_adapter(
        lp.inject(tiny.build("llama"), "lora", r=8), _adapter(tmp)
    ),
    ("record", "another architecture"): _other_architecture,
    ("record", "another base, or a derivative of it"): lambda tmp: lp.load_adapter(
        tiny.build("llama", seed=1), _adapter(tmp)
    ),
    ("tensors", "missing"): _tampered(lambda t: t.pop("model.layers.1.self_attn.v_proj.lora_B")),
    ("tensors", "one the model lacks"): _tampered(
        lambda t: t.update({"model.layers.0.self_attn.k_proj.lora_A": torch.zeros(4, 32)})
    ),
    ("tensors", "another shape"): _tampered(
        lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 31)})
    ),
    ("tensors", "NaN or infinity"): _tampered(
        lambda t: t["model.layers.1.self_attn.v_proj.lora_B"].__setitem__((0, 0), float("nan"))
    ),
    ("tensors", "merged layers"): _merged,
    ("peft", "field peft does not have"): _peft(lambda c: c.update(lora_rnak=4)),
    ("peft", "field lightning_peft needs"): _peft(lambda c: c.pop("r")),
    ("peft", "option not implemented"): _peft(lambda c: c.update(layer_replication=[[0, 1]])),
    ("peft", "another architecture"): _peft_other_architecture,
    ("peft", "another hidden size"): lambda tmp: lp.load_peft_adapter(_wider_llama(), _peft_adapter(tmp)),
    ("save", "NaN or infinity in an option"): _nan_option,
}


def test_every_row_has_a_case() -> None:
    assert set(_rows()) == set(CASES)


@pytest.mark.parametrize("key", list(CASES), ids=[" / ".join(k) for k in CASES])
def test_the_row_says_what_lightning_peft_says(tmp_path: Path, key: tuple[str, str]) -> None:
    says = _rows()[key]
    with pytest.raises((ValueError, FileNotFoundError, UserWarning)) as caught:
        CASES[key](tmp_path)
    assert re.search(_pattern(says), str(caught.value), re.DOTALL), f"README: {says!r}\nactual: {caught.value}"
    assert not (tmp_path / "marker").exists()


def test_placeholders_stand_for_what_varies_only() -> None:
    assert _pattern("a <file> b … c") == "a\\ .*?\\ b\\ .*?\\ c"
    assert re.search(_pattern("x <n> of <m> y"), "x 3 of 21 y")
    assert not re.search(_pattern("x <n> of <m> y"), "x 3 from 21 y")
