"""File helpers shared by the data module: atomic writes and (gzip-)transparent CSV opening.

Everything the data module writes goes through `atomic_path`: the content is written to a
temporary file in the destination folder and moved into place with `os.replace`, so a crash
never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Iterator

# MIMIC notes and CAML TEXT fields are far longer than the csv module's 128 KiB default.
CSV_FIELD_SIZE_LIMIT = 2**31 - 1
TEMP_SUFFIX = ".tmp"  # atomic_path's temporary files: .<name>.<random>.tmp next to the target


def allow_long_csv_fields() -> None:
    """Raise the csv module's field size limit (process-wide) so long notes can be read."""
    if csv.field_size_limit() < CSV_FIELD_SIZE_LIMIT:
        csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)


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


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_text_writer(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a .csv or .csv.gz file for reading as text (UTF-8, newline='' for the csv module)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def find_table(folder: str | os.PathLike, name: str) -> Path:
    """The path of table `name` (e.g. "NOTEEVENTS.csv") in `folder`, plain or gzipped.

    Raises FileNotFoundError naming both candidates when neither exists.
    """
    folder = Path(folder)
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"neither {folder / name} nor {folder / (name + '.gz')} exists")


def csv_records(path: Path, required: Iterable[str], expected: str = "") -> Iterator[tuple[int, dict[str, str]]]:
    """(first line number, row as {column: value}) for each record of a CSV file; ValueError
    naming the file for an empty file or missing columns (`expected` is appended to those
    messages) and the file and line for a malformed row."""
    allow_long_csv_fields()
    with open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file{expected}")
            missing = [c for c in required if c not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; header is {header}{expected}")
            line = reader.line_num + 1  # first physical line of the next record
            for row in reader:
                start, line = line, reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}, line {start}: malformed row with {len(row)} fields, "
                                     f"expected {len(header)}")
                yield start, dict(zip(header, row))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}, near line {reader.line_num + 1}: not UTF-8 text ({exc.reason})") from exc
        except (OSError, EOFError, zlib.error, csv.Error) as exc:  # a damaged or truncated .gz, a csv error
            raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc


def warn_lines(path, what: str, lines: list[int]) -> None:
    """One warning naming the file, what happened and the first few line numbers."""
    if lines:
        shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
        warnings.warn(f"{path}: {len(lines)} {what} (lines {shown})", stacklevel=3)
