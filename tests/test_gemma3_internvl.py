"""Gemma-3 and InternVL3 on tiny real models: parity, pruning against a reference, serving.

(a) every token kept: joulecap's greedy tokens equal `model.generate`'s; (b) pruned: they equal an
independent reference written here (the model's own forward on the pruned ids, with the kept
features handed to its own merge step and, for Gemma-3, the processor's token types gathered at the
kept tokens, then decoded step by step) and the prompt is shorter; (c) two images of different
sizes; (d) E-AdaPrune budgets per image; serving with `joint` over HTTP; odd images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _factories import marked_image
from _family import (
    check_eadaprune_budgets_each_image,
    check_serves_joint_over_http,
    family_engine,
    family_runtime,
    images_request,
    plain_plan,
    processor_inputs,
    served,
)
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from joulecap.kernels import select_tokens
from joulecap.runtime.engines.adapters import cache_kwarg, keep_mask, output_cache
from joulecap.runtime.engines.base import RunHooks
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.engines.transformers_engine import TransformersEngine
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.tiny_models import build_tiny_model
from joulecap.runtime.types import Request

ARCHS = ["gemma3", "internvl"]
# Different sizes and aspect ratios: the same 256 tokens each for Gemma-3, different tile counts
# for InternVL (one 64 px tile; a 1x2 grid of tiles plus the thumbnail).
IMAGES = (marked_image((200, 30, 30), (64, 64)), marked_image((20, 40, 220), (64, 120)))


@pytest.fixture(scope="module", params=ARCHS)
def engine(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersEngine]:
    yield from family_engine(request.param, tmp_path_factory.mktemp("models"))


def _request(n_images: int = 2, text: str = "What is in the picture?", **kw: Any) -> Request:
    return images_request(IMAGES, n_images, text, **kw)


# ---------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_all_tokens_kept_matches_generate(engine: TransformersEngine, n_images: int) -> None:
    req = _request(n_images)
    prepared = engine.prepare(req)
    result = engine.run(prepared, plain_plan(prepared, max_new=12), RunHooks())
    inputs = processor_inputs(engine.processor, req)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert list(result.token_ids) == [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]
    assert result.prefill_tokens == inputs["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------- (c)
def _image_spans(engine: TransformersEngine, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each image's placeholder positions, found here from the family's own markers."""
    image_id = engine.model.config.image_token_id
    if engine.info.family == "gemma3":  # one contiguous run of soft tokens per image
        pos = (ids == image_id).nonzero().flatten()
        breaks = (torch.diff(pos) > 1).nonzero().flatten() + 1
        return list(torch.tensor_split(pos, breaks.tolist()))
    tok = engine.tokenizer  # InternVL: between <img> and </img>
    starts = (ids == tok.start_image_token_id).nonzero().flatten().tolist()
    ends = (ids == tok.end_image_token_id).nonzero().flatten().tolist()
    return [torch.arange(s + 1, e) for s, e in zip(starts, ends, strict=True)]


