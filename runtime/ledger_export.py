"""`joulecap ledger export`: the ledger as CSV, JSON lines or Parquet, for an operator's own tools.

Parquet needs `pyarrow` (`pip install 'joulecap[parquet]'`); it is imported only for that
format. Every column keeps its type (text, float, integer; `interpolated`, `jetson_clocks` and
`budget_exceeded` as booleans); `plan` is JSON text in CSV and Parquet and an object in JSON
lines.

A file is written next to its destination under a temporary name and renamed when complete,
so an export that fails (an unwritable folder, a full disk) leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from joulecap.runtime.ledger import COLUMN_NAMES, COLUMNS, Ledger

ExportFormat = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[ExportFormat, ...] = ("csv", "jsonl", "parquet")

BOOL_COLUMNS = frozenset({"interpolated", "jetson_clocks", "budget_exceeded"})
"""INTEGER columns that hold a flag (exported as booleans)."""


class ExportError(RuntimeError):
    """The export cannot be done (missing extra, unwritable destination); the message says why."""


def _rows(ledger: Ledger) -> Iterator[dict[str, Any]]:
    return ledger._iter_all()


def _plan_text(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["plan"] = json.dumps(row["plan"], sort_keys=True) if row["plan"] is not None else None
    return out


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Header and one line per row (`plan` as JSON text, null as an empty field)."""
    writer = csv.DictWriter(out, fieldnames=list(COLUMN_NAMES), lineterminator="\n")
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow(_plan_text(row))
        n += 1
    return n


def write_jsonl(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """One JSON object per line."""
    n = 0
    for row in rows:
        out.write(json.dumps(row) + "\n")
        n += 1
    return n


def _arrow_type(pa: Any, name: str, decl: str) -> Any:
    if name in BOOL_COLUMNS:
        return pa.bool_()
    if decl.startswith("REAL"):
        return pa.float64()
    if decl.startswith("INTEGER"):
        return pa.int64()
    return pa.string()


def write_parquet(rows: Iterable[dict[str, Any]], path: str) -> int:
    """Every row into one Parquet file with a typed schema.

    Raises:
        ExportError: pyarrow is not installed.

    """
    try:
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise ExportError(f"Parquet export needs pyarrow: pip install 'joulecap[parquet]' ({exc})") from exc
    schema = pa.schema([(name, _arrow_type(pa, name, decl)) for name, decl in COLUMNS])
    columns: dict[str, list[Any]] = {name: [] for name in COLUMN_NAMES}
    n = 0
    for row in rows:
        row = _plan_text(row)
        for name in COLUMN_NAMES:
            columns[name].append(row[name])
        n += 1
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path)
    return n


def export_ledger(ledger: Ledger, fmt: ExportFormat, out_path: str | None, stdout: TextIO) -> int:
    """Write every row of `ledger` as `fmt` to `out_path` (or `stdout` for csv and jsonl).

    Returns:
        Rows written.

    Raises:
        ExportError: Unknown format, Parquet to stdout or without pyarrow, or the destination
            cannot be written (the message names it and the reason).

    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if out_path is None:
        if fmt == "parquet":
            raise ExportError("Parquet is binary: pass --out FILE")
        return write_csv(_rows(ledger), stdout) if fmt == "csv" else write_jsonl(_rows(ledger), stdout)
    dest = Path(out_path)
    if dest.is_dir():
        raise ExportError(f"cannot write {out_path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    except OSError as exc:
        raise ExportError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
    try:
        if fmt == "parquet":
            os.close(fd)
            n = write_parquet(_rows(ledger), tmp)
        else:
            with open(fd, "w", encoding="utf-8", newline="") as f:
                n = write_csv(_rows(ledger), f) if fmt == "csv" else write_jsonl(_rows(ledger), f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write {out_path}: {exc.strerror or exc}") from exc
        raise
    return n
