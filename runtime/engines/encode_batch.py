"""Batched image encodes: concurrent requests that need features share one vision-tower call.

`EncodeCollector` runs on one worker thread. The first submission opens a batch; submissions that
arrive within `window_s` (and up to `max_batch` of them) join it; the batch runs as one call of the
engine's encode function, which returns one result (or exception) and one weight (the request's
visual tokens) per job. No global lock: callers block only on their own batch.

Energy: a batch is one measured window `[t0_s, t1_s]` (`EncodeBatch`). Each request's share of
it is its visual tokens over the batch's (`EncodeShare.fraction`; a job rejected on its own input
weighs 0); the fractions of a batch sum
to 1, so the shares of a window sum to what the meter measured over it
(`joulecap.runtime.energy.accounting.Accounting.share_of`). A request
whose client left while its image waited in the batch still has its share (the work was done);
the runtime records it with the request's aborted status.

Failures: a job whose own input is bad (the processor rejects its image) gets its own exception
and the others run; an exception of the batched call itself (the vision tower raising) is given
to every job of the batch, and the worker keeps serving the next batch.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    pass

J = TypeVar("J")
R = TypeVar("R")

DEFAULT_WINDOW_S = 0.004
"""How long the first job of a batch waits for others (a lone request pays this once)."""

DEFAULT_MAX_BATCH = 8
"""Most jobs in one vision-tower call (bounds its memory and the latency of the first job)."""


@dataclass(frozen=True)
class EncodeBatch:
    """One vision-tower call shared by several requests.

    Attributes:
        batch_id: Sequence number of the batch (per collector).
        t0_s: `time.monotonic()` when the batched call started.
        t1_s: When it ended.
        keys: The jobs' keys (request ids), in batch order.
        weights: Their visual tokens in the batch, same order.
        failed: The batched call raised (every job got the error).
        overlapped: Other work (e.g. vLLM steps) ran during the batch, decided once for the whole
            batch when it ended: its window's energy then lies in that work's measured windows too.

    """

    batch_id: int
    t0_s: float
    t1_s: float
    keys: tuple[str, ...]
    weights: tuple[int, ...]
    failed: bool = False
    overlapped: bool = False

    @property
    def size(self) -> int:
        """Jobs in the batch."""
        return len(self.keys)

    def fraction(self, index: int) -> float:
        """Job `index`'s share: its visual tokens over the batch's (equal split if none)."""
        total = sum(self.weights)
        return self.weights[index] / total if total > 0 else 1.0 / len(self.weights)

    def share(self, index: int) -> EncodeShare:
        """Job `index`'s `EncodeShare`."""
        return EncodeShare(
            self.t0_s, self.t1_s, self.fraction(index), self.size, self.batch_id, self.overlapped
        )


@dataclass(frozen=True)
class EncodeShare:
    """A request's part of an encode batch's measured window (what the runtime charges it).

    Attributes:
        t0_s: Start of the batch's window.
        t1_s: End of the batch's window.
        fraction: The request's share of the window's energy (visual tokens over the batch's).
        batch_size: Requests in the batch.
        batch_id: The batch's sequence number.
        overlapped: Other work ran during the batch (`EncodeBatch.overlapped`): the same for every
            request of the batch, so charging the shares only when False keeps their sum equal
            to the meter's window and never counts it twice.

    """

    t0_s: float
    t1_s: float
    fraction: float
    batch_size: int
    batch_id: int
    overlapped: bool = False


@dataclass
class _Pending(Generic[J]):
    job: J
    future: concurrent.futures.Future[Any]


class EncodeCollector(Generic[J, R]):
    """Collects concurrent jobs into batches and runs each batch as one call; see the module doc.

    Args:
        encode: `jobs -> [(result or exception, weight), ...]`, one entry per job in order. An
            exception it raises itself fails the whole batch.
        key: A job's key in `EncodeBatch.weights` (the request id).
        window_s: How long a batch stays open after its first job.
        max_batch: Most jobs per batch.
        name: Worker thread name.
        overlapped: `t0_s -> bool`, asked once per batch as it ends: whether other work ran since
            `t0_s` (the vLLM engine passes `WorkLog.idle_throughout`, negated).

    """

    def __init__(
        self,
        encode: Callable[[Sequence[J]], Sequence[tuple[R | BaseException, int]]],
        key: Callable[[J], str],
        *,
        window_s: float = DEFAULT_WINDOW_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        name: str = "joulecap-encode",
        overlapped: Callable[[float], bool] | None = None,
    ) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be >= 1 and window_s >= 0.")
        self._encode = encode
        self._key = key
        self._overlapped = overlapped
        self.window_s = window_s
        self.max_batch = max_batch
        self._queue: queue.Queue[_Pending[J] | None] = queue.Queue()
        self._ids = itertools.count()
        self._sizes: list[int] = []
        self._sizes_lock = threading.Lock()
        self._closed = False
        self.last_failed: EncodeBatch | None = None
        """The last batch whose call raised (its window was spent all the same)."""
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: J, timeout_s: float | None = None) -> tuple[R, EncodeShare]:
        """Encode `job` in the next batch; blocks until its batch ran.

        Raises:
            The job's own exception, or the batch's (every job of a failed batch gets it).
            RuntimeError: The collector is closed.

        """
        if self._closed:
            raise RuntimeError("The encode collector is closed.")
        pending: _Pending[J] = _Pending(job, concurrent.futures.Future())
        self._queue.put(pending)
        result: tuple[R, EncodeShare] = pending.future.result(timeout=timeout_s)
        return result

    def batch_sizes(self) -> list[int]:
        """Sizes of the batches run so far, in order (kept for the last 10,000 batches)."""
        with self._sizes_lock:
            return list(self._sizes)

    def close(self) -> None:
        """Stop the worker after the batches already queued."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _collect(self, first: _Pending[J]) -> tuple[list[_Pending[J]], bool]:
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _serve(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            self._run(batch)

    def _run(self, batch: list[_Pending[J]]) -> None:
        keys = tuple(self._key(p.job) for p in batch)
        batch_id = next(self._ids)
        t0 = time.monotonic()
        try:
            outcomes = list(self._encode([p.job for p in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"encode returned {len(outcomes)} results for {len(batch)} jobs")
        except BaseException as exc:  # the batched call failed: every job gets the error
            self.last_failed = EncodeBatch(batch_id, t0, time.monotonic(), keys, (0,) * len(keys), True)
            self._note(len(batch))
            for p in batch:
                p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        overlapped = bool(self._overlapped(t0)) if self._overlapped is not None else False
        record = EncodeBatch(
            batch_id, t0, time.monotonic(), keys, tuple(int(w) for _, w in outcomes), overlapped=overlapped
        )
        self._note(len(batch))
        for i, (p, (result, _)) in enumerate(zip(batch, outcomes, strict=True)):
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result((result, record.share(i)))

    def _note(self, size: int) -> None:
        with self._sizes_lock:
            self._sizes.append(size)
            del self._sizes[:-10_000]
