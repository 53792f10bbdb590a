"""OpenAI chat-completions request schema (the subset joulecap serves) and its conversion.

Unknown OpenAI fields are accepted and ignored (clients send many); fields joulecap cannot
honour (`n > 1`, tools, stop sequences) are refused with 400 rather than silently dropped.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.images import ImagePolicy, load_image
from joulecap.runtime.types import ChatMessage, ImagePart, Request, SamplingParams, TextPart

BUDGET_HEADER = "X-Energy-Budget-J"


class ImageURL(BaseModel):
    """`image_url` content part payload."""

    url: str
    detail: str | None = None


class TextContentPart(BaseModel):
    """A text content part."""

    type: Literal["text"]
    text: str


class ImageContentPart(BaseModel):
    """An image content part (data URL, confined local path, or http(s) when allowed)."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextContentPart | ImageContentPart, Field(discriminator="type")]


class ChatMessageIn(BaseModel):
    """One incoming chat message."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions` (and `POST /chat`).

    joulecap extensions (send them with the OpenAI client's `extra_body`): `energy_budget_j`
    (for clients that cannot set the `X-Energy-Budget-J` header), `policy`, `tau`.
    """

    model_config = ConfigDict(extra="allow")

    model: str = "default"
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # torch.manual_seed's range: a larger seed would fail inside the engine instead of here.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    energy_budget_j: float | None = Field(
        default=None, description="Joule budget; the X-Energy-Budget-J header wins when both are set."
    )
    policy: str | None = Field(default=None, description="Planning policy (joulecap extension).")
    tau: float | None = Field(
        default=None, gt=0.0, le=1.0, description="E-AdaPrune energy fraction in (0, 1]."
    )


def parse_budget(value: object, *, param: str) -> float:
    """Validate a joule budget from a header (string) or body (number).

    Raises:
        InvalidRequest: Not a finite number greater than zero.

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


def _valid_text(text: str, param: str) -> str:
    """`text`, unless it cannot be encoded as UTF-8 (lone surrogates that JSON escapes allow)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Tokenizers reject such strings deep inside the engine; refuse them here instead.
        raise InvalidRequest(
            "Message text is not valid Unicode (it contains a lone surrogate).", param=param
        ) from exc
    return text


def _convert_messages(
    messages: list[ChatMessageIn], images_policy: ImagePolicy, max_images: int
) -> tuple[tuple[ChatMessage, ...], tuple[Any, ...]]:
    out: list[ChatMessage] = []
    images: list[Any] = []
    for m_idx, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        parts: list[TextPart | ImagePart] = []
        content = msg.content
        if content is None:
            content = ""
        if isinstance(content, str):
            parts.append(TextPart(_valid_text(content, f"messages.{m_idx}.content")))
        else:
            for p_idx, part in enumerate(content):
                if isinstance(part, TextContentPart):
                    parts.append(TextPart(_valid_text(part.text, f"messages.{m_idx}.content.{p_idx}.text")))
                    continue
                if role != "user":
                    raise InvalidRequest(
                        "Images are only accepted in user messages.", param=f"messages.{m_idx}.content"
                    )
                if len(images) >= max_images:
                    raise InvalidRequest(
                        f"At most {max_images} images per request (server option --max-images).",
                        param="messages",
                        code="too_many_images",
                    )
                param = f"messages.{m_idx}.content.{p_idx}.image_url"
                images.append(load_image(part.image_url.url, images_policy, param=param))
                parts.append(ImagePart(len(images) - 1))
        out.append(ChatMessage(role=role, parts=tuple(parts)))
    if not any(m.role == "user" for m in out):
        raise InvalidRequest("messages must contain at least one user message.", param="messages")
    return tuple(out), tuple(images)


def to_request(
    body: ChatCompletionRequest,
    *,
    header_budget: str | None,
    images_policy: ImagePolicy,
    max_images: int,
    max_tokens_limit: int,
) -> Request:
    """Validate an OpenAI request body and turn it into a transport-free `Request`.

    Raises:
        InvalidRequest: Unsupported options, bad budget, bad images.
        PayloadTooLarge: Images over the pixel limit.

    """
    if body.n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n")
    if body.tools:
        raise InvalidRequest("Tool calls are not supported.", param="tools")
    if body.stop:
        raise InvalidRequest("Stop sequences are not supported yet.", param="stop")
    budget: float | None = None
    if header_budget is not None:
        budget = parse_budget(header_budget, param=BUDGET_HEADER)
    elif body.energy_budget_j is not None:
        budget = parse_budget(body.energy_budget_j, param="energy_budget_j")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens {max_tokens} exceeds the server limit {max_tokens_limit}.", param="max_tokens"
        )
    messages, images = _convert_messages(body.messages, images_policy, max_images)
    return Request(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=messages,
        images=images,
        max_tokens=max_tokens,
        energy_budget_j=budget,
        sampling=SamplingParams(
            temperature=body.temperature if body.temperature is not None else 0.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            seed=body.seed,
        ),
        policy=body.policy,
        tau=body.tau,
        stream=body.stream,
        created_s=time.time(),
    )
