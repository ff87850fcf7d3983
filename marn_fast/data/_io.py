"""File helpers of the data module: (gzip-)transparent CSV reading. Everything the data module
writes goes through `marn_fast.files` (atomic writes)."""
from __future__ import annotations

import csv
import gzip
import io
import os
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Iterator

# MIMIC notes and CAML TEXT fields are far longer than the csv module's 128 KiB default.
CSV_FIELD_SIZE_LIMIT = 2**31 - 1


def allow_long_csv_fields() -> None:
    """Raise the csv module's field size limit (process-wide) so long notes can be read."""
    if csv.field_size_limit() < CSV_FIELD_SIZE_LIMIT:
        csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)


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
