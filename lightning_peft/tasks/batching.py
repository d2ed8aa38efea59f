"""Batching and shuffling for the DataModules: dynamic padding, a resumable shuffled order and loader."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_peft.tasks.reading import is_stream

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

    The permutation is drawn when the first index is taken, not when the iterator is made: a
    resumed Lightning fit makes its first epoch's iterator before it calls ``set_epoch``, and an
    order drawn then would be the one of the epoch the sampler was built with (epoch 0 again after
    a checkpoint written at the end of an epoch).

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

    def order(self) -> list[int]:
        """This epoch's permutation of ``range(size)``."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def __iter__(self) -> _Position:
        return _Position(self.order)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch = int(state_dict["epoch"])


class _Position:
    """An iterator over one epoch's order (drawn on the first ``next``) that saves and restores how far it got."""

    def __init__(self, draw: Callable[[], list[int]]) -> None:
        self.draw, self.order, self.yielded = draw, None, 0

    def __iter__(self) -> _Position:
        return self

    def __next__(self) -> int:
        if self.order is None:
            self.order = self.draw()
        if self.yielded >= len(self.order):
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.yielded = int(state_dict["yielded"])


class ResumableLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` that resumes a checkpoint written at the end of an epoch as
    the start of the next one.

    A state saved after an epoch's last batch (every batch of a sized loader handed out) holds a
    position with nothing left. ``StatefulDataLoader`` restores it into the next iterator, which
    Lightning uses for the next epoch: that epoch would yield no batch and the fit would end short
    (torchdata issue #1437). Such a state carries nothing to restore, so it is not loaded: the next
    epoch starts afresh, in the order ``set_epoch`` gives it, as in an uninterrupted run.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not is_stream(self.dataset) and state_dict.get("_num_yielded", 0) >= len(self):
            return
        super().load_state_dict(state_dict)


def resumable_loader(
    data: Dataset | Any,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any],
) -> ResumableLoader:
    """A split's loader: its position and shuffling order are saved in Lightning checkpoints and
    restored, so a run resumed from any checkpoint sees the same batches as an uninterrupted one
    (a plain DataLoader starts the epoch over).

    ``shuffle`` draws each epoch's order from ``seed`` and the epoch (:class:`EpochShuffle`; a
    stream shuffles itself). Worker seeds come from a generator of the loader's own: building or
    iterating it draws nothing from the global RNG, so a resumed run's dropout stays in step.
    """
    with warnings.catch_warnings():
        # torchdata 0.11's constructor calls torch's deprecated set_vital; not about the user's run.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        return ResumableLoader(
            data,
            batch_size=batch_size,
            sampler=EpochShuffle(len(data), seed) if shuffle and not is_stream(data) else None,
            generator=torch.Generator().manual_seed(seed),
            num_workers=num_workers,
            collate_fn=collate_fn,
        )
