"""The vLLM native path's prepare: a request's token counts, from a family's rule when it has one.

The native path needs only how many tokens each image becomes, not its pixels or features.
Running the processor (`processor(text, images)`) gives that, but it also resizes, splits,
rescales and normalises every image: 3-20 ms per image on one CPU core, which vLLM's own
processor then repeats. A family's rule computes the same counts from the image size alone:

- **Idefics3 / SmolVLM**: each image becomes `image_seq_len` `<image>` tokens per tile, with one
  tile per `rows x cols` split plus the global image (just the global image without splitting);
  the placeholder block around them is the processor's `_get_num_multimodal_tokens`.

A family without a rule, or an image the rule cannot size (0 pixels wide or high), returns None
and the engine runs the processor instead (same counts, same errors as the transformers engine).
Tests compare every rule with the processor on images of several sizes, with and without splitting.
`prepare_native` counts a request this way and carries its images to `run` (`NativePayload`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.types import ImagePart, PreparedRequest, Request

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.engines.transformers_engine import TransformersEngine


def idefics3_counts(processor: Any, text: str, images: Sequence[Any]) -> tuple[int, tuple[int, ...]] | None:
    """Prompt tokens and per-image visual tokens of `text` (chat-templated, one `<image>` per image).

    Returns None when the rule does not apply (no `replace_image_token`, an empty image, or a
    placeholder count that does not match the images). Each `<image>` is expanded with the
    processor's own `replace_image_token` and the result tokenised once: its
    `_get_num_multimodal_tokens` changed meaning between transformers 5.24 (the whole block) and
    5.25 (the image tokens alone).
    """
    if not hasattr(processor, "replace_image_token"):
        return None
    sizes = [(int(img.height), int(img.width)) for img in images]
    if any(h <= 0 or w <= 0 for h, w in sizes):
        return None
    tokenizer = processor.tokenizer
    parts = text.split(processor.image_token)
    if len(parts) != len(images) + 1:
        return None
    seq_len = int(processor.image_seq_len)
    expanded, visual = [parts[0]], []
    for (h, w), after in zip(sizes, parts[1:], strict=True):
        _, rows, cols = processor.image_processor.get_number_of_image_patches(h, w, {})  # its own settings
        expanded += [processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0), after]
        visual.append(seq_len * (rows * cols + 1 if rows > 0 else 1))
    ids = tokenizer("".join(expanded))["input_ids"]  # as the processor tokenises (its default special tokens)
    return len(ids), tuple(visual)


RULES = {"idefics3": idefics3_counts}
"""Family -> token-count rule."""


def rule_counts(
    family: str, processor: Any, text: str, images: Sequence[Any]
) -> tuple[int, tuple[int, ...]] | None:
    """The family's rule applied (None: no rule, or it does not apply; run the processor)."""
    rule = RULES.get(family)
    if rule is None:
        return None
    try:
        return rule(processor, text, images)
    except Exception:  # a rule that cannot size an image defers to the processor and its errors
        return None


@dataclass(frozen=True)
class NativePayload:
    """Engine-private part of a request prepared for the native path (no features).

    Attributes:
        images: The request's images in prompt order, handed to vLLM as `multi_modal_data`.
        prompt_tokens: Prompt tokens with every visual token, as joulecap counts them (vLLM's
            own count comes back with the first output and is what `run` reports).
        text: The chat-template text (without a brevity hint).

    """

    images: tuple[Any, ...]
    prompt_tokens: int
    text: str


def prepare_native(hf: TransformersEngine, request: Request, context_length: int) -> PreparedRequest:
    """Prepare a request for the native path: its token counts, without features.

    Chat template and tokenisation, then the family's rule sizes the images (else the processor
    counts them); the vision tower does not run. The payload is a `NativePayload`.

    Args:
        hf: The vLLM engine's Hugging Face copy (its processor, adapter and lock).
        request: The request.
        context_length: The engine's context length, recorded in the prepared request.

    Raises:
        InvalidRequest: A message refers to a missing image, the images cannot be placed in the
            prompt, or the prompt is longer than the context (the transformers engine's errors).

    """
    import torch

    refs = [p.index for m in request.messages for p in m.parts if isinstance(p, ImagePart)]
    if any(not 0 <= i < len(request.images) for i in refs):
        raise InvalidRequest("A message refers to an image that was not supplied.", param="messages")
    images = tuple(request.images[i] for i in refs)
    with hf._lock, torch.inference_mode():  # HF fast tokenizers are not thread-safe
        text = str(
            hf.processor.apply_chat_template(
                hf._template_messages(request.messages), add_generation_prompt=True, tokenize=False
            )
        )
        # The family's rule sizes the images without touching their pixels; else the processor
        # (pixel preprocessing, still no vision tower) counts them.
        counted = rule_counts(hf.adapter.family, hf.processor, text, images)
        if counted is None:
            inputs = hf._tokenise(request.messages, images)
            input_ids = inputs["input_ids"][0]
            try:
                positions = hf.adapter.visual_positions(input_ids.tolist(), len(images))
            except ValueError as exc:
                raise InvalidRequest(f"Could not place the images in the prompt: {exc}") from exc
            counted = (int(input_ids.shape[0]), tuple(int(p.numel()) for p in positions))
    prompt_tokens, visual = counted
    hf._check_context(prompt_tokens)
    return PreparedRequest(
        request=request,
        text_tokens=prompt_tokens - sum(visual),
        visual_tokens=visual,
        features=(),
        context_length=context_length,
        payload=NativePayload(images=images, prompt_tokens=prompt_tokens, text=text),
        hint_tokens=hf.hint_tokens,
    )
