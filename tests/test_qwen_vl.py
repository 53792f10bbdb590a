"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL on tiny real models: parity, M-RoPE pruning, serving.

(a) every token kept: joulecap's greedy tokens equal `model.generate`'s; (b) pruned: they equal an
independent reference written here (the model's own forward on the pruned ids with the gathered
3-D positions, its own decode-time `rope_deltas` offset, step by step) and the prompt is shorter;
(c) two images of different sizes; (d) E-AdaPrune budgets per image; serving with `joint` over
HTTP; bad images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
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

from joulecap.kernels import select_tokens
from joulecap.runtime.engines.adapters import cache_kwarg, get_adapter, keep_mask, output_cache
from joulecap.runtime.engines.base import RunHooks
from joulecap.runtime.engines.transformers_engine import TransformersEngine
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.types import ChatMessage, ImagePart, Plan, Request, TextPart

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# Two images of different sizes and aspect ratios: different merged grids (e.g. 6x8 and 7x4).
IMAGES = (marked_image((200, 30, 30), (224, 168)), marked_image((20, 40, 220), (112, 196)))


@pytest.fixture(scope="module", params=ARCHS)
def engine(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersEngine]:
    yield from family_engine(request.param, tmp_path_factory.mktemp("models"))


def _request(n_images: int = 2, text: str = "What is in the picture?") -> Request:
    return images_request(IMAGES, n_images, text)


# ---------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("n_images", [0, 2])
def test_all_tokens_kept_matches_generate(engine: TransformersEngine, n_images: int) -> None:
    req = _request(n_images)
    prepared = engine.prepare(req)
    result = engine.run(prepared, plain_plan(prepared, max_new=12), RunHooks())
    inputs = processor_inputs(engine.processor, req)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert list(result.token_ids) == [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]
    assert result.prefill_tokens == inputs["input_ids"].shape[1]


