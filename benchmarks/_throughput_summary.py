"""Summarising the throughput benchmark's runs: per-side medians, paired ratios, the target verdict."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks._throughput_sides import BARE, SIDES

TARGET_RATIO = 0.97


def geomean_ci95(ratios: Sequence[float]) -> list[float] | None:
    """Geometric mean of paired ratios with a 95% interval (normal approximation on the logs)."""
    if len(ratios) < 2 or any(r <= 0 for r in ratios):
        return None
    logs = [math.log(r) for r in ratios]
    mean, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    return [math.exp(mean), math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)]


def cpu_notes(result: dict[str, Any]) -> str:
    """What a reader must know about a run on a CPU without a GPU (the sides and options it had)."""
    if result["machine"].get("gpu") != "no GPU available":
        return ""
    systems = {r["system"] for r in result["runs"]}
    notes = [
        "No GPU was available for this run. On this CPU, vLLM's engine-core process and joulecap's "
        "threads share 2 cores with other jobs (load_avg_1_5_15 in machine): the paired ratios "
        "range widely from repeat to repeat; paired_ratio_geomean_ci95 is [geometric mean, 95% low, "
        "95% high].",
        "The estimate meter is a power model (base watts plus watts per CPU-second of this process "
        "tree, vLLM's engine core included), not a measurement.",
    ]
    if "native_engine" in systems:
        notes.append(
            "native_engine is the engine's native path without the Runtime: the gap between it and "
            "output_budget is the Runtime's own cost."
        )
    if systems & {"joint", "joint_unlocked"}:
        fraction = result.get("workload", {}).get("joint_budget_fraction")
        notes.append(
            "joint's budget is unset (tau pruning only): see the module docstring."
            if fraction is None
            else f"joint's budget binds: {fraction} of the way from its smallest plan to keep-all, "
            "recomputed before every joint batch (workload.joint_budgets_per_batch)."
        )
    return " ".join(notes)


def summarize_sides(result: dict[str, Any]) -> None:
    """(Re)compute every side's summary in `result` from its runs, and the target verdict."""
    order = [BARE, *[s for s in SIDES[1:] if any(r["system"] == s for r in result["runs"])]]
    for side in order:
        result[side] = side_summary(result["runs"], side)
    result["notes"] = cpu_notes(result)
    ob = result.get("output_budget")
    if ob is not None:
        ci = ob["paired_ratio_geomean_ci95"]
        ob["target_met"] = ob["paired_ratio_median"] is not None and ob["paired_ratio_median"] >= TARGET_RATIO
        ob["target_met_with_confidence"] = ci is not None and ci[1] >= TARGET_RATIO


def side_summary(rows: Sequence[dict[str, Any]], side: str) -> dict[str, Any]:
    """Medians of one side's runs and, for joulecap sides, its paired ratios against bare vLLM.

    A paired ratio is the side's tokens/s over bare vLLM's in the same repeat.
    """
    mine = [r for r in rows if r["system"] == side]
    out: dict[str, Any] = {
        k: statistics.median(r[k] for r in mine)
        for k in ("tokens_per_s", "p50_latency_s", "p99_latency_s", "completion_tokens")
    }
    per_token = [r["meter_j_per_token"] for r in mine if r.get("meter_j_per_token") is not None]
    out["meter_j_per_token_median"] = statistics.median(per_token) if per_token else None
    if side == BARE:
        return out
    bare = {r["repeat"]: r["tokens_per_s"] for r in rows if r["system"] == BARE}
    paired = [r["tokens_per_s"] / bare[r["repeat"]] for r in mine if bare.get(r["repeat"])]
    out["paired_ratios"] = paired
    out["paired_ratio_median"] = statistics.median(paired) if paired else None
    out["paired_ratio_range"] = [min(paired), max(paired)] if paired else None
    out["paired_ratio_geomean_ci95"] = geomean_ci95(paired)
    if side == "native_engine":
        return out
    out["visual_kept_fraction"] = sum(r["visual_tokens_kept"] for r in mine) / max(
        1, sum(r["visual_tokens_in"] for r in mine)
    )
    out["plans_binding_fraction"] = sum(r["plans_binding"] for r in mine) / max(
        1, sum(r["requests"] for r in mine)
    )
    sizes = [n for r in mine for n in r["encode_batch_sizes"]]
    out["encode_batches"] = len(sizes)
    out["encode_batch_size_mean"] = statistics.mean(sizes) if sizes else None
    out["encode_batch_size_max"] = max(sizes) if sizes else None
    reported = [r["reported_energy_j"] / r["completion_tokens"] for r in mine if r["completion_tokens"]]
    out["reported_j_per_token_median"] = statistics.median(reported) if reported else None
    return out
