"""E-AdaPrune kernels: spectral-energy visual-token budgets and token selection.

For one image's visual features X (N tokens x D dims) with singular values s1 >= s2 >= ..., the
budget is the smallest k with `sum(s_i^2, i <= k) >= tau * sum(s_i^2)`, clamped to
`[k_min, min(N, k_max)]`; each image of a batch gets its own k. `select_tokens` then picks which
k tokens to keep.

Modules: `validation` (argument checks), `reference` (float64 exact rule), `certified` (the
exact rule at fp32 cost), `native_lapack` (NumPy's bundled OpenBLAS `ssyrk`/`ssyevd`, the
certified path's CPU solver), `randomized` (bracketed randomized range finder), `selection`
(selection methods and merge), `dispatch` (impl choice), `triton_spectral` (Triton kernels,
CUDA or `TRITON_INTERPRET=1`), `basis_cache` (the budget's sketch, reused by `select_tokens` on
the same ordinary tensor). Engines instead
compute `leverage_basis` once per image while preparing and pass it as `select_tokens(basis=)`
(their features are inference-mode tensors, which the memo cannot guard against in-place change);
`spectral_budget(basis=)` reads the budget off the same basis' exact energies.

Default tau (`SchedulerConfig.tau`, owned by the scheduler) is chosen on answers, not on a
proxy: `python -m benchmarks.tinyvqa.tau_sweep` (see docs/policies.md). The earlier proxy sweep
(`python -m benchmarks.kernels --tau-sweep`: reconstruction error of scikit-image photos through
a random projector, `benchmarks/results/kernels_tau.json`) is kept as a description of how k grows
with tau on photographs.

Exactness: the PyTorch path returns the float64 rule's k (fp32 Gram eigenvalues read against an
error bound, float64 only near ties: `joulecap.kernels.certified`; on CPU the Gram and its
eigenvalues come from OpenBLAS where NumPy bundles it, else from PyTorch); the randomized sketch runs
only above a short side of 2048 and may return a larger k.
"""

from __future__ import annotations

import sys

if __name__ == "kernels":  # found as a top-level `kernels`, not as `joulecap.kernels`
    # The repository root is ahead of site-packages on sys.path (`python -c` or `-m` run from the
    # root, the benchmark scripts, tests importing `benchmarks`), and this folder answered
    # `import kernels`. That name is Hugging Face's `kernels` package, which transformers imports
    # (5.25 installs it): hand the import over to the installed one, if any. One mechanism here
    # serves every way of running from the root.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        # The import statement returns what sys.modules holds once this file has run.
        sys.modules["kernels"] = _installed
        _spec.loader.exec_module(_installed)

import torch

from joulecap.kernels.dispatch import resolve_impl, torch_budget
from joulecap.kernels.randomized import SketchBasis
from joulecap.kernels.reference import FLOAT64_SLACK, budget_from_energies, center_features
from joulecap.kernels.selection import SELECTORS, exact_basis, merge_dropped, select
from joulecap.kernels.validation import budget_args

__all__ = ["SELECTORS", "leverage_basis", "merge_dropped", "select_tokens", "spectral_budget"]


