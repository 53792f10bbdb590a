"""E-AdaPrune kernels: spectral-energy visual-token budgets and token selection.

Placeholder reference implementation; the full module (randomized SVD, Triton kernels,
selection methods) replaces it with the same signatures.
"""

from __future__ import annotations

import torch


def spectral_budget(
    features: torch.Tensor,
    tau: float,
    *,
    k_min: int = 1,
    k_max: int | None = None,
    center: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Smallest k whose top-k squared singular values reach `tau` of the total, per image."""
    x = features.double()
    if center:
        x = x - x.mean(dim=-2, keepdim=True)
    s2 = torch.linalg.svdvals(x) ** 2
    cum = s2.cumsum(-1) / s2.sum(-1, keepdim=True)
    k = (cum < tau).sum(-1) + 1
    n = features.shape[-2]
    hi = n if k_max is None else min(n, k_max)
    return k.clamp(min=min(k_min, hi), max=hi).to(torch.int64)


def select_tokens(features: torch.Tensor, k: int, *, method: str = "leverage", impl: str = "auto") -> torch.Tensor:
    """Indices of the `k` kept tokens, in their original order."""
    n = features.shape[0]
    if method == "uniform":
        idx = torch.linspace(0, n - 1, k).round().long()
    else:
        u, _, _ = torch.linalg.svd(features.double(), full_matrices=False)
        idx = (u[:, :k] ** 2).sum(-1).topk(k).indices
    return idx.sort().values
