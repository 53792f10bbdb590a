"""Realistic-shape models: random weights with the real configuration dimensions of released VLMs.

`joulecap make-tiny-model --shape NAME DIR` builds a model whose layers, hidden sizes, heads,
vocabulary, vision tower and tokens per image are those of a released checkpoint, with random
weights and joulecap's byte-level tokenizer (the embedding and output matrices keep the real
vocabulary size; the tokenizer only uses its first few hundred rows). Answers are noise, but the
arithmetic per token, and so the time and energy per token, is the real one: energy sweeps on these
models force output lengths (end-of-sequence ignored) instead of relying on what they say.

The dimensions below are TRANSCRIBED by hand from each model's published `config.json` and
processor configs on the Hugging Face hub (named per shape), since nothing can be downloaded here.
`tests/test_shapes.py` checks each shape's parameter count, counted on the meta device without
allocating weights, against the size its model card publishes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joulecap.runtime.tiny_common import save_built, seeded

SHAPE_NAMES = ("smolvlm-256m", "smolvlm-500m", "internvl3-1b", "qwen2.5-vl-3b", "gemma-3-4b")
"""Names accepted by `--shape` (the table `_shapes()` builds, listed here so the CLI imports nothing)."""


@dataclass(frozen=True)
class Shape:
    """One released model's dimensions.

    Attributes:
        name: Shape name (`--shape`).
        source: The checkpoint whose configs the dimensions are transcribed from.
        arch: Hugging Face `model_type` of the result.
        published_params_b: Parameters its model card publishes, in billions.
        tokens_per_image: Visual tokens per image (per tile for tiled families), as the real one;
            0 where it varies with the image (Qwen's one token per 28x28 px).
        config: `(tokenizer) -> PretrainedConfig` with the real dimensions.
        processor: `(tokenizer) -> processor` with the real image settings.
        tokenizer: `() -> tokenizer` with the family's special tokens.
        stop_tokens: Tokens that end an answer.

    """

    name: str
    source: str
    arch: str
    published_params_b: float
    tokens_per_image: int
    config: Callable[[Any], Any]
    processor: Callable[[Any], Any]
    tokenizer: Callable[[], Any]
    stop_tokens: tuple[str, ...]


# ------------------------------------------------------------------------------- SmolVLM (Idefics3)
# HuggingFaceTB/SmolVLM-256M-Instruct and -500M-Instruct: SigLIP base patch-16 at 512 px (12 layers,
# 768 wide), pixel shuffle 4 -> 64 tokens per 512 px tile; image splitting on, images resized to a
# 2048 px longest edge (N = 4 x 512) and cut into 512 px tiles plus a global image; SmolLM2 LMs with
# a 49,280-token vocabulary and untied output embeddings.
_SMOL_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 512,
    "patch_size": 16,
}
_SMOL_TEXT = {
    "smolvlm-256m": {  # SmolLM2-135M
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "smolvlm-500m": {  # SmolLM2-360M
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
    },
}
_SMOL_COMMON_TEXT: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 49280,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def _smol_tokenizer() -> Any:
    from joulecap.runtime.tiny_models import _build_tokenizer

    tok = _build_tokenizer()
    tok.model_max_length = int(_SMOL_COMMON_TEXT["max_position_embeddings"])
    return tok


def _smol_config(name: str) -> Callable[[Any], Any]:
    def build(tokenizer: Any) -> Any:
        from transformers import Idefics3Config

        from joulecap.runtime.tiny_models import IM_START, IMAGE

        return Idefics3Config(
            vision_config=dict(_SMOL_VISION),
            text_config={
                **_SMOL_COMMON_TEXT,
                **_SMOL_TEXT[name],
                "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START),
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            scale_factor=4,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
            tie_word_embeddings=False,
        )

    return build


def _smol_processor(tokenizer: Any) -> Any:
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    from joulecap.runtime.tiny_models import CHAT_TEMPLATE

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": 4 * 512},
        max_image_size={"longest_edge": 512},
        resample=1,  # LANCZOS, as the released preprocessor config
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64, chat_template=CHAT_TEMPLATE
    )


# ------------------------------------------------------------------------------------- InternVL3-1B
# OpenGVLab/InternVL3-1B-hf: InternViT-300M-448px-V2.5 (24 layers, 1024 wide, patch 14 at 448 px,
# qkv bias), pixel shuffle 0.5 -> 256 tokens per 448 px tile, 1-12 dynamic tiles plus a thumbnail;
# Qwen2.5-0.5B LM (24 layers, 896 wide, 14 heads / 2 KV heads, vocab 151,674, untied output).
_INTERNVL_TEXT: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151674,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
_INTERNVL_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 448,
    "patch_size": 14,
    "attention_bias": True,
    "layer_scale_init_value": 0.1,
    "norm_type": "layer_norm",
}


def _internvl_tokenizer() -> Any:
    from joulecap.runtime.tiny_internvl import internvl_tokenizer

    return internvl_tokenizer(model_max_length=int(_INTERNVL_TEXT["max_position_embeddings"]))


def _internvl_config(tokenizer: Any) -> Any:
    from joulecap.runtime.tiny_internvl import internvl_config

    return internvl_config(tokenizer, _INTERNVL_TEXT, _INTERNVL_VISION, 256)


def _internvl_processor(tokenizer: Any) -> Any:
    from joulecap.runtime.tiny_internvl import internvl_processor

    return internvl_processor(tokenizer, 448, 256, max_tiles=12)


# ---------------------------------------------------------------------------------------- Gemma-3-4B
# google/gemma-3-4b-it: SigLIP so400m patch-14 at 896 px (27 layers, 1152 wide), pooled to a fixed
# 256 tokens per image; LM 34 layers, 2560 wide, 8 heads / 4 KV heads of 256, vocab 262,208, tied
# embeddings, 5 sliding-window (1024) layers per global layer, RoPE 10k local / 1M global (x8 linear).
_GEMMA_TEXT: dict[str, Any] = {
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "vocab_size": 262208,
    "sliding_window": 1024,
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
}
_GEMMA_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
}


def _gemma_tokenizer() -> Any:
    from joulecap.runtime.tiny_gemma3 import gemma3_tokenizer

    return gemma3_tokenizer(model_max_length=int(_GEMMA_TEXT["max_position_embeddings"]))


def _gemma_config(tokenizer: Any) -> Any:
    from joulecap.runtime.tiny_gemma3 import gemma3_config

    return gemma3_config(tokenizer, _GEMMA_TEXT, _GEMMA_VISION, 256)


def _gemma_processor(tokenizer: Any) -> Any:
    from joulecap.runtime.tiny_gemma3 import gemma3_processor

    return gemma3_processor(tokenizer, 896, 256)


# ------------------------------------------------------------------------------------ Qwen2.5-VL-3B
# Qwen/Qwen2.5-VL-3B-Instruct: ViT of 32 blocks, 1280 wide, patch 14, windowed attention (112 px)
# with full attention in blocks 7/15/23/31, 2x2 patch merger to 2048; variable tokens per image
# (one per 28x28 px, 4 to 16,384 between min_pixels 3,136 and max_pixels 12,845,056); LM 36 layers,
# 2048 wide, 16 heads / 2 KV heads, vocab 151,936, tied embeddings, M-RoPE sections 16/24/24.
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_QWEN_TEXT = {
    "model_type": "qwen2_5_vl_text",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": True,
}
_QWEN_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def _qwen_tokenizer() -> Any:
    from joulecap.runtime.tiny_common import byte_tokenizer

    return byte_tokenizer(
        QWEN_SPECIALS, bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>", model_max_length=128000
    )


def _qwen_config(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            **_QWEN_TEXT,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=dict(_QWEN_VISION),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def _qwen_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from joulecap.runtime.engines.processors import images_only

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=3136,
        max_pixels=12845056,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return images_only(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN_TEMPLATE
    )


def _shapes() -> dict[str, Shape]:
    from joulecap.runtime import tiny_gemma3, tiny_internvl, tiny_models

    smol_stop = (tiny_models.EOS, tiny_models.EOU)
    shapes = [
        Shape(
            "smolvlm-256m",
            "HuggingFaceTB/SmolVLM-256M-Instruct",
            "idefics3",
            0.256,
            64,
            _smol_config("smolvlm-256m"),
            _smol_processor,
            _smol_tokenizer,
            smol_stop,
        ),
        Shape(
            "smolvlm-500m",
            "HuggingFaceTB/SmolVLM-500M-Instruct",
            "idefics3",
            0.507,
            64,
            _smol_config("smolvlm-500m"),
            _smol_processor,
            _smol_tokenizer,
            smol_stop,
        ),
        Shape(
            "internvl3-1b",
            "OpenGVLab/InternVL3-1B-hf",
            "internvl",
            0.938,
            256,
            _internvl_config,
            _internvl_processor,
            _internvl_tokenizer,
            tiny_internvl.STOP_TOKENS,
        ),
        Shape(
            "qwen2.5-vl-3b",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            "qwen2_5_vl",
            3.75,
            0,  # variable: one token per 28x28 px
            _qwen_config,
            _qwen_processor,
            _qwen_tokenizer,
            ("<|im_end|>", "<|endoftext|>"),
        ),
        Shape(
            "gemma-3-4b",
            "google/gemma-3-4b-it",
            "gemma3",
            4.3,
            256,
            _gemma_config,
            _gemma_processor,
            _gemma_tokenizer,
            tiny_gemma3.STOP_TOKENS,
        ),
    ]
    return {s.name: s for s in shapes}


def shape_names() -> list[str]:
    """Names accepted by `--shape`."""
    return list(SHAPE_NAMES)


def get_shape(name: str) -> Shape:
    """The shape called `name`.

    Raises:
        ValueError: Unknown shape (the message lists the known ones).

    """
    shapes = _shapes()
    if name not in shapes:
        raise ValueError(f"Unknown model shape {name!r}; choose one of {', '.join(sorted(shapes))}.")
    return shapes[name]


def _model_class(arch: str) -> Any:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[arch])


def count_parameters(name: str) -> int:
    """Parameters of the shape's model, counted on the meta device (no weights are allocated)."""
    import torch

    shape = get_shape(name)
    config = shape.config(shape.tokenizer())
    with torch.device("meta"):
        model = _model_class(shape.arch)(config)
    return sum(p.numel() for p in model.parameters())


def build_shape_model(name: str, out_dir: Path | str, *, seed: int = 0) -> Path:
    """Build the shape's model with random weights and save it like any checkpoint.

    The weights take 4 bytes per parameter in memory and on disk (float32): about 1 GB for
    SmolVLM-256M, 17 GB for Gemma-3-4B. Building needs that much free memory.

    Args:
        name: A name from `shape_names()`.
        out_dir: Directory to write (created).
        seed: Seed of the random weights.

    Returns:
        The model directory.

    """
    shape = get_shape(name)
    tokenizer = shape.tokenizer()
    config = shape.config(tokenizer)
    with seeded(seed):
        model = _model_class(shape.arch)(config)
    processor = shape.processor(tokenizer)
    return save_built(
        model,
        processor,
        out_dir,
        stop_tokens=shape.stop_tokens,
        marker={"arch": shape.arch, "shape": name, "source": shape.source, "seed": seed},
    )
