"""Batched encodes (the vLLM engine's pruned-path prepare), on real tiny models without vLLM.

`EncodeCollector` on plain callables; `BatchEncoder` over a real tiny Idefics3/LLaVA
`TransformersEngine`: features equal to one-at-a-time encodes, concurrent requests share a batch,
per-request energy shares sum to the measured window, bad input and a failing tower.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from _factories import marked_image
from PIL import Image

from joulecap.runtime.energy.accounting import SingleAccounting
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.estimate import EstimateMeter
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.engines.encode_batch import EncodeCollector, EncodeShare
from joulecap.runtime.engines.transformers_engine import TransformersEngine
from joulecap.runtime.engines.vllm_encode import BatchEncoder, _collate, encode_share
from joulecap.runtime.errors import EngineError, InvalidRequest
from joulecap.runtime.types import ChatMessage, ImagePart, Request, TextPart


def _concurrently(fn: Any, args: list[Any]) -> list[Any]:
    """`fn(arg)` on one thread per arg, released together; results (or exceptions) in order."""
    out: list[Any] = [None] * len(args)
    barrier = threading.Barrier(len(args))

    def work(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(args[i])
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a submitter hung"
    return out


# ---------------------------------------------------------------------------------------- collector
def test_collector_batches_concurrent_jobs_and_splits_by_weight() -> None:
    calls: list[list[int]] = []

    def encode(jobs: Any) -> list[tuple[Any, int]]:
        calls.append(list(jobs))
        time.sleep(0.01)
        return [(j * 10, j) for j in jobs]

    collector: EncodeCollector[int, int] = EncodeCollector(encode, key=str, window_s=0.2, max_batch=4)
    try:
        results = _concurrently(collector.submit, [1, 2, 3, 4, 5, 6])
        assert sorted(r[0] for r in results) == [10, 20, 30, 40, 50, 60]
        assert max(len(c) for c in calls) == 4 and sum(len(c) for c in calls) == 6
        assert collector.batch_sizes() == [len(c) for c in calls]
        # Per batch: one window, fractions by weight summing to 1.
        by_batch: dict[int, list[tuple[int, EncodeShare]]] = {}
        for job, (_, share) in zip([1, 2, 3, 4, 5, 6], results, strict=True):
            by_batch.setdefault(share.batch_id, []).append((job, share))
        for members in by_batch.values():
            assert sum(s.fraction for _, s in members) == pytest.approx(1.0)
            assert len({(s.t0_s, s.t1_s) for _, s in members}) == 1
            total = sum(j for j, _ in members)
            for job, share in members:
                assert share.fraction == pytest.approx(job / total)
                assert share.batch_size == len(members)
    finally:
        collector.close()


def test_collector_a_lone_job_waits_at_most_the_window() -> None:
    collector: EncodeCollector[int, int] = EncodeCollector(
        lambda jobs: [(j, 1) for j in jobs], key=str, window_s=0.05
    )
    try:
        t0 = time.monotonic()
        value, share = collector.submit(7)
        assert value == 7 and share.batch_size == 1 and share.fraction == 1.0
        assert time.monotonic() - t0 < 2.0
    finally:
        collector.close()


def test_collector_failure_reaches_every_job_and_it_keeps_serving() -> None:
    fail = threading.Event()
    fail.set()

    def encode(jobs: Any) -> list[tuple[Any, int]]:
        if fail.is_set():
            raise RuntimeError("tower exploded")
        return [(j, 1) for j in jobs]

    collector: EncodeCollector[int, int] = EncodeCollector(encode, key=str, window_s=0.2)
    try:
        outcomes = _concurrently(collector.submit, [1, 2, 3])
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert collector.last_failed is not None and collector.last_failed.failed
        fail.clear()
        assert collector.submit(9)[0] == 9
    finally:
        collector.close()
    with pytest.raises(RuntimeError, match="closed"):
        collector.submit(1)


def test_collector_a_job_error_fails_that_job_only() -> None:
    def encode(jobs: Any) -> list[tuple[Any, int]]:
        return [((ValueError(f"bad {j}"), 0) if j < 0 else (j, j)) for j in jobs]

    collector: EncodeCollector[int, int] = EncodeCollector(encode, key=str, window_s=0.2)
    try:
        outcomes = _concurrently(collector.submit, [2, -1, 6])
        assert isinstance(outcomes[1], ValueError)
        assert outcomes[0][1].fraction == pytest.approx(0.25) and outcomes[2][1].fraction == pytest.approx(
            0.75
        )
    finally:
        collector.close()


def test_collector_flags_a_batch_that_overlapped_other_work_once() -> None:
    asked: list[float] = []

    def overlapped(t0_s: float) -> bool:
        asked.append(t0_s)
        return True

    collector: EncodeCollector[int, int] = EncodeCollector(
        lambda jobs: [(j, 1) for j in jobs], key=str, window_s=0.2, overlapped=overlapped
    )
    try:
        outcomes = _concurrently(collector.submit, [1, 2, 3])
        assert all(share.overlapped for _, share in outcomes)
        assert len(asked) == len({share.batch_id for _, share in outcomes})  # once per batch
        assert all(t0 == share.t0_s for t0, (_, share) in zip(asked, outcomes, strict=False))
    finally:
        collector.close()


def test_collector_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        EncodeCollector(lambda jobs: [], key=str, max_batch=0)


def test_collate_pads_only_where_allowed() -> None:
    a = {"pixel_values": torch.ones(1, 1, 3, 4, 4)}
    b = {"pixel_values": torch.ones(1, 2, 3, 4, 4)}
    assert _collate([a, a], pad=False) is not None
    assert _collate([a, b], pad=False) is None
    padded = _collate([a, b], pad=True)
    assert padded is not None and padded["pixel_values"].shape == (2, 2, 3, 4, 4)
    assert padded["pixel_values"][0, 1].abs().sum() == 0  # the padded tile is all zeros
    assert _collate([a, {"other": torch.ones(1)}], pad=True) is None


# ---------------------------------------------------------------------------------------- real towers
@pytest.fixture(scope="module")
def idefics3(tiny_idefics3: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(EngineConfig(model=str(tiny_idefics3), device="cpu", leverage_basis=True))
    yield engine
    engine.close()


def _request(rid: str, images: tuple[Image.Image, ...], text: str = "What is it?") -> Request:
    parts = (*(ImagePart(i) for i in range(len(images))), TextPart(text))
    return Request(rid, (ChatMessage("user", parts),), images=images)


IMAGES = [
    marked_image((200, 30, 30)),
    marked_image((20, 40, 220), (64, 120)),
    marked_image((30, 200, 30), (150, 50)),
    marked_image((200, 200, 30), (40, 40)),
]


def test_batched_features_equal_one_at_a_time(idefics3: TransformersEngine) -> None:
    encoder = BatchEncoder(idefics3, window_s=0.3, max_batch=8)
    requests = [
        _request("chatcmpl-a", (IMAGES[0],)),
        _request("chatcmpl-b", (IMAGES[1], IMAGES[2])),
        _request("chatcmpl-c", (IMAGES[3],)),
    ]
    try:
        expected = [idefics3.prepare(r) for r in requests]
        got = _concurrently(encoder.prepare, requests)
        assert encoder.batch_sizes() == [3], "the three concurrent encodes did not share one call"
        shares = [encode_share(p) for p in got]
        assert all(s is not None for s in shares)
        assert sum(s.fraction for s in shares if s is not None) == pytest.approx(1.0)
        for exp, p, share in zip(expected, got, shares, strict=True):
            assert p.visual_tokens == exp.visual_tokens and p.text_tokens == exp.text_tokens
            assert share is not None
            assert share.fraction == pytest.approx(sum(p.visual_tokens) / 256)  # 64 + 128 + 64
            for f_exp, f_got in zip(exp.features, p.features, strict=True):
                torch.testing.assert_close(f_got, f_exp, rtol=1e-4, atol=1e-4)
            assert len(p.bases) == len(exp.bases)  # decomposed in the batch, as prepare does
            torch.testing.assert_close(p.payload.input_ids, exp.payload.input_ids)
    finally:
        encoder.close()


def test_batch_energy_shares_sum_to_the_meter(idefics3: TransformersEngine) -> None:
    cfg = EnergyConfig(meter="estimate", idle_baseline_s=0.0)
    monitor = EnergyMonitor(EstimateMeter(cfg), cfg)
    monitor.start()
    encoder = BatchEncoder(idefics3, window_s=0.3)
    try:
        got = _concurrently(encoder.prepare, [_request(f"chatcmpl-e{i}", (IMAGES[i],)) for i in range(4)])
        shares = [encode_share(p) for p in got]
        assert all(s is not None for s in shares)
        windows = {(s.t0_s, s.t1_s) for s in shares if s is not None}
        time.sleep(0.1)  # let the sampler pass the window's end
        reports = [SingleAccounting(monitor).share_of(s) for s in shares if s is not None]
        measured = sum(monitor.energy_between(t0, t1).energy_j for t0, t1 in windows)
        assert measured > 0
        assert sum(r.total_j for r in reports) == pytest.approx(measured, rel=1e-9)
        assert all(r.encode_j == r.total_j and r.prefill_j == r.decode_j == 0 for r in reports)
        assert all("encode batch" in r.note for r in reports)
    finally:
        encoder.close()
        monitor.stop()


def test_rejected_image_fails_its_request_only(idefics3: TransformersEngine) -> None:
    encoder = BatchEncoder(idefics3, window_s=0.3)
    bad = _request("chatcmpl-bad", (Image.new("RGB", (0, 0)),))
    missing = Request(
        "chatcmpl-missing", (ChatMessage("user", (ImagePart(3), TextPart("x"))),), images=(IMAGES[0],)
    )
    try:
        with pytest.raises(Exception) as alone:
            idefics3.prepare(bad)
        outcomes = _concurrently(encoder.prepare, [_request("chatcmpl-ok", (IMAGES[0],)), bad, missing])
        assert type(outcomes[1]) is type(alone.value)  # the transformers engine's own error
        assert isinstance(outcomes[2], InvalidRequest)
        share = encode_share(outcomes[0])
        assert share is not None and share.fraction == 1.0  # the rejected ones weigh nothing
    finally:
        encoder.close()


def test_failing_tower_gives_every_request_an_engine_error(
    idefics3: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = BatchEncoder(idefics3, window_s=0.3)
    try:
        original = idefics3.adapter.image_features

        def broken(_inputs: Any) -> Any:
            raise RuntimeError("CUDA error: device-side assert (simulated)")

        monkeypatch.setattr(idefics3.adapter, "image_features", broken)
        outcomes = _concurrently(
            encoder.prepare, [_request(f"chatcmpl-f{i}", (IMAGES[i],)) for i in range(3)]
        )
        assert all(isinstance(o, EngineError) for o in outcomes)
        assert all("vision encoder failed" in str(o) for o in outcomes)
        assert all(o.http_status == 500 for o in outcomes)
        monkeypatch.setattr(idefics3.adapter, "image_features", original)
        again = encoder.prepare(_request("chatcmpl-after", (IMAGES[0],)))
        assert again.features and encode_share(again) is not None
    finally:
        encoder.close()


def test_llava_batches_without_padding(tiny_llava: Path) -> None:
    engine = TransformersEngine(EngineConfig(model=str(tiny_llava), device="cpu"))
    encoder = BatchEncoder(engine, window_s=0.3)
    try:
        requests = [_request(f"chatcmpl-l{i}", (IMAGES[i],)) for i in range(3)]
        expected = [engine.prepare(r) for r in requests]
        got = _concurrently(encoder.prepare, requests)
        assert encoder.batch_sizes() == [3]
        for exp, p in zip(expected, got, strict=True):
            torch.testing.assert_close(p.features[0], exp.features[0], rtol=1e-4, atol=1e-4)
        assert replace(got[0], payload=None).visual_tokens == expected[0].visual_tokens
    finally:
        encoder.close()
        engine.close()
