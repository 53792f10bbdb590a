"""TransformersEngine on tiny real Idefics3 and LLaVA models: parity, pruning, hooks, sampling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _factories import marked_image
from _family import processor_inputs

from joulecap.kernels import select_tokens
from joulecap.runtime.brevity import brevity_hint
from joulecap.runtime.engines.base import Engine, RunHooks
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.engines.decoding import StreamDetokenizer
from joulecap.runtime.engines.factory import create_engine, engine_class
from joulecap.runtime.engines.transformers_engine import TransformersEngine
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.paths import Paths, PathsConfig
from joulecap.runtime.types import (
    ChatMessage,
    ImagePart,
    Plan,
    PreparedRequest,
    Request,
    SamplingParams,
    TextPart,
)


@pytest.fixture(scope="module")
def idefics3(tiny_idefics3: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(EngineConfig(model=str(tiny_idefics3), device="cpu"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def llava(tiny_llava: Path) -> Iterator[TransformersEngine]:
    engine = TransformersEngine(EngineConfig(model=str(tiny_llava), device="cpu"))
    yield engine
    engine.close()


IMAGES = (marked_image((200, 30, 30)), marked_image((20, 40, 220), (64, 120)))


def _request(n_images: int = 1, text: str = "What is in the picture?", **kw: Any) -> Request:
    parts: tuple[TextPart | ImagePart, ...] = (*(ImagePart(i) for i in range(n_images)), TextPart(text))
    return Request("chatcmpl-test", (ChatMessage("user", parts),), images=IMAGES[:n_images], **kw)


def _plan(
    prepared: PreparedRequest, keep: tuple[int, ...] | None = None, max_new: int = 12, **kw: Any
) -> Plan:
    keep = prepared.visual_tokens if keep is None else keep
    return Plan(visual_keep=keep, max_new_tokens=max_new, predicted_j=1.0, policy="test", reason="test", **kw)


def _hf_generate(engine: TransformersEngine, request: Request, max_new: int) -> list[int]:
    """transformers' own pixel_values path: processor(...) then model.generate, greedy."""
    inputs = processor_inputs(engine.processor, request)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("family", ["idefics3", "llava"])
def test_all_tokens_kept_matches_transformers_generate(family: str, n_images: int, request: Any) -> None:
    engine: TransformersEngine = request.getfixturevalue(family)
    req = _request(n_images)
    prepared = engine.prepare(req)
    result = engine.run(prepared, _plan(prepared, max_new=16), RunHooks())
    expected = _hf_generate(engine, req, 16)
    assert list(result.token_ids) == expected
    assert result.prefill_tokens == prepared.input_tokens
    assert result.visual_tokens_kept == result.visual_tokens_in == sum(prepared.visual_tokens)


def test_prepare_reports_tokens_and_features(idefics3: TransformersEngine, llava: TransformersEngine) -> None:
    for engine in (idefics3, llava):
        prepared = engine.prepare(_request(2))
        assert prepared.visual_tokens == (64, 64)
        assert [tuple(f.shape) for f in prepared.features] == [(64, 64), (64, 64)]
        assert prepared.text_tokens > 0
        assert prepared.context_length == engine.info.context_length == 2048
        # Different images give different features (the tower really ran on each image).
        assert not torch.allclose(prepared.features[0], prepared.features[1])


# ---------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("family", ["idefics3", "llava"])
def test_pruning_shortens_prefill_by_exactly_the_dropped_tokens(family: str, request: Any) -> None:
    engine: TransformersEngine = request.getfixturevalue(family)
    prepared = engine.prepare(_request(2))
    full = engine.run(prepared, _plan(prepared, max_new=2), RunHooks())
    for keep in [(10, 64), (1, 0), (0, 0), (33, 7)]:
        result = engine.run(prepared, _plan(prepared, keep, max_new=2), RunHooks())
        dropped = sum(n - k for n, k in zip(prepared.visual_tokens, keep, strict=True))
        assert result.prefill_tokens == full.prefill_tokens - dropped
        assert result.visual_tokens_kept == sum(keep)
        assert result.visual_tokens_in == 128


