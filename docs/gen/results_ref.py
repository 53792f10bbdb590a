"""Render the index of committed benchmark results from `benchmarks/results/` as they are now.

Each result file is listed with the benchmark that wrote it, its date, machine and the command
that reproduces it, read from the file itself; a field the file does not record is shown as
"not recorded", so a stale or incomplete file is visible on the page.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
MISSING = "not recorded"


def _date(data: dict[str, Any]) -> str:
    for key in ("date", "date_utc", "time"):
        if isinstance(data.get(key), str):
            return str(data[key])[:10]
    for key in ("started_unix", "created_unix"):
        if isinstance(data.get(key), (int, float)):
            return dt.datetime.fromtimestamp(data[key], dt.timezone.utc).strftime("%Y-%m-%d")
    machine = data.get("machine")
    if isinstance(machine, dict) and isinstance(machine.get("date"), str):
        return str(machine["date"])[:10]
    return MISSING


def _committed(path: Path) -> str:
    """The date of the last commit that touched `path` ("" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def _machine(data: dict[str, Any]) -> str:
    machine = data.get("machine")
    if isinstance(machine, dict):
        return str(
            machine.get("label") or f"{machine.get('cpu_count', '?')}-core {machine.get('cpu', 'CPU')}"
        )
    return str(machine) if machine else MISSING


def _command(data: dict[str, Any]) -> str:
    command = data.get("command")
    if isinstance(command, list):
        command = " ".join(map(str, command))
    return f"`{command}`" if command else MISSING


def result_files() -> list[Path]:
    """Every JSON result file, top level and one folder down (a benchmark's own folder)."""
    return sorted([*RESULTS.glob("*.json"), *RESULTS.glob("*/*.json")])


def render_results() -> str:
    """A Markdown table: file, benchmark, date, machine, command."""
    lines = ["| file | benchmark | date | machine | command |", "|---|---|---|---|---|"]
    for path in result_files():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            lines.append(f"| `{path.relative_to(RESULTS)}` | unreadable: {type(exc).__name__} | | | |")
            continue
        if not isinstance(data, dict):
            data = {}
        name = data.get("benchmark") or MISSING
        date = _date(data)
        if date == MISSING and _committed(path):
            date = f"{MISSING} (committed {_committed(path)})"
        row = [f"`{path.relative_to(RESULTS)}`", str(name), date, _machine(data), _command(data)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_results())
