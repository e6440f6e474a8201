"""Reading input files (JSON, Parquet, Arrow IPC): a corrupt or wrongly shaped file is a
`UserError` naming the file, never a traceback.

A missing file still raises `FileNotFoundError` (callers check existence themselves with
their own hint; the CLI prints it as one line too).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_json(path: str | Path, expect: type | None = dict) -> Any:
    """Parse the JSON file at `path`; with `expect`, its top level must be of that type."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({_first_line(exc)})") from None
    if expect is not None and not isinstance(data, expect):
        want = _TYPE_NAMES.get(expect, expect.__name__)
        got = _TYPE_NAMES.get(type(data), type(data).__name__)
        raise UserError(f"{path}: expected {want} at the top level, got {got}")
    return data


@contextlib.contextmanager
def readable(path: str | Path, what: str) -> Iterator[None]:
    """Turn Arrow/Parquet read failures inside the block into `UserError(f"{path}: not {what}")`."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise UserError(f"{path}: not {what} ({_first_line(exc)})") from None


PARQUET = "a readable Parquet file"


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """`pq.read_table`, with a corrupt file as a `UserError`."""
    with readable(path, PARQUET):
        return pq.read_table(path, columns=columns)


def read_parquet_schema(path: str | Path) -> pa.Schema:
    """`pq.read_schema`, with a corrupt file as a `UserError`."""
    with readable(path, PARQUET):
        return pq.read_schema(path)


def parquet_file(path: str | Path) -> pq.ParquetFile:
    """`pq.ParquetFile` (footer read now), with a corrupt file as a `UserError`."""
    with readable(path, PARQUET):
        return pq.ParquetFile(path)
