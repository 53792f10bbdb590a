"""Scheduler: policy choice, tau and budget validation, planning speed sanity."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
import torch
from _factories import prepared
from PIL import Image

from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import BudgetTooSmall, InvalidRequest
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.scheduler import Scheduler


def sched(**cfg: object) -> Scheduler:
    return Scheduler(replace(SchedulerConfig(), **cfg), Predictor(1.0, 0.01, 0.1))


def test_default_policy_and_request_override() -> None:
    s = sched()
    assert s.plan(prepared()).policy == "answers_first"
    assert s.plan(prepared(policy="baseline")).policy == "baseline"
    assert sched(policy="fixed_output").plan(prepared()).policy == "fixed_output"


def test_unknown_policy() -> None:
    with pytest.raises(InvalidRequest, match="available"):
        sched().plan(prepared(policy="magic"))
    with pytest.raises(InvalidRequest, match="available"):
        sched(policy="magic")


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_tau_is_400(tau: float) -> None:
    with pytest.raises(InvalidRequest) as err:
        sched().plan(prepared(tau=tau))
    assert err.value.param == "tau" and err.value.http_status == 400


def test_request_tau_overrides_config() -> None:
    # The default keeps every token without a budget: ask for E-AdaPrune by name.
    p_lo = sched().plan(prepared(visual=(128,), rank=64, tau=0.3, policy="eadaprune"))
    p_hi = sched().plan(prepared(visual=(128,), rank=64, tau=1.0, policy="eadaprune"))
    assert sum(p_lo.visual_keep) < sum(p_hi.visual_keep)


@pytest.mark.parametrize("budget", [0.0, -1.0, float("inf"), float("nan"), 0.5, 2000.0])
def test_budget_out_of_range_is_400(budget: float) -> None:
    with pytest.raises(InvalidRequest) as err:
        sched(budget_min_j=1.0, budget_max_j=1000.0).plan(prepared(energy_budget_j=budget))
    assert err.value.param == "energy_budget_j" and err.value.http_status == 400


def test_budget_in_range_plans_and_too_small_is_422() -> None:
    s = sched()
    out = s.plan(prepared(energy_budget_j=5.0))
    assert out.budget_j == 5.0 and out.predicted_j <= 5.0
    with pytest.raises(BudgetTooSmall):
        s.plan(prepared(energy_budget_j=0.01))


def test_scheduler_sets_the_predictor_forgetting() -> None:
    pred = Predictor(1.0, 0.01, 0.1)
    Scheduler(replace(SchedulerConfig(), rls_forgetting=0.9, speed_alpha=0.3), pred)
    assert pred.forgetting == 0.9 and pred.speed_alpha == 0.3


@pytest.mark.parametrize("alpha", [-0.01, 1.01])
def test_speed_alpha_out_of_range_is_a_config_error(alpha: float) -> None:
    with pytest.raises(ValueError, match="speed_alpha"):
        SchedulerConfig(speed_alpha=alpha)


def test_planning_without_spectral_work_is_fast() -> None:
    # Sanity bound only (generous for loaded CI); the real p50 is measured in benchmarks/scheduler.py.
    s = sched()
    p = prepared(visual=(64,), energy_budget_j=5.0, policy="output_budget")
    t0 = time.perf_counter()
    for _ in range(200):
        s.plan(p)
    assert (time.perf_counter() - t0) / 200 < 0.01


# ---------------------------------------------------------------------------------------------
# Through the real runtime (tiny random-weight model, estimate meter) and a real server.


def test_joint_holds_binding_budgets_in_the_real_runtime(config_factory: Any) -> None:
    from joulecap.runtime.errors import BudgetTooSmall
    from joulecap.runtime.runtime import Runtime

    frames = [Image.new("RGB", (96, 96), c) for c in ("red", "green", "blue", "white", "black", "gray")]
    prompt = "Describe everything you see in great detail."
    cap = 96  # long answers: decode dominates, so a budget can bind without starving the prefill
    # 100 Hz sampling: the governor sees energy only as fast as the sampler reads the meter.
    with Runtime(config_factory(energy={"sample_hz": 100.0})) as rt:
        for frame in frames[:3]:  # warm the engine and let the predictor learn this machine
            rt.chat(prompt, images=[frame], max_tokens=cap)
        held, budgets, unheld = [], [], []
        for frame in frames:
            free = rt.plan(rt.build_request(prompt, [frame], max_tokens=cap, policy="baseline"))[1]
            try:  # the cheapest answer the joint policy would accept
                rt.plan(rt.build_request(prompt, [frame], max_tokens=cap, energy_budget_j=1e-6))
                raise AssertionError("a 1 uJ budget was accepted")
            except BudgetTooSmall as exc:
                min_j = exc.min_j
            budgets.append(max(0.6 * free.predicted_j, 1.1 * min_j))
            unheld.append(free.predicted_j / budgets[-1])
            held.append(
                rt.chat(prompt, images=[frame], max_tokens=cap, energy_budget_j=budgets[-1], policy="joint")
            )
    assert min(unheld) >= 1.3, unheld  # the budgets bind: unheld, the requests would exceed them
    assert all(r.plan.max_new_tokens < cap for r in held)  # planned under the budget
    used = [r.energy.total_j / b for r, b in zip(held, budgets, strict=True)]
    # The governor's guarantee is against its own measurement and prediction; on a shared, loaded
    # CPU a stall after its last check can still push one over, so this checks the mechanism, not
    # the >= 99% target (that is measured, with its machine, by benchmarks/scheduler.py).
    assert max(used) <= min(1.25, min(unheld)), used
    assert sum(u <= 1.0 for u in used) >= len(used) // 2 + 1, used
    assert all(r.energy.source == "estimated" for r in held)
    # Every held run that took a first decode step taught the scheduler that step's premium.
    stepped = [r for r in held if r.completion_tokens >= 2]
    assert rt.scheduler.first_step.stats()["samples"] == len(stepped) > 0


def test_envelope_429_with_retry_after_over_http(live_server_factory: Any) -> None:
    server, runtime = live_server_factory(scheduler={"power_envelope_w": 0.001, "power_envelope_j": 3.0})
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "hello"}]
    first = client.chat.completions.create(
        model="default", messages=messages, max_tokens=4, extra_headers={"X-Energy-Budget-J": "2.0"}
    )
    assert first.choices[0].message is not None
    assert runtime.envelope.level_j() < 3.0  # the first request's energy was drawn
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(
            model="default", messages=messages, max_tokens=4, extra_headers={"X-Energy-Budget-J": "3.0"}
        )
    retry_after = int(err.value.response.headers["retry-after"])
    expected_s = (3.0 - runtime.envelope.level_j()) / 0.001
    assert retry_after >= 1 and abs(retry_after - expected_s) <= max(2.0, 0.05 * expected_s)
    assert err.value.response.json()["error"]["code"] == "power_envelope_exhausted"
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert "joulecap_envelope_level_joules" in metrics


@pytest.mark.slow
def test_scheduler_benchmark_smoke(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("JOULECAP_CACHE", str(tmp_path / "cache"))
    from benchmarks import scheduler as bench

    out = tmp_path / "scheduler.json"
    args = ["--requests", "2", "--heldout", "2", "--quick-calibration", "--out", str(out)]
    args += ["--session-note", "smoke"]
    threads = torch.get_num_threads()
    try:
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark pins torch threads process-wide
    data = json.loads(out.read_text())
    assert set(data["policies"]) >= {"baseline", "joint", "output_budget"}
    assert "ESTIMATED" in data["energy_source"] or "measured" in data["energy_source"]
    assert data["machine"]["label"] and data["planning"]["joint"]["p50_ms"] > 0
    held = data["heldout"]
    assert all(r["repeat_j"] > 0 for r in held["rows"]) and 0 <= held["repeat_ape_pct"] < 100
    assert len(held["reference_j"]) == 2 and held["reference_ape_pct"] >= 0
    assert set(held["online"]) == {"server", "rls_only"}
    assert held["online"]["server"]["speed_alpha"] > 0 == held["online"]["rls_only"]["speed_alpha"]
    assert set(data["targets"]) == {
        "joint_within_budget_pct>=99",
        "joint_mean_use_binding_pct>=85",
        "calibrated_heldout_mape_pct<=5",
        "planning_besides_spectral_p50_ms<=1",
    }
    assert data["session_note"] == "smoke"
    # benchmarks/pool.py reads what the benchmark wrote, and judges it as the benchmark did.
    from benchmarks import pool

    pooled_out = tmp_path / "pooled.json"
    assert pool.main([str(out), "--out", str(pooled_out)]) == 0
    pooled = json.loads(pooled_out.read_text())["pooled"]
    assert pooled["runs"] == 1 and pooled["pooled_targets"] == data["targets"]
