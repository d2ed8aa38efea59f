"""The one place where lightning_peft reads and writes files (pure Python and torch; imports nothing above).

- :func:`load_torch` is the only ``torch.load``: always ``weights_only=True``, so a checkpoint
  that holds a pickled object (which could run code) is refused, never unpickled.
  :func:`unpickle_plain` reads the few plain pickles other formats keep (DCP's ``.metadata``)
  with an allowlist of data classes. :func:`load_tensors` reads safetensors, :func:`read_json`
  JSON. Each names the file and says what is wrong with it (:class:`FileContentError`).
- :func:`atomic_write` writes a temporary file in the target's own folder, fsyncs it and renames
  it over the target: a reader sees the old file or the new one, never half of one, and a write
  killed midway leaves nothing behind (see :func:`atomic_write` for how). :func:`save_torch`,
  :func:`save_tensors` and :func:`write_json` (which refuses NaN, naming the field) use it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import pickle
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

PathLike = str | os.PathLike[str]


class FileContentError(ValueError):
    """A file lightning_peft reads exists, but is truncated, corrupt, or holds what it refuses to load."""


# --------------------------------------------------------------------------- reading


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message (torch's go on for a paragraph)."""
    text = str(error).strip().splitlines()
    return text[0].split(". ")[0].rstrip(".") if text and text[0] else type(error).__name__


def load_torch(
    source: PathLike | IO[bytes], *, map_location: Any = "cpu", name: str | None = None, allow: Iterable[type] = ()
) -> Any:
    """``torch.load(source, weights_only=True)``, the only way lightning_peft reads a torch file.

    Args:
        source: a path, or an open binary file (then ``name`` says what to call it).
        map_location: as for ``torch.load``.
        name: what errors call the file (default: its path).
        allow: data classes another library stores in its files (DeepSpeed's loss scaler), allowed
            besides torch's plain types for this one read; never a function.

    Raises:
        FileNotFoundError: when ``source`` is a path with no file.
        FileContentError: when the file holds a pickled object (naming its class) or is truncated
            or corrupt.
    """
    label = name or str(source)
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        what = "a folder, not a checkpoint file" if Path(source).is_dir() else "missing"
        raise FileNotFoundError(f"checkpoint file {label} is {what}.")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(source, map_location=map_location, weights_only=True)  # type: ignore[arg-type]
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise FileContentError(
                f"{label} is not a plain-tensor checkpoint: it holds a pickled Python object ({found.group(1)}), "
                "which could run code when loaded. lightning_peft loads checkpoints with weights_only=True and never "
                f"unpickles; if you trust the file and {found.group(1)} is plain data, allow it with "
                "torch.serialization.add_safe_globals([...]) before loading."
            ) from error
        found = re.search(r"WeightsUnpickler error: \s*(.+)", str(error))
        detail = found.group(1).strip() if found else _first_line(error)
        raise FileContentError(
            f"{label} is not a plain-tensor checkpoint (torch's weights-only reader stopped at: {detail}): it is "
            "corrupt, not a PyTorch file, or holds pickled code. lightning_peft never unpickles; save it again, or "
            "copy it again if it was transferred."
        ) from error
    except (EOFError, OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "PytorchStreamReader" not in str(error):
            raise  # not the file's fault (a device it names that this machine lacks, ...)
        if isinstance(error, OSError) and error.errno != errno.EINVAL:
            raise  # permissions, I/O errors: the system's message says it
        raise FileContentError(
            f"{label} is truncated or corrupt ({_first_line(error)}); the save that wrote it was interrupted or the "
            "copy is incomplete. Use another checkpoint, or copy this one again."
        ) from error


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], label: str, allowed: Callable[[str, str, Any], bool]) -> None:
        super().__init__(file)
        self.label, self.allowed = label, allowed

    def find_class(self, module: str, name: str) -> Any:
        found = None
        with contextlib.suppress(Exception):
            found = getattr(__import__(module, fromlist=[name]), name)
        if found is None or not self.allowed(module, name, found):
            raise FileContentError(
                f"{self.label} is not a plain-tensor checkpoint file: it holds a pickled {module}.{name}, which "
                "could run code when loaded; lightning_peft never unpickles. Write the checkpoint again."
            )
        return found


def unpickle_plain(path: PathLike, allowed: Callable[[str, str, Any], bool]) -> Any:
    """Read a pickle another format keeps beside its tensors (DCP's ``.metadata``), allowing only the
    globals ``allowed(module, name, object)`` accepts: data classes, never a function that runs code.

    Raises:
        FileNotFoundError: when there is no file at ``path``.
        FileContentError: for a global ``allowed`` refuses, or a truncated or corrupt file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing.")
    with open(path, "rb") as handle:
        try:
            return _PlainUnpickler(handle, str(path), allowed).load()
        except FileContentError:
            raise
        except Exception as error:
            raise FileContentError(f"{path} is truncated or corrupt ({_first_line(error)}); write it again.") from error


def load_tensors(path: PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file (a format without code), with the file named on failure.

    Raises:
        FileNotFoundError: when there is no file at ``path``.
        FileContentError: when it is truncated, corrupt or not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise FileContentError(
            f"{path} is not a readable safetensors file ({_first_line(error)}): it is truncated, corrupt, or another "
            "format. Write it again, or copy it again if it was transferred."
        ) from error


def read_json(path: PathLike) -> Any:
    """The JSON value in ``path``, with the file, line and column named when it does not parse.

    Raises:
        FileNotFoundError: when there is no file at ``path``.
        FileContentError: when it is not valid UTF-8 JSON (truncated, or edited by hand).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing.")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise FileContentError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); write it again."
        ) from error
    except json.JSONDecodeError as error:
        raise FileContentError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): it is truncated or "
            "was edited by hand. Write it again (save_adapter / save_peft_adapter)."
        ) from error


