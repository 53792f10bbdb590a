"""Shared parts of the per-family offline builders: a byte-level tokenizer and the save step.

Real checkpoints ship tokenizers of 49k-262k entries; these models are built offline, so their
tokenizer is 256 byte symbols plus the family's real special tokens (`<start_of_image>`,
`<IMG_CONTEXT>`, ...). Any text round-trips, no training corpus is needed, and the result is
deterministic. Family-specific attributes a processor reads from its tokenizer (Gemma-3's
`boi_token`, InternVL's `context_image_token`, ...) are passed through `named` and saved with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = "joulecap.json"
"""Marker file written beside the weights of a built model: `{"random_weights": true, ...}` with the
builder's facts (`arch` and `seed` for the tiny models, the `shape` for realistic-shape ones)."""


def byte_tokenizer(
    specials: Sequence[str],
    *,
    bos: str,
    eos: str,
    pad: str,
    named: Mapping[str, str] | None = None,
    model_max_length: int = 2048,
) -> Any:
    """A `PreTrainedTokenizerFast` over bytes with `specials` as single special tokens.

    Args:
        specials: Every special token of the family, in id order after the 256 byte symbols
            (`bos`, `eos` and `pad` must be among them).
        bos: Beginning-of-sequence token.
        eos: End-of-sequence token.
        pad: Padding token.
        named: Extra named special tokens the family's processor reads as tokenizer attributes,
            e.g. `{"boi_token": "<start_of_image>"}`.
        model_max_length: Longest sequence the tokenizer reports.

    Raises:
        ValueError: `bos`, `eos`, `pad` or a named token is not in `specials`.

    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    missing = [t for t in (bos, eos, pad, *(named or {}).values()) if t not in specials]
    if missing:
        raise ValueError(f"Special tokens {missing} are not in the tokenizer's specials.")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Added to the backend itself so they survive save/load with their ids, whatever their role.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=model_max_length,
        **dict(named or {}),
    )
    fast.padding_side = "left"
    return fast


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block only, restoring the caller's RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_built(
    model: Any,
    processor: Any,
    out_dir: Path | str,
    *,
    stop_tokens: Sequence[str],
    marker: Mapping[str, Any],
) -> Path:
    """Write a built model and its processor with `save_pretrained`, plus the random-weights marker.

    Args:
        model: The `...ForConditionalGeneration` model.
        processor: Its processor (its tokenizer gives the generation config's special ids).
        out_dir: Directory to write (created).
        stop_tokens: Tokens that end an answer (generation config `eos_token_id`).
        marker: Facts for `joulecap.json` (`random_weights` is always true).

    Returns:
        The model directory.

    """
    tok = processor.tokenizer
    model.generation_config.eos_token_id = [int(tok.convert_tokens_to_ids(t)) for t in stop_tokens]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return write_built(model, processor, out_dir, marker)


def write_built(model: Any, processor: Any, out_dir: Path | str, marker: Mapping[str, Any]) -> Path:
    """`save_pretrained` the model and processor as they are, then the random-weights marker.

    Args:
        model: The built model, its generation config already set.
        processor: Its processor.
        out_dir: Directory to write (created).
        marker: Facts for `joulecap.json` (`random_weights` is always true).

    Returns:
        The model directory.

    """
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second write needs no progress bar in server logs
    try:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (out / MARKER).write_text(json.dumps({"random_weights": True, **marker}, indent=2) + "\n")
    return out


Builder = Callable[[Path, int], Path]
"""`(out_dir, seed) -> out_dir`: builds one family's tiny model and saves it."""
