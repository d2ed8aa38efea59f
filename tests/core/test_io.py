"""Adapter files and the file helpers under them: every truncated, corrupt or tampered file is refused
with the file and the problem named, a refused load leaves the model as it was, and saves are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.api import io
from lightning_peft.core import files, state
from tests import tiny
from tests.payload import Payload, poison
from tests.peft_reference import randomize_adapter

ROOT = Path(__file__).resolve().parents[2]


def trained(arch: str = "llama", seed: int = 0, **options: Any) -> nn.Module:
    model = lp.inject(tiny.build(arch, seed=seed), "lora", **({"r": 4} | options))
    randomize_adapter(model)
    return model


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was: tensors, trainable flags, module types, record."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "info": lp.get_info(model),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["info"] is before["info"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), f"{name} changed"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return lp.save_adapter(trained(), tmp_path / "adapter")


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / io.CONFIG_NAME).read_text())


def _rewrite(folder: Path, change: Any) -> None:
    config = _config(folder)
    change(config[state.METADATA_KEY])
    (folder / io.CONFIG_NAME).write_text(json.dumps(config))


# --------------------------------------------------------------------------- torch files


def test_a_pickled_payload_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = poison(tmp_path / "evil.ckpt", marker)
    with pytest.raises(
        files.FileContentError,
        match=r"evil\.ckpt is not a plain-tensor checkpoint: it holds a pickled "
        r"Python object \(tests\.payload\._touch\).*never unpickles",
    ):
        files.load_torch(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("keep", "problem"),
    [
        (0.0, r"truncated or corrupt \(EOFError\)"),
        (0.5, r"truncated or corrupt \(PytorchStreamReader failed reading zip archive: failed finding central"),
        (None, r"truncated or corrupt \(\[Errno 22\] Invalid argument\)"),
    ],
    ids=["empty", "half", "errno22"],
)
def test_a_truncated_checkpoint_is_named(tmp_path: Path, keep: float | None, problem: str) -> None:
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"a": torch.randn(1000)}, "x": 1}, whole)
    data = whole.read_bytes()
    if keep is None:  # the lengths at which torch's reader fails with errno 22 (an mmap past the end)
        lengths = [n for n in range(0, len(data), 97) if n > len(data) // 2]
    else:
        lengths = [int(len(data) * keep)]
    cut = tmp_path / "cut.ckpt"
    for length in lengths:
        cut.write_bytes(data[:length])
        try:
            torch.load(cut, weights_only=True)
        except OSError:
            break
        except Exception:
            continue
    with pytest.raises(files.FileContentError, match=rf"cut\.ckpt is {problem}.*copy this one again"):
        files.load_torch(cut)


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "noise.ckpt"
    path.write_bytes(
        torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(
        files.FileContentError, match=r"noise\.ckpt is not a plain-tensor checkpoint \(torch's weights-only"
    ):
        files.load_torch(path)


def test_a_missing_checkpoint_or_a_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint file .*nothing\.ckpt is missing"):
        files.load_torch(tmp_path / "nothing.ckpt")
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a checkpoint file"):
        files.load_torch(tmp_path)


def test_allowed_data_classes_load_and_nothing_else(tmp_path: Path) -> None:
    from collections import namedtuple

    torch.save({"t": torch.ones(1), "n": 3}, tmp_path / "plain.pt")
    assert files.load_torch(tmp_path / "plain.pt")["n"] == 3
    marker = tmp_path / "marker"
    poison(tmp_path / "evil.pt", marker)
    with pytest.raises(files.FileContentError, match="pickled Python object"):
        files.load_torch(tmp_path / "evil.pt", allow=[namedtuple("Point", "x")])  # allowing one class allows no other
    assert not marker.exists()


def test_unpickle_plain_refuses_what_is_not_allowed(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "marker"
    (tmp_path / "evil").write_bytes(pickle.dumps({"a": Payload(marker)}))
    with pytest.raises(
        files.FileContentError,
        match=r"evil is not a plain-tensor checkpoint file: it holds a pickled tests\.payload\._touch",
    ):
        files.unpickle_plain(tmp_path / "evil", lambda module, name, found: False)
    assert not marker.exists()
    (tmp_path / "ok").write_bytes(pickle.dumps({"size": torch.Size([2, 3])}))
    assert files.unpickle_plain(tmp_path / "ok", lambda m, n, f: (m, n) == ("torch", "Size")) == {
        "size": torch.Size([2, 3])
    }
    (tmp_path / "cut").write_bytes(pickle.dumps({"a": list(range(100))})[:20])
    with pytest.raises(files.FileContentError, match="cut is truncated or corrupt"):
        files.unpickle_plain(tmp_path / "cut", lambda m, n, f: True)


# --------------------------------------------------------------------------- safetensors and JSON


def test_a_truncated_weights_file_is_named(folder: Path) -> None:
    weights = folder / io.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(
        files.FileContentError,
        match=r"adapter_model\.safetensors is not a readable safetensors file "
        r"\(Error while deserializing header: incomplete metadata.*truncated",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_random_bytes_as_weights_are_named(folder: Path) -> None:
    (folder / io.WEIGHTS_NAME).write_bytes(b"\xff" * 64)
    with pytest.raises(
        files.FileContentError,
        match=r"adapter_model\.safetensors is not a readable safetensors file "
        r"\(Error while deserializing header: header too large",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_a_truncated_config_names_the_line(folder: Path) -> None:
    config = folder / io.CONFIG_NAME
    config.write_text(config.read_text()[:300])
    with pytest.raises(
        files.FileContentError,
        match=r"adapter_config\.json is not valid JSON \(.* at line \d+, column \d+\).*truncated",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_a_config_that_is_not_utf8_is_named(folder: Path) -> None:
    (folder / io.CONFIG_NAME).write_bytes(b'{"\xff": 1}')
    with pytest.raises(files.FileContentError, match=r"adapter_config\.json is not UTF-8 text"):
        lp.load_adapter(tiny.build("llama"), folder)


def test_written_json_is_standard_and_non_finite_values_are_refused(tmp_path: Path) -> None:
    # BERT has integer buffers (position ids): format 1 wrote their checksum as a bare NaN.
    folder = lp.save_adapter(trained("bert"), tmp_path / "bert")

    def refuse(constant: str) -> None:
        raise AssertionError(f"adapter_config.json holds {constant}, which is not JSON")

    json.loads((folder / io.CONFIG_NAME).read_text(), parse_constant=refuse)
    with pytest.raises(ValueError, match=r"cannot write .*x\.json: a\.b\[1\]=nan is not a finite number"):
        files.write_json(tmp_path / "x.json", {"a": {"b": [1.0, float("nan")]}})
    assert not (tmp_path / "x.json").exists()


def test_save_adapter_refuses_a_non_finite_option_and_writes_nothing(tmp_path: Path) -> None:
    model = trained()
    lp.get_info(model).config.dropout = float("nan")  # past validation, as a bug elsewhere might
    with pytest.raises(ValueError, match=r"lightning_peft\.config\.dropout=nan is not a finite number"):
        lp.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize("key", ["format", "method", "config", "base_path", "base"])
def test_a_record_missing_a_key_names_it(folder: Path, key: str) -> None:
    _rewrite(folder, lambda record: record.pop(key))
    with pytest.raises(
        ValueError,
        match=rf"adapter_config\.json carries a malformed lightning_peft record: it lacks "
        rf"'{key}'",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_an_unknown_record_key_is_refused_by_name(folder: Path) -> None:
    _rewrite(folder, lambda record: record.update(bsae={}))
    with pytest.raises(ValueError, match=r"unknown key 'bsae' \(did you mean 'base'\?\)"):
        lp.load_adapter(tiny.build("llama"), folder)


def test_an_unknown_top_level_key_is_refused(folder: Path) -> None:
    config = _config(folder) | {"extra": 1}
    (folder / io.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config\.json has unknown top-level key\(s\) 'extra'"):
        lp.load_adapter(tiny.build("llama"), folder)


def test_an_unknown_option_is_refused_by_name(folder: Path) -> None:
    _rewrite(folder, lambda record: record["config"].update(rnak=4))
    with pytest.raises(
        ValueError,
        match=r"records options this lightning_peft cannot use: LoRAConfig has no "
        r"option\(s\) 'rnak'",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_an_unknown_method_is_refused_naming_the_file(folder: Path) -> None:
    _rewrite(folder, lambda record: record.update(method="lorax"))
    with pytest.raises(
        ValueError,
        match=r"adapter holds an adapter of a method this lightning_peft does "
        r"not have: method must be one of .*got 'lorax'",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_a_newer_format_is_refused(folder: Path) -> None:
    _rewrite(folder, lambda record: record.update(format=99))
    with pytest.raises(
        ValueError,
        match=r"written in record format 99 by a newer lightning_peft; this version "
        r"\(.*\) reads formats 1 to 2\. Upgrade",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(format="2"), r"format must be a positive integer; got '2'"),
        (lambda r: r.update(format=0), r"format must be a positive integer; got 0"),
        (lambda r: r.update(method=3), r"method must be a str; got '3'"),
        (lambda r: r["base"].update(structur="x"), r"unknown key base\.structur \(did you mean 'structure'\?\)"),
        (lambda r: r["base"].pop("samples"), r"it lacks base\.samples"),
        (lambda r: r["base"]["samples"].__setitem__(0, "float32:%%%"), r"base\.samples\[0\] is not a sample"),
        (lambda r: r["base"]["samples"].__setitem__(0, "int8:AAAAAA=="), r"does not start with a floating-point dtype"),
    ],
    ids=["format-str", "format-0", "method-type", "base-key", "base-missing", "sample-b64", "sample-dtype"],
)
def test_a_malformed_record_names_the_field(folder: Path, change: Any, message: str) -> None:
    _rewrite(folder, change)
    with pytest.raises(ValueError, match=message):
        lp.load_adapter(tiny.build("llama"), folder)


# --------------------------------------------------------------------------- tensors, all or nothing


def _tamper(folder: Path, change: Any) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / io.WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / io.WEIGHTS_NAME)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_tensor_is_refused_by_name(folder: Path, value: float) -> None:
    _tamper(folder, lambda t: t["model.layers.1.self_attn.v_proj.lora_B"].__setitem__((0, 0), value))
    bare = tiny.build("llama")
    before = snapshot(bare)
    with pytest.raises(
        ValueError,
        match=r"holds non-finite values \(NaN or infinity\) in adapter tensor\(s\) "
        r"model\.layers\.1\.self_attn\.v_proj\.lora_B \(1 of 64 values\)",
    ):
        lp.load_adapter(bare, folder)
    assert_unchanged(bare, before)


def test_a_tensor_of_another_shape_is_named_with_both_shapes(folder: Path) -> None:
    _tamper(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 31)}))
    with pytest.raises(
        ValueError,
        match=r"does not fit this model's adapter: model\.layers\.0\.self_attn\.q_proj\."
        r"lora_A is \(4, 31\) there, \(4, 32\) here",
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_a_tensor_the_model_lacks_is_refused(folder: Path) -> None:
    _tamper(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.lora_A": torch.zeros(4, 32)}))
    with pytest.raises(
        ValueError, match=r"holds tensors this model does not have: model\.layers\.0\.self_attn\.k_proj"
    ):
        lp.load_adapter(tiny.build("llama"), folder)


def test_a_failed_load_leaves_the_model_as_it_was_and_a_retry_works(tmp_path: Path) -> None:
    other_base = lp.save_adapter(trained(seed=1), tmp_path / "other")
    right = lp.save_adapter(trained(seed=0), tmp_path / "right")
    model = tiny.build("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # flags are restored as they were, too
    before = snapshot(model)
    with pytest.raises(ValueError, match="another base model of the same architecture"):
        lp.load_adapter(model, other_base)
    assert_unchanged(model, before)
    lp.load_adapter(model, right)  # no "already has 'lora' injected"
    expected = dict(state.adapter_state(trained(seed=0)))
    for name, tensor in state.adapter_state(model):
        assert torch.equal(tensor, expected[name]), name


def test_a_failed_load_into_an_injected_model_changes_no_adapter_tensor(folder: Path) -> None:
    model = lp.inject(tiny.build("llama"), "lora", r=4)
    _tamper(folder, lambda t: t["model.layers.1.self_attn.q_proj.lora_A"].__setitem__((0, 0), float("nan")))
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        lp.load_adapter(model, folder)
    assert_unchanged(model, before)


def test_a_checkpoint_with_a_payload_is_refused_and_the_model_untouched(tmp_path: Path) -> None:
    source = trained()
    marker = tmp_path / "marker"
    path = poison(tmp_path / "evil.ckpt", marker, {"state_dict": lp.trainable_state_dict(source)})
    model = tiny.build("llama")
    before = snapshot(model)
    with pytest.raises(files.FileContentError, match="is not a plain-tensor checkpoint"):
        lp.load_adapter(model, path)
    assert not marker.exists()
    assert_unchanged(model, before)


def test_a_truncated_lightning_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": lp.trainable_state_dict(trained())}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(files.FileContentError, match=r"last\.ckpt is truncated or corrupt"):
        lp.load_adapter(tiny.build("llama"), path)


def test_a_format_1_record_loads_with_its_old_check_and_a_warning(tmp_path: Path) -> None:
    source = trained()
    folder = lp.save_adapter(source, tmp_path / "v1")
    structure, checksums = lp.get_info(source).fingerprint.legacy
    old_base = {"model_type": "llama", "structure": structure, "checksums": checksums}
    _rewrite(folder, lambda r: r.update(format=1, base=old_base))
    with pytest.warns(UserWarning, match=r"format-1 lightning_peft record.*cannot tell a fine-tuned derivative"):
        loaded = lp.load_adapter(tiny.build("llama"), folder)
    for (name, a), (_, b) in zip(state.adapter_state(loaded), state.adapter_state(source), strict=True):
        assert torch.equal(a, b), name
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="another base model of the same architecture"):
        lp.load_adapter(tiny.build("llama", seed=3), folder)


# --------------------------------------------------------------------------- atomic writes


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    files.atomic_write(target, b"old")

    def fail(handle: Any) -> None:
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from lightning_peft.core import files
target, ready, named = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "named"
if named:  # as on a filesystem without unnamed files
    files._NO_UNNAMED.add(os.stat(target.parent).st_dev)
def slow(handle):
    handle.write(b"new" * 100000)
    handle.flush()
    ready.write_text("writing")
    time.sleep(120)
files.atomic_write(target, slow)
"""


