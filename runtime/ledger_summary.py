"""`joulecap ledger summary`: requests, joules, joules per output token and budgets held, grouped.

Grouped by model, policy and API key name (rows without a key are grouped as `-`). Computed in
SQL over a read-only connection, so a summary of a large ledger neither loads it into memory
nor blocks a running server.

- `requests`: rows in the group (every status); `ok`: rows with status `ok`.
- `energy_j`: sum of `measured_j` (rows whose reading the hardware did not support are left
  out, and counted in `unmeasured`).
- `j_per_output_token`: `energy_j` over the output tokens of the same rows.
- `budgeted`: rows that had a budget and a figure; `budgets_held`: those within it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

GROUP_BY = ("model", "policy", "key_name")

_SQL = """
SELECT model, policy, key_name,
       COUNT(*) AS requests,
       SUM(status = 'ok') AS ok,
       SUM(measured_j IS NULL) AS unmeasured,
       SUM(measured_j) AS energy_j,
       SUM(CASE WHEN measured_j IS NOT NULL THEN completion_tokens END) AS output_tokens,
       SUM(budget_j IS NOT NULL AND measured_j IS NOT NULL) AS budgeted,
       SUM(budget_j IS NOT NULL AND measured_j IS NOT NULL AND measured_j <= budget_j) AS budgets_held
FROM requests
GROUP BY model, policy, key_name
ORDER BY model, policy, key_name
"""


@dataclass(frozen=True)
class SummaryRow:
    """One group of the summary (see the module docstring)."""

    model: str | None
    policy: str | None
    key_name: str | None
    requests: int
    ok: int
    unmeasured: int
    energy_j: float
    output_tokens: int
    j_per_output_token: float | None
    budgeted: int
    budgets_held: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def summarize(path: str) -> list[SummaryRow]:
    """Summarise the ledger file at `path` (opened read-only).

    Raises:
        FileNotFoundError: No ledger at `path`.

    """
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=30.0)
    try:
        rows = conn.execute(_SQL).fetchall()
    finally:
        conn.close()
    out = []
    for model, policy, key, requests, ok, unmeasured, energy, tokens, budgeted, held in rows:
        energy_j = float(energy or 0.0)
        tokens_n = int(tokens or 0)
        out.append(
            SummaryRow(
                model=model,
                policy=policy,
                key_name=key,
                requests=int(requests),
                ok=int(ok or 0),
                unmeasured=int(unmeasured or 0),
                energy_j=energy_j,
                output_tokens=tokens_n,
                j_per_output_token=energy_j / tokens_n if tokens_n > 0 else None,
                budgeted=int(budgeted or 0),
                budgets_held=int(held or 0),
            )
        )
    return out


def print_table(rows: list[SummaryRow], out: TextIO) -> None:
    """A fixed-width table, one line per group."""
    head = ("model", "policy", "key", "requests", "ok", "energy J", "J/out tok", "budgets held")
    lines = [head]
    for r in rows:
        jpt = f"{r.j_per_output_token:.4g}" if r.j_per_output_token is not None else "-"
        held = f"{r.budgets_held}/{r.budgeted}" if r.budgeted else "-"
        lines.append(
            (
                r.model or "-",
                r.policy or "-",
                r.key_name or "-",
                str(r.requests),
                str(r.ok),
                f"{r.energy_j:.4g}",
                jpt,
                held,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n")
