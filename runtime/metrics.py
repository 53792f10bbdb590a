"""Prometheus metrics for `/metrics`, on a registry owned by each `Metrics` (one per app).

Exposed series (all names prefixed `joulecap_`):

- `energy_joules_total{model,policy,source}`: joules of served requests.
- `request_energy_joules{model,source}`: histogram of per-request energy.
- `budget_violations_total{model,policy}`: requests whose energy exceeded their budget.
- `requests_total{model,policy,stop_reason}`: finished requests.
- `tokens_total{model,kind}`: prompt, completion, visual_in and visual_kept tokens.
- `errors_total{status}`: error responses by HTTP status.
- `predictor_mape{model}`: the energy predictor's running MAPE (fraction, as reported).
- `predictor_speed_factor{model}`: recent measured over predicted joules (1 = as calibrated;
  above 1 the device is running slower or hungrier, e.g. throttled or contended).
- `envelope_level_joules`: joules left in the shared power envelope.

Operations series (prediction error, phase energy, keys, power state, meter power) are in
`runtime/metrics_ops.py`, on the same registry (`Metrics.ops`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from joulecap.runtime.metrics_ops import OperationsMetrics
from joulecap.runtime.types import ChatResult

ENERGY_BUCKETS_J = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    10000.0,
)
"""Histogram buckets for per-request energy: a tiny CPU demo request to a long GPU answer."""


class Metrics:
    """Counters, histograms and gauges of one runtime, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.energy_j = Counter(
            "joulecap_energy_joules", "Energy of served requests.", ["model", "policy", "source"], registry=r
        )
        self.request_energy_j = Histogram(
            "joulecap_request_energy_joules",
            "Energy per request.",
            ["model", "source"],
            buckets=ENERGY_BUCKETS_J,
            registry=r,
        )
        self.budget_violations = Counter(
            "joulecap_budget_violations",
            "Requests whose energy exceeded their joule budget.",
            ["model", "policy"],
            registry=r,
        )
        self.requests = Counter(
            "joulecap_requests", "Finished requests.", ["model", "policy", "stop_reason"], registry=r
        )
        self.tokens = Counter("joulecap_tokens", "Tokens processed.", ["model", "kind"], registry=r)
        self.errors = Counter("joulecap_errors", "Error responses by HTTP status.", ["status"], registry=r)
        self.predictor_mape = Gauge(
            "joulecap_predictor_mape", "Energy predictor's running MAPE (fraction).", ["model"], registry=r
        )
        self.predictor_speed = Gauge(
            "joulecap_predictor_speed_factor",
            "Energy predictor's speed factor: recent measured over predicted joules.",
            ["model"],
            registry=r,
        )
        self.envelope_level_j = Gauge(
            "joulecap_envelope_level_joules", "Joules left in the shared power envelope.", registry=r
        )
        # Operations block (runtime/metrics_ops.py): new series only, existing ones unchanged.
        self.ops = OperationsMetrics(r)

    def observe_result(self, result: ChatResult) -> None:
        """Count one finished request's energy, tokens and budget outcome."""
        model, policy, energy = result.model, result.plan.policy, result.energy
        self.energy_j.labels(model, policy, energy.source).inc(max(0.0, energy.total_j))
        self.request_energy_j.labels(model, energy.source).observe(max(0.0, energy.total_j))
        budget = result.plan.budget_j
        if budget is not None and energy.total_j > budget:
            self.budget_violations.labels(model, policy).inc()
        gen = result.generation
        self.requests.labels(model, policy, gen.stop_reason).inc()
        for kind, n in (
            ("prompt", gen.prefill_tokens),
            ("completion", len(gen.token_ids)),
            ("visual_in", gen.visual_tokens_in),
            ("visual_kept", gen.visual_tokens_kept),
        ):
            self.tokens.labels(model, kind).inc(max(0, n))
        self.ops.observe_result(result)

    def observe_error(self, status: int) -> None:
        """Count one error response."""
        self.errors.labels(str(int(status))).inc()

    def set_predictor_mape(self, model: str, value: float) -> None:
        """Publish the predictor's current MAPE for `model`."""
        self.predictor_mape.labels(model).set(value)

    def set_predictor_speed_factor(self, model: str, value: float) -> None:
        """Publish the predictor's current speed factor for `model`."""
        self.predictor_speed.labels(model).set(value)

    def set_envelope_level_j(self, value: float) -> None:
        """Publish the power envelope's current level."""
        self.envelope_level_j.set(value)

    def render(self) -> tuple[bytes, str]:
        """Return the exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
