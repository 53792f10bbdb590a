"""Prometheus metrics: energy by model/policy/source, histogram, violations, per-instance registry."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from joulecap.runtime.metrics import Metrics
from joulecap.runtime.types import ChatResult, EnergyReport, GenerationResult, PhaseTimes, Plan


def result(
    total_j: float, budget_j: float | None, *, policy: str = "joint", source: str = "measured"
) -> ChatResult:
    plan = Plan((10,), 16, 5.0, policy, "test", budget_j=budget_j)
    gen = GenerationResult("hi", (1, 2, 3, 4), "length", 30, 64, 10, PhaseTimes(0.0, 0.1, 0.5))
    energy = EnergyReport(total_j, 1.0, total_j - 1.0, 0.5, 0.5, source, "nvml:0")
    return ChatResult("r", "m1", "hi", gen, plan, energy, 0.0)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_observe_result_counts_energy_tokens_and_violations() -> None:
    m = Metrics()
    m.observe_result(result(4.0, 5.0))
    m.observe_result(result(7.5, 5.0))  # over budget
    m.observe_result(result(3.0, None, policy="baseline", source="estimated"))
    s = samples(m)
    assert (
        s[("joulecap_energy_joules_total", (("model", "m1"), ("policy", "joint"), ("source", "measured")))]
        == 11.5
    )
    assert (
        s[
            (
                "joulecap_energy_joules_total",
                (("model", "m1"), ("policy", "baseline"), ("source", "estimated")),
            )
        ]
        == 3.0
    )
    assert s[("joulecap_budget_violations_total", (("model", "m1"), ("policy", "joint")))] == 1.0
    assert ("joulecap_budget_violations_total", (("model", "m1"), ("policy", "baseline"))) not in s
    hist = (("model", "m1"), ("source", "measured"))
    assert s[("joulecap_request_energy_joules_count", hist)] == 2.0
    assert s[("joulecap_request_energy_joules_sum", hist)] == 11.5
    assert s[("joulecap_request_energy_joules_bucket", (("le", "5.0"), *hist))] == 1.0
    assert s[("joulecap_tokens_total", (("kind", "completion"), ("model", "m1")))] == 12.0
    assert s[("joulecap_tokens_total", (("kind", "visual_kept"), ("model", "m1")))] == 30.0
    key = ("joulecap_requests_total", (("model", "m1"), ("policy", "joint"), ("stop_reason", "length")))
    assert s[key] == 2.0


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


def test_exactly_at_budget_is_not_a_violation() -> None:
    m = Metrics()
    m.observe_result(replace(result(5.0, 5.0)))
    assert ("joulecap_budget_violations_total", (("model", "m1"), ("policy", "joint"))) not in samples(m)
