"""Building and validating a `Request`: the one place, for HTTP and in-process callers alike.

The HTTP schema (`runtime/api/schema.py`) checks the JSON's shape and hands plain
OpenAI-style messages here; `Runtime.build_request` hands a prompt with images, or messages.
Every value is checked once, here, against `RequestLimits`; the scheduler and the policies trust
what they are given. Nothing here knows about HTTP.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from joulecap.runtime.errors import InvalidRequest, PayloadTooLarge
from joulecap.runtime.images import ImagePolicy, decode_image_bytes, load_image
from joulecap.runtime.types import ChatMessage, ImagePart, Request, SamplingParams, TextPart

ImageLike = Image.Image | np.ndarray | bytes | str | Path
"""What in-process callers may pass as an image: PIL, an HxWx3 uint8 array (camera frame),
encoded bytes, or a path to a file."""

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Accepted message roles and what each becomes (OpenAI's `developer` is a system message)."""

# torch.manual_seed's range: a larger seed would fail inside the engine instead of here.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class RequestLimits:
    """What a server accepts (from `ServerConfig` and `SchedulerConfig`, fixed at start-up).

    Attributes:
        images: Pixel limit and where images may come from.
        max_images: Most images in one request.
        max_tokens_limit: Largest `max_tokens` accepted.
        budget_min_j: Smallest budget accepted.
        budget_max_j: Largest budget accepted.
        policies: Policy names accepted (the registry's).

    """

    images: ImagePolicy = field(default_factory=lambda: ImagePolicy(max_pixels=16_000_000))
    max_images: int = 8
    max_tokens_limit: int = 4096
    budget_min_j: float = 0.0
    budget_max_j: float = 1_000_000.0
    policies: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RequestOptions:
    """A request's options besides its messages, as the caller gave them (unvalidated).

    Attributes:
        max_tokens: Output cap.
        energy_budget_j: Joule budget (a number, or the header's text).
        budget_param: Name of the field the budget came from, for error bodies.
        policy: Policy name.
        tau: E-AdaPrune fraction.
        temperature: Sampling temperature (0: greedy).
        top_p: Nucleus sampling mass.
        seed: Sampling seed.
        stream: Whether the caller wants server-sent events.

    """

    max_tokens: int | None = None
    energy_budget_j: object = None
    budget_param: str = "energy_budget_j"
    policy: str | None = None
    tau: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False


def parse_budget(value: object, *, param: str) -> float:
    """A joule budget from a header (text) or a body (number): finite and greater than 0.

    Raises:
        InvalidRequest: Anything else.

    """
    if isinstance(value, bool):
        raise InvalidRequest("Energy budget must be a number of joules.", param=param, code="invalid_budget")
    try:
        budget = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"Energy budget must be a number of joules, got {str(value)[:40]!r}.",
            param=param,
            code="invalid_budget",
        ) from exc
    if not math.isfinite(budget) or budget <= 0:
        raise InvalidRequest(
            f"Energy budget must be finite and greater than 0 J, got {budget!r}.",
            param=param,
            code="invalid_budget",
        )
    return budget


