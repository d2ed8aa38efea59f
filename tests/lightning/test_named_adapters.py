"""PEFTCallback(adapter_name=...): training one named adapter beside others the module already holds."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.core import state
from lightning_peft.lightning import strategies
from tests import tiny
from tests.lightning.modules import TinyLM, token_loader, trainer

#: task_b shares q_proj with task_a (a chain of two wrappers there) and adds o_proj.
TASK_B = {"r": 2, "target_modules": ["q_proj", "o_proj"]}


class TwoTaskLM(TinyLM):
    """A TinyLM that loads earlier adapters at construction, as a module training the next task would.

    Args:
        loads: ``(adapter name, folder or checkpoint)`` in the order they are loaded.
        into_self: load them into the LightningModule itself rather than into ``self.model``.
    """

    def __init__(self, loads: list[tuple[str, Path]], into_self: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, path in loads:
            lp.load_adapter(self if into_self else self.model, path, adapter_name=name)


def holder(module: L.LightningModule) -> tuple[str, torch.nn.Module]:
    return strategies.adapter_root(module)


def tensors_of(module: L.LightningModule, name: str) -> dict[str, torch.Tensor]:
    _, root = holder(module)
    return {k: v.clone() for k, v in lp.trainable_state_dict(root, adapter_name=name).items()}


def base_weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The frozen weights by where they sit in the base model (adapter wrappers taken out of the names)."""
    adapter = {id(t) for _, t in state.adapter_state(module)}
    return {
        n.replace(".base_layer", ""): p.detach().clone() for n, p in module.named_parameters() if id(p) not in adapter
    }


