"""Opening records through Hugging Face ``datasets``: local files, saved datasets, folders, Hub ids, streams.

What a source may be (``open_file`` for the ``*_file`` options, ``open_dataset`` for ``dataset``):

* a data file, read by the ``datasets`` builder its suffix names:

  ===================  ===========  ======================================================================
  suffix               builder      records
  ===================  ===========  ======================================================================
  ``.csv`` / ``.tsv``  ``csv``      a header row, then one record per row; every cell a string, as
                                    written (no NA conversion: an empty cell is ``""``)
  ``.json``            ``json``     a JSON list of objects (or one object per line)
  ``.jsonl``           ``json``     one JSON object per line
  ``.parquet``         ``parquet``  one record per row
  ``.txt``             ``text``     one record per non-empty line, in the single column ``text``
  ===================  ===========  ======================================================================

* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``load_from_disk``);
* any other folder, given to ``load_dataset`` (data files, ``imagefolder``, ``audiofolder`` layouts);
* a named offline dataset of :mod:`lightning_peft.tasks.datasets` (``bbc_news``, ...);
* otherwise a Hugging Face Hub dataset id, refused up front when the Hub is switched off
  (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``), so nothing waits on the network.

Caching: ``load_dataset`` prepares Arrow files in ``datasets``' cache (``HF_DATASETS_CACHE``, or the
datamodule's ``cache_dir``) and ``Dataset.map`` caches its results beside its input's Arrow files
(that cache, or a saved dataset's own folder). Nothing is written to the working directory.
With ``streaming``, files are read lazily as an ``IterableDataset``: a corpus bigger than memory
is tokenized as batches are drawn, and only the part read so far was ever parsed.
"""

from __future__ import annotations

import csv
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, overload

import torch

from lightning_peft.tasks import datasets as named

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

Record = dict[str, Any]
#: What a split's records are held in: an Arrow-backed table, or a stream.
Data = Union["Dataset", "IterableDataset", "ShuffledStream"]

#: suffix -> (``datasets`` builder, what the format is called in errors)
FORMATS: dict[str, tuple[str, str]] = {
    ".csv": ("csv", "CSV"),
    ".tsv": ("csv", "TSV"),
    ".json": ("json", "JSON"),
    ".jsonl": ("json", "JSON lines"),
    ".parquet": ("parquet", "Parquet"),
    ".txt": ("text", "text lines"),
}
SOURCES = (
    "a named offline dataset ({named}), a data file ({suffixes}), a folder saved with save_to_disk, "
    "a folder of data files, or a Hugging Face Hub dataset id"
)
_TRUE = ("1", "true", "yes", "on")


def describe_sources() -> str:
    """Every kind of value ``dataset`` takes, for error messages."""
    return SOURCES.format(named=", ".join(map(repr, named.NAMED)), suffixes=", ".join(FORMATS))


def hub_offline() -> bool:
    """Whether the environment switches the Hugging Face Hub off (``datasets`` reads the same variables)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "\\")) or Path(value).suffix.lower() in FORMATS


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_to_disk`` (a Dataset's state, or a DatasetDict's split list)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def check_dataset(value: str, *, field: str) -> None:
    """Fail now for a ``dataset`` value that cannot load: a missing package or path, a Hub id while offline."""
    if value in named.NAMED:
        named.check_named(value, owner=field.rpartition(".")[0] or field)
        return
    path = Path(value).expanduser()
    if path.exists():
        return
    if _looks_like_path(value):
        raise FileNotFoundError(f"{field}={value!r} does not exist; give {describe_sources()}.")
    if hub_offline():
        raise ValueError(
            f"{field}={value!r} is neither a named offline dataset ({', '.join(map(repr, named.NAMED))}) nor an "
            "existing local path, and the Hugging Face Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), "
            f"so it cannot be a Hub dataset id; give {describe_sources()}."
        )


#: Work smaller than this gets no progress bar from ``datasets`` (bytes of a file, records to map):
#: a bar that fills at once is noise on stderr, a long read or map keeps its bar.
QUIET_BELOW = {"bytes": 16 * 2**20, "records": 20_000}


@contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """``datasets``' progress bars on or off for a block (off only if they were on: the user's choice wins)."""
    import datasets

    switch = not show and not datasets.are_progress_bars_disabled()
    if switch:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            datasets.enable_progress_bars()


def _empty() -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({})


def _csv_header(path: Path, delimiter: str) -> list[str]:
    """The header row alone (the builder then reads every column as a string)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:  # pandas drops a byte-order mark too
        return next(csv.reader(handle, delimiter=delimiter), [])


