"""`WorkQueue`: the engine's worker pool with a bounded queue in front (503 past the limit).

Why a queue of its own: the `Runtime` runs every request on a pool sized by the engine's
concurrency (1 for the embedded transformers engine, vLLM's `max_num_seqs` for vLLM). A full
queue refuses at once with `Overloaded` (HTTP 503 with `Retry-After`) rather than letting a
backlog grow behind an engine that cannot catch up; the running and waiting counts are
published as vLLM's own gauges count them.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from joulecap.runtime.errors import Overloaded


class WorkQueue:
    """Runs callables on `workers` threads, with at most `queue_limit` more waiting.

    Args:
        workers: Threads (the engine's concurrency).
        queue_limit: Requests allowed to wait beyond those running.
        on_change: `on_change(running, waiting)`, called under the queue's lock on every change.

    """

    def __init__(self, workers: int, queue_limit: int, on_change: Callable[[int, int], None]) -> None:
        self.workers = workers
        self.queue_limit = queue_limit
        self._on_change = on_change
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="joulecap-engine"
        )
        self._inflight = 0
        self._executing = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def inflight(self) -> int:
        """Requests queued or running."""
        return self._inflight

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run `fn(*args, **kwargs)` on the pool.

        Raises:
            Overloaded: When the queue is full or the pool is shutting down.

        """
        if self._closed:
            raise Overloaded("The runtime is shutting down.")
        with self._lock:
            if self._inflight >= self.workers + self.queue_limit:
                raise Overloaded(
                    f"{self._inflight} requests in flight; the queue limit is "
                    f"{self.queue_limit} (server option --queue-limit).",
                    retry_after_s=1.0,
                )
            self._inflight += 1
            self._publish()
        try:
            future = self._pool.submit(self._running, fn, *args, **kwargs)
        except RuntimeError as exc:
            with self._lock:
                self._inflight -= 1
                self._publish()
            raise Overloaded("The runtime is shutting down.") from exc
        future.add_done_callback(self._release)
        return future

    def close(self) -> None:
        """Finish running work, cancel what waits, and refuse new work."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _running(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._executing += 1
            self._publish()
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._executing -= 1

    def _publish(self) -> None:
        # Called with the lock held, so the two counts are read together.
        self._on_change(self._executing, self._inflight - self._executing)

    def _release(self, _future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._inflight -= 1
            self._publish()
