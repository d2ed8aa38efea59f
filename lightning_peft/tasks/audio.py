"""Audio classification: transformers audio models (Whisper's encoder, wav2vec2, AST) on labelled sound files.

``AudioClassification("folder")`` loads ``AutoModelForAudioClassification``
(``WhisperForAudioClassification``, ``Wav2Vec2ForSequenceClassification``, ``ASTForAudioClassification``,
...) with a new head, and the model's feature extractor turns waveforms into its inputs (log-mel
frames for Whisper and AST, normalized samples for wav2vec2). Waveforms are read with soundfile,
mixed down to mono and resampled to the feature extractor's rate by band-limited (FFT) resampling::

    X = rfft(x)  (n samples at rate r)  ->  keep / zero-pad to m // 2 + 1 bins,  x' = irfft(X, m) * m / n,
    m = round(n * r' / r)

which is exact for signals without content above min(r, r') / 2. A ``class:`` model takes the padded
waveform (B, T) at ``sampling_rate`` as ``input_values``.

Under :class:`~lightning_peft.PEFTCallback` the new head modules (``projector`` and ``classifier``)
train only when ``modules_to_save`` names them; fitting with them frozen is refused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from lightning_peft.core.config import check_positive, check_positive_int
from lightning_peft.tasks.media import Item, MediaClassification, MediaData

#: Sound file suffixes read from class folders (what libsndfile reads).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au")


def read_audio(value: Any) -> tuple[torch.Tensor, int]:
    """A path, ``{"bytes"/"path": ...}`` or ``{"array", "sampling_rate"}`` as a mono waveform (T,) and its rate."""
    if isinstance(value, dict) and value.get("array") is not None:
        wave = torch.as_tensor(value["array"], dtype=torch.float32)
        return (wave.mean(-1) if wave.ndim == 2 else wave), int(value["sampling_rate"])
    try:
        import soundfile
    except ImportError as err:
        raise ModuleNotFoundError('reading audio files needs soundfile: pip install "lightning-peft[audio]"') from err
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    if not isinstance(value, (str, Path, io.BytesIO)):
        raise TypeError(f"cannot read audio from a {type(value).__name__}; give a path or an audio dict.")
    data, rate = soundfile.read(value, dtype="float32", always_2d=True)  # (T, channels)
    return torch.from_numpy(data).mean(-1), int(rate)


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Band-limited resampling of a (T,) waveform from ``rate`` to ``target`` Hz (the module docstring's formula)."""
    if rate == target or wave.numel() == 0:
        return wave
    n = wave.shape[-1]
    m = max(1, round(n * target / rate))
    spectrum = torch.fft.rfft(wave.double())  # (n // 2 + 1,)
    bins = m // 2 + 1
    kept = (
        spectrum[:bins] if spectrum.shape[-1] >= bins else torch.nn.functional.pad(spectrum, (0, bins - len(spectrum)))
    )
    return (torch.fft.irfft(kept, m) * (m / n)).float()


class AudioClassification(MediaClassification):
    """Classify sound clips; logs accuracy and macro F1, precision and recall on validation and test.

    ``predict`` returns ``{"audio": file (or dataset row), "label": class, "score": probability}`` per
    clip. See :class:`~lightning_peft.tasks.media.MediaClassification` for the arguments.
    """

    auto_class = "AutoModelForAudioClassification"
    input_keys = ("input_features", "input_values", "attention_mask")
    data_class = "AudioClassificationData"
    item = "audio"

    processor_kind = "feature extractor"

    def load_processor(self, path: str) -> Any:
        from transformers import AutoFeatureExtractor

        return AutoFeatureExtractor.from_pretrained(path)


class AudioClassificationData(MediaData):
    """Labelled sound clips for :class:`AudioClassification` (see :class:`~lightning_peft.tasks.media.MediaData`).

    Items are sound files (WAV, FLAC, OGG, ...), or a ``datasets`` audio column (``file_column``,
    default ``"audio"``; read with soundfile, not decoded by ``datasets``).

    Args:
        max_seconds: keep at most the first this many seconds of each clip; ``None``: whole clips
            (a Whisper feature extractor pads or cuts to its own ``chunk_length`` anyway).
        sampling_rate: the rate a ``class:`` model's waveforms are resampled to; default: the
            feature extractor's (this option overrides it otherwise).
        **kwargs: the data options of :class:`~lightning_peft.tasks.media.MediaData` (``train``,
            ``validation``, ``test``, ``predict``, ``dataset``, ``batch_size``, ...).
    """

    extensions = AUDIO_EXTENSIONS
    default_column = "audio"

    def __init__(self, *, max_seconds: float | None = None, sampling_rate: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        if max_seconds is not None:
            check_positive(owner, "max_seconds", max_seconds)
        if sampling_rate is not None:
            check_positive_int(owner, "sampling_rate", sampling_rate)
        self.max_seconds, self.sampling_rate = max_seconds, sampling_rate

    def prepare_dataset(self, split: Any) -> Any:
        import datasets as hf

        if isinstance(split.features.get(self.file_column), hf.Audio):
            return split.cast_column(self.file_column, hf.Audio(decode=False))  # {"path", "bytes"}: soundfile reads
        return split

    def load(self, item: Item) -> Any:
        return read_audio(item.value)

    def _extractor(self) -> tuple[Any, int]:
        module = self.module()
        extractor = getattr(module, "processor", None) if module is not None else None
        rate = self.sampling_rate or getattr(extractor, "sampling_rate", None)
        if rate is None:
            raise ValueError(
                f"{type(self).__name__}.sampling_rate is None and the model has no feature extractor: set "
                "sampling_rate, or use a transformers model folder with preprocessor_config.json."
            )
        return extractor, int(rate)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extractor, rate = self._extractor()
        waves = []
        for e in examples:
            wave, source_rate = e["item"]
            wave = resample(wave, source_rate, rate)
            if self.max_seconds is not None:
                wave = wave[: int(self.max_seconds * rate)]
            if wave.numel() == 0:
                raise ValueError(f"{type(self).__name__}: {e['source']} holds no samples.")
            waves.append(wave)
        if extractor is not None:
            kwargs: dict[str, Any] = {"sampling_rate": rate, "return_tensors": "pt"}
            if type(extractor).__name__ != "WhisperFeatureExtractor":  # Whisper pads to its chunk by itself
                kwargs["padding"] = True
            inputs = dict(extractor([w.numpy() for w in waves], **kwargs))
        else:
            width = max(len(w) for w in waves)
            inputs = {"input_values": torch.stack([torch.nn.functional.pad(w, (0, width - len(w))) for w in waves])}
        labels = torch.tensor([self.label_id(e["label"]) for e in examples])
        return {**inputs, "labels": labels, "source": [e["source"] for e in examples]}