def test_images_of_different_sizes_keep_their_own_tokens(engine: TransformersEngine) -> None:
    prepared = engine.prepare(_request(2))
    inputs = processor_inputs(engine.processor, _request(2))
    spans = _image_spans(engine, inputs["input_ids"][0])
    assert list(prepared.visual_tokens) == [s.numel() for s in spans]
    payload: Any = prepared.payload
    assert [p.tolist() for p in payload.positions] == [s.tolist() for s in spans]
    if engine.info.family == "gemma3":
        assert prepared.visual_tokens == (256, 256)  # Gemma-3's fixed 256 per image, whatever its size
    else:
        per_tile = engine.processor.image_seq_length
        tiles = [n // per_tile for n in prepared.visual_tokens]
        image_processor = engine.processor.image_processor
        assert tiles == [
            image_processor.get_number_of_image_patches(im.height, im.width, {}) for im in IMAGES
        ]
        assert tiles == [1, 3]  # one tile; two tiles plus the thumbnail
        assert inputs["pixel_values"].shape[0] == sum(tiles)


# ---------------------------------------------------------------------------------------- (b)
def _image_features(engine: TransformersEngine, inputs: Any) -> list[torch.Tensor]:
    """Per image, the model's own post-projector features for the processor's pixels."""
    model, ids = engine.model, inputs["input_ids"][0]
    with torch.inference_mode():
        if engine.info.family == "gemma3":
            pooled = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            return list(pooled)
        cfg = model.config
        pooled = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
    flat = pooled.reshape(-1, pooled.shape[-1])
    return list(flat.split([s.numel() for s in _image_spans(engine, ids)]))


def _reference_pruned(
    engine: TransformersEngine,
    request: Request,
    keep: tuple[int, ...],
    n_tokens: int,
    token_types: bool = True,
) -> tuple[list[int], torch.Tensor, int]:
    """Greedy tokens of the model's own forward on the pruned prompt, one step at a time.

    Returns the tokens, the prefill's last logits and the pruned prompt length.
    """
    model = engine.model
    inputs = processor_inputs(engine.processor, request)
    ids = inputs["input_ids"][0]
    features = _image_features(engine, inputs)
    stay = torch.ones_like(ids, dtype=torch.bool)
    kept_features = []
    for span, feats, k in zip(_image_spans(engine, ids), features, keep, strict=True):
        kept = select_tokens(feats, k)
        dropped = torch.ones(span.numel(), dtype=torch.bool)
        dropped[kept] = False
        stay[span[dropped]] = False
        kept_features.append(feats[kept])
    pruned_ids = ids[stay].unsqueeze(0)
    kwargs: dict[str, Any] = {}
    if engine.info.family == "gemma3" and token_types:
        kwargs["token_type_ids"] = inputs["token_type_ids"][:, stay]  # the processor's own types
    image = BaseModelOutputWithPooling(pooler_output=torch.cat(kept_features).unsqueeze(0))
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=pruned_ids, mm_encoder_outputs={"image": image}, use_cache=True, **kwargs)
        first = out.logits[0, -1]
        cache = output_cache(out)
        for _ in range(n_tokens):
            token = int(out.logits[0, -1].float().argmax())
            tokens.append(token)
            out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_kwarg(model): cache})
            cache = output_cache(out)
    return tokens, first, int(pruned_ids.shape[1])


