"""Judging the scheduler benchmark: adherence, false refusals, targets, and the printed table.

`benchmarks/scheduler.py` runs the workload; this module turns its per-request rows into the
two-sided summary (`summarise`), judges `joint` against the targets (`judge_targets`) and prints
the table. A row is a dict: an accepted request has `used_j` and `budget_j`; a refused one has
`min_j` (stated), `min_plan_runs_j` (its smallest plan run `MIN_PLAN_RUNS` times) and
`min_plan_j` (their median: the true minimum).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

MIN_PLAN_RUNS = 3
"""Runs of a refused request's smallest plan: their median is its true minimum (one run is one
draw of this machine's 5-28% run-to-run noise), their spread is reported beside it."""


def within_budget(row: dict[str, Any]) -> bool:
    """Whether a request that ran stayed at or under its budget (the adherence the targets count)."""
    return bool(row["used_j"] <= row["budget_j"])


def false_refusal(row: dict[str, Any]) -> bool:
    """Whether a refused request's smallest plan, run anyway, fitted its budget."""
    return bool(row["refused"] and row["min_plan_j"] <= row["budget_j"])


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent ((nan, nan) for n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * (centre - half), 100.0 * (centre + half))


def judge_targets(
    within_pct: float, false_refusals_pct: float, refusals_above_minimum: int
) -> dict[str, bool]:
    """The targets for `joint`: within budget, false refusals, no refusal at or above the true minimum."""
    return {
        "joint_within_budget_pct>=99": within_pct >= 99.0,
        "joint_false_refusals_pct_of_requests<=2": false_refusals_pct <= 2.0,
        "joint_every_refusal_below_true_minimum": refusals_above_minimum == 0,
    }


def summarise(rows: list[dict[str, Any]], binds: list[bool]) -> dict[str, Any]:
    """Both sides of one policy's run: adherence and use of what ran, false refusals of what did not."""
    ran = [(r, b) for r, b in zip(rows, binds, strict=True) if not r["refused"]]
    refused = [r for r in rows if r["refused"]]
    within = sum(within_budget(r) for r, _ in ran)
    use_binding = [r["used_j"] / r["budget_j"] for r, b in ran if b]
    over = [r["used_j"] / r["budget_j"] - 1 for r, _ in ran if r["used_j"] > r["budget_j"]]
    false = [r for r in refused if false_refusal(r)]
    n = len(rows)
    return {
        "requests": n,
        "ran": len(ran),
        "refused_422": len(refused),
        "within_budget": within,
        "within_budget_pct": 100.0 * within / len(ran) if ran else math.nan,
        "within_budget_wilson95_pct": wilson(within, len(ran)),
        "binding": len(use_binding),
        "mean_use_binding_pct": 100.0 * statistics.fmean(use_binding) if use_binding else math.nan,
        "max_overshoot_pct": 100.0 * max(over) if over else 0.0,
        "false_refusals": len(false),
        "false_refusals_pct_of_requests": 100.0 * len(false) / n if n else math.nan,
        "false_refusals_wilson95_pct": wilson(len(false), n),
        # A refusal at or above the true minimum (its smallest plan's measured cost) is the same
        # event as a false refusal; counted apart because the targets judge it apart (none allowed).
        "refusals_above_true_minimum": sum(r["budget_j"] >= r["min_plan_j"] for r in refused),
        # How close the false refusals came: budget / true minimum (>= 1), and the stated minimum
        # over the true minimum for every refusal (above 1 by the feasibility margin and the error).
        "false_refusal_budget_over_true_min": sorted(r["budget_j"] / r["min_plan_j"] for r in false),
        "stated_over_true_min_median": (
            statistics.median(r["min_j"] / r["min_plan_j"] for r in refused) if refused else math.nan
        ),
        # The noise beside it: refusals whose budget even the cheapest of the smallest plan's runs
        # would not have exceeded, and the runs' spread (max / min - 1, median over refusals).
        "refusals_above_cheapest_min_run": sum(r["budget_j"] >= min(r["min_plan_runs_j"]) for r in refused),
        "min_plan_spread_pct_median": (
            100.0
            * statistics.median(max(r["min_plan_runs_j"]) / min(r["min_plan_runs_j"]) - 1 for r in refused)
        )
        if refused
        else math.nan,
        "mean_tokens": statistics.fmean(r["tokens"] for r, _ in ran) if ran else math.nan,
        "mean_visual_kept": statistics.fmean(r["visual_kept"] for r, _ in ran) if ran else math.nan,
        "mean_energy_j": statistics.fmean(r["used_j"] for r, _ in ran) if ran else math.nan,
        "stopped_by_governor": sum(r["stop_reason"] == "energy_budget" for r, _ in ran),
    }


