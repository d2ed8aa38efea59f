"""Image decoding, explicit resize/normalize transforms and training augmentation, on PIL and torch only.

Used by :class:`~lightning_peft.tasks.ImageClassificationData` when a model has no transformers image
processor (a ``class:`` CNN) or when the transforms are given explicitly; augmentation applies to the
training split in both cases, before the processor. Random draws come from torch's RNG, which
Lightning seeds per run and per loader worker.
"""

from __future__ import annotations

import gzip
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_peft.core.config import invalid

#: Image file suffixes read from class folders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def require_pillow(what: str) -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise ModuleNotFoundError(f'{what} needs Pillow: pip install "lightning-peft[vision]"') from err
    return Image


def open_image(value: Any) -> Any:
    """A path, PIL image, ``{"bytes": ...}``/``{"path": ...}`` dict or (H, W[, C]) uint8 array as an RGB PIL image."""
    Image = require_pillow("reading images")
    if isinstance(value, (str, Path)):
        with Image.open(value) as img:
            return img.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            with Image.open(io.BytesIO(value["bytes"])) as img:
                return img.convert("RGB")
        return open_image(value["path"])
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if hasattr(value, "__array__"):
        return Image.fromarray(__import__("numpy").asarray(value)).convert("RGB")
    raise TypeError(f"cannot read an image from a {type(value).__name__}; give a path, a PIL image or an array.")


@dataclass(frozen=True)
class Augment:
    """Training augmentation on PIL images.

    Args:
        hflip: flip left-right with probability 1/2.
        crop_scale: random-resized crop: keep a random square of ``U(crop_scale, 1)`` of the area
            (then resized back); 1 turns it off.
        rotation: rotate by ``U(-rotation, rotation)`` degrees; 0 turns it off.
        color_jitter: scale brightness and contrast each by ``U(1 - j, 1 + j)``; 0 turns it off.
    """

    hflip: bool = False
    crop_scale: float = 1.0
    rotation: float = 0.0
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        owner = "ImageClassificationData"
        if not isinstance(self.hflip, bool):
            raise invalid(owner, "hflip", self.hflip, "True or False")
        if isinstance(self.crop_scale, bool) or not isinstance(self.crop_scale, (int, float)):
            raise invalid(owner, "crop_scale", self.crop_scale, "a number in (0, 1]")
        if not 0 < self.crop_scale <= 1:
            raise invalid(owner, "crop_scale", self.crop_scale, "a number in (0, 1]")
        if isinstance(self.rotation, bool) or not isinstance(self.rotation, (int, float)) or not self.rotation >= 0:
            raise invalid(owner, "rotation", self.rotation, "a number of degrees >= 0")
        jitter = self.color_jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
            raise invalid(owner, "color_jitter", jitter, "a number in [0, 1)")

    @property
    def active(self) -> bool:
        return self.hflip or self.crop_scale < 1 or self.rotation > 0 or self.color_jitter > 0

    def __call__(self, img: Any) -> Any:
        from PIL import Image, ImageEnhance

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand(()))

        if self.crop_scale < 1:
            w, h = img.size
            side = math.sqrt(uniform(self.crop_scale, 1.0)) * min(w, h)
            left, top = uniform(0, w - side), uniform(0, h - side)
            img = img.crop((round(left), round(top), round(left + side), round(top + side))).resize((w, h))
        if self.hflip and float(torch.rand(())) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rotation > 0:
            img = img.rotate(uniform(-self.rotation, self.rotation), resample=Image.Resampling.BILINEAR)
        if self.color_jitter > 0:
            j = self.color_jitter
            img = ImageEnhance.Brightness(img).enhance(uniform(1 - j, 1 + j))
            img = ImageEnhance.Contrast(img).enhance(uniform(1 - j, 1 + j))
        return img


def to_tensor(img: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize to ``size x size`` (bilinear), normalize ``x = (pixel / 255 - mean) / std`` per channel: (3, H, W)."""
    from PIL import Image

    img = img.resize((size, size), Image.Resampling.BILINEAR)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)  # (H, W, C)
    x = x.permute(2, 0, 1).float().div_(255)  # (C, H, W) in [0, 1]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def check_stats(owner: str, field: str, value: Any) -> list[float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise invalid(owner, field, value, "three numbers (one per RGB channel)")
    if field == "std" and any(v <= 0 for v in value):
        raise invalid(owner, field, value, "three positive numbers")
    return [float(v) for v in value]


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

#: Fashion-MNIST's classes in label-id order.
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
#: Where Debian's ``dataset-fashion-mnist`` puts the IDX files (``LIGHTNING_PEFT_FASHION_MNIST`` overrides).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzipped or not) of unsigned bytes as a tensor of its declared shape."""
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).view(shape)


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's ``"train"`` (60,000) or ``"test"`` (10,000) images (N, 28, 28) and labels (N,).

    Raises:
        FileNotFoundError: when the files are not installed; says how to install them.
    """
    folder = Path(os.environ.get("LIGHTNING_PEFT_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise FileNotFoundError(
            f"dataset 'fashion_mnist' needs {images.name} in {folder}: apt-get install dataset-fashion-mnist (or, "
            "without root, apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR, then "
            "set LIGHTNING_PEFT_FASHION_MNIST=DIR/usr/share/datasets/fashion-mnist)."
        )
    return read_idx(images), read_idx(labels).long()
