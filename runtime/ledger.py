"""SQLite ledger: one row per request with its plan and energy, committed before the response.

Durability: WAL journal with `synchronous=FULL`, so a row whose `record_*` call returned
survives a crash or `kill -9` of the server (and a power loss, as far as the disk honours
fsync). One connection shared by the engine threads and the HTTP handlers, guarded by a
lock. The schema is versioned with `PRAGMA user_version`; a newer ledger is refused rather
than silently misread.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from joulecap.runtime.energy.power_state import PowerState
from joulecap.runtime.energy.quality import MeasurementQuality, ledger_energy_j, measurement_quality
from joulecap.runtime.types import ChatResult, EnergyReport, Plan, RequestStatus

SCHEMA_VERSION = 2
"""1: the first schema. 2: encode, LM prefill and run apart; margin, minimum and budget_exceeded;
power state, measurement quality and the API key's name per row."""


COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"),
    ("created_s", "REAL NOT NULL"),
    ("recorded_s", "REAL NOT NULL"),
    ("model", "TEXT"),
    ("policy", "TEXT"),
    ("plan", "TEXT"),
    ("budget_j", "REAL"),
    ("predicted_j", "REAL"),
    ("measured_j", "REAL"),
    ("encode_j", "REAL"),
    ("prefill_j", "REAL"),
    ("decode_j", "REAL"),
    ("run_j", "REAL"),
    ("idle_j", "REAL"),
    ("source", "TEXT"),
    ("meter", "TEXT"),
    ("interpolated", "INTEGER"),
    ("energy_note", "TEXT"),
    ("prompt_tokens", "INTEGER"),
    ("visual_tokens_in", "INTEGER"),
    ("visual_tokens_kept", "INTEGER"),
    ("completion_tokens", "INTEGER"),
    ("max_new_tokens", "INTEGER"),
    ("stop_reason", "TEXT"),
    ("status", "TEXT NOT NULL"),
    ("error", "TEXT"),
    ("duration_s", "REAL"),
    ("margin", "REAL"),
    ("min_j", "REAL"),
    ("budget_exceeded", "INTEGER"),
    # Schema 2: the power state the request ran in (null where the hardware does not say).
    ("power_mode", "TEXT"),
    ("power_mode_id", "INTEGER"),
    ("jetson_clocks", "INTEGER"),
    ("gpu_clock_mhz", "REAL"),
    ("cpu_clock_mhz", "REAL"),
    ("emc_clock_mhz", "REAL"),
    ("gpu_temp_c", "REAL"),
    ("cpu_temp_c", "REAL"),
    ("power_limit_w", "REAL"),
    ("throttle_reasons", "TEXT"),
    # Schema 2: how the energy figure was measured (runtime/energy/quality.py).
    ("meter_kind", "TEXT"),
    ("sample_period_s", "REAL"),
    ("meter_update_period_s", "REAL"),
    ("interpolation", "TEXT"),
    ("idle_share", "REAL"),
    ("samples", "INTEGER"),
    # Schema 2: the API key's NAME from --api-keys (never the key itself).
    ("key_name", "TEXT"),
)
"""Ledger columns in export order. `plan` is JSON; `created_s`/`recorded_s` are Unix times.
`measured_j` is every joule the request spent: `encode_j` (image preprocessing and vision tower),
`prefill_j` (the LM prefill) and `decode_j`; `run_j` is prefill + decode; it is null when the meter
gave no reading the hardware supports (never a false 0 J). `margin` is the feasibility margin its
plan was made with, `min_j` the smallest budget its policy would have accepted."""

COLUMN_NAMES = tuple(name for name, _ in COLUMNS)


_PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(Plan))
_FLAT = (str, int, float, bool, type(None))


def _plan_json(plan: Plan | None) -> str | None:
    if plan is None:
        return None
    # A plan's fields are scalars and a tuple of ints: read them directly. `asdict` deep-copies
    # every value first (a cost paid on each request's row) and gives the same JSON for these.
    fields = {name: getattr(plan, name) for name in _PLAN_FIELDS}
    for value in fields.values():
        if not (
            isinstance(value, _FLAT)
            or (isinstance(value, tuple) and all(isinstance(v, _FLAT) for v in value))
        ):
            return json.dumps(dataclasses.asdict(plan), sort_keys=True)  # anything else: the general form
    return json.dumps(fields, sort_keys=True)


def _energy_fields(energy: EnergyReport | None, quality: MeasurementQuality | None) -> dict[str, Any]:
    if energy is None:
        return {}
    quality = quality or measurement_quality(energy)
    return {
        **quality.ledger_fields(),
        "measured_j": ledger_energy_j(energy),
        "encode_j": energy.encode_j,
        "prefill_j": energy.prefill_j,
        "decode_j": energy.decode_j,
        "run_j": energy.run_j,
        "idle_j": energy.idle_j,
        "source": energy.source,
        "meter": energy.meter,
        "interpolated": int(energy.interpolated),
        "energy_note": energy.note or None,
        "duration_s": energy.duration_s,
    }