def open_file(path: str | Path, *, field: str, streaming: bool = False, cache_dir: str | None = None) -> Data:
    """The records of a local data file (the builder follows the suffix: see the module docstring).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for an unknown suffix, or a file its builder cannot parse (naming the file and the cause).
    """
    from datasets import Features, Value, load_dataset

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{field}={str(path)!r} has an unsupported suffix; use one of {', '.join(FORMATS)}.")
    builder, what = FORMATS[suffix]
    options: dict[str, Any] = {}
    if builder == "csv":
        delimiter = "\t" if suffix == ".tsv" else ","
        header = _csv_header(path, delimiter)
        if not header:
            return _empty()
        # Cells stay the strings they are (as a CSV reader gives them): "007" is not 7, "NA" is not missing.
        options = {
            "sep": delimiter,
            "features": Features({name: Value("string") for name in header}),
            "keep_default_na": False,
            "na_filter": False,
            "index_col": False,  # a row with an extra cell is an error, not a shift of every column
        }
    try:
        with warnings.catch_warnings():
            # pandas only warns of a row longer than the header ("loss of data"): refuse the file instead.
            warnings.filterwarnings("error", message=".*does not match length of data")
            with progress_bars(path.stat().st_size >= QUIET_BELOW["bytes"]):
                data = load_dataset(
                    builder, data_files=str(path), split="train", streaming=streaming, cache_dir=cache_dir, **options
                )
    except Exception as error:  # datasets wraps the parser's error; name the file and quote the cause
        cause = error.__cause__ or error
        if type(cause).__name__ == "EmptyDataError" or "corresponds to no data" in str(error):
            return _empty()
        raise ValueError(f"{field}={str(path)!r} could not be read as {what}: {cause}") from error
    if builder == "text":  # blank lines are no examples
        with progress_bars(streaming or len(data) >= QUIET_BELOW["records"]):
            data = data.filter(lambda line: bool(line.strip()), input_columns="text")
    return data


def open_dataset(value: str, *, field: str, streaming: bool = False, cache_dir: str | None = None) -> dict[str, Data]:
    """The splits of a ``dataset`` value (one ``train`` split unless the source holds several).

    Raises:
        FileNotFoundError / ValueError / ModuleNotFoundError: as :func:`check_dataset`, and for a Hub
            id that fails to load (quoting ``datasets``' error).
    """
    from datasets import Dataset, IterableDataset, load_dataset, load_from_disk

    check_dataset(value, field=field)
    loaded: Any
    path = Path(value).expanduser()
    if value in named.NAMED:
        loaded = Dataset.from_list(named.load_named(value, owner=field))
    elif path.is_file():
        loaded = open_file(path, field=field, streaming=streaming, cache_dir=cache_dir)
    elif path.is_dir() and is_saved_dataset(path):
        loaded = load_from_disk(str(path))  # memory-mapped: streaming only changes how it is iterated
    elif path.is_dir():
        loaded = load_dataset(str(path), streaming=streaming, cache_dir=cache_dir)
    else:
        try:
            loaded = load_dataset(value, streaming=streaming, cache_dir=cache_dir)
        except Exception as error:
            raise ValueError(
                f"{field}={value!r} is neither a named offline dataset ({', '.join(map(repr, named.NAMED))}) nor a "
                f"local path, and loading it as a Hugging Face Hub dataset failed: {error}"
            ) from error
    splits = {"train": loaded} if isinstance(loaded, (Dataset, IterableDataset)) else dict(loaded)
    if streaming:
        splits = {k: v.to_iterable_dataset() if isinstance(v, Dataset) else v for k, v in splits.items()}
    return splits


