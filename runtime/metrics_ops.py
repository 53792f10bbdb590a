"""Operations metrics for fleets: prediction error, phase energy, budgets, keys, power state, meter power.

Registered on the same registry as `runtime/metrics.py`'s series (`Metrics.ops`). Series (all
prefixed `joulecap_`):

- `prediction_error_ratio{model,policy}`: histogram of (measured - predicted) / predicted per
  request (signed: above 0 the request cost more than planned).
- `phase_energy_joules_total{model,policy,phase}`: joules by phase (`prefill`, `decode`); with
  `tokens_total{kind="completion"}` it gives joules per output token by phase.
- `budgeted_requests_total{model,policy}`: requests that had a joule budget (held = this minus
  `budget_violations_total`).
- `key_energy_joules_total{key}`, `key_quota_refusals_total{key}`: per API key NAME.
- `key_quota_remaining_joules{key}`: what each key with a quota has left today (at scrape).
- `meter_power_watts{meter}`: the meter's latest power reading (at scrape).
- `power_state_info{kind,power_mode,jetson_clocks}` (always 1), `gpu_clock_mhz`,
  `power_limit_watts`, `device_temperature_celsius{sensor}`: the power state (at scrape; absent
  when unknown, never 0).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from joulecap.runtime.types import ChatResult

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.energy.power_state import PowerState

log = logging.getLogger(__name__)

PREDICTION_ERROR_BUCKETS = (-0.5, -0.25, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Signed relative error buckets: a few percent either way is the calibrated case."""


class _ScrapeCollector(Collector):
    """Gauges read from the runtime when Prometheus scrapes (no thread keeps them fresh)."""

    def __init__(self) -> None:
        self.meter_power: Callable[[], tuple[str, float | None]] | None = None
        self.power_state: Callable[[], PowerState] | None = None
        self.quota_remaining: Callable[[], dict[str, float]] | None = None

    def describe(self) -> list[Any]:
        # Empty: the registry must not call collect() at registration (providers come later).
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        meter = GaugeMetricFamily(
            "joulecap_meter_power_watts", "Latest meter power reading.", labels=["meter"]
        )
        info = GaugeMetricFamily(
            "joulecap_power_state_info",
            "The device's power state (always 1).",
            labels=["kind", "power_mode", "jetson_clocks"],
        )
        clock = GaugeMetricFamily("joulecap_gpu_clock_mhz", "GPU clock.")
        limit = GaugeMetricFamily("joulecap_power_limit_watts", "Enforced GPU power limit.")
        temp = GaugeMetricFamily("joulecap_device_temperature_celsius", "Temperatures.", labels=["sensor"])
        quota = GaugeMetricFamily(
            "joulecap_key_quota_remaining_joules", "Joules a key has left today.", labels=["key"]
        )
        try:
            if self.meter_power is not None:
                name, watts = self.meter_power()
                if watts is not None:
                    meter.add_metric([name], watts)
            if self.power_state is not None:
                s = self.power_state()
                clocks = "" if s.jetson_clocks is None else str(s.jetson_clocks).lower()
                info.add_metric([s.kind, s.power_mode or "", clocks], 1.0)
                if s.gpu_clock_mhz is not None:
                    clock.add_metric([], s.gpu_clock_mhz)
                if s.power_limit_w is not None:
                    limit.add_metric([], s.power_limit_w)
                for sensor, value in (("gpu", s.gpu_temp_c), ("cpu", s.cpu_temp_c)):
                    if value is not None:
                        temp.add_metric([sensor], value)
            if self.quota_remaining is not None:
                for key, joules in self.quota_remaining().items():
                    quota.add_metric([key], joules)
        except Exception as exc:  # a provider bug must not break /metrics
            log.warning("operations gauges skipped: %s", exc)
        yield from (meter, info, clock, limit, temp, quota)


class OperationsMetrics:
    """The operations series on `registry` (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.prediction_error = Histogram(
            "joulecap_prediction_error_ratio",
            "Per-request (measured - predicted) / predicted energy.",
            ["model", "policy"],
            buckets=PREDICTION_ERROR_BUCKETS,
            registry=r,
        )
        self.phase_energy_j = Counter(
            "joulecap_phase_energy_joules",
            "Energy of served requests by phase.",
            ["model", "policy", "phase"],
            registry=r,
        )
        self.budgeted = Counter(
            "joulecap_budgeted_requests", "Requests that had a joule budget.", ["model", "policy"], registry=r
        )
        self.key_energy_j = Counter(
            "joulecap_key_energy_joules", "Energy charged to each API key name.", ["key"], registry=r
        )
        self.quota_refusals = Counter(
            "joulecap_key_quota_refusals",
            "Requests refused because a key's quota was spent.",
            ["key"],
            registry=r,
        )
        self.scrape = _ScrapeCollector()
        r.register(self.scrape)

    def observe_result(self, result: ChatResult) -> None:
        """Prediction error, phase energy and budget count of one finished request."""
        model, plan, energy = result.model, result.plan, result.energy
        if plan.predicted_j > 0 and energy.total_j > 0:
            self.prediction_error.labels(model, plan.policy).observe(
                (energy.total_j - plan.predicted_j) / plan.predicted_j
            )
        for phase, joules in (("prefill", energy.prefill_j), ("decode", energy.decode_j)):
            self.phase_energy_j.labels(model, plan.policy, phase).inc(max(0.0, joules))
        if plan.budget_j is not None:
            self.budgeted.labels(model, plan.policy).inc()

    def observe_key_energy(self, key_name: str, joules: float) -> None:
        """Charge `joules` to a key name."""
        if joules > 0:
            self.key_energy_j.labels(key_name).inc(joules)

    def observe_quota_refusal(self, key_name: str) -> None:
        """Count one 429 for a spent quota."""
        self.quota_refusals.labels(key_name).inc()

    def attach(
        self,
        *,
        meter_power: Callable[[], tuple[str, float | None]] | None = None,
        power_state: Callable[[], PowerState] | None = None,
        quota_remaining: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        """Give the scrape-time gauges their sources (each optional; absent series stay empty)."""
        if meter_power is not None:
            self.scrape.meter_power = meter_power
        if power_state is not None:
            self.scrape.power_state = power_state
        if quota_remaining is not None:
            self.scrape.quota_remaining = quota_remaining
