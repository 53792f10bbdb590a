"""examples/robot_loop.py: the demo model answers right under a budget that binds and shrinks.

It runs the example as a user would (a subprocess on the demo model, calibrated like a first
`make serve`, see `tests/_docblocks.py`) and reads its printed table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from _docblocks import _env, calibrated_demo_cache, demo_config
from _factories import REPO

ROW = re.compile(
    r"^\s*(?P<step>\d+)\s+(?P<batt>[\d.]+)\s+(?P<budget>[\d.]+)\s+(?P<used>[\d.]+)\s+"
    r"(?P<kept>\d+)/(?P<vin>\d+)\s+(?P<max_new>\d+)\s+(?P<stop>\S+)\s+(?P<question>.+?) -> (?P<answer>.*)$"
)
FLOOR = re.compile(r"^floor now (?P<floor>[\d.]+) J \(1\.5 x the minimum stated at step (?P<step>\d+)\)$")
# What TinyVQA must answer about the example's frames (a red circle, a blue square, a yellow triangle).
SHORT_ANSWERS = {
    "what color is the circle?": "red",
    "is there a green diamond?": "no",
    "what color is the square?": "blue",
}


DESCRIPTION = "a yellow triangle, a red circle and a blue square."
"""Every frame, left to right (the circle rolls between the triangle and the square)."""


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrated_demo_cache(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_robot_loop_adapts_its_plan_and_answers_right(demo_cache: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "robot_loop.py"), "--steps", "10", "--hz", "100"],
        env=_env(demo_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rclpy" not in proc.stderr  # the loop's core needs no ROS
    lines = proc.stdout.splitlines()
    header = re.search(r"budget per step from ([\d.]+) J .* to ([\d.]+) J .*battery ([\d.]+) J", lines[0])
    assert header, lines[0]
    full_j, floor_j, capacity_j = map(float, header.groups())
    assert floor_j < full_j
    # A refusal whose stated minimum outgrew the floor raises it (printed before that step's row).
    floors = {int(m["step"]): float(m["floor"]) for m in map(FLOOR.match, lines[2:]) if m}
    rows = [m.groupdict() for m in map(ROW.match, lines[2:]) if m]
    assert [int(r["step"]) for r in rows] == list(range(10)), proc.stdout

    level_j = capacity_j
    for drawn, row in enumerate(rows, start=1):
        budget, used = float(row["budget"]), float(row["used"])
        if drawn - 1 in floors:
            assert floors[drawn - 1] > floor_j
            floor_j, full_j = floors[drawn - 1], max(full_j, floors[drawn - 1])
        # The budget follows the battery: floor + (full - floor) x the charge before the step.
        assert budget == pytest.approx(floor_j + (full_j - floor_j) * level_j / capacity_j, abs=0.002)
        assert row["stop"] in ("stop", "length", "energy_budget"), row
        assert used > 0
        level_j = max(0.0, level_j - used)
        # The charge is printed to 0.1%, rebuilt here from the capacity and every draw so far,
        # each printed to 1 mJ: their rounding adds up to 0.5 mJ apiece over the capacity.
        rounding_pct = 0.05 + 100 * 0.0005 * (drawn + 2) / capacity_j
        assert float(row["batt"]) == pytest.approx(100 * level_j / capacity_j, abs=rounding_pct + 1e-9)
        assert int(row["kept"]) <= int(row["vin"]) == 144
        if row["question"] in SHORT_ANSWERS:
            assert row["answer"] == SHORT_ANSWERS[row["question"]], row
        else:  # the description, as far as the budget let it go
            assert row["question"] == "what is in the image?"
            assert DESCRIPTION.startswith(row["answer"]), row
    describes = [int(r["max_new"]) for r in rows if r["question"] == "what is in the image?"]
    # The binding budget shrinks the plan as the battery drains.
    assert describes[-1] < describes[0], describes


@pytest.mark.slow
def test_a_refusal_raises_the_floor_to_its_stated_minimum_and_the_frame_is_answered(
    demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A floor far under the runtime's minimum, at an empty battery: the first try is refused
    # (422) and its stated minimum sets the floor the frame is then answered under.
    from joulecap.runtime.errors import BudgetTooSmall
    from joulecap.runtime.runtime import Runtime

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from robot_loop import Battery, PerceptionLoop, camera_frame
    finally:
        sys.path.pop(0)
    stated: list[BudgetTooSmall] = []
    cfg = demo_config(demo_cache, tmp_path)  # its ledger is the shared cache's: keep one of our own
    cfg = replace(cfg, paths=replace(cfg.paths, ledger_path=str(tmp_path / "ledger.sqlite3")))
    with Runtime(cfg) as runtime:
        chat = runtime.chat

        def watched_chat(*args: Any, **kwargs: Any) -> Any:
            try:
                return chat(*args, **kwargs)
            except BudgetTooSmall as exc:
                stated.append(exc)
                raise

        monkeypatch.setattr(runtime, "chat", watched_chat)
        loop = PerceptionLoop(runtime, Battery(capacity_j=1.0, level_j=0.0), floor_j=0.001, full_j=0.002)
        report = loop.step(1, camera_frame(1))
        refusals = [row for row in runtime.ledger.query(limit=100) if row["status"] == "refused"]
    assert [row["budget_j"] for row in refusals] == [pytest.approx(0.001)] and len(stated) == 1
    assert report.floor_j == pytest.approx(1.5 * stated[0].min_j)
    assert report.stop_reason in ("stop", "length", "energy_budget"), report
    assert report.answer == "red"
    assert report.floor_j > 0.001 and report.budget_j == pytest.approx(report.floor_j)
    assert report.energy_j <= report.budget_j * 1.01


def test_ros2_node_compiles_and_reuses_the_loop() -> None:
    """The ROS 2 node cannot run here (no ROS 2); it must still parse and use the tested loop."""
    import ast

    source = (REPO / "examples" / "ros2_node.py").read_text()
    tree = ast.parse(source)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "robot_loop"
        for alias in node.names
    }
    assert imported == {"Battery", "PerceptionLoop", "derive_budgets"}
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import robot_loop
    finally:
        sys.path.pop(0)
    assert all(hasattr(robot_loop, name) for name in imported)
    assert "NOT RUN HERE" in source


def test_budget_follows_the_battery() -> None:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from robot_loop import Battery, PerceptionLoop
    finally:
        sys.path.pop(0)
    battery = Battery(capacity_j=10.0, level_j=10.0)
    loop = PerceptionLoop(None, battery, floor_j=1.0, full_j=3.0)  # type: ignore[arg-type]
    assert loop.budget_j() == pytest.approx(3.0)
    battery.draw(5.0)
    assert loop.budget_j() == pytest.approx(2.0)
    battery.draw(50.0)
    assert battery.level_j == 0.0 and loop.budget_j() == pytest.approx(1.0)
