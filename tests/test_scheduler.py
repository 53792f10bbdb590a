"""Scheduler: policy choice, tau, the planning context it adds (learned margin, expected encode),
planning speed sanity; and budgets held through the real runtime and server.

Range checks of a request's fields (budget, tau, policy) happen before the scheduler, in
`joulecap.runtime.requests` (tests/test_requests.py)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
from _factories import prepared
from PIL import Image

from joulecap.policies.base import MIN_J_RESOLUTION
from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.errors import BudgetTooSmall, InvalidRequest
from joulecap.runtime.learning import Learner, LearningConfig
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.scheduler import Scheduler
from joulecap.runtime.types import EnergyReport, PreparedRequest

PRED_COEF = (1.0, 0.01, 0.1)  # 1 J fixed, 0.01 J per prompt token, 0.1 J per generated token
MARGIN = LearningConfig().feasibility_margin  # before anything is learned


def sched(**cfg: object) -> Scheduler:
    pred = Predictor(*PRED_COEF)
    return Scheduler(replace(SchedulerConfig(), **cfg), pred, Learner(pred, LearningConfig()))


def encoded(p: PreparedRequest, encode_j: float) -> PreparedRequest:
    """`p` with a measured encode of `encode_j` joules, as the runtime hands it to the scheduler."""
    report = EnergyReport(encode_j, 0.0, 0.0, 0.0, 0.1, "measured", "test", encode_j=encode_j)
    return replace(p, encode=report)


def test_default_policy_and_request_override() -> None:
    s = sched()
    assert s.plan(prepared()).policy == "answers_first"
    assert s.plan(prepared(policy="baseline")).policy == "baseline"
    assert sched(policy="fixed_output").plan(prepared()).policy == "fixed_output"
    # The default prunes only under a budget; joint prunes by tau without one.
    assert s.prunes_visual(prepared().request) is False
    assert s.prunes_visual(prepared(energy_budget_j=5.0).request) is True
    assert s.prunes_visual(prepared(policy="joint").request) is True
    assert s.prunes_visual(prepared(policy="output_budget", energy_budget_j=5.0).request) is False


def test_unknown_policy() -> None:
    with pytest.raises(InvalidRequest, match="available"):
        sched().plan(prepared(policy="magic"))
    with pytest.raises(InvalidRequest, match="available"):
        sched(policy="magic")  # at start-up, not on the first request


def test_request_tau_overrides_config() -> None:
    # The default keeps every token without a budget: ask for E-AdaPrune by name.
    p_lo = sched().plan(prepared(visual=(128,), rank=64, tau=0.3, policy="eadaprune"))
    p_hi = sched().plan(prepared(visual=(128,), rank=64, tau=1.0, policy="eadaprune"))
    assert sum(p_lo.visual_keep) < sum(p_hi.visual_keep)
    assert (
        sched(tau=0.3).plan(prepared(visual=(128,), rank=64, policy="eadaprune")).visual_keep
        == p_lo.visual_keep
    )


def test_budget_plans_and_too_small_is_422() -> None:
    s = sched()
    out = s.plan(prepared(energy_budget_j=5.0))
    assert out.budget_j == 5.0 and out.predicted_j <= 5.0 * (1 - SchedulerConfig().budget_headroom)
    assert out.holds_budget is True and out.margin == MARGIN
    with pytest.raises(BudgetTooSmall) as err:
        s.plan(prepared(energy_budget_j=0.01))
    assert err.value.min_j == out.min_j  # the same request's stated minimum, with or without a budget


def test_the_context_carries_what_the_learner_knows() -> None:
    s = sched()
    p = encoded(prepared(visual=(64,), energy_budget_j=5.0, max_tokens=9, tau=0.5), 0.8)
    c = s.context(p)
    assert (c.tau, c.max_tokens, c.budget_j, c.encode_j) == (0.5, 9, 5.0, 0.8)
    assert c.margin == MARGIN and c.promised_min_j is None
    assert c.left_j == pytest.approx(5.0 - 0.8)  # the measured encode is what is already spent
    for _ in range(5):
        s.learner.margin.observe(1.0, 1.4)
    # A steady 40% overshoot: the margin is it plus the configured least safety.
    assert s.context(p).margin == pytest.approx(0.4 + MARGIN)


def test_a_retry_at_the_stated_minimum_is_accepted_though_its_encode_came_out_dearer() -> None:
    s = sched(policy="output_budget")
    run_min = Predictor(*PRED_COEF).predict(20, 64, 1).total_j
    with pytest.raises(BudgetTooSmall) as err:
        s.plan(encoded(prepared(visual=(64,), energy_budget_j=0.1), 0.5))
    stated = err.value.min_j
    assert stated == pytest.approx(0.5 + run_min * (1 + MARGIN), abs=MIN_J_RESOLUTION)
    # The same request again (same messages, images and options; any budget): the stated minimum
    # is held, whatever this attempt's encode cost.
    retry = encoded(prepared(visual=(64,), energy_budget_j=stated), 0.9)
    assert s.context(retry).promised_min_j == stated
    out = s.plan(retry)
    assert out.min_j == stated and out.encode_j == 0.9 and out.max_new_tokens == 1
    with pytest.raises(BudgetTooSmall) as again:
        s.plan(encoded(prepared(visual=(64,), energy_budget_j=stated * (1 - 1e-6)), 0.9))
    assert again.value.min_j == stated
    # Another request (a different output cap) is priced by the rule with its own encode.
    other = encoded(prepared(visual=(64,), energy_budget_j=stated, max_tokens=7), 0.9)
    assert s.context(other).promised_min_j is None
    with pytest.raises(BudgetTooSmall) as refused:
        s.plan(other)
    assert refused.value.min_j == pytest.approx(0.9 + run_min * (1 + MARGIN), abs=MIN_J_RESOLUTION)


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
    assert [r.budget_exceeded for r in held] == [u > 1.0 for u in used]  # what the answer reports
    # Every held run that took a first decode step taught the learner that step's premium, unless
    # its energy leaned on the predictor (an interpolated window teaches nothing).
    taught = [r for r in held if r.completion_tokens >= 2 and not r.energy.interpolated]
    samples = rt.learner.first_step.stats()["samples"]
    assert samples == len(taught) > 0, [(r.completion_tokens, r.energy.interpolated) for r in held]


def test_envelope_429_with_retry_after_over_http(live_server_factory: Any) -> None:
    server, runtime = live_server_factory(envelope={"power_envelope_w": 0.001, "power_envelope_j": 3.0})
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "hello"}]
    first = client.chat.completions.create(
        model="default", messages=messages, max_tokens=4, extra_headers={"X-Energy-Budget-J": "2.0"}
    )
    assert first.choices[0].finish_reason in {"stop", "length"}
    assert runtime.envelope is not None and runtime.envelope.level_j() < 3.0  # its energy was drawn
    # A request reserves its prediction with the margin, capped by a held budget: a long answer
    # under a 3 J budget reserves the whole 3 J, more than the bucket holds now.
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(
            model="default", messages=messages, max_tokens=256, extra_headers={"X-Energy-Budget-J": "3.0"}
        )
    retry_after = int(err.value.response.headers["retry-after"])
    expected_s = (3.0 - runtime.envelope.level_j()) / 0.001
    assert retry_after >= 1 and abs(retry_after - expected_s) <= max(2.0, 0.05 * expected_s)
    assert err.value.response.json()["error"]["code"] == "power_envelope_exhausted"
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert "joulecap_envelope_level_joules" in metrics
