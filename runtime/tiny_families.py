"""Tiny random-weight builders of the families the energy study measured, one function each.

Each builder returns `(model, processor)` with the family's real special tokens, the shape of its
chat template and its real image-processing arithmetic (patch size, merge grid, pixel range), so
the grid and position code paths run in tests as they do on released checkpoints. Only the widths
and depths are tiny; `joulecap.runtime.tiny_models.build_tiny_model` seeds, saves and marks them.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL: an image is resized to multiples of `patch * merge` pixels
within `[min_pixels, max_pixels]` and becomes `(h / patch / merge) x (w / patch / merge)`
`<|image_pad|>` tokens between `<|vision_start|>` and `<|vision_end|>`; the LM places them with
3-D multimodal rotary positions (M-RoPE). The tiny builders keep the real patch, merge and
minimum pixels; the maximum is lowered (real: 12.8 M px for Qwen2/2.5-VL, 16.8 M px for Qwen3-VL)
so that a test image stays under ~128 visual tokens on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from joulecap.runtime.tiny_models import byte_tokenizer

QWEN_EOS = "<|im_end|>"
QWEN_PAD = "<|endoftext|>"
QWEN_SPECIALS = [
    QWEN_PAD,
    "<|im_start|>",
    QWEN_EOS,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
"""Qwen2-VL's added tokens, in the released tokenizer's order (ids 151643-151656 there)."""

QWEN_MAX_LENGTH = 4096

# Qwen2-VL / Qwen2.5-VL: a default system prompt when none is given, images as
# <|vision_start|><|image_pad|><|vision_end|> inside the turn, ChatML turns.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL (instruct): the same ChatML turns without a default system prompt.
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LM: 2 query heads of 32 sharing one KV head. M-RoPE splits the 16 rotary frequency pairs of a
# head over (time, height, width) in the released ratio: Qwen2/2.5-VL 16:24:24 of 64 -> 4:6:6,
# Qwen3-VL 24:20:20 of 64 (interleaved) -> 6:5:5.
_QWEN_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": QWEN_MAX_LENGTH,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    # Transformers' default 0.02 leaves a 64-wide random LM with near-uniform attention, which
    # hardly depends on positions; 0.2 gives attention logits of order 1, as trained models have,
    # so that a wrong position changes the greedy tokens and the tests can tell.
    "initializer_range": 0.2,
}


def qwen_tokenizer() -> Any:
    """Bytes plus Qwen's special tokens; EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS (as released)."""
    return byte_tokenizer(QWEN_SPECIALS, bos=None, eos=QWEN_EOS, pad=QWEN_PAD, max_length=QWEN_MAX_LENGTH)


def _qwen_ids(tokenizer: Any) -> dict[str, Any]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_text(tokenizer: Any, mrope_section: list[int], **extra: Any) -> dict[str, Any]:
    return {
        **_QWEN_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.convert_tokens_to_ids(QWEN_PAD),
        "eos_token_id": tokenizer.convert_tokens_to_ids(QWEN_EOS),
        "pad_token_id": tokenizer.pad_token_id,
        "rope_parameters": {"rope_type": "default", "mrope_section": mrope_section, **extra},
    }


def _qwen_processor(cls_name: str, tokenizer: Any, template: str, **image: Any) -> Any:
    """The family's processor (images only: joulecap serves no video) on the PIL image processor."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from joulecap.runtime.engines.processors import images_only

    cls = images_only(getattr(transformers, cls_name))
    return cls(image_processor=Qwen2VLImageProcessorPil(**image), tokenizer=tokenizer, chat_template=template)


def _qwen_generation(model: Any, tokenizer: Any) -> None:
    """Released Qwen-VL generation configs stop on `<|im_end|>` and `<|endoftext|>`."""
    eos, pad = tokenizer.convert_tokens_to_ids(QWEN_EOS), tokenizer.convert_tokens_to_ids(QWEN_PAD)
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = pad


QWEN2_IMAGE: dict[str, int] = {
    "min_pixels": 56 * 56,  # released value
    "max_pixels": 28 * 28 * 128,  # released: 28 * 28 * 16384
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
}
"""Image processor settings Qwen2-VL and Qwen2.5-VL share (patch 14, 2x2 merge)."""


def build_qwen2_vl() -> tuple[Any, Any]:
    """Qwen2-VL: ViT with 2-D rotary patches (patch 14), 2x2 patch merger, M-RoPE LM."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    config = Qwen2VLConfig(
        text_config=_qwen_text(tokenizer, [4, 6, 6], rope_theta=1e6),
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 64,  # the merger's output: the LM width
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        tie_word_embeddings=False,
        **_qwen_ids(tokenizer),
    )
    model = Qwen2VLForConditionalGeneration(config)
    _qwen_generation(model, tokenizer)
    processor = _qwen_processor("Qwen2VLProcessor", tokenizer, QWEN2_VL_TEMPLATE, **QWEN2_IMAGE)
    return model, processor


def build_qwen2_5_vl() -> tuple[Any, Any]:
    """Qwen2.5-VL: windowed-attention ViT (full attention every few blocks), SwiGLU, M-RoPE LM."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tokenizer, [4, 6, 6], rope_theta=1e6),
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 64,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,  # released value: 8x8 patches per attention window
            "fullatt_block_indexes": [1],  # released: every 8th of 32 blocks
        },
        tie_word_embeddings=False,
        **_qwen_ids(tokenizer),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    _qwen_generation(model, tokenizer)
    processor = _qwen_processor("Qwen2_5_VLProcessor", tokenizer, QWEN2_VL_TEMPLATE, **QWEN2_IMAGE)
    return model, processor


def build_qwen3_vl() -> tuple[Any, Any]:
    """Qwen3-VL: ViT with learned + rotary positions (patch 16), deepstack features, interleaved M-RoPE."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    config = Qwen3VLConfig(
        text_config=_qwen_text(tokenizer, [6, 5, 5], mrope_interleaved=True, rope_theta=5e6)
        | {"head_dim": 32},
        vision_config={
            "depth": 3,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 64,
            "num_heads": 4,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,  # released: a 48x48 learned grid, interpolated
            "deepstack_visual_indexes": [0, 1],  # released: [8, 16, 24] of 27 blocks
        },
        tie_word_embeddings=False,
        **_qwen_ids(tokenizer),
    )
    model = Qwen3VLForConditionalGeneration(config)
    _qwen_generation(model, tokenizer)
    processor = _qwen_processor(
        "Qwen3VLProcessor",
        tokenizer,
        QWEN3_VL_TEMPLATE,
        min_pixels=256 * 256,  # released value: at least 8x8 merged tokens
        max_pixels=32 * 32 * 128,  # released: 4096 * 4096
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return model, processor


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
}
"""Tiny-model architecture -> builder. Each builder makes its own tokenizer and generation config."""
