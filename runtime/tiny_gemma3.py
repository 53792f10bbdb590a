r"""Gemma-3 built offline: a tiny random-weight model, and the parts the realistic shape reuses.

Gemma-3 gives every image a fixed 256 soft tokens: SigLIP's patch grid is average-pooled to 16x16
and projected, and the processor expands each `<start_of_image>` of the chat template into
`\n\n<start_of_image>` + 256 x `<image_soft_token>` + `<end_of_image>\n\n`. The tiny model keeps
that: 256 tokens per image from a 32x32 patch grid (128 px, patch 4) pooled 2x2, a two-layer LM
with one sliding-window and one global layer (the real 5:1 pattern's two kinds), and the real
special tokens and chat-template shape (system text folded into the first user turn, `model` as
the assistant role, `<end_of_turn>` ends an answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from joulecap.runtime.tiny_common import byte_tokenizer, save_built, seeded

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_TURN, END_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIALS = (PAD, EOS, BOS, UNK, START_TURN, END_TURN, BOI, EOI, IMAGE)
STOP_TOKENS = (EOS, END_TURN)
TOKENS_PER_IMAGE = 256
"""Gemma-3's fixed soft tokens per image (`mm_tokens_per_image`), kept by the tiny model."""

# The shape of Gemma-3's own template: BOS, a leading system message folded into the first user
# turn, `model` for the assistant role, `<start_of_image>` where an image goes, trimmed text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    # Shorter than one image block, so the sliding layers' mask composition is exercised too.
    "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 2048,
}
TINY_VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 128,
    "patch_size": 4,
}


def gemma3_tokenizer(model_max_length: int = 2048) -> Any:
    """Byte-level tokenizer with Gemma-3's special tokens and its processor's named tokens."""
    return byte_tokenizer(
        SPECIALS,
        bos=BOS,
        eos=EOS,
        pad=PAD,
        named={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE},
        model_max_length=model_max_length,
    )


def gemma3_processor(tokenizer: Any, image_size: int, tokens_per_image: int = TOKENS_PER_IMAGE) -> Any:
    """Gemma-3's processor: PIL image processor at `image_size` square, pan-and-scan off (default)."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=2,  # bilinear, as the released preprocessor config
        do_pan_and_scan=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )


def gemma3_config(
    tokenizer: Any, text: dict[str, Any], vision: dict[str, Any], tokens_per_image: int = TOKENS_PER_IMAGE
) -> Any:
    """A `Gemma3Config` whose special-token ids are `tokenizer`'s.

    The vocabulary is the tokenizer's size unless `text` sets `vocab_size`.
    """
    from transformers import Gemma3Config

    ids = tokenizer.convert_tokens_to_ids
    return Gemma3Config(
        text_config={
            "model_type": "gemma3_text",
            "vocab_size": len(tokenizer),
            **text,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": [ids(t) for t in STOP_TOKENS],
            "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config={"model_type": "siglip_vision_model", "vision_use_head": False, **vision},
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids(BOI),
        eoi_token_index=ids(EOI),
        image_token_index=ids(IMAGE),
    )


def build_tiny_gemma3(out_dir: Path | str, seed: int = 0) -> Path:
    """Build and save the tiny random-weight Gemma-3 (see the module docstring)."""
    from transformers import Gemma3ForConditionalGeneration

    tokenizer = gemma3_tokenizer()
    with seeded(seed):
        model = Gemma3ForConditionalGeneration(gemma3_config(tokenizer, TINY_TEXT, TINY_VISION))
    processor = gemma3_processor(tokenizer, int(TINY_VISION["image_size"]))
    return save_built(
        model, processor, out_dir, stop_tokens=STOP_TOKENS, marker={"arch": "gemma3", "seed": seed}
    )