def spectral_budget(
    features: torch.Tensor,
    tau: float,
    *,
    k_min: int = 1,
    k_max: int | None = None,
    center: bool = False,
    impl: str = "auto",
    basis: SketchBasis | None = None,
) -> torch.Tensor:
    """Smallest k whose top-k squared singular values reach `tau` of the total, per image.

    Args:
        features: `[N, D]` or `[B, N, D]` floating-point features (fp32, fp16, bf16, fp64).
        tau: Energy fraction in (0, 1].
        k_min: Fewest tokens kept (>= 0). Larger than N (or `k_max`) clamps to `min(N, k_max)`,
            i.e. keeps everything allowed, so one `k_min` can serve images of any size.
        k_max: Most tokens kept, or None for N.
        center: Subtract the per-image token mean first.
        impl: `"auto"` (Triton on CUDA, PyTorch otherwise), `"torch"` or `"triton"`.
        basis: `leverage_basis(features)` of an unbatched, uncentered call, computed earlier (an
            engine does it while preparing): its float64 energies are the exact spectrum, so the
            budget is read off them and no `impl` runs (unless the basis dropped null directions
            and `tau` needs them: then the usual path decides).

    Returns:
        int64 tensor of shape `[]` (for `[N, D]`) or `[B]`, on the CPU. N = 0 gives 0; an all-zero
        image gives `min(k_min, N)`.

    Raises:
        ValueError: NaN/inf features, tau outside (0, 1], negative clamps, bad shape or impl.

    """
    args = budget_args(features, tau, k_min=k_min, k_max=k_max)
    if basis is not None and not (args.batched or center):
        k_basis = basis_budget(basis, args.features, args.tau, args.lo, args.hi)
        if k_basis is not None:
            return k_basis
    x = center_features(args.features) if center else args.features
    chosen = resolve_impl(impl, x.device)
    if chosen == "triton":
        from joulecap.kernels.triton_spectral import triton_budget

        k = triton_budget(x, args.tau, args.lo, args.hi)
    else:
        # Remember the sketch of an unbatched, uncentered call: select_tokens on the same tensor
        # reuses it for the leverage scores (see joulecap.kernels.basis_cache).
        memo = features if not (args.batched or center) else None
        k = torch_budget(x, args.tau, args.lo, args.hi, memo_for=memo)
    k = k.to(device="cpu", dtype=torch.int64)
    return k if args.batched else k[0]


def select_tokens(
    features: torch.Tensor,
    k: int,
    *,
    method: str = "leverage",
    impl: str = "auto",
    attention: torch.Tensor | None = None,
    basis: SketchBasis | None = None,
) -> torch.Tensor:
    """Indices of the `k` kept tokens, in their original order.

    Args:
        features: `[N, D]` features of one image.
        k: Tokens to keep (0 gives an empty tensor; k >= N gives all N).
        method: `"leverage"` (default), `"norm"`, `"attention"`, `"diversity"` or `"uniform"`.
        impl: `"auto"`, `"torch"` or `"triton"` (Triton accelerates the leverage scores).
        attention: `[N]` vision-tower attention scores, required by `method="attention"`.
        basis: `leverage_basis(features)`, computed earlier (an engine does it while preparing
            the request): `leverage` then reads its scores off it, on the PyTorch path.

    Returns:
        int64 indices on `features.device`, ascending.

    Raises:
        ValueError: NaN/inf features, negative k, unknown method/impl, or attention missing.

    """
    chosen = resolve_impl(impl, features.device)
    if chosen == "triton" and method == "leverage" and basis is None:
        from joulecap.kernels.triton_spectral import triton_leverage_selector

        return select(features, k, method=method, attention=attention, selector=triton_leverage_selector)
    return select(features, k, method=method, attention=attention, basis=basis)


def basis_budget(basis: SketchBasis, x: torch.Tensor, tau: float, lo: int, hi: int) -> torch.Tensor | None:
    """The budget of validated `[1, N, D]` features from their exact basis (None: not decidable).

    The basis keeps every direction with energy, in float64, so the rule is exact against the
    float64 total; only when it dropped null directions and the threshold is not reached without
    them (tau at 1 on a rank-deficient image) does it leave the answer to the usual path.
    """
    a = x[0].double()
    if basis.q.shape[0] != a.shape[0]:
        raise ValueError(f"basis is for {basis.q.shape[0]} tokens, features have {a.shape[0]}")
    total = a.square().sum().reshape(1)
    energies = basis.energies.double().reshape(1, -1)
    full = energies.shape[1] == min(a.shape)
    if not full and float(energies.sum()) < (tau - FLOAT64_SLACK) * float(total):
        return None
    return budget_from_energies(energies, total, tau, lo, hi, slack=FLOAT64_SLACK)[0].cpu()


def leverage_basis(features: torch.Tensor) -> SketchBasis | None:
    """The exact basis `select_tokens(..., basis=)` reuses for leverage at any k (None if too big).

    See `joulecap.kernels.selection.exact_basis`.
    """
    return exact_basis(features)
