"""The mixed-batch benchmark runs end to end in its quick mode and writes its four-row table (no timings checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from benchmarks import mixed_batch  # noqa: E402


def test_quick_mode_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "mixed_batch.md"
    text = mixed_batch.main(["--quick", "--steps", "1", "--warmup", "0", "--out", str(out)])
    assert out.read_text() == text
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["mode", *mixed_batch.MODES]
    assert "mixed / single:" in text and "mixed / peft:" in text
    diffs = json.loads(out.with_suffix(".json").read_text())["max_abs_diff"]
    assert set(diffs) == {"loop", "peft", "single"}
    assert max(diffs.values()) < 1e-4  # mixed batch == each adapter on its own samples (and == peft's)
