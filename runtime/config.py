"""The whole runtime's configuration: one dataclass per component, gathered here.

Defaults live only in the component dataclasses; the CLI is generated from them
(`runtime/configtools.py`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.api.config import ServerConfig
from joulecap.runtime.configtools import add_config_args, config_from_args
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.ledger_config import LedgerConfig


@dataclass(frozen=True)
class JoulecapConfig:
    """All component configs of one runtime."""

    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)


COMPONENTS: dict[str, type] = {
    "server": ServerConfig,
    "engine": EngineConfig,
    "energy": EnergyConfig,
    "scheduler": SchedulerConfig,
    "ledger": LedgerConfig,
}
"""Attribute of `JoulecapConfig` -> its component dataclass, in CLI help order."""


def add_args(parser: argparse.ArgumentParser, components: tuple[str, ...] = tuple(COMPONENTS)) -> None:
    """Add the flags of the named components to `parser`."""
    for name in components:
        add_config_args(parser, COMPONENTS[name], title=f"{name} options")


def from_args(args: argparse.Namespace, components: tuple[str, ...] = tuple(COMPONENTS)) -> JoulecapConfig:
    """Build a `JoulecapConfig`; components not on the parser keep their defaults."""
    parts = {name: config_from_args(COMPONENTS[name], args) for name in components}
    return JoulecapConfig(**parts)