def test_images_of_different_sizes_get_their_own_grids(engine: TransformersEngine) -> None:
    prepared = engine.prepare(_request(2))
    grids = processor_inputs(engine.processor, _request(2))["image_grid_thw"]
    merge = engine.processor.image_processor.merge_size
    assert grids[0].tolist() != grids[1].tolist()
    assert list(prepared.visual_tokens) == [int(g.prod()) // merge**2 for g in grids]


# ---------------------------------------------------------------------------------------- (b)
def _reference_pruned(
    engine: TransformersEngine, request: Request, kept: list[torch.Tensor], n_tokens: int
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tokens of the model's own forward on the pruned prompt, one step at a time.

    Returns the tokens, the first step's logits, the first step's logits with the pruned prompt
    renumbered 1-D (what embeddings without positions would get), for contrast, and the gathered
    `[3, 1, L_kept]` positions.
    """
    model = engine.model
    inputs = processor_inputs(engine.processor, request)
    ids, grid = inputs["input_ids"][0], inputs["image_grid_thw"]
    with torch.inference_mode():
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid
        )
        encoded = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=grid)
    placeholders = (ids == model.config.image_token_id).nonzero().flatten()
    merge = engine.processor.image_processor.merge_size
    stay = torch.ones_like(ids, dtype=torch.bool)
    for pos, k in zip(placeholders.split((grid.prod(-1) // merge**2).tolist()), kept, strict=True):
        dropped = torch.ones(pos.numel(), dtype=torch.bool)
        dropped[k] = False
        stay[pos[dropped]] = False
    pruned = copy.copy(encoded)
    pruned.pooler_output = tuple(f[k] for f, k in zip(encoded.pooler_output, kept, strict=True))
    if getattr(encoded, "deepstack_features", None) is not None:
        pruned.deepstack_features = [
            tuple(f[k] for f, k in zip(layer, kept, strict=True)) for layer in encoded.deepstack_features
        ]
    kept_ids, kept_positions = ids[stay].unsqueeze(0), positions[:, :, stay]
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(
            input_ids=kept_ids,
            position_ids=kept_positions,
            mm_encoder_outputs={"image": pruned},
            use_cache=True,
        )
        first_logits = out.logits[0, -1]
        flat = model(input_ids=kept_ids, mm_encoder_outputs={"image": copy.copy(pruned)}).logits[0, -1]
        # The model's own continuation: it offsets each new 1-D position by `rope_deltas`.
        model.model.rope_deltas = (kept_positions.max() + 1 - kept_ids.shape[1]).view(1, 1)
        cache = output_cache(out)
        for _ in range(n_tokens):
            token = int(out.logits[0, -1].float().argmax())
            tokens.append(token)
            out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_kwarg(model): cache})
            cache = output_cache(out)
        model.model.rope_deltas = None
    return tokens, first_logits, flat, kept_positions


def test_pruned_run_matches_the_model_with_gathered_positions(engine: TransformersEngine) -> None:
    req = _request(2)
    prepared = engine.prepare(req)
    keep = tuple(max(1, n // 3) for n in prepared.visual_tokens)
    result = engine.run(prepared, plain_plan(prepared, keep, max_new=10), RunHooks())
    kept = [select_tokens(f, k) for f, k in zip(prepared.features, keep, strict=True)]
    assert all(int(k.max()) > k.numel() for k in kept)  # tokens beyond the first rows are kept
    tokens, logits, flat_logits, positions = _reference_pruned(engine, req, kept, len(result.token_ids))
    assert list(result.token_ids) == tokens
    # The adapter hands the model exactly these positions, then continues from rope_deltas.
    payload: Any = prepared.payload
    ids = payload.input_ids
    extra = engine.adapter.lm_inputs(
        ids, keep_mask(ids.shape[0], payload.positions, kept), payload.image_inputs, payload.extras
    )
    assert torch.equal(extra.prefill["position_ids"], positions)
    n_kept = positions.shape[-1]
    assert extra.step(n_kept + 4)["position_ids"].flatten().tolist() == [int(positions.max()) + 5] * 3
    assert result.prefill_tokens == prepared.input_tokens - sum(prepared.visual_tokens) + sum(keep)
    assert result.prefill_tokens < prepared.input_tokens
    # The positions matter: the same pruned prompt numbered 1-D predicts something else.
    assert not torch.allclose(logits, flat_logits, atol=1e-4)


def test_pruning_every_visual_token_still_answers(engine: TransformersEngine) -> None:
    prepared = engine.prepare(_request(2))
    result = engine.run(prepared, plain_plan(prepared, (0, 0), max_new=4), RunHooks())
    assert result.visual_tokens_kept == 0
    assert result.prefill_tokens == prepared.text_tokens
    assert 0 < len(result.token_ids) <= 4


def test_brevity_hint_keeps_positions_consistent(engine: TransformersEngine) -> None:
    """A re-tokenised (hinted) prompt gets its own M-RoPE positions; all-kept equals generate."""
    req = _request(1)
    prepared = engine.prepare(req)
    plan = Plan(
        visual_keep=prepared.visual_tokens,
        max_new_tokens=8,
        predicted_j=1.0,
        policy="test",
        reason="test",
        brevity_hint="Answer in at most 8 words.",
    )
    result = engine.run(prepared, plan, RunHooks())
    hinted = Request(
        "chatcmpl-test",
        (ChatMessage("system", (TextPart("Answer in at most 8 words."),)), *req.messages),
        images=req.images,
    )
    inputs = processor_inputs(engine.processor, hinted)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert list(result.token_ids) == [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


# ---------------------------------------------------------------------------------------- bad input
def test_one_pixel_image_runs(engine: TransformersEngine) -> None:
    req = Request(
        "chatcmpl-test",
        (ChatMessage("user", (ImagePart(0), TextPart("?"))),),
        images=(Image.new("RGB", (1, 1), (9, 9, 9)),),
    )
    prepared = engine.prepare(req)
    assert prepared.visual_tokens[0] >= 1  # resized up to the minimum pixels
    keep = (max(1, prepared.visual_tokens[0] // 2),)
    result = engine.run(prepared, plain_plan(prepared, keep, max_new=3), RunHooks())
    assert result.visual_tokens_kept == keep[0]


def test_extreme_aspect_ratio_is_an_invalid_request(engine: TransformersEngine) -> None:
    req = Request(
        "chatcmpl-test",
        (ChatMessage("user", (ImagePart(0), TextPart("?"))),),
        images=(Image.new("RGB", (1, 4000), (9, 9, 9)),),
    )
    with pytest.raises(InvalidRequest, match="aspect ratio"):
        engine.prepare(req)


def test_context_is_checked_on_the_unpruned_prompt(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images that fit only after pruning are refused before the vision tower runs; pruning never
    makes a prompt that fits stop fitting."""
    full = int(processor_inputs(engine.processor, _request(2))["input_ids"].shape[1])
    monkeypatch.setattr(engine, "info", replace(engine.info, context_length=full))  # full + 1 > context
    with pytest.raises(InvalidRequest) as info:
        engine.prepare(_request(2))
    assert info.value.code == "context_length_exceeded"
    monkeypatch.setattr(engine, "info", replace(engine.info, context_length=full + 2))
    prepared = engine.prepare(_request(2))
    for keep in (prepared.visual_tokens, (1, 1)):
        result = engine.run(prepared, plain_plan(prepared, keep, max_new=8), RunHooks())
        assert result.prefill_tokens + len(result.token_ids) <= full + 2


def test_reserved_vision_tokens_in_text_are_invalid(engine: TransformersEngine) -> None:
    for token in ("<|image_pad|>", "<|vision_start|>", "<|video_pad|>"):
        with pytest.raises(InvalidRequest, match="reserved"):
            engine.prepare(_request(0, f"look {token} here"))


def test_unknown_model_type_lists_the_supported_ones() -> None:
    model = SimpleNamespace(config=SimpleNamespace(model_type="paligemma"))
    with pytest.raises(ValueError, match="paligemma") as info:
        get_adapter(model, SimpleNamespace(tokenizer=None))
    for name in ARCHS:
        assert name in str(info.value)


# ---------------------------------------------------------------------------------------- (d), serving
@pytest.fixture(scope="module")
def runtime(engine: TransformersEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from family_runtime(Path(engine.config.model or ""), tmp_path_factory.mktemp("rt"))


def test_eadaprune_budgets_each_image(runtime: Any) -> None:
    check_eadaprune_budgets_each_image(runtime, IMAGES)


def test_every_policy_runs(runtime: Any) -> None:
    from joulecap.policies import available_policies

    for policy in available_policies():
        result = runtime.chat(
            "What is in the picture?", list(IMAGES), policy=policy, max_tokens=3, energy_budget_j=50.0
        )
        generation = result.generation
        assert result.plan.policy == policy
        assert 0 < generation.visual_tokens_kept <= generation.visual_tokens_in, policy
        assert 0 < len(generation.token_ids) <= 3, policy


def test_serves_joint_over_http(runtime: Any, png: Any) -> None:
    for client in served(runtime):
        check_serves_joint_over_http(
            client, [png(size=(224, 168)), png(size=(112, 196), color=(20, 40, 220))]
        )
        bad = [
            {"type": "image_url", "image_url": {"url": png(size=(1, 4000))}},
            {"type": "text", "text": "?"},
        ]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": bad}], max_tokens=2
            )
