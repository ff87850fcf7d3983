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
from pathlib import Path
from typing import Iterable, Iterator

# MIMIC notes and CAML TEXT fields are far longer than the csv module's 128 KiB default.
CSV_FIELD_SIZE_LIMIT = 2**31 - 1


def allow_long_csv_fields() -> None:
    """Raise the csv module's field size limit (process-wide) so long notes can be read."""
    if csv.field_size_limit() < CSV_FIELD_SIZE_LIMIT:
        csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


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
                raise ValueError(f"{path}, line {start}: malformed row with {len(row)} fields, expected {len(header)}")
            yield start, dict(zip(header, row))


def warn_lines(path, what: str, lines: list[int]) -> None:
    """One warning naming the file, what happened and the first few line numbers."""
    if lines:
        shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
        warnings.warn(f"{path}: {len(lines)} {what} (lines {shown})", stacklevel=3)
