"""Where joulecap keeps its files: one config, resolved once, for every subcommand."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_cache_dir() -> str:
    # The flag's own variable (`--cache-dir`, JOULECAP_CACHE_DIR), read here too so that in-process
    # users of `JoulecapConfig()` (examples, benchmarks) follow it like the CLI does.
    return os.environ.get("JOULECAP_CACHE_DIR", "~/.cache/joulecap")


@dataclass(frozen=True)
class PathsConfig:
    """Where the demo model, energy profiles and the ledger live."""

    cache_dir: str = field(default_factory=_default_cache_dir)
    """Base directory: the demo model, and by default the profiles and the ledger."""
    profile_dir: str | None = None
    """Energy profiles (one JSON per model, device, dtype); default `<cache dir>/profiles`."""
    ledger_path: str | None = None
    """SQLite ledger of every request; default `<cache dir>/ledger.sqlite3` (every server using the
    same cache directory shares it); `:memory:` keeps nothing."""


@dataclass(frozen=True)
class Paths:
    """`PathsConfig` resolved to absolute paths."""

    cache_dir: Path
    profile_dir: Path
    ledger_path: str
    """A file path, or `:memory:`."""

    @classmethod
    def resolve(cls, config: PathsConfig) -> Paths:
        """Fill the defaults from the cache directory and expand `~`."""
        cache = Path(config.cache_dir).expanduser()
        profiles = Path(config.profile_dir).expanduser() if config.profile_dir else cache / "profiles"
        if config.ledger_path == ":memory:":
            ledger = ":memory:"
        else:
            ledger = str(
                Path(config.ledger_path).expanduser() if config.ledger_path else cache / "ledger.sqlite3"
            )
        return cls(cache, profiles, ledger)
