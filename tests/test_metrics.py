"""Prometheus metrics: energy by model/policy/source/status, histogram, violations, learning gauges,
per-instance registry."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from joulecap.runtime.learning import Learner, LearningConfig
from joulecap.runtime.metrics import Metrics
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import ChatResult, EnergyReport, EnergySource, GenerationResult, PhaseTimes, Plan

Labels = tuple[tuple[str, str], ...]


def energy(total_j: float, source: EnergySource = "measured") -> EnergyReport:
    return EnergyReport(total_j, 1.0, total_j - 1.2, 0.5, 0.5, source, "nvml:0", encode_j=0.2)


def result(
    total_j: float,
    budget_j: float | None,
    *,
    policy: str = "joint",
    source: EnergySource = "measured",
    holds: bool = True,
) -> ChatResult:
    plan = Plan((10,), 16, 5.0, policy, "test", budget_j=budget_j, holds_budget=holds)
    gen = GenerationResult("hi", (1, 2, 3, 4), "length", 30, 64, 10, PhaseTimes(0.0, 0.1, 0.5))
    return ChatResult("r", "m1", "hi", gen, plan, energy(total_j, source), 0.0)


def samples(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def energy_key(policy: str, source: str, status: str) -> tuple[str, Labels]:
    labels = (("model", "m1"), ("policy", policy), ("source", source), ("status", status))
    return ("joulecap_energy_joules_total", labels)


def violations_key(policy: str) -> tuple[str, Labels]:
    return ("joulecap_budget_violations_total", (("model", "m1"), ("policy", policy)))


def test_observe_result_counts_energy_tokens_and_violations() -> None:
    m = Metrics()
    m.observe_result(result(4.0, 5.0))
    m.observe_result(result(7.5, 5.0))  # over budget
    m.observe_result(result(3.0, None, policy="baseline", source="estimated"))
    m.observe_result(result(2.0, 5.0), "aborted")
    s = samples(m)
    assert s[energy_key("joint", "measured", "ok")] == 11.5
    assert s[energy_key("joint", "measured", "aborted")] == 2.0
    assert s[energy_key("baseline", "estimated", "ok")] == 3.0
    assert s[violations_key("joint")] == 1.0
    assert violations_key("baseline") not in s
    hist = (("model", "m1"), ("source", "measured"))
    assert s[("joulecap_request_energy_joules_count", hist)] == 3.0
    assert s[("joulecap_request_energy_joules_sum", hist)] == 13.5
    assert s[("joulecap_request_energy_joules_bucket", (("le", "5.0"), *hist))] == 2.0
    assert s[("joulecap_tokens_total", (("kind", "completion"), ("model", "m1")))] == 16.0
    assert s[("joulecap_tokens_total", (("kind", "visual_kept"), ("model", "m1")))] == 40.0
    assert s[("joulecap_tokens_total", (("kind", "visual_in"), ("model", "m1")))] == 256.0
    key = ("joulecap_requests_total", (("model", "m1"), ("policy", "joint"), ("stop_reason", "length")))
    assert s[key] == 3.0


def test_a_budget_ignoring_policy_over_its_budget_is_a_violation_too() -> None:
    # The budget was recorded but not held: the answer says budget_exceeded, /metrics counts it.
    over = result(7.5, 5.0, policy="baseline", holds=False)
    assert over.budget_exceeded
    m = Metrics()
    m.observe_result(over)
    assert samples(m)[violations_key("baseline")] == 1.0


def test_exactly_at_budget_is_not_a_violation() -> None:
    at = result(5.0, 5.0)
    assert not at.budget_exceeded
    m = Metrics()
    m.observe_result(at)
    assert violations_key("joint") not in samples(m)


def test_energy_spent_without_a_result_is_counted_by_status() -> None:
    m = Metrics()
    m.observe_spent("m1", "joint", energy(1.5), "refused")
    m.observe_spent("m1", "joint", energy(0.25, "estimated"), "estimate")
    m.observe_spent("m1", "joint", energy(0.5), "refused")
    m.observe_spent("m1", "joint", None, "error")  # failed before anything was measured
    s = samples(m)
    assert s[energy_key("joint", "measured", "refused")] == 2.0
    assert s[energy_key("joint", "estimated", "estimate")] == 0.25
    assert energy_key("joint", "measured", "error") not in s
    # Not answers: no request, histogram or token counts.
    assert not any(name.startswith(("joulecap_requests", "joulecap_tokens")) for name, _ in s)
    assert ("joulecap_request_energy_joules_count", (("model", "m1"), ("source", "measured"))) not in s


def test_set_learning_publishes_the_predictor_and_the_margins() -> None:
    pred = Predictor(1.0, 0.01, 0.1)
    learner = Learner(pred, LearningConfig(feasibility_margin=0.2))
    m = Metrics()
    m.set_learning("m1", pred, learner)
    s = samples(m)
    model = (("model", "m1"),)
    assert s[("joulecap_feasibility_margin", model)] == 0.2
    assert s[("joulecap_planning_margin", model)] == 0.2  # nothing learned: both at the floor
    assert s[("joulecap_first_step_premium", model)] == 0.0
    assert s[("joulecap_predictor_speed_factor", model)] == 1.0
    assert ("joulecap_predictor_mape", model) not in s  # no prediction scored yet
    pred.update(20, 30, 10, 3.0)  # predicted 2.5 J: 1/6 off
    for over in (1.3, 1.5, 1.5, 1.5, 1.7):
        learner.margin.observe(1.0, over)  # the planning margin reads the same observations
        learner.first_step.observe(0.1, 0.2)
    m.set_learning("m1", pred, learner)
    s = samples(m)
    assert s[("joulecap_predictor_mape", model)] == 0.5 / 3.0
    assert s[("joulecap_feasibility_margin", model)] == pytest.approx(0.5 + 0.2)  # overshoot + least safety
    # The same errors further into their tail: median + 3 robust sigmas (MAD 0 here: the floor).
    assert s[("joulecap_planning_margin", model)] == pytest.approx(0.5 + 0.2)
    assert s[("joulecap_first_step_premium", model)] == 1.0


def test_gauges_errors_and_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.observe_error(503)
    a.observe_error(503)
    a.set_predictor_mape("m1", 0.12)
    a.set_predictor_speed_factor("m1", 1.25)
    a.set_envelope_level_j(42.0)
    sa, sb = samples(a), samples(b)
    assert sa[("joulecap_errors_total", (("status", "503"),))] == 2.0
    assert sa[("joulecap_predictor_mape", (("model", "m1"),))] == 0.12
    assert sa[("joulecap_predictor_speed_factor", (("model", "m1"),))] == 1.25
    assert sa[("joulecap_envelope_level_joules", ())] == 42.0
    assert ("joulecap_errors_total", (("status", "503"),)) not in sb
    assert sb[("joulecap_envelope_level_joules", ())] == 0.0
