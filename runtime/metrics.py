"""Prometheus metrics for `/metrics`, on a registry owned by each `Metrics` (one per app).

Exposed series (all names prefixed `joulecap_`):

- `energy_joules_total{model,policy,source,status}`: every joule spent, by how the request ended
  (`ok`, `aborted`, `error`, `refused`, `estimate`): the ledger's joules add up to it.
- `request_energy_joules{model,source}`: histogram of per-request energy.
- `budget_violations_total{model,policy}`: answers whose energy exceeded their budget (every
  policy, budget-ignoring ones too: `usage.energy.budget_exceeded`).
- `requests_total{model,policy,stop_reason}`: finished requests.
- `tokens_total{model,kind}`: prompt, completion, visual_in and visual_kept tokens.
- `errors_total{status}`: error responses by HTTP status.
- `predictor_mape{model}`: the energy predictor's running MAPE (fraction, as reported).
- `predictor_speed_factor{model}`: recent measured over predicted joules (1 = as calibrated;
  above 1 the device is running slower or hungrier, e.g. throttled or contended).
- `envelope_level_joules`: joules left in the shared power envelope.
- `feasibility_margin{model}`: the margin budgets are accepted with now (relative).
- `planning_margin{model}`: the margin accepted budgets are filled with now (relative).
- `first_step_premium{model}`: the governor's premium on the first decode step (relative).

Operations series (prediction error, phase energy, keys, power state, meter power) are in
`runtime/metrics_ops.py`, on the same registry (`Metrics.ops`).

Serving series, named as vLLM's own (`vllm:*`) so that dashboards built for vLLM carry over:

- `time_to_first_token_seconds{model}`: arrival at the runtime (queueing included) to first token.
- `time_per_output_token_seconds{model}`: first to last token over the tokens after the first.
- `e2e_request_latency_seconds{model}`: arrival to the last token.
- `num_requests_running{model}`, `num_requests_waiting{model}`: requests executing, and queued.
- `prompt_tokens_total{model}`, `generation_tokens_total{model}`: tokens prefilled and generated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from joulecap.runtime.metrics_ops import OperationsMetrics
from joulecap.runtime.types import ChatResult, EnergyReport, RequestStatus

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.learning import Learner
    from joulecap.runtime.predictor import Predictor

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

TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
)
"""Time-to-first-token buckets (vLLM's, to 20 s)."""

TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
"""Time-per-output-token buckets (vLLM's)."""

E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
"""End-to-end latency buckets (vLLM's)."""


class Metrics:
    """Counters, histograms and gauges of one runtime, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.energy_j = Counter(
            "joulecap_energy_joules",
            "Energy spent, by how the request ended.",
            ["model", "policy", "source", "status"],
            registry=r,
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
        self.feasibility_margin = Gauge(
            "joulecap_feasibility_margin",
            "Feasibility margin budgets are accepted with now (relative).",
            ["model"],
            registry=r,
        )
        self.planning_margin = Gauge(
            "joulecap_planning_margin",
            "Planning margin budgets are filled with now (relative; at least the feasibility margin).",
            ["model"],
            registry=r,
        )
        self.first_step_premium = Gauge(
            "joulecap_first_step_premium",
            "Governor's premium on the first decode step (relative).",
            ["model"],
            registry=r,
        )
        # Operations block (runtime/metrics_ops.py): new series only, existing ones unchanged.
        self.ops = OperationsMetrics(r)
        self._init_serving_series()

    def observe_result(self, result: ChatResult, status: RequestStatus = "ok") -> None:
        """Count one finished request's energy, tokens and budget outcome."""
        model, policy, energy = result.model, result.plan.policy, result.energy
        self.energy_j.labels(model, policy, energy.source, status).inc(max(0.0, energy.total_j))
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

    def observe_spent(
        self, model: str, policy: str, energy: EnergyReport | None, status: RequestStatus
    ) -> None:
        """Count the energy of a request that has no result (refused after its encode, aborted, failed)."""
        if energy is not None:
            self.energy_j.labels(model, policy, energy.source, status).inc(max(0.0, energy.total_j))

    def set_learning(self, model: str, predictor: Predictor, learner: Learner) -> None:
        """Publish what the server has learned: predictor error and speed, margins."""
        mape = predictor.rolling_mape()
        if mape is not None:
            self.set_predictor_mape(model, mape)
        self.set_predictor_speed_factor(model, predictor.speed_factor)
        self.feasibility_margin.labels(model).set(learner.margin.value())
        self.planning_margin.labels(model).set(learner.plan_margin.value())
        self.first_step_premium.labels(model).set(learner.first_step.value())

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

    # ------------------------------------------------------------------ serving series (vLLM's)
    def _init_serving_series(self) -> None:
        r = self.registry
        self.ttft_s = Histogram(
            "joulecap_time_to_first_token_seconds",
            "Arrival at the runtime (queueing included) to the first token.",
            ["model"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tpot_s = Histogram(
            "joulecap_time_per_output_token_seconds",
            "First to last token, per output token after the first.",
            ["model"],
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.e2e_s = Histogram(
            "joulecap_e2e_request_latency_seconds",
            "Arrival at the runtime to the last token.",
            ["model"],
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.running = Gauge("joulecap_num_requests_running", "Requests executing.", ["model"], registry=r)
        self.waiting = Gauge("joulecap_num_requests_waiting", "Requests queued.", ["model"], registry=r)
        self.prompt_tokens = Counter(
            "joulecap_prompt_tokens", "Prompt tokens prefilled (after pruning).", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "joulecap_generation_tokens", "Tokens generated.", ["model"], registry=r
        )

    def observe_latency(self, result: ChatResult, arrival_s: float) -> None:
        """Record one finished request's latencies and token counts.

        Args:
            result: The finished request (its `generation.times` are `time.monotonic()` marks).
            arrival_s: `time.monotonic()` when the request reached the runtime (before queueing).

        """
        model, gen = result.model, result.generation
        times, n = gen.times, len(gen.token_ids)
        if n > 0:
            self.ttft_s.labels(model).observe(max(0.0, times.first_token_s - arrival_s))
        if n > 1:
            self.tpot_s.labels(model).observe(max(0.0, times.end_s - times.first_token_s) / (n - 1))
        self.e2e_s.labels(model).observe(max(0.0, times.end_s - arrival_s))
        self.prompt_tokens.labels(model).inc(max(0, gen.prefill_tokens))
        self.generation_tokens.labels(model).inc(n)

    def set_queue_state(self, model: str, running: int, waiting: int) -> None:
        """Publish how many requests are executing and how many wait for a worker."""
        self.running.labels(model).set(max(0, running))
        self.waiting.labels(model).set(max(0, waiting))
