"""Exact spectral budgets at fp32 speed: fp32 Gram eigenvalues, re-checked in float64 only when needed.

The budget k is decided by where `tau * T` (T = ||X||_F^2) falls among the cumulative energies
`E_j = lambda_1 + ... + lambda_j` of the Gram matrix. This path computes them in fp32 (Gram product
over the short side, `eigvalsh`) and bounds their error:

    |E_j(fp32) - E_j(exact)| <= bound = BOUND_SAFETY * u32 * T * (sqrt(D_long) + sqrt(m))

(u32 = 2^-24, m the short side, D_long the long side: the rounding of a length-D_long dot product
grows like sqrt(D_long) u |x_i||x_j| under the usual random-rounding model, and `eigvalsh` of the
m x m Gram adds a backward error of order sqrt(m) u ||G||; both are at most T). The answer is then
read with the threshold moved down and up by the bound: when both readings give the same k
(after the `[lo, hi]` clamp), no rounding of that size can change it and k is returned. Otherwise,
and only then, the image is re-decided from a float64 Gram product and float64 `eigvalsh` against
the float64 total, i.e. the float64 reference rule (`FLOAT64_SLACK`).

The bound is a rounding model with a safety factor, not a worst-case proof; its margin is measured
in `benchmarks/kernels.py` (largest observed error over the bound) and the float64 agreement is
checked there and in the tests on the benchmark's images and on slowly decaying spectra.

Two solvers compute the same fp32 quantities (`SOLVERS`):

- `openblas` (the default where `native_lapack.is_available()`): one `ssyrk` (the symmetric
  product, half the flops of `X @ X.T`) and `ssyevd` from NumPy's bundled OpenBLAS. At 576 x 4096
  fp32 on the project's 2-core AMD EPYC CPU, one thread: about 0.5x + 0.4x of PyTorch's
  `X @ X.T`.
- `torch`: the Gram product in `GRAM_BLOCKS` row blocks of the upper triangle (~0.7x of one full
  `X @ X.T`) plus PyTorch's (MKL) fp32 `eigvalsh` of 576 x 576 (~0.5-0.6x). It runs where the
  OpenBLAS library is missing and on non-CPU tensors.

See `benchmarks/results/kernels_cpu.json` for both, timed side by side with the Gram product.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from joulecap.kernels import native_lapack
from joulecap.kernels.reference import FLOAT64_SLACK, budget_from_energies, sum_squares

U32 = 2.0**-24
BOUND_SAFETY = 2.0
"""Safety factor over the rounding model (observed errors are recorded by the kernel benchmark)."""
GRAM_BLOCKS = 4
"""Row blocks of the triangular Gram product: 4 measured fastest on this CPU (6 and 8 tie)."""
SOLVERS = ("auto", "openblas", "torch")
"""`auto`: `openblas` for CPU tensors where NumPy's bundled OpenBLAS loads, else `torch`."""
MAX_SHORT_SIDE = 2048
"""Above this short side the eigensolver (cubic) costs more than a sketch; the randomized path runs."""


@dataclass(frozen=True)
class CertifiedResult:
    """Budgets of a batch and which images needed the float64 re-check.

    Attributes:
        budget: `[B]` int64 budgets, clamped to `[lo, hi]`.
        rechecked: `[B]` bool, True where the fp32 answer was within the bound and float64 decided.
        bound_rel: The error bound used, relative to each image's total energy.

    """

    budget: torch.Tensor
    rechecked: torch.Tensor
    bound_rel: float


