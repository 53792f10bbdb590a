"""The whole runtime's configuration: one dataclass per component, gathered here.

Defaults live only in the component dataclasses; the CLI is generated from them
(`runtime/configtools.py`), each subcommand with only the components it uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.calibrate_config import CalibrationConfig
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.envelope import EnvelopeConfig
from joulecap.runtime.learning import LearningConfig
from joulecap.runtime.ledger_config import LedgerConfig
from joulecap.runtime.paths import PathsConfig
from joulecap.runtime.server_config import ServerConfig


@dataclass(frozen=True)
class JoulecapConfig:
    """All component configs of one runtime."""

    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    envelope: EnvelopeConfig = field(default_factory=EnvelopeConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


COMPONENTS: dict[str, type] = {
    "server": ServerConfig,
    "engine": EngineConfig,
    "energy": EnergyConfig,
    "scheduler": SchedulerConfig,
    "learning": LearningConfig,
    "calibration": CalibrationConfig,
    "envelope": EnvelopeConfig,
    "ledger": LedgerConfig,
    "paths": PathsConfig,
}
"""Attribute of `JoulecapConfig` -> its component dataclass, in CLI help order."""
