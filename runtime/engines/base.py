"""The `Engine` protocol: prepare a request (tokenise, encode images), then run a `Plan`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from joulecap.runtime.types import GenerationResult, Plan, PreparedRequest, Request


@dataclass
class RunHooks:
    """Callbacks an engine calls while it runs a plan. All are optional.

    Attributes:
        on_prefill_done: Called once with `time.monotonic()` when the first token exists.
        on_token: Called with each new token id and its decoded text delta (streaming).
        should_stop: Called after each generated token with the count so far; returning
            True stops decoding with `stop_reason="energy_budget"` (the governor).
        cancelled: Set by the caller (client disconnect, timeout); the engine stops with
            `stop_reason="aborted"` at the next token.

    """

    on_prefill_done: Callable[[float], None] | None = None
    on_token: Callable[[int, str], None] | None = None
    should_stop: Callable[[int], bool] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about a loaded model, used by the predictor and `/v1/models`.

    Attributes:
        engine: Engine kind (`transformers`, `vllm`).
        model: Served model name.
        model_path: Where the weights came from.
        family: Architecture family (`idefics3`, `llava`, ...).
        params_b: Parameters in billions (the predictor's `S`).
        device: Torch device string.
        dtype: Torch dtype name.
        context_length: Maximum sequence length.
        random_weights: True for the randomly initialised demo model.

    """

    engine: str
    model: str
    model_path: str
    family: str
    params_b: float
    device: str
    dtype: str
    context_length: int
    random_weights: bool = False


@runtime_checkable
class Engine(Protocol):
    """A VLM backend. One file per engine; see `factory.py` for selection.

    Optional capabilities, found with `getattr` by the runtime: `add_bases(prepared)` decomposes
    the features of a request prepared with `bases=False` (the transformers engine; the runtime
    then defers the decomposition for policies that ask, `joulecap.runtime.encoding`), and
    `encode_share(prepared)` for an engine that measures its encodes by batch (vLLM).
    """

    info: EngineInfo

    def prepare(self, request: Request, *, bases: bool = True) -> PreparedRequest:
        """Tokenise the prompt and encode the images into LM-ready visual features.

        Args:
            request: The request.
            bases: Also decompose each image's features (`PreparedRequest.bases`) when the
                engine is configured to; False when the plan will keep every visual token.

        Raises:
            InvalidRequest: prompt longer than the context, unusable image.

        """
        ...

    def run(self, prepared: PreparedRequest, plan: Plan, hooks: RunHooks) -> GenerationResult:
        """Run a plan: keep `plan.visual_keep[i]` visual tokens of image i, prefill, decode.

        Decoding stops at `plan.max_new_tokens`, and `hooks` are called along the way.
        """
        ...

    def close(self) -> None:
        """Free the model."""
        ...
