"""The vLLM engine's pruned-path prepare: concurrent requests' images encoded in one batch.

`BatchEncoder.prepare` does what `TransformersEngine.prepare` does (chat template, tokenisation,
vision tower, optional leverage basis) but hands the vision tower to an `EncodeCollector`: the
requests that arrive within its window share one `image_features` call. Each request's processor
inputs are made on its own (a rejected image fails that request only, with the transformers
engine's error); the pixel tensors are then stacked along the batch dimension, zero-padded where
their shapes differ for families whose vision tower ignores zero padding (Idefics3: padded tiles
are all-zero and dropped, padded pixels are masked), and run once. Families without that
guarantee are encoded one request after another inside the batch (still no global lock).

The prepared request's payload carries the request's `EncodeShare` (`encode_share`), which the
runtime uses to charge its part of the batch's measured window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from joulecap.kernels import leverage_basis
from joulecap.runtime.engines.encode_batch import (
    DEFAULT_MAX_BATCH,
    DEFAULT_WINDOW_S,
    EncodeCollector,
    EncodeShare,
)
from joulecap.runtime.engines.transformers_engine import TransformersEngine, _Payload
from joulecap.runtime.errors import EngineError, InvalidRequest
from joulecap.runtime.types import ImagePart, PreparedRequest, Request

_Outcome = tuple[PreparedRequest | BaseException, int]

PADDABLE_FAMILIES = frozenset({"idefics3"})
"""Families whose vision tower gives the same features for zero-padded pixel inputs."""


@dataclass(frozen=True)
class EncodedPayload(_Payload):
    """The transformers engine's payload plus the request's share of its encode batch."""

    share: EncodeShare | None = None


@dataclass(frozen=True)
class _Staged:
    request: Request
    bases: bool
    input_ids: torch.Tensor
    positions: tuple[torch.Tensor, ...]
    images: tuple[Any, ...]
    pixels: dict[str, Any]


def encode_share(prepared: PreparedRequest) -> EncodeShare | None:
    """The request's share of the encode batch its features came from (None: not batch-encoded)."""
    payload = prepared.payload
    return payload.share if isinstance(payload, EncodedPayload) else None


