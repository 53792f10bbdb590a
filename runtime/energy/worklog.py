"""Per-request energy under continuous batching: a log of token work and the split of measured windows.

A batching engine (vLLM) runs several requests in the same forward passes, so one request's time
window also contains the other requests' work. The engine records, as outputs arrive, which
request did how much token work at what time (`WorkLog`); `attribute` then cuts the timeline at
those moments into windows, measures each window once, and splits it among the requests that
worked in it by token work (`split_by_token_work`: prefill tokens x calibrated prefill cost,
decode tokens x decode cost; ../shared/DESIGN.md, "Energy semantics"). Consequences:

- Every window's shares add up to the window's measured energy exactly, so the requests' totals
  add up to the energy measured over their busy windows; idle gaps (no request working) are not
  attributed to anyone.
- A token event at time `t` stands for the work done since the previous event of any request (the
  engine step that produced it); a request's `begin` is a boundary too, so the window holding its
  prefill starts no earlier than its arrival, and the stretch before the `begin` goes to the
  requests already there that finish work next (see `windows`).
- Windows are not merged: a merge would depend on where a reader starts, and the shares of one
  request would no longer be cut from the same windows as the others'. Windows shorter than the
  meter's update period are interpolated by `EnergyMonitor.energy_between` (and flagged).

A request's report reads only its own windows of that cut (`WorkLog.windows_of`, found from its
own events rather than a pass over every request's events in its span, which would cost each
report O(concurrency x its length)).

`joulecap.runtime.energy.accounting.BatchedAccounting` turns a request's shares into the usual
`EnergyReport` (prefill = the windows in which it prefilled, the idle share split like the
energy). Engines that batch (see `VLLMEngine`) expose a `work_log` and record into it; the energy
accounting lives here, not in the engines.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joulecap.runtime.energy.attribution import TokenWork, split_by_token_work

_MAX_TRACKED = 4096
"""Requests whose running totals are kept for `live_fraction` (oldest forgotten first)."""
_MAX_STEPS = 16384
"""Step groups whose work `windows_of` keeps for the other requests of the step."""


@dataclass(frozen=True)
class WorkEvent:
    """Token work one request finished at `t_s` (a `begin` event has no tokens)."""

    t_s: float
    request_id: str
    prefill_tokens: int = 0
    decode_tokens: int = 0


@dataclass(frozen=True)
class Window:
    """A busy stretch of the timeline and the token work done in it, per request."""

    t0_s: float
    t1_s: float
    work: Mapping[str, TokenWork]


@dataclass(frozen=True)
class Share:
    """One request's attributed energy.

    Attributes:
        total_j: Sum of the request's shares of the windows it worked in.
        prefill_j: The part from the windows in which it prefilled (its first token's step).
        idle_j: Idle power x window duration, split in the same proportions.
        windows: Windows the request worked in.
        shared_windows: Those in which other requests worked too.
        interpolated: True when a window was shorter than the meter's update period.

    """

    total_j: float
    prefill_j: float
    idle_j: float
    windows: int
    shared_windows: int = 0
    interpolated: bool = False


class _FullCut(Exception):
    """`WorkLog.windows_of` cannot answer from its index: cut every event in the span instead."""


class WorkLog:
    """Thread-safe, time-ordered log of token work, kept for `history_s` seconds.

    Args:
        history_s: Events older than this are dropped (the log must not grow without bound when
            nobody reads it, e.g. an engine used directly, without a `Runtime`).

    """

    def __init__(self, history_s: float = 600.0) -> None:
        self.history_s = history_s
        self._lock = threading.Lock()
        self._times: list[float] = []
        self._events: list[WorkEvent] = []
        # Running token totals (all requests), and per request its own work and the totals at its
        # arrival: what `live_fraction` needs in O(1) per call (the governor asks after every token).
        self._total = (0, 0)
        self._own: dict[str, tuple[int, int]] = {}
        self._at_begin: dict[str, tuple[int, int]] = {}
        # Per request its `begin` time and the times it did work: `windows_of` finds a request's
        # windows from these in O(its own events) instead of cutting every event of its span.
        self._begun_at: dict[str, float] = {}
        self._work_times: dict[str, list[float]] = {}
        self._forgotten_begin_s = -math.inf  # the latest begin dropped from `_begun_at`
        # Requests between `begin` and `end`, and when the last of them ended (`idle_throughout`).
        self._in_flight: set[str] = set()
        self._idle_since_s = -math.inf
        # Per step time, its event count, first event and work (`_step_work`), which the step's
        # requests share.
        self._steps: dict[float, tuple[int, WorkEvent, dict[str, TokenWork]]] = {}

    def _count(self, event: WorkEvent) -> None:
        rid = event.request_id
        if not (event.prefill_tokens or event.decode_tokens):
            self._at_begin[rid] = self._total
            self._own[rid] = (0, 0)
            # A second begin would make the request's windows depend on where a reader starts:
            # `windows_of` then leaves it to the full cut.
            self._begun_at[rid] = math.nan if rid in self._begun_at else event.t_s
            self._work_times[rid] = []
            while len(self._at_begin) > _MAX_TRACKED:
                oldest = next(iter(self._at_begin))
                del self._at_begin[oldest]
                self._own.pop(oldest, None)
                forgotten = self._begun_at.pop(oldest, -math.inf)
                if not math.isnan(forgotten):
                    self._forgotten_begin_s = max(self._forgotten_begin_s, forgotten)
                self._work_times.pop(oldest, None)
            return
        p, d = self._total
        self._total = (p + event.prefill_tokens, d + event.decode_tokens)
        own = self._own.get(rid)
        if own is not None:
            self._own[rid] = (own[0] + event.prefill_tokens, own[1] + event.decode_tokens)
            bisect.insort(self._work_times[rid], event.t_s)

    def _append(self, event: WorkEvent) -> None:
        with self._lock:
            self._count(event)
            # Events come from one engine thread in time order; insort keeps it true regardless.
            i = bisect.bisect_right(self._times, event.t_s)
            self._times.insert(i, event.t_s)
            self._events.insert(i, event)
            horizon = event.t_s - self.history_s
            if self._times and self._times[0] < horizon:
                cut = bisect.bisect_left(self._times, horizon)
                del self._times[:cut], self._events[:cut]

    def begin(self, request_id: str, t_s: float | None = None) -> None:
        """Mark a request's arrival (a window boundary, no work); it is in flight until `end`."""
        self.busy(request_id)
        self._append(WorkEvent(time.monotonic() if t_s is None else t_s, request_id))

    def busy(self, request_id: str) -> None:
        """Mark a request in flight from now until `end`, without a window boundary."""
        with self._lock:
            self._in_flight.add(request_id)

    def end(self, request_id: str, t_s: float | None = None) -> None:
        """Mark that the engine is done with a request (its last work is recorded)."""
        t = time.monotonic() if t_s is None else t_s
        with self._lock:
            if request_id not in self._in_flight:
                return
            self._in_flight.discard(request_id)
            if not self._in_flight:
                self._idle_since_s = max(self._idle_since_s, t)

    def idle_throughout(self, t0_s: float) -> bool:
        """Whether no request has been in flight at any moment from `t0_s` until now.

        Work done in such a stretch (a lone request's image encode) lies in no window that
        `attribute` splits, so the caller must measure and charge it itself.
        """
        with self._lock:
            return not self._in_flight and self._idle_since_s <= t0_s

    def record(
        self, request_id: str, *, prefill_tokens: int = 0, decode_tokens: int = 0, t_s: float | None = None
    ) -> None:
        """Record work a request finished now (or at `t_s`)."""
        t = time.monotonic() if t_s is None else t_s
        self._append(WorkEvent(t, request_id, prefill_tokens, decode_tokens))

    def events(self, t0_s: float = -math.inf, t1_s: float = math.inf) -> list[WorkEvent]:
        """Events with `t0_s <= t <= t1_s`, in time order."""
        with self._lock:
            lo = bisect.bisect_left(self._times, t0_s)
            hi = bisect.bisect_right(self._times, t1_s)
            return self._events[lo:hi]

    def windows_of(self, request_id: str, t0_s: float = -math.inf, t1_s: float = math.inf) -> list[Window]:
        """The windows `request_id` works in, of `windows(self.events(t0_s, t1_s))`, in that order.

        The same windows (bounds, work and order), found from the request's own work events:
        each is the step window ending at one of them, preceded by the stretches that end at
        arrivals since the previous working step. Costs O(the request's events x log n) instead
        of a pass over every event in the span, which under batching is every request's.
        A request whose `begin` (once) is not in the log falls back to the full cut.
        """
        with self._lock:
            begun_at = self._begun_at.get(request_id, math.nan)
            mine = self._work_times.get(request_id)
            times = self._times
            lo, hi = bisect.bisect_left(times, t0_s), bisect.bisect_right(times, t1_s)
            try:
                # The first event read is where a reader's knowledge of begins starts (older ones
                # are out of the span or dropped with the history). A NaN (twice begun) fails too.
                if mine is None or lo >= hi or not times[lo] <= begun_at <= t1_s:
                    raise _FullCut
                return self._windows_of(request_id, mine, lo, hi)
            except _FullCut:
                pass
        return [w for w in windows(self.events(t0_s, t1_s)) if request_id in w.work]

    def _windows_of(self, request_id: str, mine: list[float], lo: int, hi: int) -> list[Window]:
        # Called with the lock held. Mirrors `windows()` over events[lo:hi]: a group (the events at
        # one time) opens no window when it is the first one read, and the stretches ending at
        # begin-only groups go to the owners of the next working group that had arrived by then.
        times, events = self._times, self._events
        read_from_s, read_to_s = times[lo], times[hi - 1]
        out: list[Window] = []
        last = -math.inf
        for t in mine:
            if t == last or not read_from_s <= t <= read_to_s:
                continue
            last = t
            a, b = bisect.bisect_left(times, t, lo, hi), bisect.bisect_right(times, t, lo, hi)
            if a in (lo, b):
                continue  # the first group read (no previous event opens its window), or dropped
            work = self._step_work(t, a, b)
            # Walk back over begin-only groups: each ends a pending stretch owned here.
            stretches: list[tuple[float, float]] = []
            end = a  # the group before index `end` is the previous one
            while True:
                prev_t = times[end - 1]
                start = bisect.bisect_left(times, prev_t, lo, end)
                if start == lo or _has_work(events, start, end):
                    break  # a working group (its pending were resolved) or the first group read
                stretches.append((times[start - 1], prev_t))
                end = start
            for s0, s1 in reversed(stretches):
                owners = {r: w for r, w in work.items() if self._arrived_before(r, s1, read_from_s, t)}
                if request_id in owners:
                    out.append(Window(s0, s1, owners))
            out.append(Window(times[a - 1], t, work))
        return out

    def _step_work(self, t: float, a: int, b: int) -> Mapping[str, TokenWork]:
        # Called with the lock held: the work of the events[a:b] at time `t`, per request. Every
        # request of a step reads the same group, so it is built once and shared (read-only). A
        # group only grows at its end (events are inserted after their equals) and the history
        # drops whole groups, so the same first event and count mean the same events.
        known = self._steps.get(t)
        if known is not None and known[0] == b - a and known[1] is self._events[a]:
            return known[2]
        work: dict[str, TokenWork] = {}
        for e in self._events[a:b]:
            if e.prefill_tokens or e.decode_tokens:
                w = work.get(e.request_id)
                work[e.request_id] = (
                    TokenWork(e.prefill_tokens, e.decode_tokens)
                    if w is None
                    else TokenWork(w.prefill_tokens + e.prefill_tokens, w.decode_tokens + e.decode_tokens)
                )
        self._steps[t] = (b - a, self._events[a], work)
        while len(self._steps) > _MAX_STEPS:  # the oldest steps go first
            del self._steps[next(iter(self._steps))]
        return work

    def _arrived_before(self, request_id: str, t_s: float, read_from_s: float, now_s: float) -> bool:
        # `windows()` knows a begin only once its scan has passed it (read from `read_from_s` up to
        # the group at `now_s`); one it has not seen counts as arrived.
        begun = self._begun_at.get(request_id)
        if begun is None:
            if self._forgotten_begin_s >= read_from_s:
                raise _FullCut  # its begin may be in the span but is no longer known here
            return True
        if math.isnan(begun):
            raise _FullCut  # begun twice: the scan would know the latest begin it passed
        if not read_from_s <= begun <= now_s:
            return True
        return begun < t_s

    def live_fraction(self, request_id: str, *, prefill_cost: float, decode_cost: float) -> float:
        """The request's share of all token work done since it arrived (1.0 before any work).

        Live energy since a request's start times this fraction is its running share under
        batching, which is what the governor should compare with the request's budget.
        """
        with self._lock:
            base = self._at_begin.get(request_id)
            own = self._own.get(request_id)
            total = self._total
        if base is None or own is None:
            return 1.0
        everyone = (total[0] - base[0]) * prefill_cost + (total[1] - base[1]) * decode_cost
        mine = own[0] * prefill_cost + own[1] * decode_cost
        return min(1.0, mine / everyone) if everyone > 0 else 1.0

    def __len__(self) -> int:
        return len(self._events)


def _has_work(events: Sequence[WorkEvent], start: int, end: int) -> bool:
    for i in range(start, end):
        e = events[i]
        if e.prefill_tokens or e.decode_tokens:
            return True
    return False


def windows(events: Sequence[WorkEvent]) -> list[Window]:
    """Cut the timeline at every event and keep the busy windows with their work.

    Window `i` spans from the previous event (of any request) to event time `t_i` and holds the
    work of the events at `t_i`. A `begin` (an arrival, no work) cuts too, so a new request's
    window never reaches back before its arrival; the stretch just before a `begin` goes to the
    requests that had arrived by then and finish work at the next working event (the engine step
    they were in when the new request came). With none (the engine was idle, waiting for that
    arrival), it is nobody's. The cut depends only on the events, not on where a reader starts,
    so every request sees the same windows and the shares of a window add up to it. A request
    whose `begin` precedes the events read counts as arrived.
    """
    out: list[Window] = []
    begun: dict[str, float] = {}
    pending: list[tuple[float, float]] = []  # stretches ending at a begin, not yet owned
    prev_t: float | None = None
    i = 0
    while i < len(events):
        t = events[i].t_s
        work: dict[str, TokenWork] = {}
        while i < len(events) and events[i].t_s == t:
            e = events[i]
            if e.prefill_tokens or e.decode_tokens:
                w = work.get(e.request_id, TokenWork())
                work[e.request_id] = TokenWork(
                    w.prefill_tokens + e.prefill_tokens, w.decode_tokens + e.decode_tokens
                )
            else:
                begun[e.request_id] = t
            i += 1
        if prev_t is not None and work:
            for t0, t1 in pending:
                owners = {r: w for r, w in work.items() if begun.get(r, -math.inf) < t1}
                if owners:
                    out.append(Window(t0, t1, owners))
            pending = []
            out.append(Window(prev_t, t, work))
        elif prev_t is not None:
            pending.append((prev_t, t))
        prev_t = t
    return out


WindowSplit = Callable[[Window, float, float, float], Mapping[str, float]]
"""`(window, window_j, prefill_cost, decode_cost) -> shares`: a window's energy split by token work."""


def split_window(
    window: Window, window_j: float, prefill_cost: float, decode_cost: float
) -> Mapping[str, float]:
    """`split_by_token_work` of one window's energy among the requests that worked in it."""
    return split_by_token_work(window_j, window.work, prefill_cost=prefill_cost, decode_cost=decode_cost)


def attribute(
    request_id: str,
    log_windows: Sequence[Window],
    energy_between: Callable[[float, float], Any],
    *,
    prefill_cost: float,
    decode_cost: float,
    idle_power_w: float = 0.0,
    split: WindowSplit = split_window,
) -> Share:
    """`request_id`'s share of every window it worked in.

    Args:
        request_id: The request.
        log_windows: Windows from `windows()`.
        energy_between: `(t0, t1) -> joules` or a `WindowEnergy` (the monitor's `energy_between`).
        prefill_cost: Relative energy of a prefill token (the predictor's per-token prefill joules).
        decode_cost: Relative energy of a decode token.
        idle_power_w: Idle baseline; the idle share is split like the energy.
        split: Splits a window's energy (`split_window`, or a cache of its results that every
            request of a window reads: `BatchedAccounting.window_shares`).

    """
    total = prefill = idle = 0.0
    n = shared = 0
    interpolated = False
    for w in log_windows:
        mine = w.work.get(request_id)
        if mine is None:
            continue
        measured = energy_between(w.t0_s, w.t1_s)
        window_j = float(getattr(measured, "energy_j", measured))
        interpolated = interpolated or bool(getattr(measured, "interpolated", False))
        share = split(w, max(0.0, window_j), prefill_cost, decode_cost)[request_id]
        total += share
        if mine.prefill_tokens > 0:
            prefill += share  # the step(s) that ran its prompt and produced its first token
        if window_j > 0:
            idle += idle_power_w * (w.t1_s - w.t0_s) * share / window_j
        n += 1
        shared += len(w.work) > 1
    return Share(
        total_j=total,
        prefill_j=prefill,
        idle_j=min(idle, total),
        windows=n,
        shared_windows=shared,
        interpolated=interpolated,
    )
