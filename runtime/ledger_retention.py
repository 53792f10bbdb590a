"""Ledger retention: `--ledger-max-rows` and `--ledger-max-days`, applied while the server runs."""

from __future__ import annotations

import logging
import threading

from joulecap.runtime.ledger import Ledger
from joulecap.runtime.ledger_config import LedgerConfig

log = logging.getLogger(__name__)


class LedgerRetention:
    """Prunes `ledger` per `config` once at `start()` and then every `ledger_prune_interval_s`.

    A thread rather than a check in each insert: the insert stays one fsynced statement, and a
    ledger over its limit by one interval's rows is harmless.

    Args:
        ledger: The ledger to prune.
        config: Its limits; with neither limit set `start()` does nothing.

    """

    def __init__(self, ledger: Ledger, config: LedgerConfig) -> None:
        self.ledger = ledger
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.deleted = 0

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return self.config.ledger_max_rows is not None or self.config.ledger_max_days is not None

    def prune_now(self) -> int:
        """Apply the limits once; returns the rows deleted (0 on a failure, which is logged)."""
        if not self.active:
            return 0
        try:
            n = self.ledger.prune(self.config.ledger_max_rows, self.config.ledger_max_days)
        except Exception as exc:  # a locked or closed ledger must not kill the thread
            log.warning("ledger retention skipped: %s", exc)
            return 0
        if n:
            log.info("ledger retention deleted %d rows from %s", n, self.ledger.path)
        self.deleted += n
        return n

    def start(self) -> None:
        """Prune now, then keep pruning on a daemon thread."""
        if not self.active or self._thread is not None:
            return
        self.prune_now()
        self._thread = threading.Thread(target=self._run, name="joulecap-ledger-retention", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.ledger_prune_interval_s):
            self.prune_now()

    def stop(self) -> None:
        """Stop the thread (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