def _collate(pixels: Sequence[dict[str, Any]], pad: bool) -> dict[str, Any] | None:
    """Stack per-request processor tensors along dim 0 (zero-padding other dims when `pad`).

    Returns None when they cannot be stacked (different keys, non-tensors, or shapes that differ
    without `pad`).
    """
    keys = list(pixels[0])
    if any(list(p) != keys for p in pixels):
        return None
    out: dict[str, Any] = {}
    for key in keys:
        values = [p[key] for p in pixels]
        if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in values):
            return None
        if len({v.dim() for v in values}) != 1:
            return None
        shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
        if any(list(v.shape[1:]) != shape for v in values):
            if not pad:
                return None
            grown = []
            for v in values:
                full = v.new_zeros((v.shape[0], *shape))
                full[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
                grown.append(full)
            values = grown
        out[key] = torch.cat(values, dim=0)
    return out


class BatchEncoder:
    """Pruned-path prepare over a shared `EncodeCollector`; see the module docstring.

    Args:
        hf: The vLLM engine's Hugging Face copy (vision tower, projector, processor).
        window_s: The collector's batching window.
        max_batch: Most requests per vision-tower call.
        overlapped: Whether other work ran since a batch's start (see `EncodeCollector`).

    """

    def __init__(
        self,
        hf: TransformersEngine,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        overlapped: Callable[[float], bool] | None = None,
    ) -> None:
        self.hf = hf
        self.pad = hf.adapter.family in PADDABLE_FAMILIES
        self.collector: EncodeCollector[tuple[Request, bool], PreparedRequest] = EncodeCollector(
            self._encode,
            key=lambda job: job[0].request_id,
            window_s=window_s,
            max_batch=max_batch,
            overlapped=overlapped,
        )

    def prepare(self, request: Request, *, bases: bool = True) -> PreparedRequest:
        """`TransformersEngine.prepare`, with the vision tower batched across concurrent callers.

        Raises:
            InvalidRequest: As the transformers engine (rejected image, context, reserved tokens).
            EngineError: The batch's vision-tower call failed (every request in it gets this).

        """
        prepared, share = self.collector.submit((request, bases))
        payload = prepared.payload
        assert isinstance(payload, EncodedPayload)
        return replace(prepared, payload=replace(payload, share=share))

    def batch_sizes(self) -> list[int]:
        """Sizes of the encode batches run so far."""
        return self.collector.batch_sizes()

    def close(self) -> None:
        """Stop the collector's worker."""
        self.collector.close()

    # ------------------------------------------------------------------ worker side
    def _stage(self, request: Request, bases: bool) -> _Staged:
        hf = self.hf
        refs = [p.index for m in request.messages for p in m.parts if isinstance(p, ImagePart)]
        if any(not 0 <= i < len(request.images) for i in refs):
            raise InvalidRequest("A message refers to an image that was not supplied.", param="messages")
        images = tuple(request.images[i] for i in refs)
        inputs = hf._tokenise(request.messages, images)
        input_ids = inputs["input_ids"][0]
        hf._check_context(int(input_ids.shape[0]))
        try:
            positions = tuple(hf.adapter.visual_positions(input_ids.tolist(), len(images)))
        except ValueError as exc:
            raise InvalidRequest(f"Could not place the images in the prompt: {exc}") from exc
        pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return _Staged(request, bases, input_ids, positions, images, pixels)

    def _features(self, staged: Sequence[_Staged]) -> list[tuple[torch.Tensor, ...]]:
        """Per staged request, its per-image features: one tower call when the inputs stack."""
        hf = self.hf
        collated = _collate([s.pixels for s in staged], self.pad) if len(staged) > 1 else staged[0].pixels
        groups = [list(staged)] if collated is not None else [[s] for s in staged]
        out: list[tuple[torch.Tensor, ...]] = []
        for group in groups:
            pixels = collated if collated is not None else group[0].pixels
            device_pixels = {
                k: (v.to(hf.device) if isinstance(v, torch.Tensor) else v) for k, v in pixels.items()
            }
            positions = [p for s in group for p in s.positions]
            flat = hf.adapter.encode_images(device_pixels, positions)
            i = 0
            for s in group:
                out.append(tuple(flat[i : i + len(s.positions)]))
                i += len(s.positions)
        return out

    def _encode(self, jobs: Sequence[tuple[Request, bool]]) -> list[_Outcome]:
        hf = self.hf
        results: list[_Outcome] = []
        with hf._lock, torch.inference_mode():
            staged: list[_Staged | BaseException] = []
            for request, bases in jobs:
                try:
                    staged.append(self._stage(request, bases))
                except Exception as exc:  # this request's own input: it alone fails
                    staged.append(exc)
            good = [s for s in staged if isinstance(s, _Staged)]
            try:
                features = iter(self._features(good) if good else [])
            except Exception as exc:
                raise EngineError(
                    f"The vision encoder failed on a batch of {len(good)} request(s): {type(exc).__name__}"
                ) from exc
            for s in staged:
                if not isinstance(s, _Staged):
                    results.append((s, 0))
                    continue
                feats = next(features)
                decompose = s.bases and hf.config.leverage_basis
                visual = tuple(int(p.numel()) for p in s.positions)
                prepared = PreparedRequest(
                    request=s.request,
                    text_tokens=int(s.input_ids.shape[0]) - sum(visual),
                    visual_tokens=visual,
                    features=feats,
                    context_length=hf.info.context_length,
                    # Batched encodes serve 1-D-position families: no extra LM inputs follow the
                    # kept tokens, so the processor's other outputs ride along only for symmetry.
                    payload=EncodedPayload(
                        s.input_ids,
                        s.positions,
                        s.images,
                        image_inputs={k: v for k, v in s.pixels.items() if not k.startswith("pixel_")},
                    ),
                    hint_tokens=hf.hint_tokens,
                    bases=tuple(leverage_basis(f) for f in feats) if decompose else (),
                )
                results.append((prepared, sum(visual)))
        return results