def _kill_while_writing(tmp_path: Path, named: bool, script: str = _KILLED_WRITER) -> tuple[Path, Path]:
    folder, scratch = tmp_path / "out", tmp_path / "tmpdir"
    folder.mkdir()
    scratch.mkdir()
    target, ready = folder / "file.bin", tmp_path / "ready"
    files.atomic_write(target, b"old")
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", script, str(target), str(ready), "named" if named else "unnamed"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old", "the previous file must survive a killed save"
    assert list(scratch.iterdir()) == [], "nothing may be staged in $TMPDIR"
    return folder, target


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_save_killed_mid_write_leaves_the_old_file_and_no_litter(tmp_path: Path) -> None:
    folder, target = _kill_while_writing(tmp_path, named=False)
    if hasattr(os, "O_TMPFILE"):  # the unnamed file died with the process
        assert sorted(p.name for p in folder.iterdir()) == ["file.bin"]
    files.atomic_write(target, b"newer")
    assert target.read_bytes() == b"newer" and sorted(p.name for p in folder.iterdir()) == ["file.bin"]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_without_unnamed_files_the_next_save_removes_a_killed_ones_leftover(tmp_path: Path) -> None:
    folder, target = _kill_while_writing(tmp_path, named=True)
    (leftover,) = [p for p in folder.iterdir() if p.name != "file.bin"]
    assert leftover.name.startswith(".file.bin.") and leftover.name.endswith(".lp-tmp")
    files.atomic_write(target, b"newer")
    assert target.read_bytes() == b"newer" and sorted(p.name for p in folder.iterdir()) == ["file.bin"]


def test_a_running_writers_temporary_file_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".file.bin.{files._HOST}.{alive.pid}.abcd1234.lp-tmp"
        other_host = tmp_path / ".file.bin.elsewhere.1.abcd1234.lp-tmp"
        theirs.write_bytes(b"in progress")
        other_host.write_bytes(b"in progress")
        files.atomic_write(target, b"mine")
        assert theirs.exists() and other_host.exists()
    finally:
        alive.kill()
        alive.wait()
    assert files.sweep_temporaries(target) == [theirs]
