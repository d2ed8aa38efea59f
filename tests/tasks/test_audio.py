"""Audio classification on tiny models: reading and resampling, feature extractors, datasets, errors.

Classes are synthesized tones of different pitch (tests/tasks/media_hub.py); the method x task grid
(tests/tasks/test_grid.py) fits every registered method on Whisper, wav2vec2 and AST.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_peft import PEFTCallback
from lightning_peft.tasks import AudioClassification, AudioClassificationData
from lightning_peft.tasks.audio import read_audio, resample
from tests.lightning.modules import trainer
from tests.tasks import media_hub


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    return media_hub.write_audio_folder(tmp_path / "clips", per_class=6)


def test_resampling_is_band_limited_interpolation() -> None:
    """A tone with a whole number of periods in the clip resamples to the same tone sampled at the new rate."""
    t8, t16 = torch.arange(2000) / 8000, torch.arange(4000) / 16000  # 0.25 s: 110 periods of 440 Hz
    up = resample(torch.sin(2 * math.pi * 440 * t8), 8000, 16000)
    assert up.shape == (4000,) and torch.allclose(up, torch.sin(2 * math.pi * 440 * t16), atol=1e-4)
    down = resample(torch.sin(2 * math.pi * 440 * t16), 16000, 8000)
    assert torch.allclose(down, torch.sin(2 * math.pi * 440 * t8), atol=1e-4)
    # Content above the new Nyquist frequency (2.5 kHz, from 6 kHz to 4 kHz) is removed, not folded back.
    high = resample(torch.sin(2 * math.pi * 2500 * torch.arange(6000, dtype=torch.float64) / 6000), 6000, 4000)
    assert high.abs().max() < 1e-4


def test_read_audio_mixes_down_and_takes_arrays(tmp_path: Path) -> None:
    import soundfile

    left, right = media_hub.tone("low"), media_hub.tone("high", seed=1)
    soundfile.write(tmp_path / "stereo.wav", torch.stack([left, right], 1).numpy(), 8000, subtype="FLOAT")
    wave, rate = read_audio(str(tmp_path / "stereo.wav"))
    assert rate == 8000 and torch.allclose(wave, (left + right) / 2, atol=1e-6)
    wave, rate = read_audio({"array": left.numpy(), "sampling_rate": 22050})
    assert rate == 22050 and torch.equal(wave, left)
    with pytest.raises(TypeError, match="cannot read audio from a int"):
        read_audio(3)


@pytest.mark.parametrize("arch", ["whisper", "wav2vec2", "ast"])
def test_batches_are_the_feature_extractor_of_the_resampled_waves(
    arch: str, hub_dir: Path, tmp_path: Path, clips: Path
) -> None:
    import transformers as tf

    folder = media_hub.save_audio_model(hub_dir, arch)
    module = AudioClassification(str(folder))
    data = AudioClassificationData(train=str(clips), batch_size=3, val_split=0.0)
    data.trainer = trainer(tmp_path, max_epochs=1)
    data.trainer.strategy.connect(module)
    files = [r["source"] for r in data.records["train"][:3]]
    batch = data.collate([{"item": read_audio(f), "label": "low", "source": f, "split": "train"} for f in files])
    extractor = tf.AutoFeatureExtractor.from_pretrained(str(folder))
    waves = [resample(read_audio(f)[0], 8000, 16000).numpy() for f in files]
    kwargs = {} if arch == "whisper" else {"padding": True}
    expected = extractor(waves, sampling_rate=16000, return_tensors="pt", **kwargs)
    key = extractor.model_input_names[0]
    assert torch.allclose(batch[key], expected[key], atol=1e-5) and batch["labels"].tolist() == [1, 1, 1]
    assert data.labels == ["high", "low"]


def test_whisper_lora_fits_and_predicts_each_clip(hub_dir: Path, tmp_path: Path, clips: Path) -> None:
    module = AudioClassification(str(media_hub.save_audio_model(hub_dir, "whisper")), learning_rate=1e-2)
    data = AudioClassificationData(train=str(clips), batch_size=4, val_split=0.25, max_seconds=0.2)
    lora = PEFTCallback("lora", r=4, modules_to_save=["projector", "classifier"], verbose=False)
    run = trainer(tmp_path, callbacks=[lora], max_epochs=1, limit_train_batches=2, enable_checkpointing=False)
    run.fit(module, data)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert "model.projector.trained.weight" in trained and "model.classifier.trained.weight" in trained
    metrics = run.validate(module, data, verbose=False)[0]
    assert {"val_accuracy", "val_f1", "val_precision", "val_recall"} <= set(metrics)
    rows = [r for batch in run.predict(module, data) for r in batch]
    assert [r["audio"] for r in rows] == [r["source"] for r in data.records["predict"]]
    assert all(r["label"] in media_hub.TONES and 0.5 <= r["score"] <= 1 for r in rows)

    frozen = AudioClassification(str(media_hub.save_audio_model(hub_dir, "whisper")))
    lora = PEFTCallback("lora", r=4, modules_to_save=["classifier"], verbose=False)
    run = trainer(tmp_path, callbacks=[lora], max_epochs=1, limit_train_batches=1, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"\['projector'\] are frozen.*modules_to_save=\['projector', 'classifier'\]"):
        run.fit(frozen, data)


def test_a_plain_waveform_model_and_a_datasets_audio_column(tmp_path: Path, clips: Path) -> None:
    import datasets as hf

    files = sorted(str(p) for p in clips.rglob("*.wav"))
    table = hf.Dataset.from_dict({"audio": files, "label": [Path(f).parent.name for f in files]})
    table = table.cast_column("audio", hf.Audio())  # read by soundfile here, not decoded by datasets
    module = AudioClassification("class:tests.tasks.media_hub.TinyWaveNet", model_init_args={"width": 4})
    data = AudioClassificationData(dataset=table, sampling_rate=4000, batch_size=4, val_split=0.25)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=2, enable_checkpointing=False)
    run.fit(module, data)
    assert module.model.conv.out_channels == 4 and run.global_step == 2
    batch = next(iter(data.train_dataloader()))
    assert batch["input_values"].shape == (4, 1000)  # 0.25 s at 4 kHz
    rows = [r for b in run.predict(module, data) for r in b]
    assert [r["audio"] for r in rows] == [r["source"] for r in data.records["predict"]] and rows[0]["audio"].startswith(
        "row "
    )


def test_audio_errors(tmp_path: Path, clips: Path) -> None:
    with pytest.raises(ValueError, match=r"AudioClassificationData.max_seconds must be a positive number; got 0"):
        AudioClassificationData(train=str(clips), max_seconds=0)
    with pytest.raises(ValueError, match=r"AudioClassificationData.sampling_rate must be a positive integer"):
        AudioClassificationData(train=str(clips), sampling_rate=8000.5)
    with pytest.raises(ValueError, match=r"AudioClassification.num_labels must be None or an integer of at least 2"):
        AudioClassification("class:tests.tasks.media_hub.TinyWaveNet", num_labels=1)
    module = AudioClassification("class:tests.tasks.media_hub.TinyWaveNet")
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=1, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"sampling_rate is None and the model has no feature extractor"):
        run.fit(module, AudioClassificationData(train=str(clips)))
    import soundfile

    soundfile.write(clips / "low" / "empty.wav", torch.zeros(0).numpy(), 8000)
    data = AudioClassificationData(train=str(clips), sampling_rate=8000, batch_size=64, val_split=0.0)
    with pytest.raises(ValueError, match=r"empty.wav holds no samples"):
        trainer(tmp_path, max_epochs=1, enable_checkpointing=False).fit(module, data)
