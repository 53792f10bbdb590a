"""The serving path's per-request shortcuts give what their plain forms give.

`StreamDetokenizer` remembers the text of a window's head across requests and calls a Hugging Face
tokenizer's `_decode` directly: its deltas and text are those of `decode` on every window afresh.
A ledger row's plan JSON, read field by field, is `json.dumps(asdict(plan))`. Fast: no model (a
byte-level stand-in tokenizer, and the tiny VQA model's tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest

from joulecap.runtime.engines.decoding import StreamDetokenizer
from joulecap.runtime.ledger import _plan_json
from joulecap.runtime.types import Plan


class ByteTokenizer:
    """Token i is byte i (plus special tokens >= 256): multi-byte characters span several tokens."""

    def __init__(self) -> None:
        self.calls = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls += 1
        return bytes(i for i in ids if i < 256 or not skip_special_tokens).decode("utf-8", errors="replace")


def _plain_deltas(tokenizer: Any, ids: list[int]) -> list[str]:
    """The sliding-window detokenizer with every window decoded afresh (its definition)."""
    out, emitted, prefix, read = [], [], 0, 0
    for n in range(len(ids)):
        if n == len(ids) - 1:
            full = tokenizer.decode(ids, skip_special_tokens=True)
            sent = "".join(emitted)
            out.append(full[len(sent) :] if full.startswith(sent) else "")
            break
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(ids[prefix : n + 1], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            prefix, read = read, n + 1
            emitted.append(delta)
            out.append(delta)
        else:
            out.append("")
    return out


@pytest.mark.parametrize("seed", range(40))
def test_the_detokenizer_s_deltas_are_those_of_decoding_every_window(seed: int) -> None:
    rng = random.Random(seed)
    tokenizer = ByteTokenizer()
    texts = ["héllo wörld € 🙂 done", "plain ascii", "日本語のテキスト", "a\u00e9\u20ac\U0001f642b"]
    for _ in range(3):  # later requests read what earlier ones remembered
        text = rng.choice(texts)
        ids = list(text.encode())
        for _ in range(rng.randint(0, 3)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice([257, 300, rng.randrange(128, 256)]))
        detok = StreamDetokenizer(tokenizer)
        deltas = [detok.push(t, final=n == len(ids) - 1) for n, t in enumerate(ids)]
        assert deltas == _plain_deltas(ByteTokenizer(), ids)
        assert detok.text == "".join(deltas)


def test_the_detokenizer_decodes_once_per_token_once_window_heads_are_known() -> None:
    tokenizer = ByteTokenizer()
    ids = list(b"the same answer again")
    for _ in range(2):
        tokenizer.calls = 0
        detok = StreamDetokenizer(tokenizer)
        for n, t in enumerate(ids):
            detok.push(t, final=n == len(ids) - 1)
    assert tokenizer.calls == len(ids)  # one decode per token (the last one: the full flush)


def test_the_detokenizer_decodes_a_hugging_face_tokenizer_as_its_decode_does() -> None:
    # The tiny VQA model's byte-level BPE tokenizer: `decode`'s own text for every window, the
    # special tokens (skipped) included.
    from pathlib import Path

    from transformers import AutoTokenizer

    import joulecap.runtime

    tokenizer = AutoTokenizer.from_pretrained(Path(joulecap.runtime.__file__).parent / "data" / "tinyvqa")
    assert StreamDetokenizer(tokenizer)._plain_decode is not None  # the shortcut is taken
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        detok = StreamDetokenizer(tokenizer)
        deltas = [detok.push(t, final=n == len(ids) - 1) for n, t in enumerate(ids)]
        assert deltas == _plain_deltas(tokenizer, ids)
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "plan",
    [
        Plan((64, 0), 32, 1.25, "joint", "why"),
        Plan((), 1, 0.0, "baseline", "", brevity_hint="Be brief.", budget_j=3.5, min_j=None, margin=0.2),
        Plan((7,), 8, float("inf"), "output_budget", "r", holds_budget=False, encode_j=0.1, plan_margin=0.3),
    ],
)
def test_a_plan_s_ledger_json_is_its_asdict_json(plan: Plan) -> None:
    assert _plan_json(plan) == json.dumps(dataclasses.asdict(plan), sort_keys=True)
    assert _plan_json(None) is None