def _number(value: object, param: str, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{param} must be a number, got {value!r}.", param=param)
    if value < low or value > high or (low_open and value <= low):
        bracket = "(" if low_open else "["
        raise InvalidRequest(f"{param} must be in {bracket}{low:g}, {high:g}], got {value!r}.", param=param)
    return float(value)


def _valid_text(text: object, param: str) -> str:
    if not isinstance(text, str):
        raise InvalidRequest(f"{param} must be a string.", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Tokenizers reject such strings deep inside the engine; refuse them here instead.
        raise InvalidRequest(
            "Message text is not valid Unicode (it contains a lone surrogate).", param=param
        ) from exc
    return text


def to_pil(image: ImageLike, policy: ImagePolicy, param: str = "images") -> Image.Image:
    """An in-process image as RGB PIL, within the pixel limit."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidRequest("Array images must be HxWx3 uint8 (RGB).", param=param)
        pil = Image.fromarray(image, "RGB")
    elif isinstance(image, bytes | str | Path):
        # In-process callers are trusted with their own files, but the pixel limit still applies.
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        return decode_image_bytes(data, policy, param)
    else:
        raise InvalidRequest(f"Unsupported image type {type(image).__name__}.", param=param)
    if pil.width * pil.height > policy.max_pixels:
        raise PayloadTooLarge(f"Image is over the pixel limit {policy.max_pixels}.", param=param)
    return pil


def convert_messages(
    messages: Sequence[Mapping[str, Any]], limits: RequestLimits
) -> tuple[tuple[ChatMessage, ...], tuple[Image.Image, ...]]:
    """OpenAI-style message dicts -> messages and their decoded images (in order)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequest("messages must be a non-empty list.", param="messages")
    out: list[ChatMessage] = []
    images: list[Image.Image] = []
    for m_idx, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or msg.get("role") not in ROLES:
            raise InvalidRequest(
                f"messages.{m_idx} needs a role in {sorted(ROLES)}.", param=f"messages.{m_idx}.role"
            )
        role = ROLES[msg["role"]]
        content = msg.get("content") or ""
        parts: list[TextPart | ImagePart] = []
        if isinstance(content, str):
            parts.append(TextPart(_valid_text(content, f"messages.{m_idx}.content")))
        elif isinstance(content, list):
            for p_idx, part in enumerate(content):
                param = f"messages.{m_idx}.content.{p_idx}"
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text":
                    parts.append(TextPart(_valid_text(part.get("text"), f"{param}.text")))
                    continue
                if kind != "image_url":
                    raise InvalidRequest(f"{param} must be a text or image_url part.", param=param)
                if role != "user":
                    raise InvalidRequest("Images are only accepted in user messages.", param=param)
                if len(images) >= limits.max_images:
                    raise InvalidRequest(
                        f"At most {limits.max_images} images per request (server option --max-images).",
                        param="messages",
                        code="too_many_images",
                    )
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
                images.append(load_image(url, limits.images, param=f"{param}.image_url"))
                parts.append(ImagePart(len(images) - 1))
        else:
            raise InvalidRequest(
                f"messages.{m_idx}.content must be a string or a list.", param=f"messages.{m_idx}"
            )
        out.append(ChatMessage(role=role, parts=tuple(parts)))
    if not any(m.role == "user" for m in out):
        raise InvalidRequest("messages must contain at least one user message.", param="messages")
    return tuple(out), tuple(images)


def prompt_messages(
    prompt: str, images: Sequence[ImageLike], limits: RequestLimits
) -> tuple[tuple[ChatMessage, ...], tuple[Image.Image, ...]]:
    """A prompt string with its images (placed before the text) as one user message."""
    if len(images) > limits.max_images:
        raise InvalidRequest(f"At most {limits.max_images} images per request.", param="images")
    pil = tuple(to_pil(img, limits.images) for img in images)
    parts: list[TextPart | ImagePart] = [ImagePart(i) for i in range(len(pil))]
    parts.append(TextPart(_valid_text(prompt, "prompt")))
    return (ChatMessage("user", tuple(parts)),), pil


def build_request(
    messages: tuple[ChatMessage, ...],
    images: tuple[Image.Image, ...],
    options: RequestOptions,
    limits: RequestLimits,
) -> Request:
    """Validate `options` against `limits` and assemble the `Request`.

    Raises:
        InvalidRequest: An option out of range, an unknown policy.

    """
    o = options
    budget = None
    if o.energy_budget_j is not None:
        budget = parse_budget(o.energy_budget_j, param=o.budget_param)
        if not limits.budget_min_j <= budget <= limits.budget_max_j:
            raise InvalidRequest(
                f"energy_budget_j {budget:g} J is outside the accepted range "
                f"[{limits.budget_min_j:g}, {limits.budget_max_j:g}] J.",
                param=o.budget_param,
                code="invalid_budget",
            )
    if o.max_tokens is not None:
        _number(o.max_tokens, "max_tokens", 1, limits.max_tokens_limit)
        if int(o.max_tokens) != o.max_tokens:
            raise InvalidRequest(f"max_tokens must be an integer, got {o.max_tokens!r}.", param="max_tokens")
    tau = None if o.tau is None else _number(o.tau, "tau", 0.0, 1.0, low_open=True)
    if o.policy is not None and o.policy not in limits.policies:
        raise InvalidRequest(
            f"Unknown policy {o.policy!r}; available: {', '.join(sorted(limits.policies))}.", param="policy"
        )
    temperature = 0.0 if o.temperature is None else _number(o.temperature, "temperature", 0.0, 2.0)
    top_p = 1.0 if o.top_p is None else _number(o.top_p, "top_p", 0.0, 1.0, low_open=True)
    if o.seed is not None and (
        isinstance(o.seed, bool) or not isinstance(o.seed, int) or not SEED_MIN <= o.seed <= SEED_MAX
    ):
        raise InvalidRequest(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}].", param="seed")
    return Request(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=messages,
        images=images,
        max_tokens=None if o.max_tokens is None else int(o.max_tokens),
        energy_budget_j=budget,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, seed=o.seed),
        policy=o.policy,
        tau=tau,
        stream=o.stream,
        created_s=time.time(),
    )
