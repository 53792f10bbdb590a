"""Argument checks shared by every budget and selection path.

All paths (float64 reference, randomized PyTorch, Triton) go through these checks first, so an
invalid input fails the same way whichever implementation would have run. Non-finite features
raise instead of producing a budget: a NaN spectrum would otherwise turn into a silent prune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BudgetArgs:
    """Validated budget arguments.

    Attributes:
        features: The features as `[B, N, D]` (a single image gets B = 1).
        batched: Whether the caller passed `[B, N, D]` (the result then has shape `[B]`).
        tau: Energy fraction in (0, 1].
        lo: Lower clamp after clamping `k_min` to `hi` (so `k_min > N` keeps all N tokens).
        hi: Upper clamp, `min(N, k_max)`.

    """

    features: torch.Tensor
    batched: bool
    tau: float
    lo: int
    hi: int


def check_finite(features: torch.Tensor) -> None:
    """Raise `ValueError` when `features` holds NaN or infinite values.

    The fast test is one fp32 norm (NaN and inf propagate into it; ~0.4 ms for 576 x 4096 on one
    core against ~8 ms for `isfinite().all()`); only a non-finite norm, which finite values that
    overflow fp32 squares can also produce, pays for the element-wise check.
    """
    if not features.numel():
        return
    norm = torch.linalg.vector_norm(
        features, dtype=torch.float32 if features.dtype != torch.float64 else None
    )
    if bool(torch.isfinite(norm)):
        return
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or infinite values; refusing to compute a budget from them")


def check_features(features: torch.Tensor, *, dims: tuple[int, ...] = (2, 3)) -> None:
    """Check the rank, dtype and finiteness of a feature tensor."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() not in dims:
        shapes = " or ".join({2: "[N, D]", 3: "[B, N, D]"}[d] for d in dims)
        raise ValueError(f"features must be {shapes}, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    check_finite(features)


def check_tau(tau: float) -> float:
    """Return `tau` as a float after checking it lies in (0, 1]."""
    value = float(tau)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    return value


def budget_args(
    features: torch.Tensor, tau: float, *, k_min: int = 1, k_max: int | None = None
) -> BudgetArgs:
    """Validate the arguments of `spectral_budget`.

    `k_min` larger than N (or than `k_max`) is clamped down to `min(N, k_max)`: a minimum the
    image cannot satisfy means "keep everything allowed", not an error, because the scheduler
    passes one `k_min` for images of every size.

    Args:
        features: `[N, D]` or `[B, N, D]` floating-point features.
        tau: Energy fraction in (0, 1].
        k_min: Fewest tokens kept (>= 0).
        k_max: Most tokens kept (>= 0), or None for N.

    Returns:
        The validated arguments.

    Raises:
        ValueError: On NaN/inf features, a bad shape, tau outside (0, 1] or negative clamps.
        TypeError: On a non-tensor or integer tensor.

    """
    check_features(features)
    t = check_tau(tau)
    if int(k_min) != k_min or k_min < 0:
        raise ValueError(f"k_min must be a non-negative integer, got {k_min}")
    if k_max is not None and (int(k_max) != k_max or k_max < 0):
        raise ValueError(f"k_max must be a non-negative integer or None, got {k_max}")
    batched = features.dim() == 3
    x = features if batched else features.unsqueeze(0)
    n = x.shape[1]
    hi = n if k_max is None else min(n, int(k_max))
    return BudgetArgs(features=x, batched=batched, tau=t, lo=min(int(k_min), hi), hi=hi)


def check_k(features: torch.Tensor, k: int) -> int:
    """Validate `select_tokens` arguments; returns k as int (k > N is allowed and means all)."""
    check_features(features, dims=(2,))
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k}")
    return int(k)
