"""Image classification: transformers image models or plain torch CNNs, on labelled image files.

``ImageClassification("folder/of/a/vit")`` loads ``AutoModelForImageClassification`` (ViT, ConvNeXt,
ResNet, ...) with a new head for the data's classes, and
``ImageClassification("class:lightning_peft.tasks.efficientnet_lite.EfficientNetLite0")`` builds a
plain CNN (any ``nn.Module`` taking ``num_classes``). The data module resizes and normalizes with
the model's transformers image processor, or with explicit ``image_size`` / ``mean`` / ``std``
(a ``class:`` model's class attributes of those names are the defaults).

The new head trains under :class:`~lightning_peft.PEFTCallback` only when the method's
``modules_to_save`` names it (``["classifier"]`` for ViT, ConvNeXt, ResNet and EfficientNetLite0);
fitting with a frozen new head is refused, since it would train an adapter against random outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_peft.core.config import invalid
from lightning_peft.tasks.images import (
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    Augment,
    check_stats,
    fashion_mnist,
    open_image,
    read_idx,
    to_tensor,
)
from lightning_peft.tasks.media import Item, MediaClassification, MediaData


def image_processor(path: str) -> Any:
    """The image processor saved at ``path``, in its PIL backend (torchvision is not a dependency).

    transformers' ``AutoImageProcessor`` needs torchvision up to 5.9 even for PIL processors, so the
    class is taken from ``preprocessor_config.json``'s ``image_processor_type`` (its ``...Pil`` variant).
    """
    import transformers
    from transformers.image_processing_utils import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(path)
    name = str(config.get("image_processor_type", "")).removesuffix("Fast")
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name, None) if name else None
    if cls is None:
        return transformers.AutoImageProcessor.from_pretrained(path)
    return cls.from_pretrained(path)


class ImageClassification(MediaClassification):
    """Classify images; logs accuracy and macro F1, precision and recall on validation and test.

    ``predict`` returns ``{"image": file (or dataset row), "label": class, "score": probability}`` per
    image. See :class:`~lightning_peft.tasks.media.MediaClassification` for the arguments.
    """

    auto_class = "AutoModelForImageClassification"
    input_keys = ("pixel_values",)
    data_class = "ImageClassificationData"
    item = "image"

    processor_kind = "image processor"

    def load_processor(self, path: str) -> Any:
        return image_processor(path)


class _ArrayItems(Sequence[Item]):
    """Images held as one uint8 tensor (N, H, W[, C]) with label ids: items made on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: Sequence[str], split: str) -> None:
        self.images, self.ids, self.names, self.split = images, labels.tolist(), list(names), split

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Item(self.images[i].numpy(), self.names[self.ids[i]], f"{self.split} {i}")

    def labels(self) -> list[str | None]:
        return [self.names[i] for i in self.ids]


class ImageClassificationData(MediaData):
    """Labelled images for :class:`ImageClassification` (see :class:`~lightning_peft.tasks.media.MediaData`).

    Items are image files (PNG, JPEG, ...; grayscale ones become RGB), or a ``datasets`` column of
    images (``file_column``, default ``"image"``). Training images are augmented first, then
    resized and normalized by the model's image processor or the explicit transforms.

    Args:
        image_size: resize every image to ``image_size x image_size`` with the explicit transforms
            (``x = (pixel / 255 - mean) / std``) instead of the model's processor; default: the
            processor's, or a ``class:`` model's ``image_size`` attribute.
        mean: per-channel mean of the explicit transforms (default: the model class's, else ImageNet's).
        std: per-channel standard deviation of the explicit transforms.
        hflip: training augmentation: random left-right flips.
        crop_scale: training augmentation: random square crops of at least this fraction of the area.
        rotation: training augmentation: random rotations up to this many degrees.
        color_jitter: training augmentation: random brightness and contrast factors in ``1 +- j``.
        **kwargs: the data options of :class:`~lightning_peft.tasks.media.MediaData` (``train``,
            ``validation``, ``test``, ``predict``, ``dataset``, ``batch_size``, ...).
    """

    extensions = IMAGE_EXTENSIONS
    default_column = "image"

    def __init__(
        self,
        *,
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        hflip: bool = False,
        crop_scale: float = 1.0,
        rotation: float = 0.0,
        color_jitter: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8
        ):
            raise invalid(owner, "image_size", image_size, "None or an integer of at least 8 (pixels)")
        self.image_size = image_size
        self.mean = check_stats(owner, "mean", mean) if mean is not None else None
        self.std = check_stats(owner, "std", std) if std is not None else None
        self.augment = Augment(hflip=hflip, crop_scale=crop_scale, rotation=rotation, color_jitter=color_jitter)

    file_kinds = "a .csv file or an IDX images file (*-images-idx3-ubyte[.gz], labels beside it)"

    def reads_file(self, path: Path) -> bool:
        return "-images-idx3-ubyte" in path.name

    def read_file(self, split: str, path: Path) -> Sequence[Item]:
        """MNIST-format images with the ``*-labels-idx1-ubyte`` file beside them; ``labels`` name the ids."""
        labels_file = path.with_name(path.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte"))
        if not labels_file.is_file():
            raise FileNotFoundError(f"{type(self).__name__}.{split}={str(path)!r}: no labels file {labels_file}.")
        images, ids = read_idx(path), read_idx(labels_file).long()
        names = self.labels or [str(i) for i in range(int(ids.max()) + 1)]
        if int(ids.max()) >= len(names):
            raise ValueError(
                f"{type(self).__name__}.labels={self.labels!r} names {len(names)} classes but {labels_file} has label "
                f"id {int(ids.max())}."
            )
        return _ArrayItems(images, ids, names, split)

    def named_datasets(self) -> dict[str, Any]:
        def fashion() -> dict[str, Sequence[Item]]:
            return {s: _ArrayItems(*fashion_mnist(s), FASHION_MNIST_CLASSES, s) for s in ("train", "test")}

        return {"fashion_mnist": fashion}

    def load(self, item: Item) -> Any:
        return open_image(item.value)

    def _transforms(self) -> tuple[Any, int | None, list[float], list[float]]:
        """(processor or None, size, mean, std): explicit transforms win over the model's processor."""
        module = self.module()
        model_class = getattr(module, "model_class", None)
        processor = None
        if self.image_size is None and self.mean is None and self.std is None and module is not None:
            processor = getattr(module, "processor", None)
        size = self.image_size or getattr(model_class, "image_size", None)
        mean = self.mean or list(getattr(model_class, "mean", (0.485, 0.456, 0.406)))
        std = self.std or list(getattr(model_class, "std", (0.229, 0.224, 0.225)))
        if processor is None and size is None:
            raise ValueError(
                f"{type(self).__name__}.image_size is None and the model has no image processor: set image_size "
                "(and mean/std), or use a transformers model folder that has preprocessor_config.json."
            )
        return processor, size, mean, std

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        processor, size, mean, std = self._transforms()
        images = [
            self.augment(e["item"]) if e["split"] == "train" and self.augment.active else e["item"] for e in examples
        ]
        if processor is not None:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        else:
            assert size is not None
            pixels = torch.stack([to_tensor(img, size, mean, std) for img in images])  # (B, 3, H, W)
        batch: dict[str, Any] = {
            "pixel_values": pixels,
            "labels": torch.tensor([self.label_id(e["label"]) for e in examples]),
            "source": [e["source"] for e in examples],
        }
        return batch