@pytest.fixture(scope="module")
def task_a(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter task_a, trained by PEFTCallback: its checkpoint, and the folder save_adapter wrote."""
    root = tmp_path_factory.mktemp("task_a")
    t = trainer(root, max_steps=2, callbacks=[PEFTCallback("lora", adapter_name="task_a", r=4, verbose=False)])
    t.fit(TinyLM(), token_loader())
    t.save_checkpoint(root / "a.ckpt")
    strategies.save_adapter(t, root / "folder")
    return {"checkpoint": root / "a.ckpt", "folder": root / "folder"}


@pytest.mark.parametrize("into_self", [False, True], ids=["into_model", "into_module"])
@pytest.mark.parametrize("source", ["checkpoint", "folder"])
def test_only_the_named_adapter_trains_and_is_checkpointed(
    tmp_path: Path, task_a: dict[str, Path], source: str, into_self: bool
) -> None:
    module = TwoTaskLM([("task_a", task_a[source])], into_self=into_self)
    a_before, base_before = tensors_of(module, "task_a"), base_weights(module)
    assert a_before
    t = trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback("lora", adapter_name="task_b", verbose=False, **TASK_B)])
    t.fit(module, token_loader())
    path, root = holder(module)
    assert path == ("" if into_self else "model")
    assert lp.active_adapters(root) == ["task_b"] and list(lp.adapters(root)) == ["task_a", "task_b"]

    # task_a bit for bit, the base frozen and unchanged, task_b trained; the optimizer held task_b only.
    after = tensors_of(module, "task_a")
    assert after.keys() == a_before.keys() and all(torch.equal(after[k], a_before[k]) for k in after)
    assert base_weights(module).keys() == base_before.keys()
    assert all(torch.equal(v, base_before[k]) for k, v in base_weights(module).items())
    task_b = dict(state.adapter_parameters(root, "task_b"))
    assert any(n.endswith("q_proj.base_layer.lora_B") for n in task_b)  # chained under task_a's wrapper
    assert all(p.abs().sum() > 0 for n, p in task_b.items() if n.endswith("lora_B"))
    assert {id(p) for p in module.parameters() if p.requires_grad} == {id(p) for p in task_b.values()}
    assert {id(p) for g in t.optimizers[0].param_groups for p in g["params"]} == {id(p) for p in task_b.values()}

    # The checkpoint: task_b's tensors only, recorded as task_b, plus the usual training state.
    t.save_checkpoint(tmp_path / "b.ckpt")
    checkpoint = torch.load(tmp_path / "b.ckpt", weights_only=True)
    prefix = f"{path}." if path else ""
    assert set(checkpoint["state_dict"]) == {prefix + n for n, _ in state.adapter_state(root, "task_b")}
    assert state.read_metadata(checkpoint["state_dict"])["adapter"] == "task_b"
    assert {"optimizer_states", "loops", "callbacks"} <= set(checkpoint)
    assert any("'adapter_name': 'task_b'" in key for key in checkpoint["callbacks"])

    # save_adapter from the Trainer writes task_b (keys by base site), which serves a bare base model alone.
    folder = strategies.save_adapter(t, tmp_path / "b")
    bare = lp.load_adapter(tiny.build("llama"), folder)
    assert list(lp.adapters(bare)) == ["task_b"] and lp.get_info(bare).config == lp.get_info(root, "task_b").config
    batch = tiny.inputs("llama")
    inner = module.model.eval()
    torch.testing.assert_close(tiny.logits(bare, batch), tiny.logits(inner, batch), rtol=0, atol=0)


def test_a_checkpoint_of_a_named_adapter_in_self_model_loads_into_a_bare_model(
    tmp_path: Path, task_a: dict[str, Path]
) -> None:
    """Where the adapters sit in ``self.model``, the checkpoint still reads as an adapter (its record at the root)."""
    module = TinyLM()
    lp.load_adapter(module.model, task_a["folder"], adapter_name="task_a")
    lp.set_adapter(module.model, "task_a")
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", adapter_name="task_a", r=4, verbose=False)])
    t.fit(module, token_loader())  # trains on the loaded task_a (same method and options): no second adapter
    assert list(lp.adapters(module.model)) == ["task_a"]
    t.save_checkpoint(tmp_path / "a2.ckpt")
    bare = lp.load_adapter(tiny.build("llama"), tmp_path / "a2.ckpt")
    assert lp.active_adapters(bare) == ["task_a"]
    batch = tiny.inputs("llama")
    torch.testing.assert_close(tiny.logits(bare, batch), tiny.logits(module.model.eval(), batch), rtol=0, atol=0)


def _run(
    root: Path, loads: list[tuple[str, Path]], epochs: int, into_self: bool, ckpt_path: Path | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    L.seed_everything(0)
    module = TwoTaskLM(loads, into_self=into_self)
    callbacks = [
        PEFTCallback("lora", adapter_name="task_b", dropout=0.1, verbose=False, **TASK_B),
        ModelCheckpoint(dirpath=root, save_last=True),
    ]
    t = trainer(root, max_epochs=epochs, callbacks=callbacks, num_sanity_val_steps=2)
    t.fit(module, token_loader(shuffle=True), token_loader(n=8, shuffle=False), ckpt_path=ckpt_path)
    return tensors_of(module, "task_b"), tensors_of(module, "task_a")


@pytest.mark.parametrize("into_self", [False, True], ids=["into_model", "into_module"])
def test_resume_is_exact(tmp_path: Path, task_a: dict[str, Path], into_self: bool) -> None:
    """fit 2N steps == fit N, stop, resume from the task_b-only checkpoint, fit N more."""
    loads = [("task_a", task_a["folder"])]
    straight, a_straight = _run(tmp_path / "straight", loads, epochs=2, into_self=into_self)
    _run(tmp_path / "first", loads, epochs=1, into_self=into_self)
    checkpoint = torch.load(tmp_path / "first" / "last.ckpt", weights_only=True)
    assert state.read_metadata(checkpoint["state_dict"])["adapter"] == "task_b"
    resumed, a_resumed = _run(
        tmp_path / "second", loads, epochs=2, into_self=into_self, ckpt_path=tmp_path / "first" / "last.ckpt"
    )
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    for name in a_straight:  # task_a: as loaded, in both runs
        assert torch.equal(a_straight[name], a_resumed[name]), name


def test_an_adapter_loaded_under_the_name_is_trained_on_and_made_the_active_one(
    tmp_path: Path, task_a: dict[str, Path]
) -> None:
    # task_b is loaded first (from task_a's folder: same method and options), then task_a, which is active.
    module = TwoTaskLM([("task_b", task_a["folder"]), ("task_a", task_a["folder"])], into_self=True)
    assert lp.active_adapters(module) == ["task_a"]
    a_before, b_before = tensors_of(module, "task_a"), tensors_of(module, "task_b")
    t = trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback("lora", adapter_name="task_b", r=4, verbose=False)])
    t.fit(module, token_loader())
    assert list(lp.adapters(module)) == ["task_b", "task_a"] and lp.active_adapters(module) == ["task_b"]
    assert all(torch.equal(v, a_before[k]) for k, v in tensors_of(module, "task_a").items())
    assert any(not torch.equal(v, b_before[k]) for k, v in tensors_of(module, "task_b").items())


def test_a_name_held_with_other_options_is_refused(tmp_path: Path, task_a: dict[str, Path]) -> None:
    module = TwoTaskLM([("task_a", task_a["folder"])])
    callback = PEFTCallback("lora", adapter_name="task_a", r=8, verbose=False)
    with pytest.raises(
        ValueError, match=r"already has a lora adapter 'task_a' .*would add lora .*another adapter_name"
    ):
        trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, token_loader())


@pytest.mark.parametrize("bad", ["", "a.b", "a/b", "a\\b", "__base__", 3, None])
def test_bad_adapter_names_fail_at_construction(bad: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"PEFTCallback\.adapter_name must be a non-empty string without '\.', '/' or '\\', other than "
        rf"'__base__' .*; got {re.escape(repr(bad))}\.$",
    ):
        PEFTCallback("lora", adapter_name=bad)


def test_the_default_name_keeps_the_state_key_and_a_named_one_gets_its_own() -> None:
    assert PEFTCallback("lora").state_key == "PEFTCallback{'method': 'lora'}"
    assert PEFTCallback("lora", adapter_name="b").state_key == "PEFTCallback{'method': 'lora', 'adapter_name': 'b'}"


def test_state_outside_the_adapters_holder_is_refused(tmp_path: Path, task_a: dict[str, Path]) -> None:
    class WithHead(TwoTaskLM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head = torch.nn.Linear(2, 2)

    module = WithHead([("task_a", task_a["folder"])])
    callback = PEFTCallback("lora", adapter_name="task_b", verbose=False)
    with pytest.raises(ValueError, match=r"WithHead\.model holds adapters, but WithHead has state outside it \(head"):
        trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(module, token_loader())


@pytest.mark.parametrize(
    ("into_self", "name", "where"),
    [
        (True, "task_b", r"TwoTaskLM holds adapters 'task_a' beside 'task_b'"),
        (False, "task_b", r"TwoTaskLM\.model holds adapters 'task_a' beside 'task_b'"),
        (False, "task_a", r"TwoTaskLM\.model holds adapters"),  # the strategies read the LightningModule's own
    ],
)
def test_sharded_strategies_refuse_other_adapters(
    task_a: dict[str, Path], into_self: bool, name: str, where: str
) -> None:
    class FakeTrainer:
        strategy = strategies.PEFTFSDPStrategy.__new__(strategies.PEFTFSDPStrategy)
        precision_plugin = None
        callbacks: list = []

    module = TwoTaskLM([("task_a", task_a["folder"])], into_self=into_self)
    callback = PEFTCallback("lora", adapter_name=name, r=4, verbose=False)
    with pytest.raises(ValueError, match=where + r", and the sharded PEFT strategies checkpoint"):
        callback.setup(FakeTrainer(), module, "fit")  # type: ignore[arg-type]


def test_two_callbacks_in_one_trainer_are_refused(tmp_path: Path) -> None:
    """Each PEFTCallback restricts the optimizer to its adapter: two would leave one untrained, so they are refused."""
    callbacks = [PEFTCallback("lora", r=4, verbose=False), PEFTCallback("lora", adapter_name="b", verbose=False)]
    t = trainer(tmp_path, max_steps=1, callbacks=callbacks)
    module = TinyLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"the Trainer has 2 PEFTCallbacks \(PEFTCallback\{'method': 'lora'\}, "):
        t.fit(module, token_loader(n=4))
    assert module.state_dict().keys() == before.keys()  # refused before any adapter was added
