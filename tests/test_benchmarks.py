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
        "JOULECAP_CACHE": str(tmp_path / "cache"),
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
            assert r["prefill_j_mean"] + r["decode_j_mean"] == pytest.approx(
                r["energy_j_mean"], rel=1e-4
            )  # JSON keeps 6 digits
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

    monkeypatch.setenv("JOULECAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "stability.json"
    threads = torch.get_num_threads()
    try:
        assert stability.main(["--reps", "100", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert set(data["workloads"]) >= {"model request (energy)", "loop: python (CPU s)"}
    assert data["workloads"]["model request (energy)"]["n"] == 100
    assert data["model"]["meter"]["source"] == "estimated" and data["model"]["major_faults"] >= 0


def _scheduler_result(
    used_j: list[float], budget_j: float, use_pct: float, binding: int, server_mape: float | None
) -> dict[str, Any]:
    """The part of a scheduler benchmark JSON that benchmarks/pool.py reads (older runs: no server)."""
    held: dict[str, Any] = {"mape_pct": 12.0, "repeat_ape_pct": 3.0, "refit_loo_mape_pct": 6.0}
    if server_mape is not None:
        held["online"] = {"server": {"mape_pct": server_mape}, "rls_only": {"mape_pct": 11.0}}
        held["reference_ape_pct"] = 9.0
    rows = [{"refused": False, "used_j": u, "budget_j": budget_j} for u in used_j]
    rows.append({"refused": True, "used_j": 0.0, "budget_j": 0.1})  # a 422 is not a request run
    return {
        "machine": {"label": "test machine"},
        "requests": {"joint": rows},
        "policies": {
            "joint": {"max_overshoot_pct": 0.0, "binding": binding, "mean_use_binding_pct": use_pct}
        },
        "heldout": held,
        "planning": {
            "joint": {"besides_spectral_p50_ms": 0.03},
            "baseline": {"besides_spectral_p50_ms": 0.5},
            "n": 3,
        },
    }


def test_wilson_interval_brackets_the_proportion_and_narrows_with_n(bench: Any) -> None:
    from benchmarks.pool import wilson

    lo, hi = wilson(99, 100)
    assert lo < 99.0 < hi <= 100.0
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-9) and wilson(10, 10)[1] == pytest.approx(100.0)
    lo_big, hi_big = wilson(990, 1000)
    assert hi_big - lo_big < hi - lo
    assert all(math.isnan(v) for v in wilson(0, 0))
    # The textbook value for 8 of 10 (Wilson 1927): 49.0-94.3%.
    assert wilson(8, 10) == pytest.approx((49.016, 94.332), abs=1e-2)


def test_pool_weights_runs_by_their_requests_and_skips_missing_figures(bench: Any) -> None:
    from benchmarks.pool import pool, run_figures

    a = run_figures(_scheduler_result([1.0] * 9 + [1.2], 1.1, use_pct=80.0, binding=1, server_mape=4.0))
    b = run_figures(_scheduler_result([1.0] * 30, 1.1, use_pct=90.0, binding=3, server_mape=None))
    assert a["ran"] == 10 and a["within"] == 9 and b["within"] == 30
    assert a["planning_besides_spectral_p50_ms"] == 0.5  # the slowest policy, as the benchmark judges
    assert b["heldout_mape_pct"]["server"] is None and b["heldout_mape_pct"]["frozen"] == 12.0
    p = pool({"a": a, "b": b})
    assert p["ran"] == 40 and p["within"] == 39 and p["within_budget_pct"] == pytest.approx(97.5)
    assert p["mean_use_binding_pct"] == pytest.approx((80.0 * 1 + 90.0 * 3) / 4)
    assert p["heldout_mape_pct"]["server"] == 4.0  # the mean over the runs that have it
    assert p["heldout_mape_pct"]["floor_reference"] == 9.0 and p["mape_judged_on"] == "server"
    # A run without the server figure cannot meet the MAPE target on it; the other run does.
    assert p["runs_meeting_target"]["calibrated_heldout_mape_pct<=5"] == 1
    assert p["runs_meeting_target"]["joint_within_budget_pct>=99"] == 1  # b alone (100%); a is 90%
    assert p["pooled_targets"] == {
        "joint_within_budget_pct>=99": False,
        "joint_mean_use_binding_pct>=85": True,
        "calibrated_heldout_mape_pct<=5": True,
        "planning_besides_spectral_p50_ms<=1": True,
    }
    with pytest.raises(ValueError):
        pool({})


def test_pool_cli_writes_json_and_refuses_a_foreign_file(bench: Any, tmp_path: Path) -> None:
    from benchmarks import pool

    run = tmp_path / "run.json"
    run.write_text(json.dumps(_scheduler_result([1.0, 1.0], 1.1, use_pct=86.0, binding=2, server_mape=7.0)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(
        json.dumps(_scheduler_result([1.0, 1.2], 1.1, use_pct=84.0, binding=2, server_mape=9.0))
    )
    out = tmp_path / "pooled.json"
    assert pool.main([str(run), str(other / "run.json"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {str(run), str(other / "run.json")}  # same name, two runs
    assert data["pooled"]["runs"] == 2 and data["pooled"]["within"] == 3
    assert data["pooled"]["heldout_mape_pct"]["server"] == 8.0
    with pytest.raises(SystemExit, match="named twice"):
        pool.main([str(run), str(run)])
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"benchmark": "kernels"}))
    with pytest.raises(SystemExit, match=r"foreign\.json: not a scheduler benchmark result"):
        pool.main([str(foreign)])


def test_pool_takes_a_run_where_nothing_bound_or_nothing_ran(bench: Any) -> None:
    from benchmarks.pool import pool, run_figures

    bound = run_figures(_scheduler_result([1.0], 1.1, use_pct=88.0, binding=1, server_mape=6.0))
    idle = _scheduler_result([], 1.1, use_pct=0.0, binding=0, server_mape=6.0)
    idle["policies"]["joint"]["mean_use_binding_pct"] = None  # as the benchmark writes NaN
    figs = run_figures(idle)
    assert figs["ran"] == 0 and math.isnan(figs["mean_use_binding_pct"])
    p = pool({"bound": bound, "idle": figs})
    assert p["mean_use_binding_pct"] == 88.0 and p["ran"] == 1
    assert p["runs_meeting_target"]["joint_within_budget_pct>=99"] == 1  # a run with none ran meets nothing


def test_pool_correlates_the_judged_mape_with_the_floors_run_by_run(bench: Any) -> None:
    from benchmarks.pool import pool, run_figures

    runs = {}
    for i, (server, reference) in enumerate([(5.0, 4.0), (10.0, 9.0), (15.0, 13.0), (8.0, 7.0)]):
        data = _scheduler_result([1.0], 1.1, use_pct=85.0, binding=1, server_mape=server)
        data["heldout"]["reference_ape_pct"] = reference
        data["heldout"]["repeat_ape_pct"] = 20.0 - server  # falls as the MAPE rises
        runs[f"run{i}"] = run_figures(data)
    corr = pool(runs)["mape_floor_correlation"]
    assert corr["floor_reference"] > 0.99 and corr["floor_repeat"] == pytest.approx(-1.0)
    assert corr["floor_refit"] is None  # the same in every run: no correlation to speak of
    assert pool(dict(list(runs.items())[:2]))["mape_floor_correlation"]["floor_reference"] is None


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
