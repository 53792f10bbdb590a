"""Quality and energy judged together for `benchmarks/run.py`: the default policy against the front.

At each budget level, a row *holds the budget* when at most `OVER_PCT` % of its requests spent more
than the budget (any policy: a baseline that happens to fit a generous budget holds it too). The
default policy meets the target at that level when it holds the budget and its quality is within
`QUALITY_POINTS` of the best quality among the rows that hold the budget and spend no more mean
energy than the default does (refusals count as wrong answers in quality).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

OVER_PCT = 1.0
QUALITY_POINTS = 0.01


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(float(v)) for v in values)


def energy_of(row: dict[str, Any]) -> float:
    """Mean energy of a row; 0 when every request was refused (nothing spent)."""
    e = row.get("energy_j_mean")
    return float(e) if isinstance(e, (int, float)) and math.isfinite(float(e)) else 0.0


def holds(row: dict[str, Any]) -> bool:
    """Whether the row held its budget (at most `OVER_PCT` % of requests over; no budget: True)."""
    if row.get("budget_j") is None:
        return True
    return _finite(row.get("violations_pct")) and float(row["violations_pct"]) <= OVER_PCT


def judge(rows: list[dict[str, Any]], default: str) -> dict[str, Any]:
    """Per budget level, whether the default holds the budget and sits on the quality-energy front.

    Args:
        rows: `run.summarize` rows (policy, budget_j, quality, energy_j_mean, violations_pct).
        default: The default policy's name.

    Returns:
        `{"levels": [...], "all_met": bool}`; each level names the best comparable row.

    """
    levels = []
    for budget in dict.fromkeys(r["budget_j"] for r in rows):
        at = [r for r in rows if r["budget_j"] == budget]
        mine = next((r for r in at if r["policy"] == default), None)
        if mine is None:
            continue
        energy = mine.get("energy_j_mean")
        # A row that refused everything spent nothing: compare it against refusals only.
        my_e = energy_of(mine)
        peers = [r for r in at if r["policy"] != default and holds(r) and energy_of(r) <= my_e]
        best = max(peers, key=lambda r: float(r["quality"]), default=None)
        gap = 0.0 if best is None else float(best["quality"]) - float(mine["quality"])
        met = holds(mine) and gap <= QUALITY_POINTS + 1e-12
        levels.append(
            {
                "budget_j": budget,
                "default_quality": mine["quality"],
                "default_energy_j_mean": energy,
                "default_violations_pct": mine.get("violations_pct"),
                "default_holds_budget": holds(mine),
                "best_peer": None if best is None else best["policy"],
                "best_peer_quality": None if best is None else best["quality"],
                "best_peer_energy_j_mean": None if best is None else best.get("energy_j_mean"),
                "quality_gap": round(gap, 6),
                "met": met,
            }
        )
    return {
        "default_policy": default,
        "rule": f"default holds the budget (<= {OVER_PCT:g}% of requests over) and its quality is within "
        f"{QUALITY_POINTS * 100:g} point(s) of the best row at that budget that holds it and spends no "
        "more mean energy",
        "levels": levels,
        "all_met": bool(levels) and all(lv["met"] for lv in levels),
    }


def front_plot(rows: list[dict[str, Any]], out: Path, default: str, subtitle: str) -> str:
    """`quality_energy.png`: one panel per budget, quality vs mean energy of every policy.

    Filled markers hold the budget, hollow ones do not; the dashed line is the budget; the default
    policy is drawn larger. Returns the file name.
    """
    from benchmarks._plots import _pyplot

    plt = _pyplot()
    budgets = list(dict.fromkeys(r["budget_j"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    cmap = plt.get_cmap("tab10")
    color = {p: cmap(i % 10) for i, p in enumerate(policies)}
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 4.2), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        for r in rows:
            if r["budget_j"] != budget:
                continue
            e = energy_of(r)  # every request refused: no energy spent
            big = r["policy"] == default
            ax.plot(
                e,
                r["quality"],
                "*" if big else "o",
                ms=14 if big else 8,
                color=color[r["policy"]],
                mfc=color[r["policy"]] if holds(r) else "none",
                label=r["policy"],
            )
        if budget is not None:
            ax.axvline(budget, ls="--", color="k", lw=1, alpha=0.6)
        ax.set_title("no budget" if budget is None else f"budget {budget:.3g} J", fontsize=9)
        ax.set_xlabel("energy per request, mean (J)")
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("quality (exact match / recall; refused = 0)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=len(uniq), fontsize=8)
    fig.suptitle(
        f"Quality vs energy per policy and budget (filled: holds the budget; star: {default})\n{subtitle}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "quality_energy.png", dpi=110)
    plt.close(fig)
    return "quality_energy.png"


def text(verdict: dict[str, Any] | None, markdown: bool = False) -> str:
    """The default policy's verdict per budget level, as lines (empty when it did not run)."""
    if verdict is None:
        return ""
    lines = [f"\nDefault policy `{verdict['default_policy']}`: {verdict['rule']}."]
    for lv in verdict["levels"]:
        peer = (
            f"best comparable {lv['best_peer']} {lv['best_peer_quality']:.3f}"
            if lv["best_peer"]
            else "no comparable row"
        )
        lines.append(
            f"{'- ' if markdown else '  '}budget {lv['budget_j']}: quality {lv['default_quality']:.3f}, "
            f"{lv['default_violations_pct']:.1f}% over budget, {peer}: {'met' if lv['met'] else 'NOT met'}"
        )
    lines.append(f"{'All levels met.' if verdict['all_met'] else 'Not met at every level.'}")
    return "\n".join(lines) + "\n"
