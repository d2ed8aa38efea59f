"""PEFTCallback(peft_dir=True): a peft-loadable adapter folder beside every checkpoint a real fit writes."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.interop import load_peft_adapter
from lightning_peft.lightning.peft_dir import peft_dir_of
from tests import tiny
from tests.interop.parity import assert_parity
from tests.lightning.modules import TinyLM, token_loader, trainer

peft = pytest.importorskip("peft")


def _fit(root: Path, callback: PEFTCallback, **kwargs: object) -> tuple[TinyLM, list[Path]]:
    module = TinyLM()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=2, monitor="train_loss")
    t = trainer(root, max_steps=3, callbacks=[callback, checkpoints], **kwargs)
    t.fit(module, token_loader(n=12))
    t.save_checkpoint(root / "after" / "final.ckpt")  # after the fit: still a peft folder beside it
    return module, sorted((root / "ckpt").glob("*.ckpt"))


def test_every_checkpoint_has_a_peft_folder_that_peft_and_transformers_load(tmp_path: Path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the current folder
    module, ckpts = _fit(tmp_path, PEFTCallback("lora", r=4, target_modules=["q_proj", "v_proj"], verbose=False))
    assert len(ckpts) == 2  # save_top_k=2 of three: one checkpoint was removed, and its peft folder with it
    folders = sorted(p for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    assert folders == [peft_dir_of(c) for c in ckpts]
    assert not list(cwd.iterdir()) and not list((tmp_path / "ckpt").glob(".*"))  # no staging folder left either
    batch = tiny.inputs("llama")
    trained = module.model.eval()
    with torch.no_grad():
        ref = trained(**batch).logits
    newest_ckpt = max(ckpts, key=lambda p: p.stat().st_mtime)  # the last step's: the trained model's state
    newest = peft_dir_of(newest_ckpt)
    base = tiny.build("llama")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), newest).eval()(**batch).logits
        hf = copy.deepcopy(base)
        hf.load_adapter(str(newest))  # transformers' PeftAdapterMixin
        through_hf = hf.eval()(**batch).logits
        ours = load_peft_adapter(copy.deepcopy(base), newest).eval()(**batch).logits
        assert not torch.allclose(ref, base(**batch).logits, atol=1e-4), "the fit changed nothing: a vacuous test"
    for what, out in (("PeftModel.from_pretrained", theirs), ("transformers load_adapter", through_hf), ("ours", ours)):
        assert_parity(out, ref, f"the last checkpoint's peft folder through {what}")
    with torch.no_grad():
        final = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "after" / "final.peft")
        assert_parity(final.eval()(**batch).logits, ref, "trainer.save_checkpoint's peft folder after the fit")
    # the checkpoint itself and the folder beside it hold the same adapter
    from_ckpt = lp.load_adapter(copy.deepcopy(base), newest_ckpt)
    with torch.no_grad():
        assert_parity(from_ckpt.eval()(**batch).logits, ref, "the checkpoint beside it")


def test_adalora_folder_records_the_trainers_schedule(tmp_path: Path) -> None:
    callback = PEFTCallback("adalora", init_r=4, target_r=2, target_modules=["q_proj"], verbose=False)
    module, ckpts = _fit(tmp_path, callback)
    config = json.loads((peft_dir_of(ckpts[-1]) / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 3  # the Trainer's max_steps
    assert config["rank_pattern"] is not None  # the schedule pruned to target_r by the last step
    newest = max(ckpts, key=lambda p: p.stat().st_mtime)
    with torch.no_grad():
        batch = tiny.inputs("llama")
        ref = module.model.eval()(**batch).logits
        theirs = peft.PeftModel.from_pretrained(tiny.build("llama"), peft_dir_of(newest)).eval()(**batch).logits
    assert_parity(theirs, ref, "AdaLoRA's peft folder through PeftModel.from_pretrained")
    # transformers' load_adapter does not apply rank_pattern (peft's AdaLoraModel does): it refuses a pruned
    # AdaLoRA folder, peft's own save_pretrained output too (checked with peft 0.21.2 / transformers 5.24)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        tiny.build("llama").load_adapter(str(peft_dir_of(newest)))


def test_a_method_without_peft_format_warns_once_and_checkpoints(tmp_path: Path) -> None:
    with pytest.warns(
        UserWarning, match=r"writes no peft adapter folder .* method 'bottleneck' has no Hugging Face"
    ) as w:
        _, ckpts = _fit(tmp_path, PEFTCallback("bottleneck", verbose=False))
    assert len([x for x in w if "peft adapter folder" in str(x.message)]) == 1
    assert ckpts and not [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]


class _DilatedConvNet(L.LightningModule):
    """A dilated 3x3 conv, which peft's format cannot hold (peft 0.21.2's LoRA conv A has no dilation)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=2, dilation=2), torch.nn.ReLU())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.net(batch).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_layer_peft_cannot_hold_warns_once_names_it_and_checkpoints(tmp_path: Path) -> None:
    """A fit whose adapter peft's format refuses by layer keeps checkpointing; the warning names the layer."""
    module = _DilatedConvNet()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    callback = PEFTCallback("lora", r=2, target_modules=["net.0"], verbose=False)
    data = torch.utils.data.DataLoader(torch.randn(6, 3, 8, 8), batch_size=2)
    with pytest.warns(UserWarning, match=r"writes no peft adapter folder.*layer 'net\.0'.*dilation=\(2, 2\)") as w:
        trainer(tmp_path, max_steps=3, callbacks=[callback, checkpoints]).fit(module, data)
    assert len([x for x in w if "peft adapter folder" in str(x.message)]) == 1
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]


