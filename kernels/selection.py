"""Token selection: which k of an image's N visual tokens to keep, plus an optional merge.

Every method maps `[N, D]` features (and, for `attention`, `[N]` scores) to the kept indices in
their original order. Methods live in the `SELECTORS` registry; `select` validates and dispatches.

- `leverage` (default): each token's squared norm in the top-k left singular subspace of X, i.e.
  how much of the dominant spectrum the token carries; the natural partner of the spectral
  budget. Exact (float64 eigh of the smaller Gram) when the short side is small or k is a large
  share of it, else a randomized range finder of rank k + oversampling with one power iteration.
- `norm`: largest L2 norm.
- `attention`: largest score from the vision tower (CLS or mean attention), passed by the caller;
  an error when no scores are given, never a silent fallback to another method.
- `diversity`: greedy max-min cosine distance (DivPrune-like), starting from the largest-norm
  token.
- `uniform`: evenly spaced in token order.

`merge_dropped` folds each dropped token into its most similar kept token (PruMerge-like).
Ties are broken by token order (stable sort), so selections are deterministic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch

from joulecap.kernels import basis_cache
from joulecap.kernels.randomized import SketchBasis, sketch_basis
from joulecap.kernels.validation import check_finite, check_k

OVERSAMPLE = 10
EXACT_SHORT_SIDE = 128
EXACT_FRACTION = 0.5
EXACT_BASIS_MAX = 256
"""`exact_basis` is computed up to this short side (a 256 x 256 float64 eigh: a few ms on a CPU)."""


class Selector(Protocol):
    """A selection method: scores or picks k tokens of `[N, D]` features (0 < k < N)."""

    def __call__(self, features: torch.Tensor, k: int, attention: torch.Tensor | None) -> torch.Tensor:
        """Return k distinct token indices (any order)."""
        ...


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores; ties go to the earlier token."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def _with_energy(energies: torch.Tensor) -> torch.Tensor:
    """Mask of the directions (energies sorted descending) that carry energy.

    Directions below 1e-12 of the largest are numerical null space: their vectors are arbitrary,
    and dividing by their singular values would amplify rounding.
    """
    return energies > energies[:1].clamp_min(0) * 1e-12


def _exact_left(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left singular vectors `[N, k']` of `x` and their energies `[k']` (float64 eigh).

    Decomposes the smaller Gram; k' <= numerical rank (directions with no energy are dropped).
    """
    a = x.double()
    n, d = a.shape
    evals, evecs = torch.linalg.eigh(a @ a.T if n <= d else a.T @ a)
    vecs, s2 = evecs.flip(-1)[:, :k], evals.flip(-1)[:k]
    keep_dirs = _with_energy(s2)
    vecs, s2 = vecs[:, keep_dirs], s2[keep_dirs]
    # With N > D the eigenvectors are the right singular vectors: X V = U S recovers U.
    return (vecs if n <= d else (a @ vecs) / s2.sqrt()), s2


