"""Batching and shuffling for the text DataModules: dynamic padding, and a resumable shuffled order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100
#: Padding values per batch key; every other list-valued key pads with the tokenizer's pad id.
_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def pad_collate(features: Sequence[dict[str, Any]], pad_token_id: int, *, left: bool = False) -> dict[str, Any]:
    """Batch a list of encoded examples, padding token lists to the longest one in the batch.

    Ints become a tensor; strings and lists of strings stay Python lists. A token list per example
    becomes (B, T); a list of token lists per example (one per answer choice) becomes (B, C, T),
    every choice padded to the longest of the batch. ``left`` pads on the left (decoder-only generation).
    """
    batch: dict[str, Any] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        first = values[0]
        if isinstance(first, str) or (isinstance(first, list) and first and isinstance(first[0], str)):
            batch[key] = values
        elif isinstance(first, int):
            batch[key] = torch.tensor(values)
        else:
            pad = _PAD.get(key, pad_token_id)
            nested = bool(first) and isinstance(first[0], list)
            if nested and len({len(v) for v in values}) > 1:
                raise ValueError(f"pad_collate: {key!r} has {sorted({len(v) for v in values})} choices in one batch.")
            rows = [row for v in values for row in v] if nested else values
            width = max(len(row) for row in rows)
            padded = [[pad] * (width - len(r)) + r if left else r + [pad] * (width - len(r)) for r in rows]
            tensor = torch.tensor(padded)  # (B, T), or (B * C, T) when nested
            batch[key] = tensor.view(len(values), -1, width) if nested else tensor  # (B, C, T)
    return batch


class EpochShuffle(Sampler[int]):
    """A shuffled order drawn from ``seed + epoch`` alone (as ``DistributedSampler`` draws it), so it resumes exactly.

    Lightning calls ``set_epoch`` before every epoch. Each epoch's permutation depends on nothing but
    the seed and that number: it draws nothing from the global RNG (which a resumed run restores
    before it builds its loaders, so dropout stays in step) and needs no generator history. The
    sampler (its epoch) and its iterators (their position) are ``Stateful`` for torchdata's
    ``StatefulDataLoader``, which Lightning saves in mid-epoch checkpoints.

    Args:
        size: the number of examples.
        seed: the base seed of every epoch's permutation.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> _Position:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return _Position(order.tolist())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch = int(state_dict["epoch"])


class _Position:
    """An iterator over one epoch's order that saves and restores how far it got."""

    def __init__(self, order: list[int]) -> None:
        self.order, self.yielded = order, 0

    def __iter__(self) -> _Position:
        return self

    def __next__(self) -> int:
        if self.yielded >= len(self.order):
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.yielded = int(state_dict["yielded"])
