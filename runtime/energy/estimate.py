"""Estimate meter for machines with no energy counter (such as a CPU-only box).

energy = `estimate_base_w` x wall time + `estimate_core_w` x CPU seconds of this process.

The CPU seconds are this process's (every thread, PyTorch's intra-op pool included) plus those of
its child processes (vLLM runs its engine core and workers as children), and nothing else on the
machine: the figure is this process tree's share, not the machine's. The clock's own periodic
listing of child processes is left out (`ProcessTreeCpuClock`). Always reported as
`source: "estimated"`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Collection
from typing import Any

import psutil

from joulecap.runtime.energy.base import Availability, MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.types import EnergySource

CHILD_RESCAN_S = 1.0
"""How often the list of child processes is refreshed (their CPU times are read at every call)."""


class ProcessTreeCpuClock:
    """CPU seconds of this process and its descendants, monotonic.

    Children are listed with psutil (a core dependency) every `CHILD_RESCAN_S`; the CPU seconds
    that listing takes are the meter's own and are left out. A child's last reading is kept after
    it exits, so the total never goes backwards.
    """

    def __init__(self) -> None:
        self._children_s: dict[int, float] = {}
        self._children: list[Any] = []
        self._listed_at_s = -float("inf")
        self._listing_s = 0.0  # CPU seconds this clock spent listing children (left out)
        self._proc = psutil.Process()
        # On Linux each listed child's /proc/<pid>/stat stays open and is re-read in place: the
        # same figures as psutil's `cpu_times` (which it parses the same way) at a fraction of
        # the cost, paid on every meter read (requests read the meter as they start and end).
        self._stat_fds: dict[int, int] = {}
        self._ticks = float(os.sysconf("SC_CLK_TCK")) if sys.platform.startswith("linux") else 0.0

    def __call__(self) -> float:
        """Current CPU seconds of the process tree, less this clock's own listing work."""
        now = time.monotonic()
        if now - self._listed_at_s >= CHILD_RESCAN_S:
            # Listing children scans the whole process table (1.3 ms of CPU with 67 processes on
            # the project's 2-core CPU, more on a busy host): do it rarely, read known ones often.
            # It is the meter's own work, so its CPU seconds are left out of the clock: counted,
            # it would land once a second on whichever request window opened at this read
            # (~20 mJ at the default 15 W per core, a fifth of a tiny model's prefill).
            started_s = time.thread_time()
            # The process table can change under us; keep the last list then.
            with contextlib.suppress(Exception):
                self._children = self._proc.children(recursive=True)
                self._close_stats(keep={child.pid for child in self._children})
            self._listed_at_s = now
            self._listing_s += time.thread_time() - started_s
        # Read after the listing, so the listing's CPU is both in it and in `_listing_s`: the
        # difference never goes backwards.
        own_s = time.process_time() - self._listing_s
        for child in self._children:
            try:
                pid_s = self._child_seconds(child)
            except Exception:  # exited between listing and reading
                continue
            self._children_s[child.pid] = max(pid_s, self._children_s.get(child.pid, 0.0))
        return own_s + sum(self._children_s.values())

    def _child_seconds(self, child: Any) -> float:
        """A child's user + system CPU seconds (as `psutil.Process.cpu_times` gives them)."""
        if not self._ticks:
            times = child.cpu_times()
            return float(times.user + times.system)
        fd = self._stat_fds.get(child.pid)
        if fd is None:
            fd = self._stat_fds[child.pid] = os.open(f"/proc/{child.pid}/stat", os.O_RDONLY)
        data = os.pread(fd, 4096, 0)  # read from the start: procfs writes the line afresh
        # psutil's parse: the name (in parentheses) may hold spaces; utime and stime follow it.
        fields = data[data.rfind(b")") + 2 :].split()
        return float(fields[11]) / self._ticks + float(fields[12]) / self._ticks

    def _close_stats(self, keep: Collection[int] = ()) -> None:
        for pid in [pid for pid in self._stat_fds if pid not in keep]:
            with contextlib.suppress(OSError):
                os.close(self._stat_fds.pop(pid))

    def close(self) -> None:
        """Close the children's stat files."""
        self._close_stats()


class EstimateMeter:
    """A counter meter whose energy is a power model, not a measurement.

    Args:
        config: Supplies `estimate_base_w` and `estimate_core_w`.
        fallback_reason: Why a requested meter was replaced by this one (kept for
            `describe()` and `joulecap meters`), empty when chosen on purpose.
        clock: Wall clock (monotonic seconds).
        cpu_clock: CPU-time clock (seconds); default this process and its children.

    """

    source: EnergySource = "estimated"
    update_period_s: float = 0.0

    def __init__(
        self,
        config: EnergyConfig,
        *,
        fallback_reason: str = "",
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = "estimate:cpu"
        self.base_w = float(config.estimate_base_w)
        self.core_w = float(config.estimate_core_w)
        self.fallback_reason = fallback_reason
        self._clock = clock
        self._cpu_clock = cpu_clock or ProcessTreeCpuClock()
        self._t0 = clock()
        self._cpu0 = self._cpu_clock()

    def is_available(self) -> Availability:
        """Report usable: it needs only the process clocks."""
        return Availability.yes("power model: base watts x wall time + watts per core x CPU seconds")

    def read(self) -> MeterReading:
        """Cumulative estimated energy since the meter was created."""
        t = self._clock()
        cpu = self._cpu_clock()
        energy_j = self.base_w * (t - self._t0) + self.core_w * (cpu - self._cpu0)
        return MeterReading(t_s=t, energy_j=energy_j)

    def describe(self) -> dict[str, object]:
        """Return the model's coefficients and, if any, why it replaced another meter."""
        facts: dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "kind": "counter",
            "estimate_base_w": self.base_w,
            "estimate_core_w": self.core_w,
            "model": "base_w * wall_s + core_w * process_tree_cpu_s",
        }
        if self.fallback_reason:
            facts["fallback_reason"] = self.fallback_reason
        return facts

    def close(self) -> None:
        """Release the CPU clock's open files, if it keeps any."""
        close = getattr(self._cpu_clock, "close", None)
        if close is not None:
            close()