def print_table(
    summary: dict[str, Any],
    heldout: dict[str, Any],
    overhead: dict[str, Any],
    brevity: dict[str, Any],
    load_at_start: list[float] | None,
    load_now: list[float] | None,
) -> None:
    """Print the two-sided table, the joint summary, the held-out MAPE and the brevity slice."""
    head = (
        f"{'policy':<14}{'ran':>5}{'422':>5}{'<=budget %':>12}{'use % (binding)':>17}{'max over %':>12}"
        f"{'false 422 %':>13}{'422>=true min':>15}{'tokens':>8}{'vis kept':>10}{'plan p50 ms':>13}"
    )
    print()
    print(head)
    for name, s in summary.items():
        print(
            f"{name:<14}{s['ran']:>5}{s['refused_422']:>5}{s['within_budget_pct']:>12.1f}"
            f"{s['mean_use_binding_pct']:>17.1f}{s['max_overshoot_pct']:>12.1f}"
            f"{s['false_refusals_pct_of_requests']:>13.1f}{s['refusals_above_true_minimum']:>15}"
            f"{s['mean_tokens']:>8.1f}{s['mean_visual_kept']:>10.1f}{overhead[name]['p50_ms']:>13.3f}"
        )
    if "joint" in summary:
        j = summary["joint"]
        lo, hi = j["within_budget_wilson95_pct"]
        flo, fhi = j["false_refusals_wilson95_pct"]
        print(
            f"\njoint: {j['within_budget']} of {j['ran']} within budget (95% interval {lo:.1f}-{hi:.1f}%); "
            f"{j['false_refusals']} false refusals of {j['requests']} requests ({flo:.1f}-{fhi:.1f}%); "
            f"stated minimum / true minimum, median {j['stated_over_true_min_median']:.2f}"
        )
        print(
            f"joint: the true minimum is the median of {MIN_PLAN_RUNS} runs of the smallest plan, whose "
            f"spread was {j['min_plan_spread_pct_median']:.1f}% (median); refusals at or above the "
            f"cheapest of those runs: {j['refusals_above_cheapest_min_run']}"
        )
        print(
            f"joint planning p50 {overhead['joint']['p50_ms']:.3f} ms, of which spectral "
            f"{overhead['joint']['spectral_p50_ms']:.3f} ms; besides spectral "
            f"{overhead['joint']['besides_spectral_p50_ms']:.3f} ms"
        )
    server = heldout["online"]["server"]
    print(
        f"held-out MAPE {server['mape_pct']:.1f}% ({heldout['requests']} requests, the server's predictor) "
        f"beside this machine's floors: run-to-run {heldout['repeat_ape_pct']:.1f}%, refitted form "
        f"{heldout['refit_loo_mape_pct']:.1f}%, reference request {heldout['reference_ape_pct']:.1f}%"
    )
    for k, s in brevity.items():
        print(
            f"brevity {k:<3}: tokens {s['mean_tokens']:.1f}, energy {s['mean_energy_j']:.3f} J, "
            f"<= budget {s['within_budget_pct']:.1f}%, governor stops {s['stopped_by_governor']}"
        )
    print(f"load average at start {load_at_start}, now {load_now}")
