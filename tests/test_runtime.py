"""The in-process `Runtime` API, as a robot stack embeds it (no HTTP)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from joulecap.runtime.calibrate_sweep import SweepPoint, make_request
from joulecap.runtime.energy.accounting import EncodeFailed
from joulecap.runtime.errors import BudgetTooSmall, EngineError, InvalidRequest, Overloaded
from joulecap.runtime.runtime import Runtime
from joulecap.runtime.types import EnergyReport


@pytest.fixture
def runtime(config_factory: Any) -> Any:
    rt = Runtime(config_factory())
    yield rt
    rt.close()


def test_chat_with_prompt_image_and_budget(runtime: Runtime) -> None:
    frame = np.zeros((96, 96, 3), dtype=np.uint8)
    frame[20:60, 30:70] = (255, 0, 0)
    result = runtime.chat("What do you see?", images=[frame], energy_budget_j=500.0, max_tokens=6)
    assert 1 <= result.completion_tokens <= 6 and not result.budget_exceeded
    assert result.energy.source == "estimated"
    assert result.energy.total_j > 0
    assert result.plan.budget_j == 500.0
    assert result.generation.visual_tokens_in > 0
    row = runtime.ledger.query(limit=10)[0]
    assert row["id"] == result.request_id


def test_token_callback_streams_the_final_text(runtime: Runtime) -> None:
    pieces: list[str] = []
    result = runtime.chat(
        "Describe it",
        images=[Image.new("RGB", (80, 80), "blue")],
        max_tokens=5,
        on_token=lambda _tid, text: pieces.append(text),
    )
    assert "".join(pieces) == result.text


def test_openai_style_messages_in_process(runtime: Runtime, png: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png()}},
                {"type": "text", "text": "Colour?"},
            ],
        },
    ]
    result = runtime.chat(messages, max_tokens=4)
    assert result.generation.visual_tokens_in > 0


def test_achat_runs_without_blocking_the_loop(runtime: Runtime) -> None:
    async def main() -> tuple[Any, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        result = await runtime.achat("hello", max_tokens=4)
        task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result.completion_tokens <= 4
    assert ticks > 1


def test_bad_budget_and_tiny_budget(runtime: Runtime) -> None:
    with pytest.raises(InvalidRequest):
        runtime.chat("hi", energy_budget_j=float("nan"))
    with pytest.raises(InvalidRequest):
        runtime.chat("hi", energy_budget_j=-1)
    with pytest.raises(BudgetTooSmall) as info:
        runtime.chat("hi", energy_budget_j=1e-9)
    assert info.value.min_j > 1e-9
    # The stated minimum is close to what works (the retry's measured prepare energy varies; the
    # policy tests check the exact minimum with a fixed encode).
    ok = runtime.chat("hi", energy_budget_j=info.value.min_j * 1.25, max_tokens=3)
    assert ok.completion_tokens >= 1


def test_queue_limit_refuses_with_overloaded(config_factory: Any) -> None:
    rt = Runtime(config_factory(server={"queue_limit": 0}))
    gate = threading.Event()
    try:
        blocker = rt.submit(gate.wait, 30)
        with pytest.raises(Overloaded):
            rt.chat("hi", max_tokens=2)
        gate.set()
        blocker.result(timeout=30)
        assert rt.chat("hi", max_tokens=2).completion_tokens >= 1
    finally:
        gate.set()
        rt.close()


def test_oversized_frame_is_refused(config_factory: Any) -> None:
    rt = Runtime(config_factory(server={"max_image_pixels": 1000}))
    try:
        with pytest.raises(InvalidRequest):
            rt.chat("hi", images=[np.zeros((100, 100, 3), dtype=np.uint8)])
    finally:
        rt.close()


def test_the_leverage_basis_is_computed_only_for_leverage_selection(config_factory: Any) -> None:
    for selection, want in (("leverage", True), ("uniform", False)):
        rt = Runtime(config_factory(scheduler={"selection": selection}, engine={"warmup": False}))
        try:
            engine: Any = rt.engine
            assert engine.config.leverage_basis is want
            request = make_request(SweepPoint(64, 1.0, 4, 2, 0))  # one 64 px image
            assert (len(rt.engine.prepare(request).bases) == 1) is want
        finally:
            rt.close()


def test_images_are_decomposed_only_for_a_policy_that_may_prune_them(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = [Image.new("RGB", (96, 96), "red")]
    for policy, prunes in (
        ("baseline", False),
        ("output_budget", False),
        ("joint", True),
        ("answers_first", False),  # its budget pays for every token: no decomposition (below)
        ("fixed_prune", True),
    ):
        request = runtime.build_request(
            "What is it?", image, max_tokens=2, policy=policy, energy_budget_j=500.0
        )
        prepared, plan = runtime.plan(request)
        assert (len(prepared.bases) == 1) is prunes, policy
        if not prunes:
            assert plan.visual_keep == prepared.visual_tokens
    # The default policy prunes only under a budget: without one its images are not decomposed.
    request = runtime.build_request("What is it?", image, max_tokens=2, policy="answers_first")
    prepared, plan = runtime.plan(request)
    assert prepared.bases == () or all(b is None for b in prepared.bases)
    assert plan.visual_keep == prepared.visual_tokens and plan.min_j is None

    def encode(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unknown policy's images were encoded")

    monkeypatch.setattr(runtime.engine, "prepare", encode)
    with pytest.raises(InvalidRequest, match="nope"):  # refused while validating, before any encode
        runtime.build_request("What is it?", image, policy="nope")


def test_encode_energy_is_measured_before_planning_charged_and_not_learned(runtime: Runtime) -> None:
    # Image preprocessing and the vision encoder run in `plan`: their energy is measured there,
    # counted in the plan's figure and the request's prefill, and kept out of the predictor's
    # training target (the predictor models the run only).
    request = runtime.build_request("What is it?", [Image.new("RGB", (96, 96), "red")], max_tokens=3)
    prepared, plan = runtime.plan(request)
    assert prepared.encode is not None and prepared.encode_j > 0
    assert prepared.encode.source == "estimated"
    kept = sum(plan.visual_keep)
    run = runtime.predictor.predict(prepared.text_tokens, kept, plan.max_new_tokens)
    assert plan.predicted_j == pytest.approx(prepared.encode_j + run.total_j)
    assert plan.encode_j == prepared.encode_j and plan.predicted_prefill_j == pytest.approx(run.prefill_j)
    seen: list[float] = []
    real_update = runtime.predictor.update

    def spy(text: int, visual: int, out: int, energy_j: float) -> None:
        seen.append(energy_j)
        real_update(text, visual, out, energy_j)

    runtime.predictor.update = spy  # type: ignore[method-assign]
    result = runtime.run_planned(prepared, plan)
    e = result.energy
    # Three parts, apart: the encode as measured in plan(), the LM prefill, the decode.
    assert e.encode_j == prepared.encode_j
    assert e.total_j == pytest.approx(e.encode_j + e.prefill_j + e.decode_j)
    assert e.run_j == pytest.approx(e.prefill_j + e.decode_j)
    assert seen == [pytest.approx(e.run_j)]


def test_a_meter_read_afresh_on_each_check_is_current_for_the_governor(runtime: Runtime) -> None:
    # The estimate meter is read on each check: the single-request accounting says so, and the
    # governor then trusts the measurement instead of max(measured, predicted).
    assert runtime.monitor.reads_fresh
    assert runtime.accounting.start("chatcmpl-x", None).measurement_is_current is True


def test_the_default_decomposes_images_only_when_its_budget_binds(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # answers_first plans keep-all first, from features alone; only a budget that binds pays for
    # the decomposition, which is measured into the encode (both windows) and then planned with.
    # Two images (128 visual tokens): keeping all of them costs about 0.25 J more than the
    # smallest plan's 8, far more than two warm encodes differ by, so a budget at the smallest
    # plan's stated minimum binds whatever this attempt's encode cost.
    image = [Image.new("RGB", (96, 96), "red"), Image.new("RGB", (96, 96), "blue")]
    runtime.chat("What is it?", image, max_tokens=1)  # warm: the first encode pays for caches
    windows: list[EnergyReport | None] = []
    measure = runtime.accounting.measure_encode

    def counted(work: Any) -> Any:
        value, report = measure(work)
        windows.append(report)
        return value, report

    monkeypatch.setattr(runtime.accounting, "measure_encode", counted)

    def ask(budget_j: float) -> Any:
        return runtime.build_request(
            "What is it?", image, max_tokens=2, policy="answers_first", energy_budget_j=budget_j
        )

    prepared, plan = runtime.plan(ask(500.0))
    assert len(windows) == 1 and prepared.bases == () and prepared.bases_pending
    assert plan.visual_keep == prepared.visual_tokens and plan.min_j is None  # no minimum measured
    windows.clear()
    with pytest.raises(BudgetTooSmall) as refused:
        runtime.plan(ask(1e-6))
    assert len(windows) == 2  # the refusal's minimum includes the decomposition
    windows.clear()
    prepared, plan = runtime.plan(ask(refused.value.min_j))
    assert len(windows) == 2 and len(prepared.bases) == 2 and not prepared.bases_pending
    assert sum(plan.visual_keep) < sum(prepared.visual_tokens) and plan.min_j is not None
    assert prepared.encode is not None
    assert prepared.encode_j == pytest.approx(sum(w.total_j for w in windows if w is not None))
    # /v1/energy/estimate decomposes while preparing, as before: its minimum is the same rule's.
    estimated, est_plan, _ = runtime.estimate(ask(500.0))
    assert len(estimated.bases) == 2 and est_plan is not None and est_plan.min_j is not None


def test_a_failed_deferred_decomposition_is_one_ledger_row_with_both_windows(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The encode was spent, then the decomposition failed part-way: one error row carries both
    # windows' joules, the caller gets a 500-class error, and the next request is served.
    image = [Image.new("RGB", (96, 96), "red")]
    windows: list[EnergyReport | None] = []
    measure = runtime.accounting.measure_encode

    def counted(work: Any) -> Any:
        try:
            value, report = measure(work)
        except EncodeFailed as exc:
            windows.append(exc.energy)
            raise
        windows.append(report)
        return value, report

    def broken(prepared: Any) -> Any:
        raise RuntimeError("decomposition failed")

    monkeypatch.setattr(runtime.accounting, "measure_encode", counted)
    monkeypatch.setattr(runtime.engine, "add_bases", broken)
    request = runtime.build_request("What is it?", image, max_tokens=2, energy_budget_j=1e-6)
    before = runtime.ledger.count()
    with pytest.raises(EngineError, match="decompose"):
        runtime.plan(request)
    rows = [r for r in runtime.ledger.query(limit=100) if r["id"] == request.request_id]
    assert runtime.ledger.count() == before + 1 and len(rows) == 1 and rows[0]["status"] == "error"
    assert len(windows) == 2 and all(w is not None for w in windows)
    assert rows[0]["measured_j"] == pytest.approx(sum(w.total_j for w in windows if w is not None))
    assert rows[0]["encode_j"] == pytest.approx(rows[0]["measured_j"])
    monkeypatch.undo()
    assert runtime.chat("What is it?", image, max_tokens=2).text is not None
