"""A request's encode stage: the engine's `prepare`, measured, and the decomposition a policy defers.

The encode (image preprocessing, vision tower and, when the plan may prune, each image's
decomposition) is spent before planning, so it is measured apart and charged to the request as
`encode_j`. A policy that can plan keep-all from token counts alone (`Policy.defers_bases`) has
its request prepared without the decomposition; if it then needs it (`BasesNeeded`), `add_bases`
runs it, measured, and the two windows are one encode report.

Every failure is recorded with the energy spent so far before it is raised.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from joulecap.runtime.energy.accounting import Accounting, EncodeFailed, added_encode
from joulecap.runtime.engines.base import Engine
from joulecap.runtime.errors import EngineError, JoulecapError
from joulecap.runtime.scheduler import Scheduler
from joulecap.runtime.types import EnergyReport, PreparedRequest, Request

RecordSpent = Callable[[Request, EnergyReport | None, BaseException, bool], None]
"""`record(request, energy spent, cause, record?)`: the runtime's ledger row for a failed encode."""


class EncodeStage:
    """Prepares requests on one engine, measured one at a time (or by the engine's batches).

    Args:
        engine: The serving engine.
        scheduler: Says whether a request's images may be pruned and whether the policy defers.
        accounting: Measures encode windows.
        record_spent: Records a request whose encode failed, with what it spent.

    Attributes:
        lock: Held while a measured encode window is open: two overlapping windows would count
            the same joules twice (not taken under a batching engine, whose batches keep its
            windows apart).

    """

    def __init__(
        self, engine: Engine, scheduler: Scheduler, accounting: Accounting, record_spent: RecordSpent
    ) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.accounting = accounting
        self.record_spent = record_spent
        self.lock: Any = threading.Lock()

    def defers_bases(self, request: Request) -> bool:
        """Whether `request` is prepared without its decomposition (`Policy.defers_bases`).

        Only where the engine can decompose afterwards; the batching engine measures encodes by
        batch, so it decomposes while preparing.
        """
        engine: Any = self.engine
        if getattr(engine, "add_bases", None) is None or getattr(engine, "encode_share", None) is not None:
            return False
        return self.scheduler.defers_bases(request)

    def prepare(self, request: Request, record: bool, *, defer_bases: bool = False) -> PreparedRequest:
        """The engine's `prepare`, measured (images decomposed only if they may be pruned)."""
        bases = self.scheduler.prunes_visual(request) and not defer_bases
        encode_share = getattr(self.engine, "encode_share", None)
        if encode_share is not None:
            # The engine batches concurrent encodes into one vision-tower call and measures each
            # batch's window; the request is charged its share by visual tokens. No lock: the
            # batches are what keeps windows from overlapping.
            try:
                prepared = self.engine.prepare(request, bases=bases)
            except Exception as exc:
                self.record_spent(request, None, exc, record)
                raise
            return dataclasses.replace(prepared, encode=self.accounting.share_of(encode_share(prepared)))
        with self.lock:
            try:
                prepared, encode = self.accounting.measure_encode(
                    lambda: self.engine.prepare(request, bases=bases)
                )
            except EncodeFailed as exc:
                self.record_spent(request, exc.energy, exc.cause, record)
                if isinstance(exc.cause, JoulecapError):
                    raise exc.cause from None
                raise EngineError(
                    f"The engine failed to prepare this request: {type(exc.cause).__name__}"
                ) from exc
        return dataclasses.replace(prepared, encode=encode, bases_pending=defer_bases)

    def add_bases(self, prepared: PreparedRequest, record: bool) -> PreparedRequest:
        """The decomposition a deferring policy turned out to need, measured into the encode."""
        engine: Any = self.engine
        with self.lock:
            try:
                done, more = self.accounting.measure_encode(lambda: engine.add_bases(prepared))
            except EncodeFailed as exc:
                spent = added_encode(prepared.encode, exc.energy)
                self.record_spent(prepared.request, spent, exc.cause, record)
                raise EngineError(
                    f"The engine failed to decompose the images: {type(exc.cause).__name__}"
                ) from exc
        return dataclasses.replace(done, encode=added_encode(prepared.encode, more), bases_pending=False)
