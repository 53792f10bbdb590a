"""Running the scheduler benchmark's requests: a learning arm per policy, smallest plans, planning time."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

from benchmarks import _common as common
from benchmarks._sched_judge import MIN_PLAN_RUNS
from benchmarks._sched_workload import Item, make_image


@dataclass
class Arm:
    """What one policy's server has learned: its predictor, learner and scheduler."""

    predictor: Any
    learner: Any
    scheduler: Any


def make_arm(rt: Any, cal: Any, scheduler_config: Any = None) -> Arm:
    """A fresh arm from the calibration: a copy of its predictor and its own learner."""
    from joulecap.runtime.learning import Learner
    from joulecap.runtime.scheduler import Scheduler

    predictor = fresh_predictor(cal, rt.config.learning.speed_alpha)
    learner = Learner(predictor, rt.config.learning)
    learner.mark_active()  # the engine is warm (calibration ran just before)
    scheduler = Scheduler(scheduler_config or rt.config.scheduler, predictor, learner)
    return Arm(predictor, learner, scheduler)


def use(rt: Any, arm: Arm) -> None:
    """Serve the next requests with `arm`'s predictor, learner and scheduler."""
    rt.predictor, rt.learner, rt.scheduler = arm.predictor, arm.learner, arm.scheduler


def smallest_plan(rt: Any, prepared: Any, policy: str) -> Any:
    """The smallest plan `policy` could make for `prepared`: the one its stated minimum prices.

    Unconstrained (no budget, not held), so that running it measures what it costs.
    """
    from joulecap.policies.base import all_visual, spectral_keep
    from joulecap.runtime.types import Plan

    cfg = rt.scheduler.config
    ctx = rt.scheduler.context(prepared)
    if policy in ("joint", "answers_first"):  # both go down to the floor per image
        keep = tuple(min(k, cfg.visual_floor_tokens) for k in spectral_keep(prepared, ctx))
    elif policy == "output_budget":
        keep = all_visual(prepared)
    else:
        raise ValueError(f"no smallest plan known for policy {policy!r} (it does not refuse budgets)")
    out = cfg.min_output_tokens
    run = ctx.predictor.predict(prepared.text_tokens, sum(keep), out)
    return Plan(
        visual_keep=keep,
        max_new_tokens=out,
        predicted_j=prepared.encode_j + run.total_j,
        policy=policy,
        reason="smallest plan, run anyway to measure the true minimum",
        selection=cfg.selection,
        budget_j=None,
        holds_budget=False,
        encode_j=prepared.encode_j,
        predicted_prefill_j=run.prefill_j,
    )


def run_request(rt: Any, item: Item, budget: float | None, policy: str) -> dict[str, Any]:
    """Plan and run one request under `policy` as the server does (learning from it).

    A refused request's smallest plan is run anyway (not recorded, not learned from) and measured.
    """
    request = rt.build_request(
        item.prompt,
        [make_image(item.image_px, item.seed)],
        energy_budget_j=budget,
        max_tokens=item.max_tokens,
        policy=policy,
    )
    # `estimate` encodes and plans as `chat` does, and hands back the prepared request of a
    # refusal too; `run_planned` then runs, records and learns exactly as `chat` would. One
    # difference: `estimate` always decomposes a request that may be pruned, where `chat` under
    # `answers_first` skips that when the budget pays for every visual token (the same plan, at
    # the decomposition's energy less); refusals and binding budgets decompose either way.
    prepared, plan, refusal = rt.estimate(request)
    if refusal is not None:
        smallest = smallest_plan(rt, prepared, policy)
        runs = [rt.run_planned(prepared, smallest, record=False) for _ in range(MIN_PLAN_RUNS)]
        runs_j = [r.energy.total_j for r in runs]
        return {
            "budget_j": budget,
            "refused": True,
            "min_j": refusal.min_j,
            "margin": rt.learner.margin.value(),
            "plan_margin": rt.learner.plan_margin.value(),
            "encode_j": prepared.encode_j,
            "min_plan_visual": runs[0].generation.visual_tokens_kept,
            "min_plan_tokens": runs[0].completion_tokens,
            "min_plan_j": statistics.median(runs_j),
            "min_plan_runs_j": runs_j,
        }
    assert plan is not None
    res = rt.run_planned(prepared, plan)
    return {
        "budget_j": budget,
        "refused": False,
        "used_j": res.energy.total_j,
        "encode_j": res.energy.encode_j,
        "prefill_j": res.energy.prefill_j,
        "decode_j": res.energy.decode_j,
        "predicted_j": plan.predicted_j,
        "min_j": plan.min_j,
        "margin": plan.margin,
        "plan_margin": plan.plan_margin,
        "tokens": res.completion_tokens,
        "max_new_tokens": plan.max_new_tokens,
        "visual_kept": res.generation.visual_tokens_kept,
        "visual_in": res.generation.visual_tokens_in,
        "stop_reason": res.generation.stop_reason,
        "source": res.energy.source,
    }


def planning_overhead(rt: Any, items: list[Item], budgets: list[float | None], reps: int) -> dict[str, Any]:
    """p50 of `Scheduler.plan` per policy, with the spectral computation timed apart per call.

    The policies' `spectral_budget` is wrapped by a timer for the measurement, so "besides the
    spectral computation" is each call's total minus the spectral time inside that same call.
    """
    import joulecap.policies.base as policy_base
    from joulecap.policies import available_policies

    prepared = []
    for item, budget in zip(items, budgets, strict=True):
        req = rt.build_request(item.prompt, [make_image(item.image_px, item.seed)], energy_budget_j=budget)
        prepared.append(rt.engine.prepare(req))
    sched = rt.scheduler
    inner = {"ns": 0}
    real = policy_base.spectral_budget

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return real(*args, **kwargs)
        finally:
            inner["ns"] += time.perf_counter_ns() - t0

    policy_base.spectral_budget = timed
    out: dict[str, Any] = {}
    try:
        for name in available_policies():
            total, besides, spectral = [], [], []
            for p in prepared:
                named = _with_policy(p, name)
                for _ in range(reps):
                    inner["ns"] = 0
                    t0 = time.perf_counter_ns()
                    with contextlib.suppress(Exception):  # 422s are part of planning cost too
                        sched.plan(named)
                    dt = time.perf_counter_ns() - t0
                    total.append(dt / 1e6)
                    besides.append((dt - inner["ns"]) / 1e6)
                    spectral.append(inner["ns"] / 1e6)
            out[name] = {
                "p50_ms": common.pct(total, 50),
                "p90_ms": common.pct(total, 90),
                "besides_spectral_p50_ms": common.pct(besides, 50),
                "spectral_p50_ms": common.pct(spectral, 50),
            }
    finally:
        policy_base.spectral_budget = real
    return out


def _with_policy(prepared: Any, name: str) -> Any:
    # Request and PreparedRequest are frozen; planning only reads them.
    request = replace(prepared.request, policy=name)
    return replace(prepared, request=request)


def fresh_predictor(cal: Any, speed_alpha: float) -> Any:
    """A copy of the calibrated predictor (each arm learns on its own copy)."""
    from joulecap.runtime.predictor import Predictor

    p = cal.predictor
    return Predictor(
        *p.coefficients,
        calibrated=True,
        source=p.source,
        forgetting=p.forgetting,
        covariance=p.covariance(),
        fit=p.fit,
        power_w=p.power_w,
        speed_alpha=speed_alpha,
    )