def gram(a: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """`A A^T` of `[m, n]` (m <= n) from the row blocks of its upper triangle (same dtype as `a`).

    Each block `A_i A_{i:}^T` is one GEMM and its transpose fills the lower part: about
    `(blocks + 1) / (2 * blocks)` of the full product's flops.
    """
    m = a.shape[0]
    if blocks <= 1 or m < 2 * blocks:
        return a @ a.T
    g = torch.empty(m, m, dtype=a.dtype, device=a.device)
    edges = [round(i * m / blocks) for i in range(blocks + 1)]
    for i in range(blocks):
        r0, r1 = edges[i], edges[i + 1]
        c = a[r0:r1] @ a[r0:].T
        g[r0:r1, r0:] = c
        g[r0:, r0:r1] = c.T
    return g


def energy_bound_rel(n_tokens: int, dim: int) -> float:
    """Error bound on every cumulative fp32 energy, relative to the total (see module doc)."""
    short, long_ = min(n_tokens, dim), max(n_tokens, dim)
    return BOUND_SAFETY * U32 * (math.sqrt(long_) + math.sqrt(short))


def resolve_solver(solver: str, device: torch.device) -> str:
    """`openblas` or `torch` for features on `device` (see `SOLVERS`).

    Raises:
        ValueError: On an unknown solver, or `openblas` where it cannot run.

    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    usable = device.type == "cpu" and native_lapack.is_available()
    if solver == "openblas" and not usable:
        raise ValueError(
            f"solver='openblas' needs CPU tensors and NumPy's bundled OpenBLAS (device {device.type}, "
            f"library found: {native_lapack.is_available()})"
        )
    if solver == "auto":
        return "openblas" if usable else "torch"
    return solver


def _gram_eigenvalues(short_side: torch.Tensor, solver: str) -> torch.Tensor:
    """Ascending eigenvalues of `S S^T` in the dtype of `short_side` (`[m, n]`, m <= n)."""
    if solver == "openblas":
        return torch.from_numpy(native_lapack.gram_eigenvalues(short_side.detach().contiguous().numpy()))
    return torch.linalg.eigvalsh(
        gram(short_side) if short_side.dtype == torch.float32 else short_side @ short_side.T
    )


def fp32_energies(a: torch.Tensor, solver: str = "auto") -> torch.Tensor:
    """Descending energies (float64 out) of one `[N, D]` image from an fp32 Gram and fp32 eigenvalues."""
    a = a.float()
    short_side = a if a.shape[0] <= a.shape[1] else a.T
    evals = _gram_eigenvalues(short_side, resolve_solver(solver, a.device))
    return evals.double().flip(-1).clamp_min(0)


def float64_budget(a: torch.Tensor, tau: float, lo: int, hi: int, solver: str = "auto") -> int:
    """The float64 rule for one `[N, D]` image: float64 Gram, float64 eigenvalues, float64 total."""
    solver = resolve_solver(solver, a.device)
    short_side = a if a.shape[0] <= a.shape[1] else a.T
    if solver == "openblas":
        if short_side.dtype not in (torch.float32, torch.float64):
            short_side = short_side.float()  # exact for fp16/bf16; NumPy has no bf16
        # Blocks of the fp32 features go to float64 inside the binding; the total is the trace.
        evals, trace = native_lapack.float64_gram_eigenvalues(short_side.detach().numpy())
        e = torch.from_numpy(evals).flip(-1).clamp_min(0)
        total = torch.tensor([trace], dtype=torch.float64)
    else:
        x = short_side.double()
        e = _gram_eigenvalues(x, solver).flip(-1).clamp_min(0)
        total = x.square().sum().reshape(1)
    return int(budget_from_energies(e.reshape(1, -1), total, tau, lo, hi, slack=FLOAT64_SLACK)[0])


def _workers(solver: str, batch: int) -> int:
    """Images decided at once: PyTorch's intra-op thread count for the OpenBLAS solver, else 1.

    Why: each OpenBLAS call runs on one thread (see `native_lapack`), so a batch decided one
    image at a time would use one core where PyTorch's own products use them all. Images are
    independent, and `ctypes` releases the GIL for the call, so one image per thread scales
    with the cores. The PyTorch solver's products are already multi-threaded: one image at a time.
    """
    if solver != "openblas":
        return 1
    return max(1, min(batch, torch.get_num_threads()))


def certified_budget(x: torch.Tensor, tau: float, lo: int, hi: int, solver: str = "auto") -> CertifiedResult:
    """Exact budgets of validated `[B, N, D]` features (see module doc).

    Images run one at a time per thread (a 2-D product per image measured faster than a batched
    `bmm` on CPU); with the OpenBLAS solver, `torch.get_num_threads()` images run at once.
    `lo == hi` (k_min at or above the token count) decides without any decomposition.

    Args:
        x: `[B, N, D]` features.
        tau: Energy fraction.
        lo: Lower clamp.
        hi: Upper clamp.
        solver: One of `SOLVERS`; both give the float64 rule's k.

    """
    solver = resolve_solver(solver, x.device)
    batch, n_tok, dim = x.shape
    out = torch.full((batch,), lo, dtype=torch.int64)
    rechecked = torch.zeros(batch, dtype=torch.bool)
    bound_rel = energy_bound_rel(n_tok, dim)
    if n_tok == 0 or dim == 0 or lo >= hi:
        # Nothing to decide: the clamp fixes the answer (k_min at or above the token count).
        return CertifiedResult(out, rechecked, bound_rel)
    totals = sum_squares(x).tolist()

    def decide(b: int) -> tuple[int, bool]:
        total = totals[b]
        if total <= 0:
            return lo, False  # an all-zero image keeps lo tokens
        cum = fp32_energies(x[b], solver).cumsum(-1)
        bound = bound_rel * total
        target = (tau - FLOAT64_SLACK) * total
        # The reference rule read with every cumulative energy moved by +-bound: fp32 errors up to
        # the bound cannot move k outside [k_low, k_high].
        k_low = min(max(int((cum + bound < target).sum()) + 1, lo), hi)
        k_high = min(max(int((cum - bound < target).sum()) + 1, lo), hi)
        if k_low == k_high:
            return k_low, False
        return float64_budget(x[b], tau, lo, hi, solver), True

    workers = _workers(solver, batch)
    if workers == 1:
        decided = [decide(b) for b in range(batch)]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="joulecap-budget") as pool:
            decided = list(pool.map(decide, range(batch)))
    for b, (k, again) in enumerate(decided):
        out[b] = k
        rechecked[b] = again
    return CertifiedResult(out, rechecked, bound_rel)