def test_pruned_run_matches_the_models_own_forward(engine: TransformersEngine) -> None:
    req = _request(2)
    prepared = engine.prepare(req)
    keep = tuple(max(1, n // 3) for n in prepared.visual_tokens)
    result = engine.run(prepared, plain_plan(prepared, keep, max_new=10), RunHooks())
    tokens, logits, length = _reference_pruned(engine, req, keep, len(result.token_ids))
    assert list(result.token_ids) == tokens
    assert result.prefill_tokens == length == prepared.input_tokens - sum(prepared.visual_tokens) + sum(keep)
    assert result.prefill_tokens < prepared.input_tokens
    # The engine's own prefill (splice + family inputs) gives the reference's logits.
    payload: Any = prepared.payload
    kept = [select_tokens(f, k) for f, k in zip(prepared.features, keep, strict=True)]
    ids = payload.input_ids
    embeds = engine.adapter.splice(ids, payload.positions, prepared.features, kept)
    extra = engine.adapter.lm_inputs(
        ids, keep_mask(ids.shape[0], payload.positions, kept), payload.image_inputs, payload.extras
    )
    with torch.inference_mode():
        mine = engine.adapter.forward(inputs_embeds=embeds, **extra.prefill).logits[0, -1]
    torch.testing.assert_close(mine, logits, rtol=1e-4, atol=1e-4)


def test_gemma3_pruned_image_tokens_stay_one_bidirectional_block(tmp_path: Path) -> None:
    eng = TransformersEngine(
        EngineConfig(model=str(build_tiny_model("gemma3", tmp_path / "g3", seed=1)), device="cpu")
    )
    try:
        req = _request(2)
        prepared = eng.prepare(req)
        keep = (40, 7)
        payload: Any = prepared.payload
        kept = [select_tokens(f, k) for f, k in zip(prepared.features, keep, strict=True)]
        ids = payload.input_ids
        types = eng.adapter.lm_inputs(ids, keep_mask(ids.shape[0], payload.positions, kept), {}, None)
        token_types = types.prefill["token_type_ids"][0]
        # Two runs of 1s (one per image), of the kept sizes, each contiguous.
        runs = torch.diff(torch.cat([torch.tensor([0]), token_types, torch.tensor([0])])).tolist()
        assert runs.count(1) == runs.count(-1) == 2
        assert int(token_types.sum()) == sum(keep)
        # The token types matter: without them the same pruned prompt predicts something else.
        _, with_types, _ = _reference_pruned(eng, req, keep, 0)
        _, without, _ = _reference_pruned(eng, req, keep, 0, token_types=False)
        assert not torch.allclose(with_types, without, atol=1e-4)
    finally:
        eng.close()


def test_pruning_every_visual_token_still_answers(engine: TransformersEngine) -> None:
    prepared = engine.prepare(_request(2))
    result = engine.run(prepared, plain_plan(prepared, (0, 0), max_new=4), RunHooks())
    assert result.visual_tokens_kept == 0
    assert result.prefill_tokens == prepared.text_tokens
    assert 0 < len(result.token_ids) <= 4


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("size", [(1, 1), (1, 4000)])
def test_odd_images_run(engine: TransformersEngine, size: tuple[int, int]) -> None:
    prepared = engine.prepare(_request(1, images=(Image.new("RGB", size, (9, 9, 9)),)))
    per_block = 256 if engine.info.family == "gemma3" else engine.processor.image_seq_length
    assert prepared.visual_tokens[0] % per_block == 0 and prepared.visual_tokens[0] >= per_block
    keep = (max(1, prepared.visual_tokens[0] // 4),)
    result = engine.run(prepared, plain_plan(prepared, keep, max_new=3), RunHooks())
    assert result.visual_tokens_kept == keep[0]


def test_reserved_image_tokens_in_text_are_invalid(engine: TransformersEngine) -> None:
    tokens = (
        ("<image_soft_token>", "<start_of_image>", "<end_of_image>")
        if engine.info.family == "gemma3"
        else ("<IMG_CONTEXT>", "<img>", "</img>")
    )
    for token in tokens:
        with pytest.raises(InvalidRequest, match="reserved"):
            engine.prepare(_request(0, f"look {token} here"))


def test_end_of_turn_stops(engine: TransformersEngine) -> None:
    end = "<end_of_turn>" if engine.info.family == "gemma3" else "<|im_end|>"
    assert engine.tokenizer.convert_tokens_to_ids(end) in engine.stop_ids


def test_vllm_refuses_gemma3_images_but_not_internvl() -> None:
    """Prompt embeddings would run Gemma-3's image block causally on vLLM: refused, not silent."""
    from joulecap.runtime.engines.vllm_families import check_prunable

    with pytest.raises(InvalidRequest, match="bidirectionally"):
        check_prunable("gemma3", (256,), (256,))
    check_prunable("gemma3", (), ())  # text only goes in as token ids
    check_prunable("internvl", (64, 192), (10, 20))  # 1-D positions: prunes exactly


# ---------------------------------------------------------------------------------------- (d), serving
@pytest.fixture(scope="module")
def runtime(engine: TransformersEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from family_runtime(Path(engine.config.model or ""), tmp_path_factory.mktemp("rt"))


def test_eadaprune_budgets_each_image(runtime: Any) -> None:
    check_eadaprune_budgets_each_image(runtime, IMAGES)


def test_serves_joint_over_http(runtime: Any, png: Any) -> None:
    for client in served(runtime):
        check_serves_joint_over_http(client, [png(size=(64, 64)), png(size=(64, 120), color=(20, 40, 220))])
