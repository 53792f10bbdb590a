"""A small memo of the budget's sketch, so `select_tokens` can reuse it for leverage scores.

The scheduler calls `spectral_budget(feats)` and the engine then `select_tokens(feats, k)` on the
same tensor object. The budget's sketch already holds an orthonormal basis of the dominant token
subspace, so recomputing it for the leverage scores would double the cost of the hot path.

Entries are keyed by the tensor object (identity through a weak reference, plus its version
counter, data pointer, shape and dtype), so an in-place change or a new tensor at a reused
address never hits a stale entry. The memo holds at most `MAX_ENTRIES` bases (each `[N, r]`
fp32, ~150 KB for 576 x 64) and is thread-safe. Inference-mode tensors have no version counter,
so an in-place change could not be detected: they are never memoised (selection recomputes).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

from joulecap.kernels.randomized import SketchBasis

MAX_ENTRIES = 64

_lock = threading.Lock()
_entries: OrderedDict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...], SketchBasis]] = OrderedDict()


def _fingerprint(x: torch.Tensor) -> tuple[Any, ...]:
    return (x._version, x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


def put(x: torch.Tensor, basis: SketchBasis) -> None:
    """Remember `basis` as the sketch of tensor `x` (a no-op for inference-mode tensors)."""
    if x.is_inference():
        return
    with _lock:
        _entries[id(x)] = (weakref.ref(x), _fingerprint(x), basis)
        _entries.move_to_end(id(x))
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)


def get(x: torch.Tensor) -> SketchBasis | None:
    """The remembered sketch of this very tensor, unchanged since, or None."""
    if x.is_inference():
        return None
    with _lock:
        hit = _entries.get(id(x))
        if hit is None:
            return None
        ref, fp, basis = hit
        if ref() is not x or fp != _fingerprint(x):
            del _entries[id(x)]
            return None
        return basis


def clear() -> None:
    """Forget every entry (tests, benchmarks)."""
    with _lock:
        _entries.clear()
