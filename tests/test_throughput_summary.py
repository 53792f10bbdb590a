"""benchmarks/_throughput_summary.py on synthetic runs (no vLLM): paired ratios per policy."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from _factories import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of scripts, not an installed package

from benchmarks._throughput_sides import BARE
from benchmarks._throughput_summary import side_summary


def _row(system: str, repeat: int, tok_s: float, **extra: Any) -> dict[str, Any]:
    row = {
        "system": system,
        "repeat": repeat,
        "tokens_per_s": tok_s,
        "p50_latency_s": 0.1,
        "p99_latency_s": 0.2,
        "completion_tokens": 100,
        "requests": 4,
        "meter_j_per_token": 0.01 * tok_s / 100,
        "visual_tokens_in": 256,
        "visual_tokens_kept": 128,
        "plans_binding": 2,
        "encode_batch_sizes": [2, 2],
        "reported_energy_j": 5.0,
        "refused": 0,
    }
    row.update(extra)
    return row


def test_paired_ratios_are_per_repeat() -> None:
    rows = [
        _row(BARE, 0, 100.0),
        _row("output_budget", 0, 99.0),
        _row("joint", 0, 50.0),
        _row(BARE, 1, 200.0),  # the machine was faster in repeat 1: ratios stay paired
        _row("output_budget", 1, 196.0),
        _row("joint", 1, 120.0, encode_batch_sizes=[4]),
        _row(BARE, 2, 150.0),
        _row("output_budget", 2, 153.0),
    ]
    ob = side_summary(rows, "output_budget")
    assert ob["paired_ratios"] == pytest.approx([0.99, 0.98, 1.02])
    assert ob["paired_ratio_median"] == pytest.approx(0.99)
    assert ob["paired_ratio_range"] == pytest.approx([0.98, 1.02])
    joint = side_summary(rows, "joint")
    assert joint["paired_ratios"] == pytest.approx([0.5, 0.6])
    assert joint["encode_batches"] == 3 and joint["encode_batch_size_max"] == 4
    assert joint["visual_kept_fraction"] == pytest.approx(0.5)
    assert joint["plans_binding_fraction"] == pytest.approx(0.5)
    assert joint["reported_j_per_token_median"] == pytest.approx(0.05)
    bare = side_summary(rows, BARE)
    assert "paired_ratios" not in bare and bare["tokens_per_s"] == 150.0


def test_geomean_interval_and_target_verdicts() -> None:
    from benchmarks._throughput_summary import TARGET_RATIO, geomean_ci95, summarize_sides

    assert geomean_ci95([1.0]) is None and geomean_ci95([1.0, -1.0]) is None
    gm, lo, hi = geomean_ci95([0.5, 2.0, 1.0])  # type: ignore[misc]
    assert gm == pytest.approx(1.0) and lo < 1.0 < hi
    steady = [_row(BARE, k, 100.0) for k in range(4)] + [
        _row("output_budget", k, 99.0 + k % 2) for k in range(4)
    ]
    result: dict[str, Any] = {"runs": steady, "machine": {"gpu": "no GPU available"}}
    summarize_sides(result)
    assert result["output_budget"]["target_met"] and result["output_budget"]["target_met_with_confidence"]
    assert result["output_budget"]["paired_ratio_median"] >= TARGET_RATIO
    assert "No GPU" in result["notes"] and "joint" not in result  # only the sides that ran


def test_model_and_shape_are_refused_together_before_vllm_is_needed(capsys: Any) -> None:
    from benchmarks.throughput import main

    with pytest.raises(SystemExit) as exited:
        main(["--model", "/nonexistent", "--shape", "smolvlm-256m"])
    assert exited.value.code == 2
    assert "--model and --shape are exclusive" in capsys.readouterr().err


def test_the_notes_describe_the_sides_and_options_that_ran() -> None:
    from benchmarks._throughput_summary import summarize_sides

    cpu = {"gpu": "no GPU available"}
    runs = [_row(BARE, 0, 100.0), _row("output_budget", 0, 90.0), _row("joint", 0, 50.0)]
    bound: dict[str, Any] = {"runs": runs, "machine": cpu, "workload": {"joint_budget_fraction": 0.5}}
    summarize_sides(bound)
    assert "joint's budget binds: 0.5 of the way" in bound["notes"] and "unset" not in bound["notes"]
    assert "native_engine" not in bound["notes"]  # it did not run
    more = [*runs, _row("native_engine", 0, 95.0)]
    unbound: dict[str, Any] = {"runs": more, "machine": cpu, "workload": {}}
    summarize_sides(unbound)
    assert "joint's budget is unset" in unbound["notes"] and "native_engine is" in unbound["notes"]
    gpu: dict[str, Any] = {"runs": runs, "machine": {"gpu": "NVIDIA H200"}}
    summarize_sides(gpu)
    assert gpu["notes"] == ""
