"""The model families whose image prompts the vLLM engine refuses (`check_prunable`)."""

from __future__ import annotations

from collections.abc import Sequence

from joulecap.runtime.errors import InvalidRequest

MROPE_MODEL_TYPES = frozenset(
    {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni", "qwen3_omni_moe"}
)
"""Model types with multimodal rotary positions: their image prompts cannot run here yet."""

BIDIRECTIONAL_IMAGE_MODEL_TYPES = frozenset({"gemma3"})
"""Model types whose image tokens attend to each other bidirectionally (token types), which plain
prompt embeddings cannot carry either: their image prompts cannot run here yet."""


def check_prunable(model_type: str, visual_tokens: Sequence[int], visual_keep: Sequence[int]) -> None:
    """Refuse every plan of an M-RoPE or Gemma-3 model whose prompt has visual tokens.

    Prompt embeddings carry no positions, so vLLM numbers them 1-D: an M-RoPE model's image
    positions are lost whether or not tokens are dropped. Text-only prompts (no visual tokens)
    go in as token ids, which vLLM positions natively, and are allowed. Gemma-3's image tokens
    attend bidirectionally through token types, which prompt embeddings lose the same way.

    Raises:
        InvalidRequest: The model's image positions are multimodal (3-D) rotary positions, or its
            image tokens attend bidirectionally, and the prompt has visual tokens.

    """
    if len(visual_keep) != len(visual_tokens):
        raise ValueError(
            f"Plan keeps tokens for {len(visual_keep)} images; the request has {len(visual_tokens)}."
        )
    if model_type in MROPE_MODEL_TYPES and sum(visual_tokens) > 0:
        raise InvalidRequest(
            f"Images are not supported yet for {model_type} on the vLLM engine: its multimodal rotary "
            "positions (M-RoPE) would be lost through prompt embeddings, with or without pruning. "
            "Serve this model with `--engine transformers`, which prunes it with its positions kept.",
            param="messages",
        )
    if model_type in BIDIRECTIONAL_IMAGE_MODEL_TYPES and sum(visual_tokens) > 0:
        raise InvalidRequest(
            f"Images are not supported yet for {model_type} on the vLLM engine: its image tokens attend "
            "to each other bidirectionally, which prompt embeddings cannot carry (vLLM would run them "
            "causally), with or without pruning. Serve this model with `--engine transformers`.",
            param="messages",
        )
