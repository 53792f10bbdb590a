"""examples/robot_loop.py runs offline on the tiny model and accounts every step's energy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _factories import REPO

# The example prints 3 decimals for joules and 1 for percent.
TOL = 0.06
ROW = re.compile(
    r"^\s*(?P<step>\d+)\s+(?P<batt>[\d.]+)\s+(?P<budget>[\d.]+)\s+(?P<used>[\d.]+)\s+(?P<stop>\S+)\s+(?P<rest>.*)$"
)


def test_robot_loop_three_steps_offline(tiny_idefics3: Path, tmp_path: Path) -> None:
    battery_j, full_budget_j = 120.0, 20.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULECAP_")}
    env.update(HF_HUB_OFFLINE="1", JOULECAP_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "robot_loop.py"),
            "--steps",
            "3",
            "--hz",
            "100",
            "--model",
            str(tiny_idefics3),
            "--battery-j",
            str(battery_j),
            "--full-budget-j",
            str(full_budget_j),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rclpy" not in proc.stderr  # the loop's core needs no ROS
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["step", "batt%", "budget_J", "used_J", "stop"]
    rows = [m.groupdict() for m in map(ROW.match, lines[1:]) if m]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]

    level_j = battery_j
    for row in rows:
        budget, used = float(row["budget"]), float(row["used"])
        # The budget shrinks with the battery: full budget x (0.2 + 0.8 x state of charge).
        assert budget == pytest.approx(full_budget_j * (0.2 + 0.8 * level_j / battery_j), abs=TOL)
        if row["stop"] == "skipped":
            assert used == 0.0
        else:
            assert used > 0
            assert row["stop"] in ("stop", "length", "energy_budget")
            assert row["rest"].startswith(("estimated:", "measured:"))
        level_j = max(0.0, level_j - used)
        # The battery column is what is left after the step's reported energy.
        assert float(row["batt"]) == pytest.approx(100 * level_j / battery_j, abs=TOL)
    assert level_j < battery_j
