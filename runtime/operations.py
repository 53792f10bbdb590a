"""Fleet operations wired in one place: power state, measurement quality, retention, keys and quotas.

The runtime and the app own their components; this module turns the operations features on over
them with a few calls, so `runtime.py` and `api/app.py` change by a handful of lines:

- `RuntimeOperations` (in `Runtime.__init__`, after the ledger, monitor and metrics exist):
  reads the power state (cached), starts ledger retention, feeds the scrape-time gauges, and
  gives the ledger its per-row extras (`account`), charging the key's quota at the same time.
- `guard_options` (in `create_app`): the `GuardMiddleware` keyword arguments for the server's
  keys file, quota book and metrics, with SIGHUP reload installed.
"""

from __future__ import annotations

import logging
from typing import Any

from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.power_state import (
    PowerState,
    PowerStateCache,
    choose_profile,
    create_power_state_cache,
    profile_key_suffix,
)
from joulecap.runtime.energy.quality import ledger_energy_j
from joulecap.runtime.keys import KeyStore
from joulecap.runtime.ledger import Ledger
from joulecap.runtime.ledger_config import LedgerConfig
from joulecap.runtime.ledger_retention import LedgerRetention
from joulecap.runtime.metrics import Metrics
from joulecap.runtime.quota import QuotaBook
from joulecap.runtime.server_config import ServerConfig
from joulecap.runtime.types import EnergyReport

log = logging.getLogger(__name__)


class RuntimeOperations:
    """Power state, retention and per-row extras of one runtime.

    Args:
        energy: Supplies the power-state reader settings.
        ledger_config: Retention limits.
        ledger: The runtime's ledger.
        monitor: The runtime's energy monitor (meter facts for measurement quality).
        metrics: The runtime's metrics (scrape-time gauges are attached to it).
        power: A power-state cache to use instead of building one (tests).

    """

    def __init__(
        self,
        energy: EnergyConfig,
        ledger_config: LedgerConfig,
        ledger: Ledger,
        monitor: EnergyMonitor,
        metrics: Metrics,
        *,
        power: PowerStateCache | None = None,
    ) -> None:
        self.power = power or create_power_state_cache(energy)
        self.power.start()  # requests read the cached state; a thread re-reads it
        self.monitor = monitor
        self.metrics = metrics
        self.quotas: QuotaBook | None = None
        self.retention = LedgerRetention(ledger, ledger_config)
        self.retention.start()
        limits = [
            f"{name} {value}"
            for name, value in (
                ("max rows", ledger_config.ledger_max_rows),
                ("max days", ledger_config.ledger_max_days),
            )
            if value is not None
        ]
        log.info("ledger: %s (%s)", ledger.path, ", ".join(limits) or "kept forever")
        state = self.power.current()
        log.info("power state: %s %s", state.kind, profile_key_suffix(state) or "(mode unknown)")
        metrics.ops.attach(meter_power=self._meter_power, power_state=self.power.current)

    def _meter_power(self) -> tuple[str, float | None]:
        latest = self.monitor.sampler.latest()
        watts = None if latest is None or latest[1] != latest[1] else float(latest[1])  # NaN: none yet
        return self.monitor.meter.name, watts

    def power_state(self) -> PowerState:
        """The power state now (cached for `power_state_ttl_s`)."""
        return self.power.current()

    def account(self, energy: EnergyReport | None, key_name: str | None = None) -> dict[str, Any]:
        """Keyword arguments for `Ledger.record_result` / `record_failure`, and the quota charge.

        Charges the request's joules to `key_name` in the quota book (when one is attached) and
        the per-key metrics, so every recorded request, streamed, aborted or failed, counts.
        """
        if key_name is not None and energy is not None:
            joules = ledger_energy_j(energy)
            if joules is not None:
                if self.quotas is not None:
                    self.quotas.charge(key_name, joules)
                self.metrics.ops.observe_key_energy(key_name, joules)
        return {
            "power_state": self.power.current(),
            "quality": None if energy is None else self.monitor.quality(energy),
            "key_name": key_name,
        }

    def profile_status(self, base_key: str, calibrated: list[str]) -> dict[str, Any]:
        """Power state and the profile it maps to, for `/v1/energy/profile`."""
        state = self.power.current()
        choice = choose_profile(base_key, state, calibrated, sep="__")
        return {
            "power_state": state.to_dict(),
            "power_mode_key": profile_key_suffix(state) or None,
            "profile_key": choice.key,
            "profile_matches_power_mode": choice.exact,
            "power_mode_flag": choice.flag or None,
            "power_mode_changes": self.power.mode_changes,
        }

    def close(self) -> None:
        """Stop retention and close the power-state reader."""
        self.retention.stop()
        self.power.close()


def guard_options(
    server: ServerConfig,
    metrics: Metrics,
    *,
    ledger_path: str | None = None,
    single_key: str | None = None,
    operations: RuntimeOperations | None = None,
) -> dict[str, Any]:
    """`GuardMiddleware` keyword arguments (besides `max_body_bytes`) for `server`'s keys.

    Loads `--api-keys` (raising `KeysFileError` with the line number at start-up), installs the
    SIGHUP reload, seeds the quota book from the ledger's rows of today, and, when the runtime
    charges quotas itself (`operations` given), turns the middleware's header charging off.
    """
    keys = KeyStore(server.api_keys, single_key=single_key or server.api_key)
    quotas = QuotaBook(keys.quota_j)
    if server.api_keys:
        keys.install_sighup()
        if ledger_path:
            seeded = quotas.seed_from_ledger(ledger_path)
            if seeded:
                log.info("quota book seeded from the ledger: %s", {k: round(v, 3) for k, v in seeded.items()})
    metrics.ops.attach(
        quota_remaining=lambda: {
            name: left for name in keys.names if (left := quotas.remaining_j(name)) is not None
        }
    )
    if operations is not None:
        operations.quotas = quotas
    return {
        "keys": keys,
        "quotas": quotas,
        "metrics": metrics,
        "charge_from_headers": operations is None,
    }