def exact_left_subspace(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors `[N, k']` of `x` from float64 eigh (k' <= numerical rank)."""
    return _exact_left(x, k)[0]


def randomized_left_subspace(x: torch.Tensor, k: int, *, power_iters: int = 1, seed: int = 0) -> torch.Tensor:
    """Approximate top-k left singular vectors `[N, k]` from a rank k + oversampling sketch."""
    a = x.float().unsqueeze(0)
    rank = min(k + OVERSAMPLE, min(x.shape))
    q, b3 = sketch_basis(a, rank, power_iters, seed)
    q = q[0]
    b = b3[0].double()
    evals, evecs = torch.linalg.eigh(b @ b.T)
    w = evecs.flip(-1)[:, :k]
    s2 = evals.flip(-1)[:k]
    return q.double() @ w[:, _with_energy(s2)]


def exact_basis(x: torch.Tensor, max_short_side: int = EXACT_BASIS_MAX) -> SketchBasis | None:
    """The whole left singular basis of `x` (`[N, D]`) for `leverage_scores` at any k, or None.

    An engine computes it once per image while preparing the request, so that the energy of the
    eigendecomposition is measured with the image encode, before planning, instead of inside the
    run, where the predictor does not model it (it cost about one decode step per pruned image on
    a 2-core CPU). None when the short side exceeds `max_short_side` (the Gram then costs more
    than the randomized subspace the selection would compute for a small k).
    """
    if min(x.shape) > max_short_side:
        return None
    check_finite(x)
    u, s2 = _exact_left(x, min(x.shape))
    eye = torch.eye(u.shape[1], dtype=torch.float64, device=u.device)
    return SketchBasis(q=u, energies=s2, evecs=eye)


def leverage_scores(x: torch.Tensor, k: int, basis: SketchBasis | None = None) -> torch.Tensor:
    """Squared row norms of the top-k left singular subspace of `x` (`[N]`, float64).

    Uses `basis` (from `exact_basis`) when given, else the sketch `spectral_budget` left for this
    tensor when its rank covers k with the usual oversampling (see `joulecap.kernels.basis_cache`).
    """
    memo = basis if basis is not None and basis.q.shape[0] == x.shape[0] else basis_cache.get(x)
    # An exact basis serves any k; a sketch only a k its rank covers with the usual oversampling.
    if memo is not None and (memo is basis or memo.q.shape[-1] >= k + OVERSAMPLE):
        w = memo.evecs[:, :k]
        s2 = memo.energies[:k]
        w = w[:, _with_energy(s2)]
        return (memo.q.double() @ w).square().sum(-1)
    short = min(x.shape)
    if short <= EXACT_SHORT_SIDE or k + OVERSAMPLE > EXACT_FRACTION * short:
        u = exact_left_subspace(x, k)
    else:
        u = randomized_left_subspace(x, k)
    return u.square().sum(-1)


def _leverage(
    features: torch.Tensor, k: int, attention: torch.Tensor | None, basis: SketchBasis | None = None
) -> torch.Tensor:
    scores = leverage_scores(features, k, basis)
    # Tokens outside the column space of the top-k directions score 0; break those ties by norm
    # (scaled far below any non-zero leverage) rather than by position.
    norms = torch.linalg.vector_norm(features, dim=-1, dtype=torch.float32).double().square()
    tie = norms / (norms.max().clamp_min(1e-300) * 1e12)
    return top_k(scores + tie, k)


def _norm(features: torch.Tensor, k: int, attention: torch.Tensor | None) -> torch.Tensor:
    return top_k(features.float().square().sum(-1), k)


def _attention(features: torch.Tensor, k: int, attention: torch.Tensor | None) -> torch.Tensor:
    if attention is None:
        raise ValueError(
            "method='attention' needs the vision tower's attention scores (attention=[N] tensor); "
            "this engine/adapter did not provide them"
        )
    if attention.shape != (features.shape[0],):
        raise ValueError(f"attention must have shape [{features.shape[0]}], got {tuple(attention.shape)}")
    check_finite(attention)
    return top_k(attention.float(), k)


def _diversity(features: torch.Tensor, k: int, attention: torch.Tensor | None) -> torch.Tensor:
    a = features.float()
    unit = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    picked = torch.empty(k, dtype=torch.long)
    first = top_k(a.square().sum(-1), 1)[0]
    picked[0] = first
    # Greedy max-min: keep each token's distance to its nearest picked token up to date with one
    # matrix-vector product per step (O(k N D)), instead of the full N x N similarity matrix.
    min_dist = 1.0 - unit @ unit[first]
    min_dist[first] = -float("inf")
    for i in range(1, k):
        nxt = int(torch.argmax(min_dist))
        picked[i] = nxt
        min_dist = torch.minimum(min_dist, 1.0 - unit @ unit[nxt])
        min_dist[picked[: i + 1]] = -float("inf")
    return picked


def _uniform(features: torch.Tensor, k: int, attention: torch.Tensor | None) -> torch.Tensor:
    n = features.shape[0]
    # Centre of k equal bins: symmetric coverage, and always k distinct indices for k <= n.
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).floor().long().clamp(max=n - 1)


SELECTORS: dict[str, Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor]] = {
    "leverage": _leverage,
    "norm": _norm,
    "attention": _attention,
    "diversity": _diversity,
    "uniform": _uniform,
}


def select(
    features: torch.Tensor,
    k: int,
    *,
    method: str = "leverage",
    attention: torch.Tensor | None = None,
    selector: Selector | None = None,
    basis: SketchBasis | None = None,
) -> torch.Tensor:
    """Kept token indices, sorted in original order (PyTorch path).

    Args:
        features: `[N, D]` features.
        k: Tokens to keep; 0 gives an empty result, k >= N all tokens.
        method: A key of `SELECTORS`.
        attention: `[N]` scores for `method="attention"`.
        selector: Overrides `method` (used by the Triton dispatch for `leverage`).
        basis: `exact_basis(features)`, computed earlier; `leverage` then needs no decomposition.

    Returns:
        int64 indices on `features.device`, ascending.

    Raises:
        ValueError: On an unknown method, NaN/inf features, a negative k, or missing attention.

    """
    k = check_k(features, k)
    if selector is None and method not in SELECTORS:
        raise ValueError(f"unknown selection method {method!r}; choose from {sorted(SELECTORS)}")
    n = features.shape[0]
    device = features.device
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if k >= n:
        if method == "attention" and selector is None:
            _attention(features, 0, attention)  # still reject missing scores consistently
        return torch.arange(n, device=device)
    if selector is not None:
        pick: Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor] = selector
    elif method == "leverage" and basis is not None:
        pick = functools.partial(_leverage, basis=basis)
    else:
        pick = SELECTORS[method]
    idx = pick(features, k, attention)
    return idx.to(device=device, dtype=torch.long).sort().values


def merge_dropped(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Fold every dropped token into its most similar kept token (PruMerge-like).

    Each kept token becomes the mean of itself and the dropped tokens assigned to it (cosine
    similarity), so the merged set keeps the information mass of the dropped tokens.

    Args:
        features: `[N, D]` features.
        keep: Kept indices (as from `select`).

    Returns:
        `[len(keep), D]` merged features in the order of `keep`, same dtype as `features`.

    """
    check_finite(features)
    n = features.shape[0]
    if keep.numel() == 0:
        return features[:0]
    keep = keep.to(features.device)
    a = features.float()
    dropped_mask = torch.ones(n, dtype=torch.bool, device=a.device)
    dropped_mask[keep] = False
    dropped = dropped_mask.nonzero().squeeze(-1)
    sums = a[keep].clone()
    counts = torch.ones(keep.numel(), device=a.device)
    if dropped.numel():
        unit = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        owner = (unit[dropped] @ unit[keep].T).argmax(-1)
        sums.index_add_(0, owner, a[dropped])
        counts.index_add_(0, owner, torch.ones(dropped.numel(), device=a.device))
    return (sums / counts.unsqueeze(-1)).to(features.dtype)
