"""SQLite ledger: rows, queries, export, reopen, schema version, and kill -9 durability."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from joulecap.runtime.ledger import SCHEMA_VERSION, Ledger, ledger_export_command
from joulecap.runtime.types import ChatResult, EnergyReport, GenerationResult, PhaseTimes, Plan


def make_result(
    request_id: str, *, created_s: float = 1000.0, total_j: float = 12.5, budget_j: float | None = 20.0
) -> ChatResult:
    plan = Plan(
        visual_keep=(40, 12),
        max_new_tokens=32,
        predicted_j=11.0,
        policy="joint",
        reason="fits the budget",
        budget_j=budget_j,
    )
    generation = GenerationResult(
        text="a red square",
        token_ids=(5, 6, 7),
        stop_reason="stop",
        prefill_tokens=70,
        visual_tokens_in=128,
        visual_tokens_kept=52,
        times=PhaseTimes(1.0, 1.5, 3.0),
    )
    energy = EnergyReport(
        total_j=total_j,
        prefill_j=2.5,
        decode_j=total_j - 2.5,
        idle_j=4.0,
        duration_s=2.0,
        source="estimated",
        meter="estimate:cpu",
        samples=20,
    )
    return ChatResult(request_id, "tiny-idefics3", generation.text, generation, plan, energy, created_s)


def test_record_query_count(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    ledger.record_result(make_result("r1", created_s=1000.0))
    ledger.record_result(make_result("r2", created_s=1001.0), status="aborted")
    assert ledger.count() == 2
    rows = ledger.query()
    assert [r["id"] for r in rows] == ["r1", "r2"]
    r1 = rows[0]
    assert r1["plan"]["visual_keep"] == [40, 12] and r1["plan"]["policy"] == "joint"
    assert (
        r1["measured_j"] == 12.5 and r1["prefill_j"] == 2.5 and r1["decode_j"] == 10.0 and r1["idle_j"] == 4.0
    )
    assert r1["budget_j"] == 20.0 and r1["predicted_j"] == 11.0 and r1["policy"] == "joint"
    assert r1["source"] == "estimated" and r1["meter"] == "estimate:cpu"
    assert (
        r1["prompt_tokens"],
        r1["visual_tokens_in"],
        r1["visual_tokens_kept"],
        r1["completion_tokens"],
    ) == (70, 128, 52, 3)
    assert r1["stop_reason"] == "stop" and r1["status"] == "ok" and r1["duration_s"] == 2.0
    assert rows[1]["status"] == "aborted"
    ledger.close()


def test_query_since_and_limit(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    for i in range(10):
        ledger.record_result(make_result(f"r{i}", created_s=1000.0 + i))
    assert [r["id"] for r in ledger.query(limit=3)] == ["r7", "r8", "r9"]
    assert [r["id"] for r in ledger.query(since_s=1004.0, limit=2)] == ["r5", "r6"]
    assert ledger.query(since_s=2000.0) == []
    ledger.close()


def test_failures_are_accounted(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    energy = make_result("x").energy
    plan = make_result("x").plan
    ledger.record_failure("e1", "tiny", plan, energy, status="error", error="RuntimeError('boom')")
    ledger.record_failure("e2", "tiny", None, None, "aborted", "client went away")
    rows = {r["id"]: r for r in ledger.query()}
    assert (
        rows["e1"]["status"] == "error" and rows["e1"]["measured_j"] == 12.5 and "boom" in rows["e1"]["error"]
    )
    assert (
        rows["e2"]["status"] == "aborted" and rows["e2"]["measured_j"] is None and rows["e2"]["plan"] is None
    )
    ledger.close()


def test_survives_reopen_and_is_versioned(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sqlite3")
    ledger = Ledger(path)
    ledger.record_result(make_result("r1"))
    ledger.close()
    ledger.close()  # idempotent
    again = Ledger(path)
    assert again.count() == 1 and again.query()[0]["id"] == "r1"
    again.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Ledger(path)


def test_export_csv_and_jsonl(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    ledger.record_result(make_result("r1", created_s=1.0))
    ledger.record_result(make_result("r2", created_s=2.0, total_j=30.0))
    buf = io.StringIO()
    assert ledger.export("jsonl", buf) == 2
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["id"] for x in lines] == ["r1", "r2"] and lines[1]["measured_j"] == 30.0
    buf = io.StringIO()
    assert ledger.export("csv", buf) == 2
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert rows[0]["id"] == "r1" and float(rows[1]["measured_j"]) == 30.0
    assert json.loads(rows[0]["plan"])["max_new_tokens"] == 32
    with pytest.raises(ValueError):
        ledger.export("xml", buf)
    ledger.close()


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "l.sqlite3"
    assert ledger_export_command(str(path), "jsonl", None) == 1
    assert not path.exists()  # a missing ledger is not created
    ledger = Ledger(str(path))
    ledger.record_result(make_result("r1"))
    ledger.close()
    out = tmp_path / "out.csv"
    assert ledger_export_command(str(path), "csv", str(out)) == 0
    assert "r1" in out.read_text()
    assert ledger_export_command(str(path), "jsonl", None) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["id"] == "r1"


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))

    def write(k: int) -> None:
        for i in range(25):
            ledger.record_result(make_result(f"t{k}-{i}", created_s=float(i)))
            ledger.query(limit=5)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.count() == 100
    ledger.close()


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_ledger import make_result
    from joulecap.runtime.ledger import Ledger
    ledger = Ledger({path!r})
    i = 0
    while True:
        ledger.record_result(make_result(f"k{{i}}", created_s=float(i)))
        print(f"k{{i}}", flush=True)  # only after record_result returned (committed)
        i += 1
    """
)


def test_kill_9_keeps_every_committed_row(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sqlite3")
    script = WRITER.format(tests=str(Path(__file__).parent), path=path)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    committed: list[str] = []
    deadline = time.monotonic() + 30
    while len(committed) < 40 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed += [ln.strip() for ln in proc.stdout.read().splitlines() if ln.strip()]
    assert len(committed) >= 40, "the writer did not get going"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    ledger = Ledger(path)
    ids = {r["id"] for r in ledger.query(limit=10_000)}
    ledger.close()
    assert set(committed) <= ids
