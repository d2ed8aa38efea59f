"""The peft parity table (tests/interop/parity.py): every row matches both ways or is refused by name."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.interop import parity

ROWS = [pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else []) for case in parity.CASES]


@pytest.mark.parametrize("case", ROWS)
def test_parity_row(case: parity.Case, tmp_path: Path) -> None:
    assert parity.run(case, tmp_path) == ("refused" if case.refused else "pass")


def test_the_table_is_sound() -> None:
    ids = [case.id for case in parity.CASES]
    assert len(ids) == len(set(ids)), "two rows share an id"
    assert all(case.model in parity.MODELS for case in parity.CASES)
    assert all(bool(case.why) == (case.refused is not None) for case in parity.CASES), "a refusal needs its why"
    assert not any(case.convert and case.refused for case in parity.CASES)
    counts = Counter("refused" if case.refused else "match" for case in parity.CASES)
    assert counts["match"] > counts["refused"] > 0