def test_peft_dir_off_and_checked(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*peft adapter folder.*")
        _, ckpts = _fit(tmp_path, PEFTCallback("lora", r=2, peft_dir=False, verbose=False))
    assert ckpts and not [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]
    assert sorted(p.name for p in (tmp_path / "after").iterdir()) == ["final.ckpt"]
    with pytest.raises(ValueError, match=r"PEFTCallback.peft_dir must be True or False; got 'yes'"):
        PEFTCallback("lora", peft_dir="yes")  # type: ignore[arg-type]


def test_peft_dir_names() -> None:
    assert peft_dir_of("/a/epoch=0-step=3.ckpt") == Path("/a/epoch=0-step=3.peft")
    assert peft_dir_of("/a/last") == Path("/a/last.peft")  # a DeepSpeed checkpoint folder without suffix


def _sharded(name: str) -> object:
    from tests import optional
    from tests.lightning.distributed import cpu_deepspeed, forked

    if name == "zero3":
        optional.importorskip("deepspeed")
        return cpu_deepspeed(3)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_peft.lightning.strategies import PEFTFSDP2Strategy, PEFTFSDPStrategy

    if name == "fsdp1":  # wraps modules: _fsdp_wrapped_module in our names, never in peft's keys
        return forked(PEFTFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}))
    return forked(PEFTFSDP2Strategy(wrap_modules={LlamaDecoderLayer}, save_distributed_checkpoint=False))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero3", "fsdp1", "fsdp2"])
def test_sharded_checkpoints_have_a_peft_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    """Two CPU ranks under ZeRO-3 (a checkpoint folder), FSDP1 and FSDP2: the parameters are shards or
    placeholders, the gathered adapter is what rank 0 writes."""
    import lightning as L

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    L.seed_everything(0)
    t = trainer(
        tmp_path,
        devices=2,
        strategy=_sharded(strategy),
        max_steps=1,
        num_sanity_val_steps=0,
        callbacks=[PEFTCallback("lora", r=4, verbose=False), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    t.fit(TinyLM(), token_loader(n=8, batch_size=4))
    assert (tmp_path / "last.peft" / "adapter_config.json").is_file()
    base, batch = tiny.build("llama"), tiny.inputs("llama")
    with torch.no_grad():
        ref = lp.load_adapter(copy.deepcopy(base), tmp_path / "last.ckpt").eval()(**batch).logits  # the checkpoint
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "last.peft").eval()(**batch).logits
        assert not torch.allclose(ref, base(**batch).logits, atol=1e-4), "the fit changed nothing: a vacuous test"
    assert_parity(theirs, ref, f"{strategy}'s peft folder through PeftModel.from_pretrained")
