"""Per-request energy under batching (WorkLog, windows, attribution), the energy accounting that turns
it into reports (`joulecap.runtime.energy.accounting`), and VLLMEngine's pure helpers.

Fast and vLLM-free: runs in the default suite (no marker). The engine itself is tested in
test_vllm_engine.py.
"""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from joulecap.runtime.energy.accounting import (
    BatchedAccounting,
    EncodeFailed,
    SingleAccounting,
    make_accounting,
    with_encode,
)
from joulecap.runtime.energy.attribution import TokenWork
from joulecap.runtime.energy.base import MeterReading
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.sampler import WindowEnergy
from joulecap.runtime.energy.worklog import WorkEvent, WorkLog, attribute, windows
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import EnergyReport, PhaseTimes, Prediction

NO_PREDICTION = Prediction(0.0, 0.0, 0.0)


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


def test_batched_accounting_weighs_tokens_at_the_predictor_s_costs() -> None:
    monitor = _sampled_monitor((0.0,))
    pred = Predictor(1.0, 0.01, 0.2)
    assert BatchedAccounting(monitor, WorkLog(), pred.token_costs).costs() == pytest.approx((0.01, 0.2))


@pytest.mark.parametrize(
    "costs,want",
    [
        ((0.01, 0.2), (0.01, 0.2)),
        ((0.0, 0.2), (1.0, 1.0)),  # no marginal cost known: plain token counts
        ((0.01, -1.0), (1.0, 1.0)),
        ((math.inf, 0.2), (1.0, 1.0)),
        ((math.nan, 0.2), (1.0, 1.0)),
    ],
)
def test_batched_accounting_weighs_tokens_by_positive_costs_only(
    costs: tuple[float, float], want: tuple[float, float]
) -> None:
    monitor = EnergyMonitor(_ConstantCounter(), EnergyConfig(idle_baseline_s=0.0, idle_refresh_s=0.0))
    assert BatchedAccounting(monitor, WorkLog(), lambda: costs).costs() == want


def _report(total_j: float, **kw: Any) -> EnergyReport:
    fields: dict[str, Any] = {"idle_j": 0.0, "duration_s": 0.1, "source": "measured", "meter": "test:counter"}
    fields.update(kw)
    return EnergyReport(total_j, 0.0, 0.0, encode_j=total_j, **fields)


def test_with_encode_adds_the_encode_as_its_own_part() -> None:
    run = EnergyReport(5.0, 2.0, 3.0, 1.0, 0.5, "measured", "nvml:0", samples=5, note="run")
    encode = _report(0.75, idle_j=0.25, duration_s=0.2, samples=2, interpolated=True, note="short")
    both = with_encode(run, encode)
    assert (both.total_j, both.encode_j, both.prefill_j, both.decode_j) == (5.75, 0.75, 2.0, 3.0)
    assert both.run_j == 5.0 and both.total_j == both.encode_j + both.run_j
    assert (both.idle_j, both.duration_s, both.samples) == (1.25, 0.7, 7)
    assert both.interpolated and both.note == "run; short"
    assert with_encode(run, None) == run


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
        return MeterReading(t_s=self.now, energy_j=10.0 * self.now)

    def describe(self) -> dict[str, object]:
        return {"name": self.name}

    def close(self) -> None:
        pass


class _LiveCounter(_ConstantCounter):
    """The same 10 W counter on the real monotonic clock (for what the accounting times itself)."""

    def read(self) -> Any:
        now = time.monotonic()
        return MeterReading(t_s=now, energy_j=10.0 * now)


def _sampled_monitor(times: tuple[float, ...]) -> EnergyMonitor:
    meter = _ConstantCounter()
    monitor = EnergyMonitor(meter, EnergyConfig(idle_baseline_s=0.0, idle_refresh_s=0.0))
    # Samples at the event times (the monitor interpolates a counter linearly between them).
    for t in times:
        meter.now = t
        monitor.sampler.sample_now()
    return monitor


def test_batched_report_replaces_the_whole_window_figure_with_the_share() -> None:
    monitor = _sampled_monitor((0.0, 1.0, 1.5, 2.0, 3.0, 4.0))
    acc = BatchedAccounting(monitor, _two_request_log(), lambda: (0.5, 1.0))
    a = acc.start("A", None).report(PhaseTimes(0.0, 1.0, 4.0), NO_PREDICTION)
    b = acc.start("B", None).report(PhaseTimes(1.5, 2.0, 3.0), NO_PREDICTION)
    assert a.total_j == pytest.approx(10 + 5 + 5 / 3 + 5 + 10)
    assert b.total_j == pytest.approx(10 / 3 + 5)
    assert a.total_j + b.total_j == pytest.approx(40.0)  # the whole busy 0..4 s, nothing lost
    assert a.prefill_j == pytest.approx(10.0) and a.decode_j == pytest.approx(a.total_j - 10.0)
    assert a.encode_j == 0.0 and a.run_j == pytest.approx(a.total_j)
    assert "split by token work: 5 engine step window(s), 2 shared" in a.note and a.source == "measured"
    # Without the split, B's window (1.5..3.0) would be charged 15 J in full.
    assert b.total_j < 15.0


