"""PowerEnvelope: refill, reserve/settle, 429 with Retry-After, thread safety."""

from __future__ import annotations

import threading

import pytest

from joulecap.runtime.envelope import PowerEnvelope
from joulecap.runtime.errors import EnvelopeExhausted


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_starts_full_and_refills_at_rate_up_to_capacity() -> None:
    clock = Clock()
    env = PowerEnvelope(2.0, 10.0, clock=clock)
    assert env.level_j() == 10.0
    res = env.reserve(8.0)
    assert env.level_j() == pytest.approx(2.0)
    clock.t += 1.5
    assert env.level_j() == pytest.approx(5.0)
    env.settle(res, 3.0)  # used 3 of 8: 5 back
    assert env.level_j() == pytest.approx(10.0)
    clock.t += 100
    assert env.level_j() == pytest.approx(10.0)


def test_exhausted_raises_429_with_retry_after_from_refill_rate() -> None:
    clock = Clock()
    env = PowerEnvelope(2.0, 10.0, clock=clock)
    env.reserve(9.0)
    with pytest.raises(EnvelopeExhausted) as err:
        env.reserve(5.0)
    assert err.value.retry_after_s == pytest.approx(2.0)  # (5 - 1) J / 2 W
    assert err.value.http_status == 429
    assert err.value.headers["Retry-After"] == "2"
    clock.t += 2.0
    env.reserve(5.0)


def test_overrun_is_charged_and_request_larger_than_bucket_waits_for_full() -> None:
    clock = Clock()
    env = PowerEnvelope(1.0, 10.0, clock=clock)
    res = env.reserve(4.0)
    env.settle(res, 7.0)  # overran by 3 J
    assert env.level_j() == pytest.approx(3.0)
    with pytest.raises(EnvelopeExhausted) as err:
        env.reserve(50.0)
    assert err.value.retry_after_s == pytest.approx(7.0)
    clock.t += 7.0
    big = env.reserve(50.0)
    assert env.level_j() == pytest.approx(-40.0)  # a debt the refill pays off
    env.settle(big, 12.0)
    assert env.level_j() == pytest.approx(-2.0)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        PowerEnvelope(0.0, 10.0)
    with pytest.raises(ValueError):
        PowerEnvelope(1.0, -1.0)


def test_concurrent_reservations_never_overdraw() -> None:
    env = PowerEnvelope(1e-9, 100.0)
    granted: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            try:
                env.reserve(1.0)
            except EnvelopeExhausted:
                continue
            with lock:
                granted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 100
    assert env.level_j() == pytest.approx(0.0, abs=1e-6)
