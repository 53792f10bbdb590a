"""API keys from `--api-keys FILE`: one key per line, `KEY NAME [DAILY_QUOTA_J]`, `#` comments.

::

    # key                         name        daily joules (optional)
    sk-robot-7-3f9c1e0b           robot-7     50000
    sk-tenant-acme-81d2aa         acme        1.2e6
    sk-ops-dashboard-5e1f         ops         # no quota

- A line whose first non-blank character is `#` is a comment, and so is anything after a `#`
  that follows whitespace. Blank lines are skipped.
- NAME is what the ledger, the metrics and the logs show; the key itself is never shown.
  Two keys may share a name (rotating a robot's key: old and new both work) when their quotas
  agree; they then share one allowance.
- DAILY_QUOTA_J is a positive number of joules per UTC day; omitted: no quota. 0 is refused
  (remove the line to revoke a key) and so is a negative or non-finite number.
- The same key twice is refused (which name would it carry?).

At start-up a malformed file stops the server with `path:line: reason`. On SIGHUP the file is
read again; a malformed file then keeps the old keys and logs why (a typo must not lock every
client out). The single `--api-key` (or `JOULECAP_API_KEY`) still works: it becomes a key
named `default` without quota, beside the file's keys.

Lookups take the same time whichever key, or how much of one, was presented: the presented
key's SHA-256 digest selects the candidate (a dict lookup on a digest tells an attacker nothing
about the key's bytes), and `hmac.compare_digest` then compares the presented key with that
candidate, or with a configured key when there is none, so every attempt costs one
constant-time comparison. A lookup costs the same with 1 key or 10,000
(`benchmarks/operations.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_KEY_NAME = "default"
"""Name of the key given with `--api-key`."""


class KeysFileError(ValueError):
    """The keys file is malformed; the message starts with `path:line:`."""


@dataclass(frozen=True)
class ApiKey:
    """One configured key.

    Attributes:
        key: The secret, as bytes (compared in constant time; never logged).
        name: What the ledger and metrics call it.
        daily_quota_j: Joules per UTC day, or None for no quota.

    """

    key: bytes
    name: str
    daily_quota_j: float | None = None

    def __repr__(self) -> str:  # never print the key
        return f"ApiKey(name={self.name!r}, daily_quota_j={self.daily_quota_j!r})"


def _strip_comment(line: str) -> str:
    stripped = line.strip()
    if stripped.startswith("#"):
        return ""
    for i, ch in enumerate(stripped):
        if ch == "#" and i > 0 and stripped[i - 1].isspace():
            return stripped[:i].strip()
    return stripped


def parse_keys(text: str, source: str = "<keys>") -> tuple[ApiKey, ...]:
    """Parse a keys file's text.

    Raises:
        KeysFileError: A malformed line, a duplicate key, or one name with two quotas
            (`source:line: reason`).

    """
    keys: list[ApiKey] = []
    seen_keys: dict[bytes, int] = {}
    quotas: dict[str, tuple[float | None, int]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        if not line:
            continue
        fields = line.split()
        where = f"{source}:{lineno}"
        if len(fields) not in (2, 3):
            raise KeysFileError(f"{where}: expected 'KEY NAME [DAILY_QUOTA_J]', got {len(fields)} field(s)")
        key, name = fields[0].encode(), fields[1]
        quota: float | None = None
        if len(fields) == 3:
            try:
                quota = float(fields[2])
            except ValueError:
                raise KeysFileError(f"{where}: quota {fields[2]!r} for {name!r} is not a number") from None
            if not math.isfinite(quota) or quota <= 0:
                raise KeysFileError(
                    f"{where}: quota for {name!r} must be a positive number of joules, got {fields[2]} "
                    "(omit it for no quota; remove the line to revoke the key)"
                )
        if key in seen_keys:
            raise KeysFileError(
                f"{where}: the key of {name!r} is the same as the key on line {seen_keys[key]}"
            )
        if name in quotas and quotas[name][0] != quota:
            raise KeysFileError(
                f"{where}: {name!r} has quota {quota} here but {quotas[name][0]} on line {quotas[name][1]}"
            )
        seen_keys[key] = lineno
        quotas.setdefault(name, (quota, lineno))
        keys.append(ApiKey(key, name, quota))
    return tuple(keys)


def load_keys(path: str | os.PathLike[str]) -> tuple[ApiKey, ...]:
    """Read and parse a keys file.

    Raises:
        KeysFileError: Unreadable or malformed.

    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"{path}: cannot read the keys file: {exc}") from exc
    return parse_keys(text, str(path))


class KeyStore:
    """The keys a server accepts: `--api-keys FILE` plus the single `--api-key`.

    Args:
        path: The keys file, or None.
        single_key: The `--api-key` value, or None.

    Raises:
        KeysFileError: The file is malformed at start-up.

    """

    def __init__(self, path: str | None = None, single_key: str | None = None) -> None:
        self.path = path
        self._single = (ApiKey(single_key.encode(), DEFAULT_KEY_NAME),) if single_key else ()
        self._keys: tuple[ApiKey, ...] = ()
        self._state: tuple[tuple[ApiKey, ...], dict[bytes, ApiKey]] = ((), {})
        self._set(self._single + (load_keys(path) if path else ()))
        self.reloads = 0
        self.failed_reloads = 0
        self._reload_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (else every request is let through)."""
        return bool(self._keys)

    @property
    def names(self) -> tuple[str, ...]:
        """Key names, in file order, without repeats."""
        return tuple(dict.fromkeys(k.name for k in self._keys))

    def quota_j(self, name: str) -> float | None:
        """The daily quota of the key named `name` (None: no quota or no such name)."""
        for k in self._keys:
            if k.name == name:
                return k.daily_quota_j
        return None

    def _set(self, keys: tuple[ApiKey, ...]) -> None:
        table = {hashlib.sha256(k.key).digest(): k for k in keys}
        # One assignment of a (tuple, dict) pair: a lookup running during a reload sees either
        # the old keys or the new ones, never a mix.
        self._state = (keys, table)
        self._keys = keys

    def lookup(self, presented: bytes) -> ApiKey | None:
        """The key matching `presented` (one constant-time comparison; see the module docstring)."""
        keys, table = self._state
        if not keys:
            return None
        candidate = table.get(hashlib.sha256(presented).digest())
        reference = candidate.key if candidate is not None else keys[0].key
        matches = hmac.compare_digest(presented, reference)
        return candidate if matches and candidate is not None else None

    def reload(self) -> bool:
        """Read the file again; on any problem keep the current keys and log why.

        Returns:
            True when the new keys are in use.

        """
        if self.path is None:
            return False
        with self._reload_lock:
            try:
                keys = load_keys(self.path)
            except KeysFileError as exc:
                self.failed_reloads += 1
                log.error("keys file not reloaded, keeping the %d current keys: %s", len(self._keys), exc)
                return False
            self._set(self._single + keys)
            self.reloads += 1
        log.info("keys file %s reloaded: %d keys (%s)", self.path, len(keys), ", ".join(self.names))
        return True

    def install_sighup(self) -> bool:
        """Reload the file on SIGHUP (only possible from the main thread, where servers start).

        Returns:
            Whether the handler was installed.

        """
        if self.path is None or not hasattr(signal, "SIGHUP"):
            return False
        if threading.current_thread() is not threading.main_thread():
            log.warning("SIGHUP reload of %s not installed: not on the main thread", self.path)
            return False
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.reload())
        return True
