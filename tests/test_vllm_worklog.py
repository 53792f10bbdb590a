"""Per-request energy under batching (WorkLog, windows, attribution) and VLLMEngine's pure helpers.

Fast and vLLM-free: runs in the default suite. The engine itself is tested in test_vllm_engine.py.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from joulecap.runtime.energy.attribution import TokenWork
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.sampler import WindowEnergy
from joulecap.runtime.engines.worklog import (
    WorkEvent,
    WorkLog,
    attribute,
    batched_report,
    token_costs,
    windows,
)
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.types import PhaseTimes


def _constant_power(power_w: float) -> Any:
    return lambda t0, t1: WindowEnergy(power_w * (t1 - t0), 2)


def _two_request_log() -> WorkLog:
    """A arrives at 0, prefills 10 tokens by 1.0, decodes at 2, 3, 4; B arrives at 1.5, prefills 4 by 2.0."""
    log = WorkLog()
    log.begin("A", 0.0)
    log.record("A", prefill_tokens=10, t_s=1.0)
    log.begin("B", 1.5)
    log.record("A", decode_tokens=1, t_s=2.0)
    log.record("B", prefill_tokens=4, t_s=2.0)
    log.record("A", decode_tokens=1, t_s=3.0)
    log.record("B", decode_tokens=1, t_s=3.0)
    log.record("A", decode_tokens=1, t_s=4.0)
    return log


def test_windows_cut_at_events_and_group_one_step() -> None:
    ws = windows(_two_request_log().events())
    assert [(w.t0_s, w.t1_s) for w in ws] == [(0.0, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 3.0), (3.0, 4.0)]
    # 1.0..1.5: A's decode step was under way when B arrived; B's window starts at its arrival.
    assert ws[1].work == {"A": TokenWork(0, 1)}
    assert ws[2].work == {"A": TokenWork(0, 1), "B": TokenWork(4, 0)}
    assert ws[3].work == {"A": TokenWork(0, 1), "B": TokenWork(0, 1)}


def test_the_stretch_before_an_arrival_goes_to_who_was_working_or_to_nobody() -> None:
    log = WorkLog()
    log.begin("A", 0.0)
    log.record("A", prefill_tokens=10, t_s=1.0)
    log.begin("B", 1.2)
    log.begin("C", 1.4)
    log.record("A", decode_tokens=1, t_s=2.0)
    log.record("B", prefill_tokens=3, t_s=2.0)
    log.record("C", prefill_tokens=3, t_s=2.0)
    ws = windows(log.events())
    assert [(w.t0_s, w.t1_s, set(w.work)) for w in ws] == [
        (0.0, 1.0, {"A"}),
        (1.0, 1.2, {"A"}),  # only A was there
        (1.2, 1.4, {"A", "B"}),
        (1.4, 2.0, {"A", "B", "C"}),
    ]
    # A finished at 1.0 and the engine idled until D arrived: that gap is nobody's.
    idle = WorkLog()
    idle.begin("A", 0.0)
    idle.record("A", prefill_tokens=10, t_s=1.0)
    idle.begin("D", 5.0)
    idle.record("D", prefill_tokens=4, t_s=5.5)
    assert [(w.t0_s, w.t1_s) for w in windows(idle.events())] == [(0.0, 1.0), (5.0, 5.5)]
    # A reader that starts after A's begin still counts A as arrived.
    assert windows(log.events(0.5, math.inf)) == ws[1:]


def test_shares_follow_token_work_and_sum_to_the_measured_windows() -> None:
    ws = windows(_two_request_log().events())
    energy = _constant_power(10.0)
    costs = {"prefill_cost": 0.5, "decode_cost": 1.0}
    a = attribute("A", ws, energy, **costs)
    b = attribute("B", ws, energy, **costs)
    # Window 1.5..2.0 (5 J): A did 1 decode (weight 1), B 4 prefill (weight 2) -> 5/3 and 10/3.
    # Window 2..3 (10 J): one decode each -> 5 and 5. A alone: 0..1 (10 J), 1..1.5 (5 J), 3..4 (10 J).
    assert a.total_j == pytest.approx(10 + 5 + 5 / 3 + 5 + 10)
    assert b.total_j == pytest.approx(10 / 3 + 5)
    assert a.total_j + b.total_j == pytest.approx(sum(10.0 * (w.t1_s - w.t0_s) for w in ws))
    assert a.prefill_j == pytest.approx(10.0)  # only the window that produced A's first token
    assert b.prefill_j == pytest.approx(10 / 3)
    assert (a.windows, b.windows) == (5, 2)
    assert (a.shared_windows, b.shared_windows) == (2, 2)


def test_idle_share_is_split_like_the_energy() -> None:
    ws = windows(_two_request_log().events())
    a = attribute("A", ws, _constant_power(10.0), prefill_cost=0.5, decode_cost=1.0, idle_power_w=4.0)
    assert a.idle_j == pytest.approx(0.4 * a.total_j)


def test_windows_do_not_depend_on_where_reading_starts() -> None:
    log = _two_request_log()
    full = windows(log.events())
    later = windows(log.events(1.5, math.inf))
    assert later == full[2:]


def test_log_is_ordered_thread_safe_and_bounded() -> None:
    log = WorkLog(history_s=10.0)

    def writer(name: str, offset: float) -> None:
        for i in range(200):
            log.record(name, decode_tokens=1, t_s=offset + i * 0.01)

    threads = [threading.Thread(target=writer, args=(f"r{k}", k * 0.001)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = [e.t_s for e in log.events()]
    assert times == sorted(times) and len(times) == 800
    log.record("late", decode_tokens=1, t_s=100.0)
    assert [e.request_id for e in log.events()] == ["late"]  # older than history_s dropped


def test_live_fraction_is_the_running_share_of_token_work() -> None:
    log = WorkLog()
    assert log.live_fraction("A", prefill_cost=1.0, decode_cost=1.0) == 1.0  # unknown request
    log.begin("A", 0.0)
    assert log.live_fraction("A", prefill_cost=1.0, decode_cost=1.0) == 1.0  # no work yet
    log.record("A", prefill_tokens=10, t_s=1.0)
    log.begin("B", 1.5)
    log.record("A", decode_tokens=1, t_s=2.0)
    log.record("B", prefill_tokens=4, t_s=2.0)
    costs = {"prefill_cost": 0.5, "decode_cost": 1.0}
    assert log.live_fraction("A", **costs) == pytest.approx(6 / 8)  # 10 x 0.5 + 1 of 5 + 1 + 2
    assert log.live_fraction("B", **costs) == pytest.approx(2 / 3)  # only work since B arrived


def test_idle_throughout_says_when_an_encode_lies_in_no_window() -> None:
    log = WorkLog()
    assert log.idle_throughout(0.0)  # nothing ever ran
    log.begin("A", 1.0)
    assert not log.idle_throughout(0.5) and not log.idle_throughout(2.0)  # A in flight
    log.begin("B", 1.5)
    log.end("A", 3.0)
    assert not log.idle_throughout(3.5)  # B still in flight
    log.end("B", 4.0)
    assert log.idle_throughout(4.0) and log.idle_throughout(9.0)
    assert not log.idle_throughout(3.9)  # B was in flight after 3.9
    log.end("B", 5.0)  # ending twice (or a request never begun) changes nothing
    assert log.idle_throughout(4.5)
    log.busy("C")  # in flight without a window boundary (an engine building C's prompt)
    assert not log.idle_throughout(4.5) and len(log.events()) == 2  # the two begins only
    log.end("C", 6.0)
    assert log.idle_throughout(6.0) and not log.idle_throughout(5.5)


def test_token_costs_from_the_predictor() -> None:
    def predict(text: int, visual: int, out: int) -> Any:
        return SimpleNamespace(prefill_j=0.5 + 0.01 * (text + visual), decode_j=0.2 * out)

    assert token_costs(SimpleNamespace(predict=predict)) == pytest.approx((0.01, 0.2))
    flat = SimpleNamespace(predict=lambda *_: SimpleNamespace(prefill_j=1.0, decode_j=1.0))
    assert token_costs(flat) == (1.0, 1.0)  # no marginal cost known: plain token counts
    assert token_costs(object()) == (1.0, 1.0)


class _ConstantCounter:
    """A counter meter at 10 W, driven by a clock the test controls."""

    name = "test:counter"
    source = "measured"
    update_period_s = 0.0

    def __init__(self) -> None:
        self.now = 0.0

    def is_available(self) -> Any:
        return SimpleNamespace(ok=True, reason="")

    def read(self) -> Any:
        from joulecap.runtime.energy.base import MeterReading

        return MeterReading(t_s=self.now, energy_j=10.0 * self.now)

    def describe(self) -> dict[str, object]:
        return {"name": self.name}

    def close(self) -> None:
        pass


def test_batched_report_replaces_the_whole_window_figure_with_the_share() -> None:
    meter = _ConstantCounter()
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0.0, idle_refresh_s=0.0))
    # Samples at the event times (the monitor interpolates a counter linearly between them).
    for t in (0.0, 1.0, 1.5, 2.0, 3.0, 4.0):
        meter.now = t
        monitor.sampler.sample_now()
    log = _two_request_log()
    a = batched_report(monitor, log, "A", PhaseTimes(0.0, 1.0, 4.0), prefill_cost=0.5, decode_cost=1.0)
    b = batched_report(monitor, log, "B", PhaseTimes(1.5, 2.0, 3.0), prefill_cost=0.5, decode_cost=1.0)
    assert a.total_j == pytest.approx(10 + 5 + 5 / 3 + 5 + 10)
    assert b.total_j == pytest.approx(10 / 3 + 5)
    assert a.total_j + b.total_j == pytest.approx(40.0)  # the whole busy 0..4 s, nothing lost
    assert a.prefill_j + a.decode_j == pytest.approx(a.total_j)
    assert "split by token work" in a.note and a.source == "measured"
    # Without the split, B's window (1.5..3.0) would be charged 15 J in full.
    assert b.total_j < 15.0


def test_batched_report_without_logged_work_is_the_plain_report() -> None:
    meter = _ConstantCounter()
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0.0, idle_refresh_s=0.0))
    for t in (0.0, 2.0):
        meter.now = t
        monitor.sampler.sample_now()
    rep = batched_report(
        monitor, WorkLog(), "X", PhaseTimes(0.0, 1.0, 2.0), prefill_cost=1.0, decode_cost=1.0
    )
    assert rep.total_j == pytest.approx(20.0)
    assert "split" not in rep.note


def test_work_events_are_plain_frozen_data() -> None:
    e = WorkEvent(1.0, "r", 3, 0)
    with pytest.raises(AttributeError):
        e.t_s = 2.0


# ---------------------------------------------------------------------------------------- vLLM engine helpers
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_families_refuse_every_image_plan(model_type: str) -> None:
    from joulecap.runtime.engines.vllm_engine import check_prunable

    with pytest.raises(InvalidRequest, match="M-RoPE"):
        check_prunable(model_type, (64,), (32,))
    # Every token kept: prompt embeddings still lose the 3-D positions.
    with pytest.raises(InvalidRequest, match="--engine transformers"):
        check_prunable(model_type, (64, 16), (64, 16))
    check_prunable(model_type, (), ())  # text only: token ids, positioned by vLLM itself
    check_prunable("idefics3", (64,), (1,))  # 1-D positions: prunes exactly


def test_engine_module_imports_without_vllm_and_reports_availability() -> None:
    from joulecap.runtime.engines import vllm_engine

    ok, why = vllm_engine.is_available()
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert not ok and "pip install" in why
    else:
        assert ok and why == ""
