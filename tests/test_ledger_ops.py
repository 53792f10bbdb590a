"""Ledger operations: power state and measurement quality per row, migration, export, summary, retention."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_ledger import make_result

from joulecap.runtime.cli import build_parser, main
from joulecap.runtime.energy.base import MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.power_state import PowerState
from joulecap.runtime.energy.quality import measurement_quality
from joulecap.runtime.ledger import COLUMN_NAMES, COLUMNS, SCHEMA_VERSION, Ledger
from joulecap.runtime.ledger_config import LedgerConfig
from joulecap.runtime.ledger_export import ExportError, export_ledger
from joulecap.runtime.ledger_retention import LedgerRetention
from joulecap.runtime.ledger_summary import summarize
from joulecap.runtime.types import ChatResult, PhaseTimes

NANO_15W = PowerState(
    kind="jetson",
    power_mode="15W",
    power_mode_id=0,
    jetson_clocks=False,
    gpu_clock_mhz=624.75,
    cpu_clock_mhz=1510.4,
    gpu_temp_c=48.2,
    cpu_temp_c=46.5,
)


def _measured(result: ChatResult, total_j: float, *, duration_s: float = 2.0) -> ChatResult:
    energy = replace(
        result.energy, total_j=total_j, source="measured", meter="nvml:0", duration_s=duration_s, idle_j=0.0
    )
    return replace(result, energy=energy)


def test_row_carries_power_state_quality_and_key_name(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    result = make_result("r1")
    quality = measurement_quality(
        result.energy, meter_kind="power", sample_period_s=0.1, meter_update_period_s=0.0
    )
    ledger.record_result(result, power_state=NANO_15W, quality=quality, key_name="robot-7")
    row = ledger.query()[0]
    assert row["power_mode"] == "15W" and row["power_mode_id"] == 0 and row["jetson_clocks"] is False
    assert row["gpu_clock_mhz"] == 624.75 and row["cpu_temp_c"] == 46.5 and row["emc_clock_mhz"] is None
    assert row["key_name"] == "robot-7"
    # The report is an estimate, whatever kind the monitor's meter is.
    assert row["meter_kind"] == "estimate" and row["sample_period_s"] == 0.1
    assert row["idle_share"] == pytest.approx(4.0 / 12.5) and row["samples"] == 20
    assert row["interpolation"] is None and row["interpolated"] is False
    # No power state known: the columns are null, not zeros.
    ledger.record_failure("r2", "m", None, result.energy, status="aborted")
    r2 = ledger.query()[1]
    assert r2["power_mode"] is None and r2["gpu_clock_mhz"] is None and r2["key_name"] is None
    assert r2["idle_share"] == pytest.approx(4.0 / 12.5)  # derived from the report alone
    ledger.close()


def test_unsupported_reading_is_null_never_zero(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    ledger.record_result(_measured(make_result("zero"), 0.0))
    ledger.record_result(_measured(make_result("instant"), 0.0, duration_s=0.0))
    ledger.record_result(_measured(make_result("real"), 3.0))
    rows = {r["id"]: r for r in ledger.query()}
    assert rows["zero"]["measured_j"] is None
    assert rows["instant"]["measured_j"] == 0.0  # an empty window really spent nothing
    assert rows["real"]["measured_j"] == 3.0 and rows["real"]["meter_kind"] is None  # kind unknown
    ledger.close()


class StuckCounter:
    """A counter meter whose counter never moves (a vGPU that reports but does not count)."""

    name = "nvml:0"
    source = "measured"
    update_period_s = 0.0

    def is_available(self) -> object:
        return True

    def read(self) -> MeterReading:
        return MeterReading(t_s=time.monotonic(), energy_j=0.0)

    def describe(self) -> dict[str, object]:
        return {"name": self.name}

    def close(self) -> None:
        pass


def test_monitor_never_reports_a_measured_zero() -> None:
    monitor = EnergyMonitor(StuckCounter(), EnergyConfig(idle_baseline_s=0, idle_refresh_s=0))  # type: ignore[arg-type]
    monitor.start()
    try:
        t0 = time.monotonic()
        monitor.sampler.sample_now()
        time.sleep(0.02)
        monitor.sampler.sample_now()
        report = monitor.report(PhaseTimes(t0, t0 + 0.01, time.monotonic()), predicted_decode_j=0.7)
    finally:
        monitor.stop()
    assert report.source == "estimated" and report.total_j == pytest.approx(0.7)
    assert "0 J" in report.note and "does not support" in report.note
    q = monitor.quality(report)
    assert q.meter_kind == "estimate" and q.sample_period_s == pytest.approx(0.1)
    assert monitor.meter_kind == "counter"


def _v1_ledger(path: Path) -> None:
    """A ledger as schema 1 wrote it, with one row."""
    v1 = COLUMNS[: COLUMN_NAMES.index("duration_s") + 1]
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE requests (" + ", ".join(f"{n} {d}" for n, d in v1) + ")")
    conn.execute(
        "INSERT INTO requests (id, created_s, recorded_s, model, measured_j, status) "
        "VALUES ('old', 1.0, 1.0, 'm', 5.0, 'ok')"
    )
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()


def test_schema_1_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    _v1_ledger(path)
    ledger = Ledger(str(path))
    ledger.record_result(make_result("new"), power_state=NANO_15W, key_name="k")
    rows = {r["id"]: r for r in ledger.query()}
    assert rows["old"]["measured_j"] == 5.0 and rows["old"]["power_mode"] is None
    assert rows["new"]["power_mode"] == "15W"
    ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


def test_prune_by_rows_and_age(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    now = time.time()
    for i in range(10):
        ledger.record_result(make_result(f"r{i}", created_s=now - (9 - i) * 86400.0))
    assert ledger.prune(max_days=3.5) == 6  # r0..r5 are 4-9 days old
    assert [r["id"] for r in ledger.query()] == ["r6", "r7", "r8", "r9"]
    assert ledger.prune(max_rows=2) == 2
    assert [r["id"] for r in ledger.query()] == ["r8", "r9"]
    assert ledger.prune() == 0
    retention = LedgerRetention(ledger, LedgerConfig(ledger_max_rows=1, ledger_prune_interval_s=0.05))
    retention.start()
    ledger.record_result(make_result("r10", created_s=now + 1))
    deadline = time.monotonic() + 5
    while ledger.count() > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    retention.stop()
    assert [r["id"] for r in ledger.query()] == ["r10"]
    ledger.close()
    with pytest.raises(ValueError, match="ledger_max_rows"):
        LedgerConfig(ledger_max_rows=0)
    with pytest.raises(ValueError, match="ledger_max_days"):
        LedgerConfig(ledger_max_days=float("nan"))


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(str(path))
    ledger.record_result(
        make_result("a", total_j=10.0, budget_j=20.0), power_state=NANO_15W, key_name="robot"
    )
    ledger.record_result(make_result("b", total_j=30.0, budget_j=20.0, created_s=1001.0), key_name="robot")
    ledger.record_result(make_result("c", total_j=6.0, budget_j=None, created_s=1002.0), key_name="tenant")
    ledger.record_result(_measured(make_result("d", created_s=1003.0), 0.0), key_name="tenant")
    ledger.close()
    return path


def test_export_csv_jsonl_parquet(filled: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    ledger = Ledger(str(filled))
    out = {fmt: tmp_path / f"out.{fmt}" for fmt in ("csv", "jsonl", "parquet")}
    for fmt, path in out.items():
        assert export_ledger(ledger, fmt, str(path), stdout=None) == 4  # type: ignore[arg-type]
    ledger.close()
    rows = list(csv.DictReader(out["csv"].open()))
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"] and rows[0]["power_mode"] == "15W"
    assert rows[3]["measured_j"] == ""  # null, not 0
    lines = [json.loads(line) for line in out["jsonl"].read_text().splitlines()]
    assert lines[0]["plan"]["policy"] == "joint" and lines[1]["key_name"] == "robot"
    table = pq.read_table(out["parquet"])
    assert table.column_names == list(COLUMN_NAMES)
    assert str(table.schema.field("measured_j").type) == "double"
    assert str(table.schema.field("interpolated").type) == "bool"
    data = table.to_pylist()
    assert data[0]["power_mode"] == "15W" and data[3]["measured_j"] is None
    assert json.loads(data[0]["plan"])["max_new_tokens"] == 32
    assert out["csv"].stat().st_mode & 0o044  # readable like any file, not mkstemp's 0600


def test_export_to_unwritable_path_fails_cleanly(
    filled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "afile"
    not_a_dir.write_text("x")
    ledger = Ledger(str(filled))
    for dest in (not_a_dir / "out.csv", tmp_path / "missing" / "out.csv", tmp_path):
        with pytest.raises(ExportError, match="cannot write"):
            export_ledger(ledger, "csv", str(dest), stdout=None)  # type: ignore[arg-type]
    ledger.close()
    out = tmp_path / "missing" / "x.jsonl"
    rc = main(["ledger", "export", "--format", "jsonl", "--out", str(out), "--ledger-path", str(filled)])
    assert rc == 1 and "cannot write" in capsys.readouterr().err
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="cannot write"):
            export_ledger(Ledger(str(filled)), "parquet", str(locked / "x.parquet"), stdout=None)  # type: ignore[arg-type]
        assert list(locked.iterdir()) == []  # no half-written file
    rc = main(["ledger", "export", "--format", "parquet", "--ledger-path", str(filled)])
    assert rc == 1 and "--out" in capsys.readouterr().err
    assert main(["ledger", "export", "--ledger-path", str(tmp_path / "none.sqlite3")]) == 1


def test_summary_per_model_policy_and_key(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {r.key_name: r for r in summarize(str(filled))}
    robot, tenant = rows["robot"], rows["tenant"]
    assert robot.requests == 2 and robot.energy_j == pytest.approx(40.0)
    assert robot.output_tokens == 6 and robot.j_per_output_token == pytest.approx(40.0 / 6)
    assert (robot.budgeted, robot.budgets_held) == (2, 1)
    # `d` had no supported reading: counted as a request, not as 0 J, and its tokens left out.
    assert tenant.requests == 2 and tenant.unmeasured == 1 and tenant.energy_j == pytest.approx(6.0)
    assert tenant.j_per_output_token == pytest.approx(2.0) and tenant.budgeted == 0
    assert main(["ledger", "summary", "--ledger-path", str(filled)]) == 0
    table = capsys.readouterr().out
    assert "robot" in table and "1/2" in table
    assert main(["ledger", "summary", "--json", "--ledger-path", str(filled)]) == 0
    assert {r["key_name"] for r in json.loads(capsys.readouterr().out)} == {"robot", "tenant"}


def test_prune_command(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "prune", "--ledger-path", str(filled)]) == 2
    assert main(["ledger", "prune", "--ledger-max-rows", "1", "--ledger-path", str(filled)]) == 0
    assert "deleted 3 rows; 1 left" in capsys.readouterr().err


def test_ledger_help_lists_only_ledger_options() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    ledger = sub.choices["ledger"]  # type: ignore[attr-defined]
    actions = next(a for a in ledger._actions if a.dest == "action")
    for name, p in {"ledger": ledger, **actions.choices}.items():
        flags = {s for a in p._actions for s in a.option_strings}
        extra = flags - {
            "-h",
            "--help",
            "--format",
            "--out",
            "--json",
            "--ledger-path",
            "--cache-dir",
            "--ledger-max-rows",
            "--ledger-max-days",
        }
        assert not extra, f"joulecap ledger {name} shows non-ledger options {sorted(extra)}"
    help_text = ledger.format_help()
    assert "--model" not in help_text and "--meter" not in help_text
