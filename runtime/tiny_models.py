"""Tiny real-architecture VLMs with random weights, built entirely offline.

`build_tiny_model("idefics3", dir)` writes an Idefics3 (the SmolVLM architecture) and
`build_tiny_model("llava", dir)` a LLaVA model, each with its processor, a byte-level tokenizer and
a chat template, saved with `save_pretrained`, so that every later load goes through the same
`from_pretrained` path as a real checkpoint. The weights are random: answers are gibberish, but the
shapes, the code paths and the energy mechanics are the real ones. A `joulecap.json` marker records
that the weights are random so the server can say so.

`demo_model_path(cache_dir)` returns the packaged trained TinyVQA model when it exists, else a
random Idefics3 demo built once (atomically) into the cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from joulecap.runtime.tiny_common import MARKER, write_built

log = logging.getLogger(__name__)

Arch = Literal["idefics3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl"]

SAVING_BUILDERS: dict[str, str] = {
    "gemma3": "joulecap.runtime.tiny_gemma3:build_tiny_gemma3",
    "internvl": "joulecap.runtime.tiny_internvl:build_tiny_internvl",
}
"""Families whose tiny builder lives in its own module and saves the model itself, with its own
tokenizer: `module:function` taking `(out_dir, seed)` (imported on first use)."""

PACKAGED_DEMO = Path(__file__).parent / "data" / "tinyvqa"
"""Where the trained TinyVQA demo model is packaged (when it has been trained)."""

DEMO_DIR_NAME = "demo-idefics3"

# Sizes: small enough for < 5 MB on disk and sub-millisecond layers on CPU, large enough that
# visual-token pruning matters (64 visual tokens per image). The LM has 2 query heads of 32 sharing
# one KV head (grouped-query attention, like SmolVLM); head_dim 32 is also the smallest vLLM's CPU
# attention kernels accept.
_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
IDEFICS3_IMAGE_SIZE = 128
IDEFICS3_PATCH = 8
IDEFICS3_SCALE = 2
LLAVA_IMAGE_SIZE = 64
LLAVA_PATCH = 8

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IMAGE = "<image>"
FAKE = "<fake_token_around_image>"
GLOBAL = "<global-img>"
EOU = "<end_of_utterance>"
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIALS = [EOS, IM_START, IMAGE, FAKE, GLOBAL, EOU, *ROW_COL]

# SmolVLM's template shape: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:". String
# content is accepted too so plain text chats render the same way.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'] and message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def byte_tokenizer(
    specials: list[str], *, bos: str | None, eos: str, pad: str, max_length: int, **extra: Any
) -> Any:
    """A byte-level tokenizer: 256 byte symbols plus `specials`, no merges.

    Byte-level means any text (any language, any byte) round-trips without an unknown token, and
    building it needs no training corpus, so it is deterministic by construction. `specials` are
    single tokens, in order, after the bytes; `extra` goes to the tokenizer (e.g. named tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    named = {bos, eos, pad} - {None}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in specials if t not in named],
        model_max_length=max_length,
        **extra,
    )
    fast.padding_side = "left"
    return fast


def _build_tokenizer() -> Any:
    """The Idefics3/LLaVA tokenizer: bytes plus SmolVLM's special tokens."""
    return byte_tokenizer(
        SPECIALS, bos=IM_START, eos=EOS, pad=EOS, max_length=int(_TEXT["max_position_embeddings"])
    )


def _text_config(tokenizer: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        **_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _stop_ids(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOU)]


def _build_idefics3(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    config = Idefics3Config(
        vision_config={
            **_VISION,
            "image_size": IDEFICS3_IMAGE_SIZE,
            "patch_size": IDEFICS3_PATCH,
        },
        text_config=_text_config(tokenizer),
        scale_factor=IDEFICS3_SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=False,
    )
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,  # one image = one block of visual tokens in the demo
        size={"longest_edge": IDEFICS3_IMAGE_SIZE},
        max_image_size={"longest_edge": IDEFICS3_IMAGE_SIZE},
    )
    seq_len = (IDEFICS3_IMAGE_SIZE // IDEFICS3_PATCH) ** 2 // IDEFICS3_SCALE**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def llava_processor(tokenizer: Any, image_size: int, patch: int) -> Any:
    """A LLaVA processor (PIL CLIP image processor, square `image_size`) with joulecap's chat template.

    Shared by the tiny random-weight LLaVA and the trained TinyVQA model.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def _build_llava(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    n_tokens = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            **_VISION,
            "image_size": LLAVA_IMAGE_SIZE,
            "patch_size": LLAVA_PATCH,
            "projection_dim": 64,
        },
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    return model, llava_processor(tokenizer, LLAVA_IMAGE_SIZE, LLAVA_PATCH)


_BUILDERS = {"idefics3": _build_idefics3, "llava": _build_llava}


def tiny_archs() -> list[str]:
    """Every architecture `build_tiny_model` builds (`make-tiny-model --arch`), sorted."""
    from joulecap.runtime.tiny_families import BUILDERS as FAMILY_BUILDERS

    return sorted({*_BUILDERS, *FAMILY_BUILDERS, *SAVING_BUILDERS})


def build_tiny_model(arch: Arch, out_dir: Path | str, *, seed: int = 0) -> Path:
    """Build a tiny random-weight VLM of a real architecture and save it with `save_pretrained`.

    Args:
        arch: `idefics3` (SmolVLM architecture), `llava`, a family of
            `joulecap.runtime.tiny_families.BUILDERS` (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, ...),
            or of `SAVING_BUILDERS` (`gemma3`, `internvl`).
        out_dir: Directory to write (created; existing files are overwritten).
        seed: Seed of the random weights; the same seed gives the same weights.

    Returns:
        The model directory, loadable with `AutoProcessor` / `AutoModelForImageTextToText`.

    Raises:
        ValueError: Unknown architecture.

    """
    import importlib

    import torch

    if arch not in tiny_archs():
        raise ValueError(f"Unknown tiny-model architecture {arch!r}; choose one of {tiny_archs()}.")
    if arch in SAVING_BUILDERS:
        module, function = SAVING_BUILDERS[arch].split(":")
        return Path(getattr(importlib.import_module(module), function)(out_dir, seed))
    from joulecap.runtime.tiny_families import BUILDERS as FAMILY_BUILDERS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Seed only around the weight initialisation, restoring the caller's RNG state afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch in FAMILY_BUILDERS:
            # These bring their own tokenizer and generation config (the family's special tokens).
            model, processor = FAMILY_BUILDERS[arch]()
        else:
            tokenizer = _build_tokenizer()
            model, processor = _BUILDERS[arch](tokenizer)
            model.generation_config.eos_token_id = _stop_ids(tokenizer)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.bos_token_id = tokenizer.convert_tokens_to_ids(IM_START)
    return write_built(model, processor, out, {"arch": arch, "seed": seed})


def demo_model_path(cache_dir: Path | str) -> Path:
    """The model served when no `--model` is given.

    The trained TinyVQA model when it is packaged, else a random-weight Idefics3 demo built once
    into `cache_dir / "demo-idefics3"`. The build goes to a temporary directory that is renamed into
    place, so concurrent processes never see a half-written model (the loser of the race discards
    its copy).
    """
    if (PACKAGED_DEMO / "config.json").is_file():
        return PACKAGED_DEMO
    cache = Path(cache_dir)
    target = cache / DEMO_DIR_NAME
    if (target / MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("building the random-weight demo model into %s (once)", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR_NAME}-", dir=cache))
    try:
        build_tiny_model("idefics3", tmp, seed=0)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model directory
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its build first (target exists and is non-empty).
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
