"""Visual token counts for the vLLM native path, from a family's token-count rule.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def idefics3_counts(processor: Any, text: str, images: Sequence[Any]) -> tuple[int, tuple[int, ...]] | None:
    """Prompt tokens and per-image visual tokens of `text` (chat-templated, one `<image>` per image).

    Returns None when the rule does not apply (no `_get_num_multimodal_tokens`, an empty image,
    or a placeholder count that does not match the images).
    """
    if not hasattr(processor, "_get_num_multimodal_tokens"):
        return None
    sizes = [(int(img.height), int(img.width)) for img in images]
    if any(h <= 0 or w <= 0 for h, w in sizes):
        return None
    tokenizer = processor.tokenizer
    ids = tokenizer(text)["input_ids"]  # as the processor tokenises (its default special tokens)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if sum(1 for t in ids if t == image_id) != len(images):
        return None
    block = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    seq_len = int(processor.image_seq_len)
    visual = []
    for h, w in sizes:
        _, rows, cols = processor.image_processor.get_number_of_image_patches(h, w, {})  # its own settings
        visual.append(seq_len * (rows * cols + 1 if rows > 0 else 1))
    return len(ids) - len(images) + sum(int(n) for n in block), tuple(visual)


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