def _plan_fields(plan: Plan | None) -> dict[str, Any]:
    if plan is None:
        return {}
    return {
        "policy": plan.policy,
        "plan": _plan_json(plan),
        "budget_j": plan.budget_j,
        "predicted_j": plan.predicted_j,
        "max_new_tokens": plan.max_new_tokens,
        "margin": plan.margin,
        "min_j": plan.min_j,
    }


class Ledger:
    """The request ledger.

    Args:
        path: SQLite file (created with its parent directory's permissions), or `:memory:`.

    """

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":  # a fresh cache directory: the ledger is the first file in it
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._migrate()

    def _migrate(self) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"ledger {self.path} has schema version {version}, newer than this joulecap's "
                f"{SCHEMA_VERSION}; use a newer joulecap or another --ledger-path"
            )
        if version == SCHEMA_VERSION:
            return
        cols = ",\n  ".join(f"{name} {decl}" for name, decl in COLUMNS)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS requests (\n  {cols}\n)")
            # An older ledger gains the newer columns (null in its existing rows).
            have = {r[1] for r in self._conn.execute("PRAGMA table_info(requests)").fetchall()}
            for name, decl in COLUMNS:
                if name not in have:
                    self._conn.execute(f"ALTER TABLE requests ADD COLUMN {name} {decl}")
            if version == 1:
                self._migrate_v1()
            self._conn.execute("CREATE INDEX IF NOT EXISTS requests_created ON requests(created_s)")
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _migrate_v1(self) -> None:
        """Schema 1 -> 2: schema 1's `prefill_j` and `measured_j` held the encode too, unsplit.

        Those rows cannot be split after the fact: their `prefill_j` (encode + LM prefill) moves
        into the note, `encode_j` and `prefill_j` become NULL (unknown), `run_j` stays NULL and
        `decode_j` and `measured_j` keep their meaning.
        """
        self._conn.execute(
            "UPDATE requests SET energy_note = trim(coalesce(energy_note || '; ', '') || "
            "'schema 1 row: encode + LM prefill ' || printf('%.6f', prefill_j) || ' J, not split'), "
            "prefill_j = NULL WHERE prefill_j IS NOT NULL"
        )
        self._conn.execute(
            "UPDATE requests SET budget_exceeded = (measured_j > budget_j) "
            "WHERE budget_j IS NOT NULL AND measured_j IS NOT NULL"
        )

    def _insert(self, row: dict[str, Any]) -> None:
        names = [n for n in COLUMN_NAMES if n in row]
        sql = f"INSERT OR REPLACE INTO requests ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
        with self._lock:
            # Autocommit mode: the statement is its own transaction, durable when execute returns.
            self._conn.execute(sql, [row[n] for n in names])

    def record_result(
        self,
        result: ChatResult,
        *,
        status: RequestStatus = "ok",
        power_state: PowerState | None = None,
        quality: MeasurementQuality | None = None,
        key_name: str | None = None,
    ) -> None:
        """Record a finished request; the row is committed (fsynced) when this returns.

        Args:
            result: The finished request.
            status: Its ledger status.
            power_state: The power state it ran in (None: the columns stay null).
            quality: Its measurement quality (`EnergyMonitor.quality`); None derives what the
                report itself says.
            key_name: The NAME of the API key it came with (never the key).

        """
        gen = result.generation
        row: dict[str, Any] = {
            "id": result.request_id,
            "created_s": result.created_s,
            "recorded_s": time.time(),
            "model": result.model,
            **_plan_fields(result.plan),
            **_energy_fields(result.energy, quality),
            **(power_state.ledger_fields() if power_state is not None else {}),
            "key_name": key_name,
            "prompt_tokens": gen.prefill_tokens,
            "visual_tokens_in": gen.visual_tokens_in,
            "visual_tokens_kept": gen.visual_tokens_kept,
            "completion_tokens": len(gen.token_ids),
            "stop_reason": gen.stop_reason,
            "status": status,
            "error": None,
            "budget_exceeded": int(result.budget_exceeded),
        }
        self._insert(row)

    def record_failure(
        self,
        request_id: str,
        model: str,
        plan: Plan | None,
        energy: EnergyReport | None,
        status: RequestStatus = "error",
        error: str = "",
        *,
        created_s: float | None = None,
        policy: str | None = None,
        budget_j: float | None = None,
        power_state: PowerState | None = None,
        quality: MeasurementQuality | None = None,
        key_name: str | None = None,
    ) -> None:
        """Record a request without a result (refused, aborted, failed), with whatever energy it spent.

        `created_s` is the request's Unix arrival time when known (else now); `policy` and
        `budget_j` name the request's when there is no plan (a refusal); `power_state`, `quality`
        and `key_name` as in `record_result`.
        """
        now = time.time()
        row: dict[str, Any] = {
            "id": request_id,
            "created_s": created_s if created_s else now,
            "recorded_s": now,
            "model": model,
            "policy": policy,
            "budget_j": budget_j,
            **_plan_fields(plan),
            **_energy_fields(energy, quality),
            **(power_state.ledger_fields() if power_state is not None else {}),
            "key_name": key_name,
            "stop_reason": "aborted" if status == "aborted" else None,
            "status": status,
            "error": error or None,
        }
        spent = row.get("measured_j")
        if row["budget_j"] is not None and spent is not None:
            row["budget_exceeded"] = int(spent > row["budget_j"])
        self._insert(row)

    def query(self, since_s: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows as dicts (`plan` decoded), oldest first.

        Args:
            since_s: Unix time; only rows created after it, the first `limit` of them (page
                forward by passing the last row's `created_s`). None: the latest `limit` rows.
            limit: Most rows returned (>= 1).

        """
        limit = max(1, int(limit))
        with self._lock:
            if since_s is None:
                rows = self._conn.execute(
                    "SELECT * FROM (SELECT rowid AS r, * FROM requests ORDER BY created_s DESC, rowid DESC "
                    "LIMIT ?) ORDER BY created_s, r",
                    (limit,),
                ).fetchall()
            else:
                rows = self._conn.execute(
                    "SELECT rowid AS r, * FROM requests WHERE created_s > ? "
                    "ORDER BY created_s, rowid LIMIT ?",
                    (float(since_s), limit),
                ).fetchall()
        return [self._to_dict(r) for r in rows]

    @staticmethod
    def _to_dict(row: sqlite3.Row) -> dict[str, Any]:
        out = {name: row[name] for name in COLUMN_NAMES}
        out["plan"] = json.loads(out["plan"]) if out["plan"] else None
        for name in ("interpolated", "budget_exceeded", "jetson_clocks"):
            out[name] = bool(out[name]) if out[name] is not None else None
        return out

    def prune(self, max_rows: int | None = None, max_days: float | None = None) -> int:
        """Delete rows created more than `max_days` ago, then the oldest beyond `max_rows`.

        Freed pages are reused by later rows (the file does not shrink). None: no such limit.

        Returns:
            Rows deleted.

        """
        deleted = 0
        with self._lock:
            if max_days is not None:
                cutoff = time.time() - float(max_days) * 86400.0
                deleted += self._conn.execute("DELETE FROM requests WHERE created_s < ?", (cutoff,)).rowcount
            if max_rows is not None:
                deleted += self._conn.execute(
                    "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests "
                    "ORDER BY created_s DESC, rowid DESC LIMIT -1 OFFSET ?)",
                    (max(0, int(max_rows)),),
                ).rowcount
        return int(deleted)

    def count(self) -> int:
        """Return the number of rows."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])

    def _iter_all(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid AS r, * FROM requests ORDER BY created_s, rowid"
            ).fetchall()
        for r in rows:
            yield self._to_dict(r)

    def export(self, fmt: Literal["csv", "jsonl"], out: TextIO) -> int:
        """Write every row to `out` as CSV (header + rows, `plan` as JSON text) or JSON lines.

        Returns:
            Rows written.

        """
        n = 0
        if fmt == "jsonl":
            for row in self._iter_all():
                out.write(json.dumps(row, sort_keys=False) + "\n")
                n += 1
        elif fmt == "csv":
            writer = csv.DictWriter(out, fieldnames=list(COLUMN_NAMES), lineterminator="\n")
            writer.writeheader()
            for row in self._iter_all():
                row["plan"] = json.dumps(row["plan"], sort_keys=True) if row["plan"] is not None else ""
                writer.writerow(row)
                n += 1
        else:
            raise ValueError(f"unknown export format {fmt!r}; use csv or jsonl")
        return n

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock, contextlib.suppress(sqlite3.ProgrammingError):
            self._conn.close()


def ledger_export_command(path: str, fmt: Literal["csv", "jsonl"], out_path: str | None) -> int:
    """`joulecap ledger export`: write the ledger at `path` to `out_path` (stdout when None).

    Returns:
        0 on success, 1 when the ledger file does not exist (nothing is created).

    """
    if path != ":memory:" and not Path(path).is_file():
        print(f"no ledger at {path} (serve some requests first, or pass --ledger-path)", file=sys.stderr)
        return 1
    ledger = Ledger(path)
    try:
        if out_path is None:
            n = ledger.export(fmt, sys.stdout)
        else:
            with open(out_path, "w", encoding="utf-8", newline="") as f:
                n = ledger.export(fmt, f)
    finally:
        ledger.close()
    print(f"exported {n} rows as {fmt}" + (f" to {out_path}" if out_path else ""), file=sys.stderr)
    return 0
