"""InternVL3 (transformers' native `internvl` port) built offline: tiny model and shared parts.

InternVL3 cuts each image into dynamic tiles (1 to 12 square crops chosen by aspect ratio, plus a
thumbnail when there is more than one) and gives every tile `image_seq_length` tokens: the
InternViT patch grid, pixel-shuffled by 0.5 and projected by an MLP. The processor expands each
`<IMG_CONTEXT>` of the chat template into `<img>` + tiles x `image_seq_length` x `<IMG_CONTEXT>` +
`</img>`. The tiny model keeps the dynamic tiles (64 px tiles, up to 12), 64 tokens per tile
(16x16 patches shuffled to 8x8), a Qwen2 LM, the real special tokens and the ChatML template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from joulecap.runtime.tiny_common import byte_tokenizer, save_built, seeded

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIALS = (EOT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO)
STOP_TOKENS = (IM_END, EOT)

# InternVL3's ChatML template shape: an image item is `<IMG_CONTEXT>\n` before its text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_TILE = 64
TINY_PATCH = 4
TINY_TOKENS_PER_TILE = (TINY_TILE // TINY_PATCH) ** 2 // 4  # pixel shuffle 0.5 in each direction
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
TINY_VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": TINY_TILE,
    "patch_size": TINY_PATCH,
    "attention_bias": True,
}


def internvl_tokenizer(model_max_length: int = 4096) -> Any:
    """Byte-level tokenizer with InternVL3's special tokens and its processor's named tokens."""
    return byte_tokenizer(
        SPECIALS,
        bos=IM_START,
        eos=IM_END,
        pad=EOT,
        named={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
        },
        model_max_length=model_max_length,
    )


def internvl_processor(tokenizer: Any, tile: int, tokens_per_tile: int, max_tiles: int = 12) -> Any:
    """InternVL's processor: GOT-OCR2 PIL image processor with dynamic tiles, no video processor."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    from joulecap.runtime.engines.processors import images_only

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        resample=3,  # bicubic
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    # The class check of a video processor needs torchvision: build the images-only variant the
    # runtime's loader also loads (saved configs still name `InternVLProcessor`).
    return images_only(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )


def internvl_config(
    tokenizer: Any, text: dict[str, Any], vision: dict[str, Any], tokens_per_tile: int
) -> Any:
    """An `InternVLConfig` (Qwen2 LM) whose special-token ids are `tokenizer`'s."""
    from transformers import InternVLConfig

    return InternVLConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            **text,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )


def build_tiny_internvl(out_dir: Path | str, seed: int = 0) -> Path:
    """Build and save the tiny random-weight InternVL3 (see the module docstring)."""
    from transformers import InternVLForConditionalGeneration

    tokenizer = internvl_tokenizer()
    with seeded(seed):
        model = InternVLForConditionalGeneration(
            internvl_config(tokenizer, TINY_TEXT, TINY_VISION, TINY_TOKENS_PER_TILE)
        )
    processor = internvl_processor(tokenizer, TINY_TILE, TINY_TOKENS_PER_TILE)
    return save_built(
        model, processor, out_dir, stop_tokens=STOP_TOKENS, marker={"arch": "internvl", "seed": seed}
    )
