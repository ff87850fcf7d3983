"""Atomic file writes, shared by every layer (stdlib only: nothing here imports the package).

`atomic_path` yields a temporary file in the destination folder; on success it is fsynced and
moved into place with `os.replace` (and the folder fsynced), so a crash never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

TEMP_SUFFIX = ".tmp"  # atomic_path's temporary files: .<name>.<random>.tmp next to the target


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems cannot fsync a folder; a file must be durable
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    The temporary file is fsynced before `os.replace`, and the folder after it, so a crash
    or power loss leaves the old or the new content under `path`, never a partial file.
    On an exception the temporary file is removed and `path` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # A failed write (ENOSPC, EIO, ...) names no file: name the one being written.
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise
    _fsync(final.parent, directory=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_path` leaves in `folder` when its process is
    killed mid-write (`.<name>.<random>.tmp`); returns them. Call only when no other process
    writes to `folder`."""
    stale = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


@contextlib.contextmanager
def atomic_text_writer(path: str | os.PathLike) -> Iterator[io.TextIOBase]:
    """Open a text file for writing (UTF-8, newline='' for the csv module) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            yield handle


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_text_writer(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to path atomically."""
    with atomic_text_writer(path) as handle:
        handle.write(text)
