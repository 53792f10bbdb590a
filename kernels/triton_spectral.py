"""Triton kernels for the spectral budget and leverage scores (CUDA, or `TRITON_INTERPRET=1`).

Kernels:

- `_bmm_kernel`: batched `C[b] = A[b] @ B[b]` (B may be shared across the batch, stride 0),
  fp16/bf16 operands with fp32 accumulation (fp32 operands use IEEE fp32, not TF32: the energies
  must match the float64 reference to 1e-3). It serves the Gram matrix (`A A^T` via strides, no
  transpose copy) and the sketch products. With `SUMSQ` the programs of the first column tile
  also accumulate `||A[b]||_F^2` from the tiles they already load, so the exact total energy comes
  out of the same pass over X as the sketch. Under the CPU interpreter bf16 tiles are upcast to
  fp32 before `tl.dot` (the interpreter's numpy backend has no bf16 matmul and returns garbage);
  a bf16 x bf16 product is exact in fp32, so this matches the GPU's bf16 MMA with fp32
  accumulation up to summation order.
- `_threshold_kernel`: per image, the first k at which the cumulative energy (plus an offset,
  the residual for the lower bracket) reaches the target: an in-register `tl.cumsum`.
- `_leverage_kernel`: per token, `sum_j (Q W)_ij^2` over the top-k directions, fused so the
  `[N, k]` left singular vectors are never written out.

Eigenvalues of the small (r x r or Gram) matrices and the QR of the sketch stay in PyTorch
(cuSOLVER on GPU): they are not the bandwidth-bound part.

No GPU was available where these kernels were written: they are verified for correctness under the
Triton CPU interpreter only (tests/test_kernels_triton.py, tiny shapes); their GPU speed is not
measured here (benchmarks/kernels.py prints "no GPU available" rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joulecap.kernels.dispatch import interpreter_enabled
from joulecap.kernels.randomized import SpectralOps, randomized_budget
from joulecap.kernels.reference import FLOAT32_SLACK
from joulecap.kernels.selection import OVERSAMPLE

LOW_PRECISION = (torch.float16, torch.bfloat16)
GRAM_SHORT_SIDE = 256


@triton.jit
def _bmm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sumsq_ptr,
    M,
    N,
    K,
    s_ab,
    s_am,
    s_ak,
    s_bb,
    s_bk,
    s_bn,
    s_cb,
    s_cm,
    s_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    SUMSQ: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a_mask = (rm[:, None] < M) & (kk[None, :] < K)
        b_mask = (kk[:, None] < K) & (rn[None, :] < N)
        a = tl.load(a_ptr + pid_b * s_ab + rm[:, None] * s_am + kk[None, :] * s_ak, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + pid_b * s_bb + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=b_mask, other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if SUMSQ:
            af = a.to(tl.float32)
            sq += af * af
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + pid_b * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn, acc, mask=c_mask)
    # Only the first column tile counts its A tiles, so each element of A is summed once. (Nested:
    # SUMSQ is a compile-time constant, pid_n a runtime value.)
    if SUMSQ:  # noqa: SIM102
        if pid_n == 0:
            tl.atomic_add(sumsq_ptr + pid_b, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _threshold_kernel(e_ptr, off_ptr, tgt_ptr, out_ptr, R, s_e, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    valid = r < R
    e = tl.load(e_ptr + b * s_e + r, mask=valid, other=0.0)
    cum = tl.cumsum(e, axis=0) + tl.load(off_ptr + b)
    below = (cum < tl.load(tgt_ptr + b)) & valid
    tl.store(out_ptr + b, tl.sum(below.to(tl.int32), axis=0) + 1)


@triton.jit
def _leverage_kernel(
    q_ptr,
    w_ptr,
    out_ptr,
    N,
    R,
    K,
    s_qn,
    s_qr,
    s_wr,
    s_wk,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    lev = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ri = r0 + rr
            q = tl.load(
                q_ptr + rn[:, None] * s_qn + ri[None, :] * s_qr,
                mask=(rn[:, None] < N) & (ri[None, :] < R),
                other=0.0,
            )
            w = tl.load(
                w_ptr + ri[:, None] * s_wr + kk[None, :] * s_wk,
                mask=(ri[:, None] < R) & (kk[None, :] < K),
                other=0.0,
            )
            u += tl.dot(q, w, input_precision="ieee")
        lev += tl.sum(u * u, axis=1)
    tl.store(out_ptr + rn, lev, mask=rn < N)


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def bmm(a: torch.Tensor, b: torch.Tensor, *, sumsq: torch.Tensor | None = None) -> torch.Tensor:
    """Batched `a @ b` in fp32 by `_bmm_kernel`.

    Args:
        a: `[B, M, K]` (any strides).
        b: `[B, K, N]` or `[K, N]` (shared across the batch).
        sumsq: Optional `[B]` fp32 zeros that receive `||a[b]||_F^2`.

    Returns:
        `[B, M, N]` fp32.

    """
    if a.dtype != b.dtype:
        # Mixed operands (fp32 basis times fp16 features): compute in fp32 so the basis keeps
        # its precision.
        a, b = a.float(), b.float()
    batch, m, k = a.shape
    shared = b.dim() == 2
    n = b.shape[-1]
    c = torch.empty(batch, m, n, device=a.device, dtype=torch.float32)
    s_bb = 0 if shared else b.stride(0)
    s_bk, s_bn = b.stride(-2), b.stride(-1)
    block_m, block_n, block_k = _block(m), _block(n), _block(k, hi=32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), batch)
    dummy = sumsq if sumsq is not None else c
    _bmm_kernel[grid](
        a, b, c, dummy, m, n, k,
        a.stride(0), a.stride(1), a.stride(2), s_bb, s_bk, s_bn, c.stride(0), c.stride(1), c.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=a.dtype == torch.float32, SUMSQ=sumsq is not None,
        UPCAST=a.dtype == torch.bfloat16 and interpreter_enabled(),
    )  # fmt: skip
    return c


def sum_squares(a: torch.Tensor) -> torch.Tensor:
    """`[B]` float64 `||a[b]||_F^2`, accumulated in fp32 by the Gram-row pass of `_bmm_kernel`."""
    out = torch.zeros(a.shape[0], device=a.device, dtype=torch.float32)
    # One column of ones: the product is the row sums (discarded), the side output the energies.
    ones = torch.ones(a.shape[-1], 1, device=a.device, dtype=a.dtype)
    bmm(a, ones, sumsq=out)
    return out.double()


def first_reaching(cum_offset: torch.Tensor, energies: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Triton version of `joulecap.kernels.randomized.first_reaching` (fp32 cumulative sums)."""
    e = energies.float().contiguous()
    batch, r = e.shape
    out = torch.empty(batch, device=e.device, dtype=torch.int32)
    off = cum_offset.float().contiguous()
    tgt = target.float().contiguous()
    _threshold_kernel[(batch,)](e, off, tgt, out, r, e.stride(0), BLOCK=triton.next_power_of_2(max(r, 1)))
    return out.to(device="cpu", dtype=torch.int64)


TRITON_OPS = SpectralOps(matmul=bmm, sum_squares=sum_squares, first_reaching=first_reaching)


def gram_energies_and_total(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies `[B, m]` (descending) and totals `[B]` from the Triton Gram of `[B, m, n]`, m <= n.

    The total energy is the trace of the Gram matrix, so it costs nothing extra.
    """
    gram = bmm(a, a.mT)
    total = gram.diagonal(dim1=-2, dim2=-1).sum(-1).double()
    # float64 solve on CPU; fp32 on GPU where float64 eigensolvers are slow (energies stay
    # within ~1e-6 of the total, far inside the 1e-3 tolerance).
    eig_dtype = torch.float64 if a.device.type == "cpu" else torch.float32
    e = torch.linalg.eigvalsh(gram.to(eig_dtype)).flip(-1).clamp_min(0)
    return e, total


def triton_budget(x: torch.Tensor, tau: float, lo: int, hi: int) -> torch.Tensor:
    """Budgets of validated `[B, N, D]` features with the Triton kernels.

    Small short sides use the Gram route (one GEMM, eigenvalues, threshold kernel); larger ones
    the bracketed randomized sketch of `joulecap.kernels.randomized` with Triton primitives.
    """
    batch, n_tok, dim = x.shape
    if n_tok == 0 or dim == 0:
        return torch.full((batch,), lo, dtype=torch.int64)
    a = x if x.dtype in LOW_PRECISION else x.float()
    a = a.mT if n_tok > dim else a
    if min(n_tok, dim) <= GRAM_SHORT_SIDE:
        e, total = gram_energies_and_total(a)
        k = first_reaching(torch.zeros_like(total), e, (tau - FLOAT32_SLACK) * total)
        k = torch.where(total.cpu() > 0, k, torch.zeros_like(k))
        return k.clamp(min=lo, max=hi)
    return randomized_budget(x if x.dtype in LOW_PRECISION else x.float(), tau, lo, hi, ops=TRITON_OPS).budget


def leverage(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`[N]` fp32 squared row norms of `q @ w` (q `[N, R]`, w `[R, K]`) by `_leverage_kernel`."""
    q = q.float()
    w = w.float()
    n, r = q.shape
    k = w.shape[1]
    out = torch.empty(n, device=q.device, dtype=torch.float32)
    block_n = _block(n)
    _leverage_kernel[(triton.cdiv(n, block_n),)](
        q, w, out, n, r, k, q.stride(0), q.stride(1), w.stride(0), w.stride(1),
        BLOCK_N=block_n, BLOCK_R=_block(r, hi=32), BLOCK_K=_block(k, hi=32),
    )  # fmt: skip
    return out


def triton_leverage_scores(features: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Leverage scores of the top-k left singular subspace via a Triton sketch (exact at full rank)."""
    a = features if features.dtype in LOW_PRECISION else features.float()
    rank = min(k + OVERSAMPLE, min(a.shape))
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(a.shape[1], rank, generator=gen).to(a.device, a.dtype)
    a3 = a.unsqueeze(0)
    q, _ = torch.linalg.qr(bmm(a3, omega))
    z, _ = torch.linalg.qr(bmm(a3.mT, q))
    q, _ = torch.linalg.qr(bmm(a3, z))
    b = bmm(q.mT, a3)[0].double()
    evals, evecs = torch.linalg.eigh(b @ b.T)
    s2 = evals.flip(-1)[:k]
    w = evecs.flip(-1)[:, :k][:, s2 > s2[:1].clamp_min(0) * 1e-12]
    return leverage(q[0], w.float())


def triton_leverage_selector(features: torch.Tensor, k: int, attention: torch.Tensor | None) -> torch.Tensor:
    """`leverage` selection with Triton scores (same tie-break as the PyTorch selector)."""
    from joulecap.kernels.selection import top_k

    scores = triton_leverage_scores(features, k).double()
    norms = features.double().square().sum(-1)
    return top_k(scores + norms / (norms.max().clamp_min(1e-300) * 1e12), k)