def is_stream(data: object) -> bool:
    """Whether ``data`` is read lazily: a ``datasets.IterableDataset`` or a :class:`ShuffledStream`."""
    from datasets import IterableDataset

    return isinstance(data, (IterableDataset, ShuffledStream))


class ShuffledStream(torch.utils.data.IterableDataset):
    """A stream's records shuffled in a buffer, encoded as they leave it, with a state that resumes exactly.

    The buffer holds ``buffer_size`` records; each record read after it is full takes the place of
    one drawn at random, which is handed out, and the buffer is emptied in random order at the end
    of the stream (what ``datasets``' ``IterableDataset.shuffle`` does). The draws come from a
    generator seeded with ``seed`` (and the DataLoader worker's id), so every pass gives the same
    order. ``datasets`` does not save its shuffle buffer, so a run resumed from its stream position
    would never see the records that were waiting in it; here the state is the number of records
    handed out this pass, and a restored stream reads the source again from its start, replaying the
    buffer's draws without encoding what it skips: a resumed run sees exactly the records an
    uninterrupted one sees, for the price of reading (not tokenizing) the records already trained on.
    The ``StatefulDataLoader`` saves and restores that state (per worker) in Lightning checkpoints.
    """

    def __init__(
        self, records: Iterable[Record], *, buffer_size: int, seed: int, encode: Callable[[Record], dict[str, Any]]
    ) -> None:
        super().__init__()
        self.records, self.buffer_size, self.seed, self.encode = records, buffer_size, seed, encode
        self._handed_out = 0  # records this pass has handed out (in this worker)
        self._skip = 0  # records the next pass skips (restored state)
        self._keep: list[tuple[Callable[[Any], bool], str]] = []

    def filter(self, keep: Callable[[Any], bool], input_columns: str) -> ShuffledStream:
        """The stream without the examples for which ``keep(example[input_columns])`` is false (as ``datasets``)."""
        kept = ShuffledStream(self.records, buffer_size=self.buffer_size, seed=self.seed, encode=self.encode)
        kept._keep = [*self._keep, (keep, input_columns)]
        return kept

    def _shuffled(self) -> Iterator[Record]:
        worker = torch.utils.data.get_worker_info()
        draws = random.Random(self.seed * 1_000_003 + (worker.id if worker is not None else 0))
        buffer: list[Record] = []
        for record in self.records:
            if len(buffer) < self.buffer_size:
                buffer.append(record)
                continue
            at = draws.randrange(self.buffer_size)
            yield buffer[at]
            buffer[at] = record
        draws.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, self._skip, self._handed_out = self._skip, 0, 0
        for number, record in enumerate(self._shuffled()):
            self._handed_out = number + 1
            if number < skip:
                continue
            example = self.encode(record)
            if all(keep(example[column]) for keep, column in self._keep):
                yield example

    def state_dict(self) -> dict[str, int]:
        return {"handed_out": self._handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["handed_out"])


class Rows(Sequence[Record]):
    """A split's records as a read-only sequence of dicts, over an Arrow-backed ``Dataset``.

    Rows are converted one at a time when read, so a memory-mapped corpus stays on disk.
    """

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> Rows: ...

    def __getitem__(self, index: int | slice) -> Record | Rows:
        if isinstance(index, slice):
            return Rows(self.data.select(range(len(self))[index]))
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return self.data[index % len(self)]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.data)

    def __repr__(self) -> str:
        return f"Rows({len(self)} records, columns {self.data.column_names})"


def first_null(data: Dataset, column: str) -> int | None:
    """The index of the first record whose ``column`` is missing (null), read from Arrow without Python rows."""
    import pyarrow.compute as pc

    values = data.with_format("arrow")[column]  # honours a selection (held-out split) of the table
    if values.null_count == 0:
        return None
    return int(pc.index(pc.is_null(values), True).as_py())