def test_a_batched_report_carries_the_encode_apart() -> None:
    monitor = _sampled_monitor((0.0, 1.0, 1.5, 2.0, 3.0, 4.0))
    acc = BatchedAccounting(monitor, _two_request_log(), lambda: (0.5, 1.0))
    b = acc.start("B", _report(0.8)).report(PhaseTimes(1.5, 2.0, 3.0), NO_PREDICTION)
    assert b.encode_j == 0.8
    assert b.prefill_j == pytest.approx(10 / 3) and b.decode_j == pytest.approx(5.0)
    assert b.total_j == pytest.approx(0.8 + 10 / 3 + 5.0)


def test_a_run_weighs_tokens_with_the_costs_at_its_start() -> None:
    monitor = _sampled_monitor((0.0, 1.0, 1.5, 2.0, 3.0, 4.0))
    costs = [(0.5, 1.0)]
    acc = BatchedAccounting(monitor, _two_request_log(), lambda: costs[-1])
    run = acc.start("B", None)
    costs.append((5.0, 1.0))  # the predictor learned meanwhile
    b = run.report(PhaseTimes(1.5, 2.0, 3.0), NO_PREDICTION)
    assert b.total_j == pytest.approx(10 / 3 + 5)  # split as at the start (0.5 : 1.0)
    later = acc.start("B", None).report(PhaseTimes(1.5, 2.0, 3.0), NO_PREDICTION)
    assert later.total_j == pytest.approx(5 * 20 / 21 + 5)  # 4 x 5.0 against 1 x 1.0


def test_batched_report_without_logged_work_is_the_plain_report() -> None:
    monitor = _sampled_monitor((0.0, 2.0))
    rep = BatchedAccounting(monitor, WorkLog(), lambda: (1.0, 1.0)).start("X", None)
    out = rep.report(PhaseTimes(0.0, 1.0, 2.0), NO_PREDICTION)
    assert out.total_j == pytest.approx(20.0)
    assert (out.prefill_j, out.decode_j) == pytest.approx((10.0, 10.0))
    assert "split" not in out.note


def test_the_live_energy_of_a_batched_run_is_its_share_plus_its_encode() -> None:
    monitor = EnergyMonitor(_LiveCounter(), EnergyConfig(idle_baseline_s=0.0, idle_refresh_s=0.0))
    log = WorkLog()
    acc = BatchedAccounting(monitor, log, lambda: (1.0, 1.0))
    t0 = time.monotonic()
    run = acc.start("A", _report(2.0))
    log.begin("A")
    log.record("A", prefill_tokens=10)
    log.begin("B")
    log.record("B", prefill_tokens=30)  # B did 3/4 of the work since A arrived
    time.sleep(0.05)
    low = 10.0 * (time.monotonic() - run.start_s)
    so_far = run.energy_so_far_j()
    high = 10.0 * (time.monotonic() - t0)
    assert 2.0 + 0.25 * low - 1e-6 <= so_far <= 2.0 + 0.25 * high + 1e-6
    # Another request's work is in the meter's reading, so a batched run's live figure is never
    # exact: the governor keeps covering it with the prediction.
    assert run.measurement_is_current is False
    assert SingleAccounting(monitor).start("C", None).measurement_is_current is monitor.reads_fresh is True


def test_an_encode_is_charged_only_when_the_engine_was_idle_throughout() -> None:
    monitor = EnergyMonitor(_LiveCounter(), EnergyConfig(idle_baseline_s=0.0, idle_refresh_s=0.0))
    log = WorkLog()
    acc = BatchedAccounting(monitor, log, lambda: (1.0, 1.0))

    def encode() -> str:
        time.sleep(0.02)
        return "prepared"

    value, alone = acc.measure_encode(encode)
    assert value == "prepared" and alone is not None
    assert alone.encode_j == alone.total_j >= 10.0 * 0.02 * 0.9
    assert (alone.prefill_j, alone.decode_j) == (0.0, 0.0)
    log.begin("other")  # another request in flight: its windows hold this encode already
    assert acc.measure_encode(encode) == ("prepared", None)
    log.end("other")
    with pytest.raises(EncodeFailed) as err:
        acc.measure_encode(lambda: 1 / 0)
    assert isinstance(err.value.cause, ZeroDivisionError) and err.value.energy is not None
    # A single-request engine owns every encode it measures.
    assert SingleAccounting(monitor).measure_encode(encode)[1] is not None


def test_make_accounting_batches_only_engines_with_a_work_log() -> None:
    monitor = _sampled_monitor((0.0,))
    assert type(make_accounting(monitor, None, lambda: (1.0, 1.0))) is SingleAccounting
    log = WorkLog()
    batched = make_accounting(monitor, log, lambda: (0.5, 2.0))
    assert type(batched) is BatchedAccounting and batched.log is log and batched.costs() == (0.5, 2.0)


def test_work_events_are_plain_frozen_data() -> None:
    e = WorkEvent(1.0, "r", 3, 0)
    with pytest.raises(AttributeError):
        e.t_s = 2.0


# ---------------------------------------------------------------------------------------- vLLM engine helpers
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_mrope_families_refuse_every_image_plan(model_type: str) -> None:
    from joulecap.runtime.engines.vllm_families import check_prunable

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
