"""Checks every model family's serving tests share (eadaprune budgets, `joint` over HTTP)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import openai
from _factories import make_config
from PIL import Image

from joulecap.kernels import spectral_budget
from joulecap.runtime.types import ChatMessage, ImagePart, Plan, PreparedRequest, Request, TextPart


def plain_plan(prepared: PreparedRequest, keep: tuple[int, ...] | None = None, max_new: int = 10) -> Plan:
    """A plan keeping `keep` visual tokens per image (default all) and `max_new` output tokens."""
    keep = prepared.visual_tokens if keep is None else keep
    return Plan(visual_keep=keep, max_new_tokens=max_new, predicted_j=1.0, policy="test", reason="test")


def processor_inputs(processor: Any, request: Request) -> Any:
    """The model's own processor on the request, through its chat template (the reference input)."""
    messages = [
        {
            "role": m.role,
            "content": [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                for p in m.parts
            ],
        }
        for m in request.messages
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=list(request.images) or None, return_tensors="pt")


def family_engine(arch: str, work: Path) -> Iterator[Any]:
    """A transformers engine over the tiny `arch` model, built under `work` (seed 0)."""
    from joulecap.runtime.engines.config import EngineConfig
    from joulecap.runtime.engines.transformers_engine import TransformersEngine
    from joulecap.runtime.tiny_models import build_tiny_model

    path = build_tiny_model(arch, work / arch, seed=0)
    eng = TransformersEngine(EngineConfig(model=str(path), device="cpu"))
    yield eng
    eng.close()


def images_request(
    pool: Sequence[Image.Image], n_images: int = 2, text: str = "What is in the picture?", **kw: Any
) -> Request:
    """One user message: `n_images` image parts, then `text`.

    The images are the first `n_images` of `pool` unless `kw` names `images`; `kw` holds any other
    `Request` fields.
    """
    parts: tuple[TextPart | ImagePart, ...] = (*(ImagePart(i) for i in range(n_images)), TextPart(text))
    images = kw.pop("images", tuple(pool[:n_images]))
    return Request("chatcmpl-test", (ChatMessage("user", parts),), images=images, **kw)


def family_runtime(model_dir: Path, work: Path) -> Iterator[Any]:
    """A runtime over a tiny family model (k_min 4, so that tiny images prune)."""
    from joulecap.runtime.runtime import Runtime

    rt = Runtime(make_config(model_dir, work, scheduler={"k_min": 4}))
    yield rt
    rt.close()


def check_eadaprune_budgets_each_image(runtime: Any, images: Sequence[Image.Image]) -> None:
    """Each image keeps its own spectral budget, and the LM prompt shrinks by what was dropped."""
    request = runtime.build_request("What is in the picture?", list(images), policy="eadaprune", max_tokens=4)
    prepared, plan = runtime.plan(request)
    cfg = runtime.config.scheduler
    want = tuple(
        min(n, int(spectral_budget(f, cfg.tau, k_min=cfg.k_min)))
        for n, f in zip(prepared.visual_tokens, prepared.features, strict=True)
    )
    assert plan.visual_keep == want
    assert any(k < n for k, n in zip(want, prepared.visual_tokens, strict=True))  # it prunes here
    result = runtime.chat("What is in the picture?", list(images), policy="eadaprune", max_tokens=4)
    assert result.generation.visual_tokens_kept == sum(want)
    assert result.generation.prefill_tokens == prepared.input_tokens - sum(prepared.visual_tokens) + sum(want)


def check_serves_joint_over_http(client: openai.OpenAI, image_urls: Sequence[str]) -> None:
    """`joint` through the openai client on a real server prunes, and reports it."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content.append({"type": "text", "text": "What colour are the squares?"})
    raw = client.chat.completions.with_raw_response.create(
        model="default",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        max_tokens=6,
        extra_headers={"X-Energy-Budget-J": "500"},
        extra_body={"policy": "joint"},
    )
    body = raw.parse()
    assert body.usage is not None and 1 <= body.usage.completion_tokens <= 6
    energy = raw.http_response.json()["usage"]["energy"]
    assert energy["policy"] == "joint" and energy["budget_exceeded"] is False
    assert 0 < energy["visual_tokens_kept"] < energy["visual_tokens_in"]


def served(runtime: Any) -> Iterator[openai.OpenAI]:
    """An openai client on a real server over `runtime` (closed when the generator ends)."""
    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.api.server import BackgroundServer

    with BackgroundServer(create_app(runtime)) as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
