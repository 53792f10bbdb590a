"""`TransformersEngine`: the embedded engine (CPU or CUDA) on Hugging Face transformers.

`prepare` renders the chat template, tokenises, and runs the vision tower once, keeping the
post-projector features per image. `run` executes a `Plan`: it keeps `plan.visual_keep[i]` visual
tokens of image i (chosen by `joulecap.kernels.select_tokens`), splices them into the text
embeddings (dropped tokens' placeholders are removed, so the LM input really is shorter), then
prefills and decodes token by token with the model's KV cache. The decode loop is our own rather
than `generate()` so the stop hook, cancellation and streaming act exactly between two tokens; with
every visual token kept it is token-for-token identical to `generate(**processor(...))` (tested).
Families whose LM takes more than embeddings (M-RoPE positions, token types, deepstack features)
add it through their adapter's `lm_inputs` hook, cut to the kept tokens, at prefill and each step.

Concurrency: one request at a time (`max_concurrency = 1`). The `Runtime` queues requests in
arrival order in front of the engine; a lock also serialises direct callers.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from joulecap.kernels import leverage_basis, select_tokens
from joulecap.runtime.brevity import RESERVE_SIZES, brevity_hint
from joulecap.runtime.engines.adapters import (
    FamilyAdapter,
    LMInputs,
    cache_kwarg,
    get_adapter,
    keep_mask,
    output_cache,
)
from joulecap.runtime.engines.base import EngineInfo, RunHooks
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.engines.decoding import StreamDetokenizer, TokenChooser, finish_run, stop_after_token
from joulecap.runtime.engines.factory import ModelLoadError
from joulecap.runtime.engines.processors import load_processor
from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.tiny_models import MARKER
from joulecap.runtime.types import (
    ChatMessage,
    GenerationResult,
    ImagePart,
    Plan,
    PreparedRequest,
    Request,
    StopReason,
    TextPart,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto` -> `cuda` when available, else `cpu`; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA, float32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def _hub_hint(model: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load model {model!r}: it is not a local directory and it could not be fetched from "
        f"the Hugging Face hub (offline or unreachable: {type(exc).__name__}). Fix: download it elsewhere "
        f"and pass `--model /local/dir`, or build a local tiny model with "
        f"`joulecap make-tiny-model --arch idefics3 DIR` and pass `--model DIR`."
    )


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection (a hub id download is worth trying)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_model(model: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load processor and model from a local directory, the local hub cache, or the hub.

    A hub id is looked up in the local cache first; the network is only tried when the hub is
    reachable, so an offline machine fails at once with a message that names the fix instead of
    retrying for minutes.

    Raises:
        ModelLoadError: Not loadable; the message names the fix.

    """
    from transformers import AutoModelForImageTextToText

    def load(source: str, local_only: bool) -> tuple[Any, Any]:
        processor = load_processor(source, local_files_only=local_only)
        net: Any = AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, local_files_only=local_only
        )
        return processor, net.to(device).eval()

    local = Path(model).expanduser()
    if local.is_dir():
        try:
            return load(str(local), True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Could not load model from {local}: {exc}") from exc
    if model.startswith((".", "~")) or local.is_absolute() or model.count("/") > 1:
        raise ModelLoadError(
            f"Model directory {model!r} does not exist. Pass an existing `--model /local/dir`, or build "
            f"one with `joulecap make-tiny-model --arch idefics3 {model}`."
        )
    try:
        return load(model, True)
    except (OSError, ValueError) as cached_exc:
        if not _hub_reachable():
            raise _hub_hint(model, cached_exc) from cached_exc
    try:
        return load(model, False)
    except (OSError, ValueError) as exc:
        raise _hub_hint(model, exc) from exc


@dataclass(frozen=True)
class _Payload:
    """Engine-private part of a `PreparedRequest`."""

    input_ids: torch.Tensor
    positions: tuple[torch.Tensor, ...]
    images: tuple[Any, ...]
    image_inputs: dict[str, Any]
    """The processor's outputs besides ids, mask and pixels (grids, token types), on the device."""
    extras: Any = None
    """`EncodedImages.extras`: per-token visual extras a family's LM needs (e.g. deepstack)."""


class TransformersEngine:
    """Embedded VLM engine executing joulecap plans (the families in `adapters.ADAPTERS`).

    Args:
        config: Engine settings; `config.model` must already be resolved (a path or hub id).

    Raises:
        ModelLoadError: The model cannot be loaded (message names the fix).
        ValueError: The model's family has no adapter.

    """

    max_concurrency = 1
    """One request at a time; the `Runtime` queues the rest in arrival order."""

    def __init__(self, config: EngineConfig) -> None:
        if config.model is None:
            raise ValueError("EngineConfig.model must be resolved before constructing the engine.")
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.processor, self.model = load_model(config.model, self.device, self.dtype)
        self.adapter: FamilyAdapter = get_adapter(self.model, self.processor)
        self._cache_kwarg = cache_kwarg(self.model)
        self.tokenizer = self.processor.tokenizer
        self.stop_ids = self.adapter.stop_token_ids()
        self._lock = threading.Lock()
        path = Path(config.model).expanduser()
        marker = path / MARKER
        random_weights = (
            bool(json.loads(marker.read_text()).get("random_weights")) if marker.is_file() else False
        )
        text_config = self.model.config.get_text_config()
        context = getattr(text_config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.info = EngineInfo(
            engine="transformers",
            model=config.served_model_name or (path.name if path.is_dir() else config.model),
            model_path=str(path.resolve()) if path.is_dir() else config.model,
            family=self.adapter.family,
            params_b=sum(p.numel() for p in self.model.parameters()) / 1e9,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            context_length=int(context),
            random_weights=random_weights,
        )
        self.hint_tokens = self._hint_reserve()

    def _hint_reserve(self) -> int:
        """Most prompt tokens any wording of the brevity hint adds, from the chat template.

        Plans pay for this many tokens whenever they carry a hint. A template without a system role
        gives 0, and plans then carry no hint.
        """
        probe = (ChatMessage("user", (TextPart("?"),)),)

        def count(messages: tuple[ChatMessage, ...]) -> int:
            # The same template and processor call that `_prompt_ids` re-tokenises a hinted prompt with.
            return int(self._tokenise(messages, ())["input_ids"].shape[1])

        try:
            base = count(probe)
            added = [
                count((ChatMessage("system", (TextPart(brevity_hint(n)),)), *probe)) - base
                for n in RESERVE_SIZES
            ]
        except Exception as exc:  # any template failure means "no hints", not a failed start
            log.info(
                "brevity hints disabled for %s: its chat template cannot render them (%s)",
                self.info.model,
                exc,
            )
            return 0
        return max(0, *added)

    # ------------------------------------------------------------------ prepare
    def _template_messages(self, messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
        reserved = self.adapter.reserved_strings
        out: list[dict[str, Any]] = []
        for msg in messages:
            content: list[dict[str, Any]] = []
            for part in msg.parts:
                if isinstance(part, ImagePart):
                    content.append({"type": "image"})
                    continue
                bad = next((s for s in reserved if s in part.text), None)
                if bad is not None:
                    raise InvalidRequest(
                        f"Message text may not contain the reserved token {bad!r}.", param="messages"
                    )
                content.append({"type": "text", "text": part.text})
            out.append({"role": msg.role, "content": content})
        return out

    def _tokenise(self, messages: tuple[ChatMessage, ...], images: tuple[Any, ...]) -> dict[str, Any]:
        text = self.processor.apply_chat_template(
            self._template_messages(messages), add_generation_prompt=True, tokenize=False
        )
        try:
            inputs = self.processor(text=[text], images=list(images) or None, return_tensors="pt")
        except (ValueError, ZeroDivisionError) as exc:  # placeholder mismatch, unusable (0-px) image
            raise InvalidRequest(f"Could not process the request: {exc}", param="messages") from exc
        return dict(inputs)

    def _check_context(self, prompt_tokens: int) -> None:
        limit = self.info.context_length
        if prompt_tokens + 1 > limit:
            raise InvalidRequest(
                f"The prompt is {prompt_tokens} tokens (visual tokens included); with one output token "
                f"that exceeds the model's context length of {limit} tokens.",
                param="messages",
                code="context_length_exceeded",
            )

    def prepare(self, request: Request, *, bases: bool = True) -> PreparedRequest:
        """Tokenise the prompt with images in place and encode each image once.

        Args:
            request: The request.
            bases: Decompose each image's features too (with `EngineConfig.leverage_basis`).

        Raises:
            InvalidRequest: Prompt plus one output token longer than the context; reserved tokens
                in the text; an image the processor rejects.

        """
        refs = [p.index for m in request.messages for p in m.parts if isinstance(p, ImagePart)]
        if any(not 0 <= i < len(request.images) for i in refs):
            raise InvalidRequest("A message refers to an image that was not supplied.", param="messages")
        images = tuple(request.images[i] for i in refs)
        # One lock for tokenizer and model: HF fast tokenizers are not safe to share across threads.
        with self._lock, torch.inference_mode():
            inputs = self._tokenise(request.messages, images)
            input_ids = inputs["input_ids"][0]
            self._check_context(int(input_ids.shape[0]))
            try:
                positions = self.adapter.visual_positions(input_ids.tolist(), len(images))
            except ValueError as exc:
                raise InvalidRequest(f"Could not place the images in the prompt: {exc}") from exc
            features: tuple[torch.Tensor, ...] = ()
            extras: Any = None
            pixel_inputs = {
                k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                for k, v in inputs.items()
                if k not in ("input_ids", "attention_mask")
            }
            if images:
                encoded = self.adapter.encode(pixel_inputs, positions)
                features, extras = encoded.features, encoded.extras
            image_bases = self._bases(features) if bases else ()
        visual = tuple(int(p.numel()) for p in positions)
        return PreparedRequest(
            request=request,
            text_tokens=int(input_ids.shape[0]) - sum(visual),
            visual_tokens=visual,
            features=features,
            context_length=self.info.context_length,
            payload=_Payload(
                input_ids=input_ids,
                positions=tuple(positions),
                images=images,
                # The LM-side hooks need grids and token types, not the pixels (already encoded).
                image_inputs={k: v for k, v in pixel_inputs.items() if not k.startswith("pixel_")},
                extras=extras,
            ),
            hint_tokens=self.hint_tokens,
            bases=image_bases,
        )

    def add_bases(self, prepared: PreparedRequest) -> PreparedRequest:
        """`prepared` with the decomposition `prepare(bases=True)` makes (`bases_pending` cleared).

        For a request prepared with `bases=False` whose plan turned out to need pruning: the
        features are already computed, so only the decomposition runs (the runtime measures it).
        """
        with self._lock, torch.inference_mode():
            bases = self._bases(prepared.features)
        return replace(prepared, bases=bases, bases_pending=False)

    def _bases(self, features: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """Each image's decomposition, or none where `EngineConfig.leverage_basis` is off."""
        return tuple(leverage_basis(f) for f in features) if self.config.leverage_basis else ()

    # ------------------------------------------------------------------ run
    def _keep_indices(self, prepared: PreparedRequest, plan: Plan) -> list[torch.Tensor]:
        if len(plan.visual_keep) != len(prepared.visual_tokens):
            raise ValueError(
                f"Plan keeps tokens for {len(plan.visual_keep)} images; the request has "
                f"{len(prepared.visual_tokens)}."
            )
        keep = []
        for i, (feats, n, k) in enumerate(
            zip(prepared.features, prepared.visual_tokens, plan.visual_keep, strict=True)
        ):
            if not 0 <= k <= n:
                raise ValueError(f"Plan keeps {k} of {n} visual tokens of an image.")
            if k == n:
                keep.append(torch.arange(n, device=feats.device))
            elif k == 0:
                keep.append(torch.zeros(0, dtype=torch.long, device=feats.device))
            else:
                kept = select_tokens(feats, int(k), method=plan.selection, basis=prepared.basis(i))
                keep.append(kept.to(feats.device))
        return keep

    def _prompt_ids(
        self, prepared: PreparedRequest, plan: Plan
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        payload = prepared.payload
        assert isinstance(payload, _Payload)
        if not plan.brevity_hint:
            return payload.input_ids, payload.positions
        # The hint is a system message in front: re-tokenise the text (the processor re-runs its
        # cheap pixel preprocessing to expand placeholders); the vision tower is not run again.
        hint = ChatMessage("system", (TextPart(plan.brevity_hint),))
        inputs = self._tokenise((hint, *prepared.request.messages), payload.images)
        ids = inputs["input_ids"][0]
        if ids.shape[0] + 1 > self.info.context_length:
            # The hint is an optimisation; a prompt that only fits without it runs without it.
            log.debug(
                "brevity hint dropped for %s: prompt would exceed the context", prepared.request.request_id
            )
            return payload.input_ids, payload.positions
        positions = tuple(self.adapter.visual_positions(ids.tolist(), len(payload.images)))
        if [p.numel() for p in positions] != [p.numel() for p in payload.positions]:
            raise ValueError("Re-tokenising with the brevity hint changed the visual token counts.")
        return ids, positions

    def run(self, prepared: PreparedRequest, plan: Plan, hooks: RunHooks) -> GenerationResult:
        """Execute `plan` on a prepared request; see the module docstring."""
        with self._lock, torch.inference_mode():
            return self._run(prepared, plan, hooks)

    def _run(self, prepared: PreparedRequest, plan: Plan, hooks: RunHooks) -> GenerationResult:
        start_s = time.monotonic()
        keep = self._keep_indices(prepared, plan)
        input_ids, positions = self._prompt_ids(prepared, plan)
        ids = input_ids.to(self.device)
        device_positions = [p.to(self.device) for p in positions]
        embeds = self.adapter.splice(ids, device_positions, prepared.features, keep)
        payload = prepared.payload
        assert isinstance(payload, _Payload)
        extra: LMInputs = self.adapter.lm_inputs(
            ids, keep_mask(int(ids.shape[0]), device_positions, keep), payload.image_inputs, payload.extras
        )
        prefill_tokens = int(embeds.shape[1])
        self._check_context(prefill_tokens)
        visual_in = sum(prepared.visual_tokens)
        visual_kept = sum(int(k.numel()) for k in keep)
        # Never decode past the context window: the cap then ends the answer ("length").
        max_new = min(plan.max_new_tokens, self.info.context_length - prefill_tokens)
        chooser = TokenChooser(prepared.request.sampling, self.device)
        detok = StreamDetokenizer(self.tokenizer)
        mask = torch.ones((1, prefill_tokens + max(max_new, 0)), dtype=torch.long, device=self.device)
        reason: StopReason | None = "aborted" if hooks.cancelled.is_set() else None
        if reason is None and max_new <= 0:
            reason = "length"
        first_token_s: float | None = None
        past = None
        step_kwargs: dict[str, Any] = {"inputs_embeds": embeds, **extra.prefill}
        length = prefill_tokens
        while reason is None:
            out = self.adapter.forward(
                **step_kwargs,
                attention_mask=mask[:, :length],
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: past},
            )
            past = output_cache(out)
            token = chooser(out.logits[0, -1])
            n = len(detok.ids) + 1
            if first_token_s is None:
                first_token_s = time.monotonic()
                if hooks.on_prefill_done is not None:
                    hooks.on_prefill_done(first_token_s)
            reason = stop_after_token(token, n, max_new, self.stop_ids, hooks)
            delta = detok.push(token, final=reason is not None)
            if hooks.on_token is not None:
                hooks.on_token(token, delta)
            # `length` tokens are in the cache now; the new token goes at index `length`.
            step_kwargs = {"input_ids": torch.tensor([[token]], device=self.device), **extra.step(length)}
            length += 1
        return finish_run(
            detok,
            reason,
            prefill_tokens=prefill_tokens,
            visual_in=visual_in,
            visual_kept=visual_kept,
            start_s=start_s,
            first_token_s=first_token_s,
        )

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
