"""Tiny image and audio model folders (random weights from configs) and synthesized labelled files.

Images: classes are the orientation of stripes (``horizontal`` / ``vertical``), so a model can
learn them at any resolution. Audio: classes are tones of different pitch (``low`` 440 Hz /
``high`` 1760 Hz), written as WAV files at 8 kHz so that loading resamples them to 16 kHz.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
import transformers as tf
from torch import nn

IMAGE_CLASSES = ("horizontal", "vertical")
TONES = {"low": 440.0, "high": 1760.0}
FILE_RATE = 8000


def _vision_config(arch: str) -> tf.PretrainedConfig:
    if arch == "vit":
        return tf.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
    if arch == "convnext":
        return tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32)
    if arch == "resnet":
        return tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", downsample_in_first_stage=True
        )
    raise ValueError(arch)


def save_vision_model(root: Path, arch: str, seed: int = 0) -> Path:
    """A folder with a tiny ``arch`` image classifier whose head has 5 classes (as a pretrained one has its own)."""
    folder = root / arch
    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        config = _vision_config(arch)
        config.num_labels = 5
        tf.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
        size = {"height": 32, "width": 32} if arch == "vit" else {"shortest_edge": 32}
        processor = tf.ViTImageProcessor(size=size) if arch == "vit" else tf.ConvNextImageProcessor(size=size)
        processor.save_pretrained(folder)
    return folder


class TinyCNN(nn.Module):
    """A plain torch CNN (no transformers) with a ``classifier`` head, built as ``class:`` models are."""

    image_size = 16
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        h = torch.relu(self.conv2(torch.relu(self.norm(self.conv1(pixel_values)))))  # (B, width, H, W)
        return self.classifier(torch.relu(self.fc(h.mean((2, 3)))))  # (B, classes)


class TinyWaveNet(nn.Module):
    """A plain torch classifier of waveforms (B, T): a strided Conv1d, mean pooling, a ``classifier``."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, width, 32, stride=8)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:  # (B, T)
        h = torch.relu(self.conv(input_values[:, None]))  # (B, width, T')
        return self.classifier(h.mean(-1))  # (B, classes)


def stripes(label: str, size: int = 24, seed: int = 0) -> torch.Tensor:
    """(size, size, 3) uint8 stripes of random period and colors, horizontal or vertical."""
    g = torch.Generator().manual_seed(seed)
    period = int(torch.randint(2, 5, (1,), generator=g))
    line = (torch.arange(size) // period % 2).float()  # (size,)
    mask = line[:, None].expand(size, size) if label == "horizontal" else line[None, :].expand(size, size)
    low, high = torch.rand(3, generator=g) * 100, 155 + torch.rand(3, generator=g) * 100
    return (low + (high - low) * mask[..., None]).to(torch.uint8)  # (H, W, 3)


def write_image_folder(root: Path, per_class: int = 6, gray: bool = False) -> Path:
    """``root/<label>/<i>.png`` stripe images (grayscale PNGs when ``gray``)."""
    from PIL import Image

    for c, label in enumerate(IMAGE_CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(stripes(label, seed=100 * c + i).numpy())
            (img.convert("L") if gray else img).save(root / label / f"{i}.png")
    return root


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- audio


def tone(label: str, seconds: float = 0.25, rate: int = FILE_RATE, seed: int = 0) -> torch.Tensor:
    """(T,) a sine of the label's pitch with a random phase and amplitude, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    amplitude, phase = 0.3 + 0.4 * float(torch.rand((), generator=g)), 2 * math.pi * float(torch.rand((), generator=g))
    noise = 0.01 * torch.randn(len(t), generator=g)
    return amplitude * torch.sin(2 * math.pi * TONES[label] * t + phase) + noise


def write_audio_folder(root: Path, per_class: int = 6) -> Path:
    """``root/<label>/<i>.wav`` tones at 8 kHz."""
    import soundfile

    for c, label in enumerate(TONES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            soundfile.write(root / label / f"{i}.wav", tone(label, seed=100 * c + i).numpy(), FILE_RATE)
    return root


def save_audio_model(root: Path, arch: str, seed: int = 0) -> Path:
    """A folder with a tiny ``arch`` audio classifier (whisper, wav2vec2 or ast) and its feature extractor."""
    folder = root / arch
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    if arch == "whisper":  # 1 s chunks: 100 frames of 10 ms, halved by the encoder's strided conv
        config = tf.WhisperConfig(
            num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
            vocab_size=64, max_target_positions=16,
        )  # fmt: skip
        extractor = tf.WhisperFeatureExtractor(feature_size=16, chunk_length=1)
        model = tf.WhisperForAudioClassification(config)
    elif arch == "wav2vec2":
        config = tf.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, classifier_proj_size=16, vocab_size=32, layerdrop=0.0, mask_time_prob=0.0,
        )  # fmt: skip
        extractor = tf.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, return_attention_mask=True)
        model = tf.Wav2Vec2ForSequenceClassification(config)
    elif arch == "ast":
        config = tf.ASTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_mel_bins=16,
            max_length=32, patch_size=8, frequency_stride=8, time_stride=8,
        )  # fmt: skip
        extractor = tf.ASTFeatureExtractor(num_mel_bins=16, max_length=32)
        model = tf.ASTForAudioClassification(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder
