"""Randomized spectral budgets: a range finder grown until the energy threshold is bracketed.

For features A (m x n per image) a Gaussian sketch `Y = (A A^T)^q A Omega` (rank r = sketch
columns, q power iterations) gives an orthonormal basis Q and `B = Q^T A`. Two facts make the
budget checkable without the full spectrum:

- The total energy is exact and cheap: `T = ||A||_F^2`.
- With `C = (I - Q Q^T) A` we have `A^T A = B^T B + C^T C`, so for every k (Ky Fan)
  `E_k(B) <= E_k(A) <= E_k(B) + R` where `E_k` is the top-k energy and `R = T - ||B||_F^2`.

Hence `k_hi` (first k with `E_k(B) >= tau T`) is an upper bound on the exact budget and `k_lo`
(first k with `E_k(B) + R >= tau T`) a lower bound. The sketch rank doubles until `k_hi` exists
and the bracket is narrow enough (`k_hi - k_lo <= max(1, gap_rtol * k_hi)`); the budget returned
is `k_hi`, i.e. it never keeps fewer tokens than the exact rule (up to fp32 rounding). When the
rank needed would exceed half the short side, the exact Gram eigenvalues are cheaper and used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from joulecap.kernels.certified import certified_budget
from joulecap.kernels.reference import FLOAT32_SLACK, sum_squares


@dataclass(frozen=True)
class SketchConfig:
    """Knobs of the randomized range finder.

    Attributes:
        rank0: First sketch rank (doubled on each retry). 40 settles the ~20-token budgets of the
            benchmark's projector features (tau 0.95) in one sketch with 2x oversampling.
        power_iters: Power iterations q (each costs two passes over X; sharpens the top spectrum).
        gap_rtol: Accept the bracket when `k_hi - k_lo <= max(1, gap_rtol * k_hi)`.
        oversampling: Also accept when `rank >= oversampling * k_hi`: with a power-iterated sketch
            of twice the rank, the top-k energies are accurate to far below the bracket's
            worst case (the Ky Fan bound charges all the residual to the top k), and requiring
            the narrow bracket would grow the sketch to near full rank on slowly decaying tails.
        exact_fraction: Switch to exact Gram eigenvalues once the rank exceeds this share of
            min(N, D) (the sketch would then cost about as much as the Gram).
        seed: Seed of the Gaussian test matrix (fixed so budgets are reproducible).

    """

    rank0: int = 40
    power_iters: int = 1
    gap_rtol: float = 0.25
    oversampling: float = 2.0
    exact_fraction: float = 0.5
    seed: int = 0


DEFAULT_SKETCH = SketchConfig()


@dataclass(frozen=True)
class SketchBasis:
    """The sketch that settled one image, reusable for leverage scores (token side only).

    Attributes:
        q: `[N, r]` orthonormal basis of the sketched token space.
        energies: `[r]` float64 energies of `B = Q^T X`, descending.
        evecs: `[r, r]` float64 eigenvectors of `B B^T` (columns in the order of `energies`).

    """

    q: torch.Tensor
    energies: torch.Tensor
    evecs: torch.Tensor


@dataclass(frozen=True)
class SketchResult:
    """Outcome of the randomized budget for a batch.

    Attributes:
        budget: `[B]` int64 budgets (`k_hi`, clamped).
        k_lo: `[B]` lower ends of the brackets (before clamping; equal to k where exact was used).
        k_hi: `[B]` upper ends of the brackets (before clamping).
        rank: `[B]` sketch rank that settled each image (0 where the exact path ran).

    """

    budget: torch.Tensor
    k_lo: torch.Tensor
    k_hi: torch.Tensor
    rank: torch.Tensor
    bases: tuple[SketchBasis | None, ...] = ()


def first_reaching(cum_offset: torch.Tensor, energies: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based first k with `cumsum(energies)[k] + cum_offset >= target` per row; r + 1 where never.

    Args:
        cum_offset: `[B]` added to every cumulative sum (the residual energy for `k_lo`, else 0).
        energies: `[B, r]` non-negative energies, descending.
        target: `[B]` thresholds.

    Returns:
        `[B]` int64 on the CPU.

    """
    cum = energies.double().cumsum(-1) + cum_offset.double().unsqueeze(-1)
    return ((cum < target.double().unsqueeze(-1)).sum(-1) + 1).cpu()


@dataclass(frozen=True)
class SpectralOps:
    """The primitive operations of the sketch, swappable for Triton kernels.

    Attributes:
        matmul: Batched `a @ b` returning fp32 (b may be unbatched).
        sum_squares: `[B, m, n]` -> `[B]` float64 total energies.
        first_reaching: See `first_reaching`.

    """

    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sum_squares: Callable[[torch.Tensor], torch.Tensor]
    first_reaching: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _torch_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float(), b.float()
    if a.dim() == 3 and a.shape[0] == 1:
        # One image: a 2-D GEMM takes transposed operands as BLAS flags, while `bmm` first copies
        # a transposed X (measured ~3 ms per 576x4096 copy on this CPU).
        return (a[0] @ (b[0] if b.dim() == 3 else b)).unsqueeze(0)
    return a @ b


TORCH_OPS = SpectralOps(
    matmul=_torch_matmul,
    sum_squares=sum_squares,
    first_reaching=first_reaching,
)


@lru_cache(maxsize=32)
def _gaussian(n: int, rank: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # The test matrix is a pure function of its shape and seed: drawing 4096 x 40 normals costs
    # about as much as a sketch pass, so keep the last few.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    return torch.randn(n, rank, generator=gen, dtype=torch.float32).to(device, dtype)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of tall `y` `[..., m, r]` (fp32 out).

    CholeskyQR2 in float64: two rounds of `Q = Y R^{-1}` with `R = chol(Y^T Y)`. On the thin
    sketch it costs a fraction of Householder QR (which took as long as a sketch pass here), and
    float64 keeps it accurate for the condition numbers a power-iterated fp32 sketch reaches
    (~1e6, squared 1e12 < 1/eps64). Falls back to Householder QR if the Cholesky breaks down.
    """
    q = y.double()
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(q.mT @ q, upper=True)
        if bool((info != 0).any()):
            return torch.linalg.qr(y.double())[0].to(torch.float32)
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    if float((q.mT @ q - eye).abs().max()) > 1e-6:  # (numerically) rank-deficient sketch
        return torch.linalg.qr(y.double())[0].to(torch.float32)
    return q.to(torch.float32)


def sketch_basis(
    a: torch.Tensor,
    rank: int,
    power_iters: int,
    seed: int = 0,
    ops: SpectralOps = TORCH_OPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis Q `[B, m, r]` of the sketched range of `a` and `B = Q^T a` `[B, r, n]`.

    Args:
        a: `[B, m, n]` features.
        rank: Sketch columns r.
        power_iters: Power iterations q.
        seed: Seed of the Gaussian test matrix.
        ops: Primitive operations.

    """
    # The test matrix in the input's dtype: it is random anyway, and fp16/bf16 operands let the
    # sketch product use the fast low-precision GEMM with fp32 accumulation.
    omega = _gaussian(a.shape[-1], rank, seed, str(a.device), a.dtype)
    y = ops.matmul(a, omega)
    for i in range(power_iters):
        # One QR at the end only (QR costs as much as a sketch pass here). Without the
        # intermediate re-orthonormalisation, fp32 loses directions below ~(1e-7)^(1/(2q+1)) of
        # the top singular value: 5e-3 for q = 1, i.e. < 3e-5 of the top energy each, which
        # only makes E_k(B) a slightly smaller lower bound (a conservative k_hi). For q > 1
        # re-orthonormalise to keep that floor.
        # Unit columns before each product: without them a power step raises the scale to s1^3
        # and large-valued features would overflow fp32.
        y = _orthonormal(y) if i else y / torch.linalg.vector_norm(y, dim=-2, keepdim=True).clamp_min(1e-30)
        y = y.to(a.dtype)
        # (Y^T X)^T rather than X^T Y: the same product, but a GEMM over X's rows runs ~1.7x faster
        # on CPU than one over its transpose (2.1 vs 3.6 ms for 576x4096 by 40, one core).
        z = ops.matmul(y.mT, a).mT
        y = ops.matmul(a, z.to(a.dtype))
    q = _orthonormal(y)
    return q, ops.matmul(q.mT, a)


def sketch_energies(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending squared singular values of the small `B` `[batch, r, n]` and their eigenvectors.

    Returns:
        Energies `[batch, r]` and eigenvectors `[batch, r, r]` of `B B^T` (columns descending),
        float64; `Q @ evecs` are the approximate left singular vectors.

    """
    bd = b.double()
    evals, evecs = torch.linalg.eigh(bd @ bd.mT)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1)


def randomized_budget(
    x: torch.Tensor,
    tau: float,
    lo: int,
    hi: int,
    *,
    config: SketchConfig = DEFAULT_SKETCH,
    ops: SpectralOps = TORCH_OPS,
    keep_basis: bool = False,
) -> SketchResult:
    """Budgets of validated `[B, N, D]` features by the grown randomized sketch.

    Args:
        x: `[B, N, D]` features (any float dtype; computed in fp32, energies in float64).
        tau: Energy fraction in (0, 1].
        lo: Lower clamp.
        hi: Upper clamp.
        config: Range-finder knobs.
        ops: Primitive operations (PyTorch, or the Triton kernels).
        keep_basis: Return the settling sketch per image (when N <= D) for leverage reuse.

    Returns:
        Budgets and brackets per image.

    """
    batch, n_tok, dim = x.shape
    # fp32 for the PyTorch path; the Triton ops take fp16/bf16 directly (fp32 accumulation).
    a = x if ops is not TORCH_OPS else x.float()
    # Orient so that the sketch basis lives in the short side (the spectrum is the same).
    if n_tok > dim:
        a = a.mT
    m = min(n_tok, dim)
    total = ops.sum_squares(a).double()
    k_lo = torch.zeros(batch, dtype=torch.int64)
    k_hi = torch.zeros(batch, dtype=torch.int64)
    rank_used = torch.zeros(batch, dtype=torch.int64)
    todo = torch.arange(batch)
    bases: list[SketchBasis | None] = [None] * batch
    if m == 0:
        return SketchResult(torch.full((batch,), lo, dtype=torch.int64), k_lo, k_hi, rank_used)
    # A bf16 range finder (cast X once, bf16 GEMMs) was measured on this AMX CPU: slower end to
    # end (24.8 vs 13.3 ms per 576x4096 image incl. selection, one core) and one k off in six,
    # so the PyTorch path sketches in fp32.
    rank = max(1, min(config.rank0, m))
    target_all = (tau - FLOAT32_SLACK) * total
    while todo.numel():
        if rank > config.exact_fraction * m:
            # The exact rule (clamped) from fp32 Gram eigenvalues, re-checked in float64 near ties.
            k_exact = certified_budget(a[todo].float(), tau, lo, hi).budget
            k_lo[todo] = k_exact
            k_hi[todo] = k_exact
            break
        # Advanced indexing copies X; skip it while every image is still open (the common case).
        sub = a if todo.numel() == batch else a[todo]
        q, b = sketch_basis(sub, rank, config.power_iters, config.seed, ops)
        e, evecs = sketch_energies(b)
        tgt = target_all[todo]
        resid = (total[todo] - e.sum(-1)).clamp_min(0)
        hi_k = ops.first_reaching(torch.zeros_like(resid), e, tgt)
        lo_k = ops.first_reaching(resid, e, tgt)
        reached = hi_k <= rank
        narrow = (hi_k - lo_k) <= torch.clamp(torch.ceil(config.gap_rtol * hi_k.double()).long(), min=1)
        oversampled = hi_k * config.oversampling <= rank
        # Whatever the exact k in [k_lo, k_hi], the clamp may decide the budget already.
        clamped = (reached & (hi_k <= lo)) | (lo_k >= hi)
        done = (reached & (narrow | oversampled)) | clamped | (total[todo].cpu() <= 0)
        idx = todo[done]
        if keep_basis and n_tok <= dim:
            for j, i in enumerate(todo.tolist()):
                if bool(done[j]):
                    bases[i] = SketchBasis(q=q[j], energies=e[j], evecs=evecs[j])
        k_lo[idx] = lo_k[done]
        k_hi[idx] = hi_k[done]
        rank_used[idx] = rank
        todo = todo[~done]
        rank *= 2
    budget = torch.where(total.cpu() > 0, k_hi, torch.zeros_like(k_hi)).clamp(min=lo, max=hi)
    return SketchResult(budget.to(torch.int64), k_lo, k_hi, rank_used, tuple(bases))


def exact_budget(x: torch.Tensor, tau: float, lo: int, hi: int) -> torch.Tensor:
    """Exact budgets of validated `[B, N, D]` features: the float64 rule's k at fp32 cost.

    See `joulecap.kernels.certified` (fp32 Gram eigenvalues, float64 re-check near ties).
    """
    return certified_budget(x, tau, lo, hi).budget