def test_splice_places_selected_features_in_order(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    payload: Any = prepared.payload
    feats = prepared.features[0]
    kept = select_tokens(feats, 9, method="leverage")
    embeds = idefics3.adapter.splice(payload.input_ids, payload.positions, prepared.features, [kept])[0]
    first = int(payload.positions[0][0])
    assert embeds.shape[0] == prepared.input_tokens - (64 - 9)
    torch.testing.assert_close(embeds[first : first + 9], feats[kept])
    # The text around the image is the token embeddings of the prompt, untouched.
    with torch.inference_mode():
        text_embeds = idefics3.model.get_input_embeddings()(payload.input_ids)
    torch.testing.assert_close(embeds[:first], text_embeds[:first])
    torch.testing.assert_close(embeds[first + 9 :], text_embeds[first + 64 :])


def test_prepare_decomposes_each_image_once_for_leverage_selection(
    tiny_idefics3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The basis is computed in prepare (measured with the encode) and the run's leverage selection
    # reads it: the same tokens and the same answer as decomposing inside the run.
    from joulecap.kernels import selection

    with_basis = TransformersEngine(EngineConfig(model=str(tiny_idefics3), device="cpu"))
    without = TransformersEngine(EngineConfig(model=str(tiny_idefics3), device="cpu", leverage_basis=False))
    try:
        a, b = with_basis.prepare(_request(2)), without.prepare(_request(2))
        assert len(a.bases) == 2 and all(basis is not None for basis in a.bases) and b.bases == ()
        plan_a, plan_b = _plan(a, (9, 20), max_new=6), _plan(b, (9, 20), max_new=6)
        assert with_basis._keep_indices(a, plan_a)[0].tolist() == without._keep_indices(b, plan_b)[0].tolist()
        rb = without.run(b, plan_b, RunHooks())

        def no_decomposition(*_args: Any, **_kw: Any) -> Any:
            raise AssertionError("the run decomposed the features again")

        monkeypatch.setattr(selection, "exact_left_subspace", no_decomposition)
        monkeypatch.setattr(selection, "randomized_left_subspace", no_decomposition)
        ra = with_basis.run(a, plan_a, RunHooks())
        assert ra.token_ids == rb.token_ids and ra.prefill_tokens == rb.prefill_tokens
        with pytest.raises(AssertionError, match="decomposed"):
            without.run(b, plan_b, RunHooks())
    finally:
        with_basis.close()
        without.close()


def test_selection_method_changes_which_tokens_stay(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    runs = {
        m: idefics3.run(prepared, _plan(prepared, (8,), max_new=8, selection=m), RunHooks())
        for m in ("leverage", "uniform")
    }
    assert runs["leverage"].prefill_tokens == runs["uniform"].prefill_tokens
    lev = select_tokens(prepared.features[0], 8, method="leverage")
    uni = select_tokens(prepared.features[0], 8, method="uniform")
    if not torch.equal(lev, uni):  # different tokens kept -> a different LM input
        payload: Any = prepared.payload
        a = idefics3.adapter.splice(payload.input_ids, payload.positions, prepared.features, [lev])
        b = idefics3.adapter.splice(payload.input_ids, payload.positions, prepared.features, [uni])
        assert not torch.equal(a, b)


def test_bad_plan_is_rejected(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    with pytest.raises(ValueError, match="images"):
        idefics3.run(prepared, _plan(prepared, (64, 64)), RunHooks())
    with pytest.raises(ValueError, match="65 of 64"):
        idefics3.run(prepared, _plan(prepared, (65,)), RunHooks())


# ---------------------------------------------------------------------------------------- hooks & stops
def test_max_new_tokens_gives_length(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    result = idefics3.run(prepared, _plan(prepared, max_new=5), RunHooks())
    assert len(result.token_ids) == 5 and result.stop_reason == "length"
    times = result.times
    assert times.start_s <= times.first_token_s <= times.end_s


def test_stop_token_ends_generation(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    free = idefics3.run(prepared, _plan(prepared, max_new=12), RunHooks())
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    original = idefics3.stop_ids
    idefics3.stop_ids = frozenset({stop_id})  # pretend this id is EOS: generation must end on it
    try:
        result = idefics3.run(prepared, _plan(prepared, max_new=12), RunHooks())
    finally:
        idefics3.stop_ids = original
    assert result.stop_reason == "stop"
    assert result.token_ids == free.token_ids[: first + 1]


def test_real_stop_ids_include_eos_and_end_of_utterance(idefics3: TransformersEngine) -> None:
    tok = idefics3.tokenizer
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")} <= idefics3.stop_ids


def test_should_stop_is_called_between_tokens(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    calls: list[int] = []

    def should_stop(n: int) -> bool:
        calls.append(n)
        return n >= 3

    result = idefics3.run(prepared, _plan(prepared, max_new=10), RunHooks(should_stop=should_stop))
    assert result.stop_reason == "energy_budget"
    assert len(result.token_ids) == 3
    assert calls == [1, 2, 3]


def test_cancel_aborts_at_next_token(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    hooks = RunHooks()

    def on_token(token_id: int, delta: str) -> None:
        if token_id is not None:
            hooks.cancelled.set()

    hooks.on_token = on_token
    result = idefics3.run(prepared, _plan(prepared, max_new=10), hooks)
    assert result.stop_reason == "aborted"
    assert len(result.token_ids) == 2  # the token in flight when cancel arrived is the last

    pre = RunHooks()
    pre.cancelled.set()
    result = idefics3.run(prepared, _plan(prepared, max_new=10), pre)
    assert result.stop_reason == "aborted" and result.token_ids == ()


def test_streaming_deltas_concatenate_to_text(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    events: list[tuple[str, Any]] = []
    hooks = RunHooks(
        on_prefill_done=lambda t: events.append(("prefill", t)),
        on_token=lambda i, d: events.append(("token", (i, d))),
    )
    result = idefics3.run(prepared, _plan(prepared, max_new=16), hooks)
    assert events[0][0] == "prefill" and [e[0] for e in events[1:]] == ["token"] * 16
    assert events[0][1] == result.times.first_token_s
    assert [e[1][0] for e in events[1:]] == list(result.token_ids)
    assert "".join(e[1][1] for e in events[1:]) == result.text
    assert result.text == idefics3.tokenizer.decode(list(result.token_ids), skip_special_tokens=True)


def test_stream_detokenizer_never_splits_a_character(idefics3: TransformersEngine) -> None:
    text = "héllo wörld € 🙂 done"
    ids = idefics3.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # byte-level: multi-byte characters span several tokens
    detok = StreamDetokenizer(idefics3.tokenizer)
    deltas = [detok.push(i, final=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


# ---------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible(idefics3: TransformersEngine) -> None:
    def sample(seed: int, top_p: float = 1.0) -> tuple[int, ...]:
        req = _request(1, sampling=SamplingParams(temperature=1.5, top_p=top_p, seed=seed))
        prepared = idefics3.prepare(req)
        return idefics3.run(prepared, _plan(prepared, max_new=12), RunHooks()).token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    prepared = idefics3.prepare(_request(1))
    greedy = idefics3.run(prepared, _plan(prepared, max_new=12), RunHooks()).token_ids
    assert greedy != sample(7)
    # top_p so small that only the most likely token survives: sampling degenerates to greedy.
    assert sample(7, top_p=1e-9) == greedy


# ---------------------------------------------------------------------------------------- prompts
def test_prompt_longer_than_context_is_invalid(idefics3: TransformersEngine) -> None:
    words = " ".join(["hello"] * (idefics3.info.context_length + 10))
    with pytest.raises(InvalidRequest, match="context") as info:
        idefics3.prepare(_request(1, text=words))
    assert info.value.http_status == 400


def test_prompt_that_just_fits_is_accepted(idefics3: TransformersEngine) -> None:
    base = idefics3.prepare(_request(1, text=""))
    room = idefics3.info.context_length - base.input_tokens - 1
    prepared = idefics3.prepare(_request(1, text="a" * room))  # byte-level: one token per 'a'
    assert prepared.input_tokens + 1 == idefics3.info.context_length
    result = idefics3.run(prepared, _plan(prepared, max_new=50), RunHooks())
    assert len(result.token_ids) == 1 and result.stop_reason in ("length", "stop")
    with pytest.raises(InvalidRequest, match="context"):
        idefics3.prepare(_request(1, text="a" * (room + 1)))


def test_reserved_image_token_in_text_is_invalid(idefics3: TransformersEngine) -> None:
    with pytest.raises(InvalidRequest, match="reserved"):
        idefics3.prepare(_request(1, text="look <image> here"))


def test_brevity_hint_becomes_a_system_message(idefics3: TransformersEngine) -> None:
    prepared = idefics3.prepare(_request(1))
    hint = "Answer in at most five words."
    plain = idefics3.run(prepared, _plan(prepared, max_new=3), RunHooks())
    hinted = idefics3.run(prepared, _plan(prepared, (20,), max_new=3, brevity_hint=hint), RunHooks())
    system = "System: " + hint + "<end_of_utterance>\n"
    extra = len(idefics3.tokenizer.encode(system, add_special_tokens=False))
    assert hinted.prefill_tokens == plain.prefill_tokens + extra - (64 - 20)
    # The reserve that plans pay for covers every wording the policies produce.
    for n in (1, 3, 7, 30, 200, 5000):
        ran = idefics3.run(prepared, _plan(prepared, max_new=1, brevity_hint=brevity_hint(n)), RunHooks())
        assert 0 < ran.prefill_tokens - plain.prefill_tokens <= prepared.hint_tokens


def test_multi_turn_with_assistant_message(llava: TransformersEngine) -> None:
    req = Request(
        "chatcmpl-mt",
        (
            ChatMessage("system", (TextPart("Be brief."),)),
            ChatMessage("user", (ImagePart(0), TextPart("Colour?"))),
            ChatMessage("assistant", (TextPart("Red."),)),
            ChatMessage("user", (TextPart("Sure?"),)),
        ),
        images=IMAGES[:1],
    )
    prepared = llava.prepare(req)
    assert prepared.visual_tokens == (64,)
    result = llava.run(prepared, _plan(prepared, max_new=8), RunHooks())
    assert list(result.token_ids) == _hf_generate(llava, req, 8)


# ---------------------------------------------------------------------------------------- loading & info
def test_engine_info(idefics3: TransformersEngine, llava: TransformersEngine, tiny_idefics3: Path) -> None:
    assert isinstance(idefics3, Engine)
    info = idefics3.info
    assert (info.engine, info.family, info.device, info.dtype) == (
        "transformers",
        "idefics3",
        "cpu",
        "float32",
    )
    assert info.random_weights is True
    assert info.model == tiny_idefics3.name and Path(info.model_path) == tiny_idefics3.resolve()
    assert info.params_b == pytest.approx(sum(p.numel() for p in idefics3.model.parameters()) / 1e9)
    assert 0 < info.params_b < 0.01
    assert llava.info.family == "llava"
    assert TransformersEngine.max_concurrency == 1


def test_served_model_name_and_dtype(tiny_llava: Path) -> None:
    engine = create_engine(
        EngineConfig(model=str(tiny_llava), served_model_name="robot-eyes", dtype="bfloat16")
    )
    try:
        assert engine.info.model == "robot-eyes" and engine.info.dtype == "bfloat16"
        req = _request(1)
        prepared = engine.prepare(req)
        assert prepared.features[0].dtype == torch.bfloat16
        assert isinstance(engine, TransformersEngine)
        full = engine.run(prepared, _plan(prepared, max_new=8), RunHooks())
        assert list(full.token_ids) == _hf_generate(engine, req, 8)  # parity holds in bfloat16 too
        result = engine.run(prepared, _plan(prepared, (16,), max_new=4), RunHooks())
        assert len(result.token_ids) == 4
    finally:
        engine.close()


def test_hub_id_offline_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from joulecap.runtime.engines.factory import ModelLoadError

    # HF_HUB_OFFLINE is read when huggingface_hub is imported; set both the variable and the constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        create_engine(EngineConfig(model="joulecap-tests/no-such-model-anywhere"))
    message = str(info.value)
    assert "--model /local/dir" in message and "joulecap make-tiny-model" in message


def test_missing_local_dir_fails_with_the_fix(tmp_path: Path) -> None:
    from joulecap.runtime.engines.transformers_engine import ModelLoadError

    with pytest.raises(ModelLoadError, match="make-tiny-model"):
        TransformersEngine(EngineConfig(model=str(tmp_path / "nope")))


def test_factory_registry_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_class("transformers") is TransformersEngine
    with pytest.raises(ValueError, match="Unknown engine"):
        engine_class("tensorrt")
    monkeypatch.setenv("JOULECAP_CACHE_DIR", str(tmp_path / "env-cache"))
    paths = Paths.resolve(PathsConfig())
    assert paths.cache_dir == tmp_path / "env-cache"
    assert paths.ledger_path == str(tmp_path / "env-cache" / "ledger.sqlite3")
    assert paths.profile_dir == tmp_path / "env-cache" / "profiles"
    assert Paths.resolve(PathsConfig(cache_dir=str(tmp_path / "c"))).cache_dir == tmp_path / "c"
    monkeypatch.delenv("JOULECAP_CACHE_DIR")
    assert Paths.resolve(PathsConfig()).cache_dir == Path("~/.cache/joulecap").expanduser()
    assert Paths.resolve(PathsConfig(ledger_path=":memory:")).ledger_path == ":memory:"


def test_no_model_serves_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import joulecap.runtime.tiny_models as tiny

    monkeypatch.setattr(tiny, "PACKAGED_DEMO", tmp_path / "not-packaged")
    engine = create_engine(EngineConfig(), tmp_path / "cache")
    try:
        assert engine.info.model == "demo-idefics3" and engine.info.random_weights
        assert Path(engine.info.model_path) == (tmp_path / "cache" / "demo-idefics3").resolve()
    finally:
        engine.close()


@pytest.fixture(scope="module")
def idefics3_split(
    tiny_idefics3: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TransformersEngine]:
    """The tiny Idefics3 with SmolVLM's image splitting on: tiles plus a global image per image."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("split") / "tiny-idefics3-split"
    shutil.copytree(tiny_idefics3, path)
    cfg_path = path / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"].update(do_image_splitting=True, size={"longest_edge": 256})
    cfg_path.write_text(json.dumps(cfg))
    engine = TransformersEngine(EngineConfig(model=str(path), device="cpu"))
    yield engine
    engine.close()


def test_image_splitting_assigns_tiles_to_theirmarked_image(idefics3_split: TransformersEngine) -> None:
    req = Request(
        "chatcmpl-split",
        (ChatMessage("user", (ImagePart(0), TextPart("and"), ImagePart(1), TextPart("?"))),),
        images=(marked_image((200, 30, 30), (200, 150)), marked_image((20, 40, 220), (200, 60))),
    )
    prepared = idefics3_split.prepare(req)
    # Longest edge to 256, then up to multiples of 128: 200x150 -> 2x2 tiles + global image,
    # 200x60 -> 1x2 tiles + global image; 64 tokens per tile.
    assert prepared.visual_tokens == (5 * 64, 3 * 64)
    result = idefics3_split.run(prepared, _plan(prepared, max_new=10), RunHooks())
    assert list(result.token_ids) == _hf_generate(idefics3_split, req, 10)
    pruned = idefics3_split.run(prepared, _plan(prepared, (40, 3), max_new=2), RunHooks())
    assert pruned.prefill_tokens == result.prefill_tokens - (320 - 40) - (192 - 3)


def test_missing_image_reference_is_invalid(idefics3: TransformersEngine) -> None:
    req = Request("chatcmpl-x", (ChatMessage("user", (ImagePart(1), TextPart("?"))),), images=IMAGES[:1])
    with pytest.raises(InvalidRequest, match="image"):
        idefics3.prepare(req)


def test_brevity_hint_is_dropped_when_it_would_not_fit(idefics3: TransformersEngine) -> None:
    base = idefics3.prepare(_request(1, text=""))
    room = idefics3.info.context_length - base.input_tokens - 3
    prepared = idefics3.prepare(_request(1, text="a" * room))
    plan = _plan(prepared, max_new=2, brevity_hint="Answer in one word.")
    result = idefics3.run(prepared, plan, RunHooks())
    assert result.prefill_tokens == prepared.input_tokens


def test_concurrent_callers_are_serialised_safely(idefics3: TransformersEngine) -> None:
    import concurrent.futures

    def job(i: int) -> tuple[int, ...]:
        prepared = idefics3.prepare(_request(1 + i % 2, text=f"question {i}"))
        return idefics3.run(prepared, _plan(prepared, max_new=4), RunHooks()).token_ids

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(job, range(6)))
    assert results == [job(i) for i in range(6)]


@pytest.mark.parametrize("family", ["idefics3", "llava"])
def test_pruned_run_matches_generate_on_the_same_embeddings(family: str, request: Any) -> None:
    """With tokens dropped, the decode loop equals `generate(inputs_embeds=...)` on the spliced input."""
    engine: TransformersEngine = request.getfixturevalue(family)
    prepared = engine.prepare(_request(2))
    keep = (10, 3)
    result = engine.run(prepared, _plan(prepared, keep, max_new=12), RunHooks())
    payload: Any = prepared.payload
    kept = [select_tokens(f, k) for f, k in zip(prepared.features, keep, strict=True)]
    embeds = engine.adapter.splice(payload.input_ids, payload.positions, prepared.features, kept)
    assert embeds.shape[1] == result.prefill_tokens
    with torch.inference_mode():
        out = engine.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
        )
    assert list(result.token_ids) == [int(t) for t in out[0]]
