"""OpenAI chat-completions request schema (the subset joulecap serves) and its conversion.

Unknown OpenAI fields are accepted and ignored (clients send many); fields joulecap cannot
honour (`n > 1`, tools, stop sequences) are refused with 400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.requests import RequestLimits, RequestOptions, build_request, convert_messages
from joulecap.runtime.types import Request

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
    # Types only: ranges are checked once, for every caller, by `joulecap.runtime.requests`.
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    energy_budget_j: float | None = Field(
        default=None, description="Joule budget; the X-Energy-Budget-J header wins when both are set."
    )
    policy: str | None = Field(default=None, description="Planning policy (joulecap extension).")
    tau: float | None = Field(default=None, description="E-AdaPrune energy fraction in (0, 1].")


def to_request(body: ChatCompletionRequest, *, header_budget: str | None, limits: RequestLimits) -> Request:
    """Turn an OpenAI request body into a validated, transport-free `Request`.

    The body's shape is pydantic's; every value is checked by `joulecap.runtime.requests`.

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
    # The header wins over the body's field when both are set.
    budget: object = header_budget if header_budget is not None else body.energy_budget_j
    options = RequestOptions(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        energy_budget_j=budget,
        budget_param=BUDGET_HEADER if header_budget is not None else "energy_budget_j",
        policy=body.policy,
        tau=body.tau,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stream=body.stream,
    )
    messages, images = convert_messages([m.model_dump() for m in body.messages], limits)
    return build_request(messages, images, options, limits)
