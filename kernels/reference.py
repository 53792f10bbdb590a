"""Exact spectral budgets: the float64 reference and the exact Gram-eigenvalue path.

The rule: for features X (N x D) with singular values s1 >= s2 >= ..., the budget is the smallest
k with `sum(s_i^2, i <= k) >= tau * sum(s_i^2)`, clamped to `[k_min, min(N, k_max)]`.

Two exact paths live here:

- `reference_energies` / `budget_from_energies`: float64 `svdvals`. Slow, used as ground truth
  by the tests and the benchmark.
- `gram_energies`: the squared singular values as eigenvalues of the smaller Gram matrix
  (`X X^T` when N <= D, else `X^T X`), which is what the exact CPU path uses.
"""

from __future__ import annotations

import torch

# Relative slack on the threshold: a cumulative energy this close below `tau * total` counts as
# reaching it. Without it `tau = 1` would ask for energy beyond what rounding lets the sum reach
# and return N for a rank-deficient X. The slack is per precision of the energies.
FLOAT64_SLACK = 1e-12
FLOAT32_SLACK = 1e-6


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Total energies `||X_b||_F^2` of `[B, N, D]` as float64 `[B]`.

    Two-level sum: per-token fp32 norms (short sums, relative error ~1e-7), then their squares
    summed in float64. A single fp32 norm over all N*D values was measured 6e-5 low on a 576 x 4096
    image, enough to move k by one at tau = 0.99. float64 throughout only when fp32 overflows.
    """
    rows = torch.linalg.vector_norm(x.float() if x.dtype != torch.float64 else x, dim=-1)
    if not bool(torch.isfinite(rows).all()):
        rows = torch.linalg.vector_norm(x.double(), dim=-1)
    return rows.double().square().sum(-1)


def center_features(x: torch.Tensor) -> torch.Tensor:
    """Subtract the per-image token mean (the optional centering of the rule)."""
    return x - x.mean(dim=-2, keepdim=True)


def reference_energies(x: torch.Tensor) -> torch.Tensor:
    """Squared singular values in float64, descending, shape `[..., min(N, D)]`."""
    return torch.linalg.svdvals(x.double()) ** 2


def gram_energies(x: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Squared singular values from `eigvalsh` of the smaller Gram matrix, descending.

    Args:
        x: `[..., N, D]` features.
        dtype: Precision of the Gram product (the eigensolver always runs in float64: the
            small eigenvalues of an fp32 Gram solve are noise, and the solve is the cheap part).

    Returns:
        `[..., min(N, D)]` energies, clamped at 0 (tiny negative eigenvalues are rounding).

    """
    a = x.to(dtype)
    gram = a @ a.mT if a.shape[-2] <= a.shape[-1] else a.mT @ a
    return torch.linalg.eigvalsh(gram.double()).flip(-1).clamp_min(0)


def budget_from_energies(
    energies: torch.Tensor, total: torch.Tensor, tau: float, lo: int, hi: int, *, slack: float
) -> torch.Tensor:
    """Smallest k whose top-k energy reaches `tau * total`, clamped to `[lo, hi]`.

    Args:
        energies: `[B, r]` squared singular values, descending (r may be < rank: a sketch).
        total: `[B]` total energy `||X||_F^2` (exact, not the sum of `energies`).
        tau: Energy fraction.
        lo: Lower clamp.
        hi: Upper clamp.
        slack: Relative rounding slack on the threshold.

    Returns:
        `[B]` int64 budgets. An all-zero image (total 0) gets `lo`.

    """
    e = energies.double()
    tot = total.double()
    target = (tau - slack) * tot
    cum = e.cumsum(-1)
    k = (cum < target.unsqueeze(-1)).sum(-1) + 1
    k = torch.where(tot > 0, k, torch.zeros_like(k))
    return k.clamp(min=lo, max=hi).to(torch.int64)


def reference_budget(x: torch.Tensor, tau: float, lo: int, hi: int) -> torch.Tensor:
    """Float64 `svdvals` budget for validated `[B, N, D]` features."""
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        return torch.full((x.shape[0],), lo, dtype=torch.int64)
    e = reference_energies(x)
    total = x.double().square().sum((-2, -1))
    return budget_from_energies(e, total, tau, lo, hi, slack=FLOAT64_SLACK)
