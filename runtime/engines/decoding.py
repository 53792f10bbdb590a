"""Token choice (greedy, temperature/top-p sampling), streaming detokenisation, and the run result."""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

from joulecap.runtime.types import GenerationResult, PhaseTimes, SamplingParams, StopReason

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.engines.base import RunHooks

_REPLACEMENT = "\ufffd"


class TokenChooser:
    """Picks the next token from logits according to `SamplingParams`.

    Greedy is `argmax` over float32 logits, as `transformers.generate` does, so that the parity
    test compares like with like. Sampling draws from a `torch.Generator` seeded with
    `sampling.seed` on the logits' device: the same seed, prompt and plan give the same tokens.

    Args:
        sampling: Decoding settings.
        device: Device the logits live on.

    """

    def __init__(self, sampling: SamplingParams, device: torch.device) -> None:
        self.sampling = sampling
        self.generator: torch.Generator | None = None
        if not sampling.greedy:
            self.generator = torch.Generator(device=device)
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(sampling.seed))

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from `[V]` logits."""
        scores = logits.float()
        if self.generator is None:
            return int(scores.argmax(-1))
        # Subtract the max first and keep the temperature representable in float32: a tiny
        # temperature then gives 0 and -inf scores (argmax-like), never inf/inf or 0/0 = nan.
        scores = (scores - scores.max()) / max(self.sampling.temperature, 1e-6)
        top_p = self.sampling.top_p
        if top_p < 1.0:
            sorted_scores, order = scores.sort(descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            # Drop a token when the mass before it already reaches top_p (the first always stays).
            drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= top_p
            drop_sorted[..., 0] = False  # rounding must not drop the top token (tiny top_p)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


_KNOWN_WINDOW = 2
"""Longest window head (in tokens) whose decoded text `StreamDetokenizer` remembers."""
_MAX_KNOWN = 1 << 16
"""Window heads remembered per tokenizer."""
_DECODED: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], str]] = weakref.WeakKeyDictionary()


def _decoded_windows(tokenizer: Any) -> dict[tuple[int, ...], str] | None:
    """The tokenizer's remembered window-head texts (None when it cannot be weakly referenced)."""
    try:
        known = _DECODED.get(tokenizer)
        if known is None:
            known = _DECODED.setdefault(tokenizer, {})
    except TypeError:
        return None
    return known


def _plain_decode(tokenizer: Any) -> Any:
    """The tokenizer's `_decode` when its `decode` is Hugging Face's own, else None.

    That `decode` converts the ids to a Python list (`to_py_obj`: a copy, for a list of ints)
    and returns `_decode` of them; its conversion checks every id on every call, twice per
    generated token. The ids here are already a list of ints, so `_decode` gives the same text.
    A tokenizer class that overrides `decode` keeps it.
    """
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return None
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return None
    if type(tokenizer).decode is not PreTrainedTokenizerBase.decode:
        return None
    return getattr(tokenizer, "_decode", None)


class StreamDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation is the final text.

    Byte-level tokenizers can split one character over several tokens; a delta is held back while
    the decoded tail is an incomplete character (U+FFFD) and released once it resolves. Decoding
    uses a sliding window (`prefix`..end) so each step costs O(window), not O(tokens so far).

    Args:
        tokenizer: A Hugging Face tokenizer.

    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted: list[str] = []
        self._prefix = 0
        self._read = 0
        self._known = _decoded_windows(tokenizer)
        self._plain_decode = _plain_decode(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._plain_decode is not None:
            return str(self._plain_decode(token_ids=ids, skip_special_tokens=True))
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _decode_prefix(self) -> str:
        # The window's head is almost always the previous token alone: the same few ids recur
        # across requests, and decoding is a pure function of them, so their text is remembered
        # (one `decode` per token instead of two).
        ids = self.ids[self._prefix : self._read]
        if self._known is None or len(ids) > _KNOWN_WINDOW:
            return self._decode(ids)
        key = tuple(ids)
        text = self._known.get(key)
        if text is None:
            text = self._decode(ids)
            if len(self._known) < _MAX_KNOWN:
                self._known[key] = text
        return text

    def push(self, token_id: int, *, final: bool = False) -> str:
        """Add a token; return the text it makes available (`final` flushes everything)."""
        self.ids.append(token_id)
        if final:
            return self._flush()
        prefix_text = self._decode_prefix()
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.emitted.append(delta)
            return delta
        return ""

    def _flush(self) -> str:
        full = self._decode(self.ids)
        sent = "".join(self.emitted)
        # Sliding-window decoding agrees with full decoding for the tokenizers we serve; if one ever
        # disagrees, keep what was already streamed so deltas still concatenate to `text`.
        delta = full[len(sent) :] if full.startswith(sent) else ""
        self.emitted.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self.emitted)


def stop_after_token(
    token: int, generated: int, max_new: int, stop_ids: frozenset[int] | set[int], hooks: RunHooks
) -> StopReason | None:
    """Why decoding ends after `token` (the `generated`-th token), or None to go on.

    The order matters and is shared by every engine: a stop token wins over the length cap,
    which wins over a cancellation and then over the governor (`hooks.should_stop`).
    """
    if token in stop_ids:
        return "stop"
    if generated >= max_new:
        return "length"
    if hooks.cancelled.is_set():
        return "aborted"
    if hooks.should_stop is not None and hooks.should_stop(generated):
        return "energy_budget"
    return None


def finish_run(
    detok: StreamDetokenizer,
    reason: StopReason,
    *,
    prefill_tokens: int,
    visual_in: int,
    visual_kept: int,
    start_s: float,
    first_token_s: float | None,
) -> GenerationResult:
    """The result of a finished run, stamped with its end time now (shared by every engine)."""
    end_s = time.monotonic()
    return GenerationResult(
        text=detok.text,
        token_ids=tuple(detok.ids),
        stop_reason=reason,
        prefill_tokens=prefill_tokens,
        visual_tokens_in=visual_in,
        visual_tokens_kept=visual_kept,
        # A run that produced no token (aborted before its first step) ends where it starts decoding.
        times=PhaseTimes(start_s=start_s, first_token_s=first_token_s or end_s, end_s=end_s),
    )