# --------------------------------------------------------------------------- writing

#: Temporary files are ``.<target>.<host>.<pid>.<random>.lp-tmp`` beside their target.
_TEMP_SUFFIX = ".lp-tmp"
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_temporaries(target: Path) -> list[Path]:
    """Remove the temporary files of ``target`` that writers on this host left when they were killed
    (their process no longer runs); returns what was removed. Other hosts' files are left alone."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return []
    removed = []
    prefix = f".{target.name}.{_HOST}."
    for found in glob.glob(glob.escape(str(target.parent / prefix)) + "*" + _TEMP_SUFFIX):
        pid = Path(found).name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(found)
                removed.append(Path(found))
    return removed


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not possible everywhere (Windows); the rename itself is atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: Devices (``st_dev``) whose unnamed files cannot be given a name (no ``linkat`` through /proc).
_NO_UNNAMED: set[int] = set()


def _write_unnamed(target: Path, write: Callable[[IO[bytes]], None]) -> Path | None:
    """Write into an unnamed file in ``target``'s folder (Linux ``O_TMPFILE``), then give it a temporary
    name; ``None`` where the filesystem has no unnamed files. A kill before the name leaves nothing."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd") or os.stat(target.parent).st_dev in _NO_UNNAMED:
        return None
    try:
        fd = os.open(target.parent, flag | os.O_RDWR, 0o666)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise
    try:
        with os.fdopen(fd, "w+b", closefd=False) as handle:
            write(handle)
            handle.flush()
            os.fsync(fd)
            temp = _temp_path(target)
            try:
                os.link(f"/proc/self/fd/{fd}", temp)
            except OSError:  # some kernels and sandboxes refuse the link: copy it into a named file once
                _NO_UNNAMED.add(os.stat(target.parent).st_dev)
                handle.seek(0)
                return _write_named(target, lambda out: shutil.copyfileobj(handle, out))
    finally:
        os.close(fd)
    return temp


def _write_named(target: Path, write: Callable[[IO[bytes]], None]) -> Path:
    temp = _temp_path(target)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return temp


def atomic_write(path: PathLike, data: bytes | Callable[[IO[bytes]], None]) -> Path:
    """Replace the file at ``path`` (its folder created if needed) with ``data`` in one step.

    The bytes go to a temporary file in the same folder (so the final rename never crosses a
    filesystem and is never a copy), are fsynced, and the file is renamed over ``path``; a reader
    sees the old file or the new one. On Linux the temporary file has no name until it is complete
    (``O_TMPFILE``), so a write killed midway, even by SIGKILL, leaves nothing behind; elsewhere it
    is ``.<name>.<host>.<pid>.<random>.lp-tmp``, removed on any error, and, after a kill, by the
    next write of the same file on the same host once that process is gone. Nothing goes to
    ``$TMPDIR``.

    Args:
        path: the file to write.
        data: the bytes, or a function that writes them to the open binary file it is given.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write = data if callable(data) else (lambda handle: handle.write(data))  # type: ignore[arg-type, return-value]
    sweep_temporaries(target)
    temp = _write_unnamed(target, write) or _write_named(target, write)
    try:
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_folder(target.parent)
    return target


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def _non_finite(value: Any, where: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, float) and not math.isfinite(value):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}[{index}]")


def json_bytes(value: Any, path: PathLike) -> bytes:
    """``value`` as standard JSON, for writing to ``path``.

    Raises:
        ValueError: naming each field that holds NaN or an infinity, which JSON cannot represent
            (Python would write a bare ``NaN`` that other readers refuse).
    """
    bad = list(_non_finite(value, ""))
    if bad:
        fields = ", ".join(f"{field}={number!r}" for field, number in bad[:5])
        raise ValueError(
            f"cannot write {path}: {fields} is not a finite number, and JSON has no NaN or infinity. "
            "Set the option to a finite value."
        )
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=False).encode()


def write_json(path: PathLike, value: Any) -> Path:
    """Write ``value`` as standard JSON through :func:`atomic_write` (see :func:`json_bytes`)."""
    return atomic_write(path, json_bytes(value, path))


def save_tensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file through :func:`atomic_write` (copies made contiguous on CPU first)."""
    from safetensors.torch import save

    # safetensors wants contiguous CPU tensors that share no storage.
    copies = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    return atomic_write(path, save(copies, metadata=metadata))
