"""Split one measured window's energy among the requests that ran in it (batched decoding).

Each request's share is proportional to its token work in the window:
`prefill_tokens x prefill_cost + decode_tokens x decode_cost`, with the costs being the
calibrated per-token energies (only their ratio matters). The shares add up to the window's
energy exactly, in floating point and in any order: every share is an integer multiple of the
window's unit in the last place, the multiples are apportioned by largest remainder so they
sum to the window's integer count, and sums of such multiples below the window are exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenWork:
    """Tokens one request processed inside a window."""

    prefill_tokens: int = 0
    decode_tokens: int = 0


def split_by_token_work(
    window_j: float,
    work: Mapping[str, TokenWork],
    *,
    prefill_cost: float,
    decode_cost: float,
) -> dict[str, float]:
    """Attribute `window_j` to requests in proportion to their token work.

    Args:
        window_j: Energy measured over the window (>= 0).
        work: Request id -> tokens it processed in the window.
        prefill_cost: Relative energy of one prefill token (>= 0).
        decode_cost: Relative energy of one decode token (>= 0).

    Returns:
        Request id -> joules, same keys and order as `work`; the values sum to `window_j`
        exactly. When no request did weighted work the window is split evenly.

    Raises:
        ValueError: Negative or non-finite inputs, or energy to attribute but no requests.

    """
    if not math.isfinite(window_j) or window_j < 0:
        raise ValueError(f"window_j must be finite and >= 0, got {window_j}")
    for name, cost in (("prefill_cost", prefill_cost), ("decode_cost", decode_cost)):
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {cost}")
    if not work:
        if window_j > 0:
            raise ValueError("energy to attribute but no requests in the window")
        return {}
    keys = list(work)
    weights = []
    for key in keys:
        w = work[key]
        if w.prefill_tokens < 0 or w.decode_tokens < 0:
            raise ValueError(f"negative token counts for {key!r}: {w}")
        weights.append(w.prefill_tokens * prefill_cost + w.decode_tokens * decode_cost)
    if window_j == 0:
        return dict.fromkeys(keys, 0.0)
    if len(keys) == 1:
        # What the apportionment below gives one request (the whole window), without its cost:
        # most step windows under light load hold one request.
        return {keys[0]: window_j}
    total_w = math.fsum(weights)
    if not total_w > 0 or not math.isfinite(total_w):
        weights, total_w = [1.0] * len(keys), float(len(keys))

    quantum = math.ulp(window_j)
    units = round(window_j / quantum)  # exact: window_j is an integer number of its own ulps
    raw = [units * (w / total_w) for w in weights]
    counts = [math.floor(r) for r in raw]
    remaining = units - sum(counts)
    # Largest remainders get the leftover units (stable order for ties).
    order = sorted(range(len(keys)), key=lambda i: (counts[i] - raw[i], i))
    step = 1 if remaining > 0 else -1
    i = 0
    while remaining != 0:
        idx = order[i % len(order)] if step > 0 else order[-1 - (i % len(order))]
        if step > 0 or counts[idx] > 0:
            counts[idx] += step
            remaining -= step
        i += 1
    return {key: count * quantum for key, count in zip(keys, counts, strict=True)}
