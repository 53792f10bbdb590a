"""benchmarks/run.py and benchmarks/paper.py: scoring and summary logic (fast), and --quick smoke runs (slow).

The smoke runs execute the real scripts in a subprocess on the real runtime (tiny model, estimate
meter, TinyVQA workload) and check what they write: every registered policy present, the JSON
contract the README relies on, consistent numbers, valid PNGs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _factories import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {
    "policy",
    "budget_j",
    "requests",
    "energy_j_mean",
    "energy_j_p50",
    "energy_j_p95",
    "energy_source",
    "latency_s_p50",
    "latency_s_p95",
    "output_tokens_mean",
    "visual_tokens_kept_mean",
    "quality",
    "violations_pct",
    "utilization",
    "predictor_mape_pct",
    "prefill_j_mean",
    "decode_j_mean",
}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(REPO))
    import benchmarks._common as common
    import benchmarks._plots as plots
    import benchmarks.run as run

    return common, run, plots


# ------------------------------------------------------------------------------------------- fast
def test_score_exact_match_normalises_case_punctuation_articles(bench: Any) -> None:
    common, *_ = bench
    assert common.score("Red.", "red", "short") == 1.0
    assert common.score("the red", "red", "short") == 1.0
    assert common.score("red circle", "red", "short") == 0.0
    assert common.score("", "red", "short") == 0.0
    # Only the first line counts: an answer followed by chatter still matches.
    assert common.score("yes\nbecause it is", "yes", "short") == 1.0


def test_score_list_recall_counts_repeats(bench: Any) -> None:
    common, *_ = bench
    ref = "a red circle, a red circle and a blue square."
    assert common.score(ref, ref, "list") == 1.0
    assert common.score("a red circle and a blue square.", ref, "list") == pytest.approx(2 / 3)
    assert common.score("a red circles", ref, "list") == 0.0
    assert common.score("a blue square, a red circle, a red circle", ref, "list") == 1.0


def test_jsonl_workload_accepts_tinyvqa_field_names(bench: Any, tmp_path: Path) -> None:
    from PIL import Image

    common, *_ = bench
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "prompt": "colour?", "reference": "red"},
        {"image": "a.png", "question": "describe the image.", "answer": "a red square.", "qtype": "describe"},
        {"image": "a.png", "prompt": "list", "reference": "a red square, a blue circle"},
    ]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = common.load_workload(str(path), 10, 0)
    assert [(i.prompt, i.reference, i.kind) for i in items] == [
        ("colour?", "red", "short"),
        ("describe the image.", "a red square.", "list"),
        ("list", "a red square, a blue circle", "list"),
    ]
    assert items[0].image.size == (32, 32)
    (tmp_path / "bad.jsonl").write_text('{"image": "missing.png", "prompt": "x", "reference": "y"}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1"):
        common.load_workload(str(tmp_path / "bad.jsonl"), 10, 0)


def _rec(energy: float | None, budget: float, quality: float, **kw: Any) -> dict[str, Any]:
    if energy is None:
        return {
            "policy": "p",
            "budget_j": budget,
            "refused": True,
            "quality": 0.0,
            "latency_s": 0.01,
            "kind": "short",
        }
    return {
        "policy": "p",
        "budget_j": budget,
        "refused": False,
        "energy_j": energy,
        "prefill_j": energy * 0.1,
        "decode_j": energy * 0.9,
        "source": "estimated",
        "meter": "estimate:cpu",
        "latency_s": energy / 10,
        "output_tokens": 10,
        "visual_tokens_in": 64,
        "visual_tokens_kept": 32,
        "quality": quality,
        "predictor_error_pct": 10.0,
        "violated": energy > budget,
        "stop_reason": "stop",
        "kind": kw.get("kind", "short"),
    }


def test_run_record_stamps_date_command_machine_and_load(bench: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    common, _, _ = bench
    record = common.RunRecord.start("-m benchmarks.stability", ["--reps", "600", "--out", "a b.json"])
    doc = record.stamp({"benchmark": "x", "machine": "replaced", "value": 1})
    head = ["benchmark", "date", "command", "machine", "load_avg_1_5_15_at_start", "load_avg_1_5_15_at_end"]
    assert list(doc)[: len(head)] == head and doc["value"] == 1 and doc["duration_s"] >= 0
    # The command is a shell line that reproduces the run, quoted where an argument needs it.
    assert doc["command"] == "python -m benchmarks.stability --reps 600 --out 'a b.json'"
    assert datetime.datetime.fromisoformat(doc["date"]).utcoffset() == datetime.timedelta(0)
    assert doc["machine"]["label"] and doc["machine"]["cpu_count"] == os.cpu_count()
    assert len(doc["load_avg_1_5_15_at_start"]) == len(doc["load_avg_1_5_15_at_end"]) == 3
    # Without argv, the arguments are the process's own.
    monkeypatch.setattr(sys, "argv", ["benchmarks/load.py", "--quick"])
    assert common.reproduce_command("benchmarks/load.py") == "python benchmarks/load.py --quick"


def test_summarize_counts_violations_refusals_and_utilisation(bench: Any) -> None:
    _, run, _ = bench
    recs = [_rec(1.0, 2.0, 1.0), _rec(3.0, 2.0, 0.0), _rec(2.0, 2.0, 1.0), _rec(None, 2.0, 0.0)]
    row = run.summarize(recs, "p", 2.0)
    assert row["requests"] == 4 and row["completed"] == 3
    assert row["violations_pct"] == pytest.approx(25.0)  # 3.0 J > 2.0 J; 2.0 J is at the budget
    assert row["refused_pct"] == pytest.approx(25.0)
    assert row["energy_j_mean"] == pytest.approx(2.0)
    assert row["utilization"] == pytest.approx(1.0)
    assert row["quality"] == pytest.approx(0.5)  # the refused request counts as a miss
    assert row["prefill_j_mean"] + row["decode_j_mean"] == pytest.approx(row["energy_j_mean"])
    assert row["energy_source"] == "estimated"
    assert row["stop_reasons"] == {"stop": 3}


def test_summarize_all_refused_gives_nan_not_crash(bench: Any) -> None:
    _, run, _ = bench
    row = run.summarize([_rec(None, 1.0, 0.0)], "p", 1.0)
    assert math.isnan(row["energy_j_mean"]) and row["refused_pct"] == 100.0
    assert "-" in run.format_table([row])


def test_refit_loo_mape_is_zero_for_an_exact_linear_cost_and_grows_with_noise(bench: Any) -> None:
    from benchmarks._heldout import refit_loo_mape_pct

    rng = random.Random(0)
    rows = []
    for _ in range(30):
        n_in, n_out = rng.randint(10, 200), rng.randint(2, 40)
        rows.append(
            {
                "text_tokens": n_in,
                "visual_kept": 0,
                "output_tokens": n_out,
                "measured_j": 0.05 + 0.001 * n_in + 0.03 * n_out,
            }
        )
    assert refit_loo_mape_pct(rows) < 1e-6
    noisy = [{**r, "measured_j": r["measured_j"] * rng.choice([0.8, 1.2])} for r in rows]
    assert 10 < refit_loo_mape_pct(noisy) < 40
    assert math.isnan(refit_loo_mape_pct(rows[:4]))


def test_pareto_front_keeps_only_undominated_points(bench: Any) -> None:
    *_, plots = bench
    pts = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.8), (3.0, 0.8), (4.0, 0.9)]
    assert plots.pareto_front(pts) == [(1.0, 0.5), (2.0, 0.8), (4.0, 0.9)]


# ------------------------------------------------------------------------------------------- slow
def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "JOULECAP_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_run_quick_smoke(tmp_path: Path) -> None:
    from joulecap.policies import available_policies

    out = tmp_path / "run"
    proc = _run(
        "run.py",
        "--quick",
        "--requests", "3",
        "--warmup", "2",
        "--max-tokens", "24",
        "--calibrate", "no",  # calibration has its own tests; here it would only cost time
        "--threads", "1",
        "--meter", "estimate",
        "--out", str(out),
        tmp_path=tmp_path,
    )  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    assert {"machine", "device", "meter", "model", "engine", "rows"} <= set(result)
    assert result["meter"]["source"] == "estimated" and "ESTIMATED" in result["meter"]["label"]
    assert "ESTIMATED" in proc.stdout  # the terminal says where the joules come from
    rows = result["rows"]
    policies = list(available_policies())
    assert {r["policy"] for r in rows} == set(policies)
    assert len(rows) == len(policies) * len(result["budgets_j"]) and len(result["budgets_j"]) >= 2
    for r in rows:
        assert set(r) >= ROW_KEYS, ROW_KEYS - set(r)
        assert r["requests"] == 3
        assert 0.0 <= r["violations_pct"] <= 100.0 and 0.0 <= r["quality"] <= 1.0
        if r["energy_j_mean"] is not None:
            assert r["energy_source"] == "estimated"
            assert 0 < r["energy_j_p50"] <= r["energy_j_p95"]
            # The three parts add up to the request's energy (JSON keeps 6 digits).
            parts = r["encode_j_mean"] + r["prefill_j_mean"] + r["decode_j_mean"]
            assert parts == pytest.approx(r["energy_j_mean"], rel=1e-4)
            assert r["visual_tokens_kept_mean"] <= r["visual_tokens_in_mean"]
    # Policies differ where they should: baseline keeps every visual token, fixed_prune fewer.
    by = {(r["policy"], r["budget_j"]): r for r in rows}
    b0 = result["budgets_j"][0]
    assert by[("baseline", b0)]["visual_tokens_kept_mean"] == by[("baseline", b0)]["visual_tokens_in_mean"]
    assert (
        by[("fixed_prune", b0)]["visual_tokens_kept_mean"] < by[("fixed_prune", b0)]["visual_tokens_in_mean"]
    )
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert len((out / "requests.jsonl").read_text().splitlines()) == 3 * len(rows)
    for name in ("pareto.png", "energy_split.png", "budget_vs_energy.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_paper_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "paper.json"
    proc = _run(
        "paper.py",
        "--quick",
        "--reps",
        "1",
        "--threads",
        "1",
        "--meter",
        "estimate",
        "--out",
        str(out),
        tmp_path=tmp_path,
    )
    result = json.loads(out.read_text())
    findings = [r["finding"] for r in result["comparison"]]
    assert len(findings) == 7 and all(r["paper"] for r in result["comparison"])
    # With the estimate meter the power finding is a tautology and must be labelled as one.
    assert "TAUTOLOGICAL" in result["caveats"]["power"] and "TAUTOLOGICAL" in proc.stdout
    assert result["forced_output_length"] is True
    runs = result["runs"]["tokens"]
    assert all(r["output_tokens"] == r["max_new"] for r in runs)
    assert {r["keep_frac"] for r in runs} >= {0.0, 1.0}
    assert min(r["visual_tokens_kept"] for r in runs) == 0
    assert 0.0 <= result["decode_share"]["min_pct"] <= result["decode_share"]["max_pct"] <= 100.0
    assert result["token_times"]["time_per_output_token_s"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_stability_spread_tells_phases_from_noise(bench: Any) -> None:
    from benchmarks.stability import spread

    rng = np.random.default_rng(0)
    phases = np.repeat(rng.uniform(0.8, 1.2, 20), 50) * rng.lognormal(0, 0.02, 1000)
    s = spread(list(phases))
    assert s["n"] == 1000 and s["block_cv_pct"] > 5
    assert s["adjacent_pct"] < 0.5 * s["random_pair_pct"]  # neighbours share their phase
    white = spread(list(rng.lognormal(0, 0.1, 1000)))
    assert white["adjacent_pct"] == pytest.approx(white["random_pair_pct"], rel=0.15)
    assert white["block_cv_pct"] < 3
    flat = spread([2.0] * 100)
    assert flat["cv_pct"] == 0 and flat["p99_over_median"] == 1.0


@pytest.mark.slow
def test_stability_benchmark_writes_its_table(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import stability

    monkeypatch.setenv("JOULECAP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "stability.json"
    threads = torch.get_num_threads()
    try:
        assert stability.main(["--reps", "100", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert set(data["workloads"]) >= {"model request (energy)", "loop: python (CPU s)"}
    assert data["workloads"]["model request (energy)"]["n"] == 100
    assert data["model"]["meter"]["source"] == "estimated" and "major_faults" in data["model"]


def _ran(used_j: float, budget_j: float) -> dict[str, Any]:
    return {
        "budget_j": budget_j,
        "refused": False,
        "used_j": used_j,
        "tokens": 4,
        "visual_kept": 16,
        "stop_reason": "length",
    }


def _refused(budget_j: float, min_plan_j: float, min_j: float, spread: float = 0.1) -> dict[str, Any]:
    runs = [min_plan_j * (1 - spread), min_plan_j, min_plan_j * (1 + spread)]
    row = {"budget_j": budget_j, "refused": True, "min_j": min_j, "min_plan_j": min_plan_j}
    return {**row, "min_plan_runs_j": runs}


def test_scheduler_summary_counts_both_sides_of_the_budget(bench: Any) -> None:
    from benchmarks._sched_judge import judge_targets, summarise

    rows = [
        _ran(0.9, 1.0),  # within, binding
        _ran(1.0, 1.0),  # at the budget is within
        _ran(1.1, 1.0),  # 10% over, binding
        _ran(0.5, 2.0),  # within, not binding
        _refused(0.5, 0.6, 0.7),  # a right refusal: the smallest plan cost more than the budget
        _refused(0.65, 0.6, 0.7),  # a false one: the smallest plan would have fitted
        _refused(0.6, 0.6, 0.7),  # at the true minimum is false too
        _refused(0.1, 0.6, 0.7),
    ]
    binds = [True, True, True, False, False, False, False, False]
    s = summarise(rows, binds)
    assert (s["requests"], s["ran"], s["refused_422"], s["within_budget"]) == (8, 4, 4, 3)
    assert s["within_budget_pct"] == pytest.approx(75.0)
    assert s["mean_use_binding_pct"] == pytest.approx(100 * (0.9 + 1.0 + 1.1) / 3)
    assert s["max_overshoot_pct"] == pytest.approx(10.0)
    assert s["false_refusals"] == 2 and s["false_refusals_pct_of_requests"] == pytest.approx(25.0)
    assert s["refusals_above_true_minimum"] == 2
    assert s["false_refusal_budget_over_true_min"] == pytest.approx([1.0, 0.65 / 0.6])
    assert s["stated_over_true_min_median"] == pytest.approx(0.7 / 0.6)
    # Beside them, the noise of the true minimum: 0.5 >= 0.54 (cheapest run) is False, 0.65 and 0.6 count.
    assert s["refusals_above_cheapest_min_run"] == 2
    assert s["min_plan_spread_pct_median"] == pytest.approx(100 * (1.1 / 0.9 - 1))
    lo, hi = s["within_budget_wilson95_pct"]
    assert lo < 75.0 < hi
    assert judge_targets(s["within_budget_pct"], s["false_refusals_pct_of_requests"], 2) == {
        "joint_within_budget_pct>=99": False,
        "joint_false_refusals_pct_of_requests<=2": False,
        "joint_every_refusal_below_true_minimum": False,
    }
    # Nothing ran, nothing refused: no figure is made up.
    empty = summarise([_refused(0.1, 0.6, 0.7)], [False])
    assert math.isnan(empty["within_budget_pct"]) and empty["false_refusals"] == 0


def test_scheduler_targets_are_judged_at_their_edges(bench: Any) -> None:
    from benchmarks._sched_judge import judge_targets

    assert all(judge_targets(99.0, 2.0, 0).values())
    assert judge_targets(98.99, 0.0, 0)["joint_within_budget_pct>=99"] is False
    assert judge_targets(100.0, 2.01, 0)["joint_false_refusals_pct_of_requests<=2"] is False
    assert judge_targets(100.0, 0.0, 1)["joint_every_refusal_below_true_minimum"] is False


def test_scheduler_budgets_span_the_scale_range_log_uniformly(bench: Any) -> None:
    from benchmarks._sched_workload import workload

    scales = np.array([i.budget_scale for i in workload(2000, 3, (0.1, 2.0))])
    assert scales.min() >= 0.1 and scales.max() <= 2.0
    # Log-uniform: as many budgets below the geometric middle as above, and a decade below 0.3x.
    middle = math.sqrt(0.1 * 2.0)
    assert 0.45 < np.mean(scales < middle) < 0.55
    assert 0.30 < np.mean(scales < 0.3) < 0.44  # ln(3)/ln(20) = 0.37
    assert np.mean(scales > 1.0) > 0.15  # some budgets do not bind
    assert [i.budget_scale for i in workload(5, 1)] == [i.budget_scale for i in workload(5, 1)]
    with pytest.raises(ValueError):
        workload(1, 0, (0.0, 1.0))


def test_wilson_interval_brackets_the_proportion_and_narrows_with_n(bench: Any) -> None:
    from benchmarks._sched_judge import wilson

    lo, hi = wilson(99, 100)
    assert lo < 99.0 < hi <= 100.0
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-9) and wilson(10, 10)[1] == pytest.approx(100.0)
    lo_big, hi_big = wilson(990, 1000)
    assert hi_big - lo_big < hi - lo
    assert all(math.isnan(v) for v in wilson(0, 0))
    # The textbook value for 8 of 10 (Wilson 1927): 49.0-94.3%.
    assert wilson(8, 10) == pytest.approx((49.016, 94.332), abs=1e-2)


@pytest.mark.slow
def test_scheduler_benchmark_smoke_measures_refusals_against_the_true_minimum(
    tmp_path: Path, bench: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import scheduler
    from benchmarks._sched_judge import false_refusal, judge_targets, summarise
    from joulecap.policies.config import SchedulerConfig

    monkeypatch.setenv("JOULECAP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "scheduler.json"
    # Seed 0's four budget scales in [0.02, 4]: 0.025 (below any answer), 1.49, 0.95, 2.84.
    args = ["--requests", "4", "--heldout", "3", "--quick-calibration", "--brevity-slice", "1"]
    args += ["--budget-scales", "0.02", "4", "--policies", "joint", "output_budget", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert scheduler.main(args) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark pins torch threads process-wide
    data = json.loads(out.read_text())
    assert data["date"] and "--requests 4" in data["command"]
    assert not any(key.endswith("_note") for key in data)  # results state the present, no run notes
    assert len(data["machine"]["load_avg_1_5_15"]) == 3 and len(data["load_avg_1_5_15_at_start"]) == 3
    assert set(data["policies"]) == {"baseline", "joint", "output_budget"}
    assert "ESTIMATED" in data["energy_source"] or "measured" in data["energy_source"]
    assert data["heldout_mape_pct"] > 0
    assert set(data["heldout_floors_pct"]) == {"repeat", "refit", "reference"}
    assert data["planning"]["joint"]["p50_ms"] > 0
    rows = data["requests"]["joint"]
    assert len(rows) == 4
    for row in rows:
        assert row["budget_j"] == pytest.approx(row["free_j"] * row["budget_scale"], rel=1e-4)
    refused = [r for r in rows if r["refused"]]
    ran = [r for r in rows if not r["refused"]]
    assert refused and ran  # both sides exercised
    floor = SchedulerConfig().visual_floor_tokens
    for r in refused:
        # The smallest plan ran: one image at the visual floor, the minimum answer, its encode included.
        assert r["min_plan_visual"] == floor and r["min_plan_tokens"] == SchedulerConfig().min_output_tokens
        assert r["min_plan_j"] > r["encode_j"] > 0 and r["min_j"] > r["budget_j"]
        # The true minimum is the median of the smallest plan's runs.
        assert len(r["min_plan_runs_j"]) == 3 and r["min_plan_j"] == sorted(r["min_plan_runs_j"])[1]
    for r in ran:
        assert r["used_j"] > 0 and r["min_j"] <= r["budget_j"]
    summary = data["policies"]["joint"]
    assert summary["false_refusals"] == sum(false_refusal(r) for r in rows)
    # The JSON's summary is what the rows say, and the targets are judged on it.
    again = summarise(rows, [False] * len(rows))
    assert again["within_budget"] == summary["within_budget"] and again["refused_422"] == len(refused)
    assert data["targets"] == judge_targets(
        summary["within_budget_pct"],
        summary["false_refusals_pct_of_requests"],
        summary["refusals_above_true_minimum"],
    )


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("[!_]*.py")))
def test_every_benchmark_runs_as_a_script(script: str) -> None:
    # Run as `python benchmarks/X.py` (as the docstrings say), benchmarks/ is sys.path[0]: its
    # kernels.py must not shadow Hugging Face's `kernels` when transformers is imported.
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
