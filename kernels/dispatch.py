"""Choosing the implementation: `impl="auto" | "torch" | "triton"`.

`auto` runs Triton when the features are on CUDA and Triton imports, else PyTorch, and logs the
reason for a fallback once per reason (the budget runs per request; a log line per call would
flood). `triton` on CPU tensors is allowed only under `TRITON_INTERPRET=1` (the CI parity tests);
otherwise it raises rather than silently running something else.

Within the PyTorch path, `torch_budget` runs the exact rule (fp32 Gram eigenvalues with a float64
re-check near ties, `joulecap.kernels.certified`) up to a short side of `EXACT_SHORT_SIDE`, and the
randomized bracketed sketch above it (see `joulecap.kernels.randomized`), where the cubic
eigensolver would cost more than the sketch. The sketch's k is never below the exact k but may be
above it; the exact path returns the float64 reference's k (see the kernel benchmark).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import cache

import torch

from joulecap.kernels import basis_cache
from joulecap.kernels.certified import MAX_SHORT_SIDE
from joulecap.kernels.randomized import exact_budget, randomized_budget

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "triton")
EXACT_SHORT_SIDE = MAX_SHORT_SIDE


@cache
def triton_available() -> bool:
    """Whether the `triton` package can be imported (checked once)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton runs in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _log_fallback(reason: str) -> None:
    log.info("joulecap.kernels: using the PyTorch path (%s)", reason)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Resolve `impl` to `"torch"` or `"triton"` for tensors on `device`.

    Args:
        impl: `"auto"`, `"torch"` or `"triton"`.
        device: Device of the features.

    Returns:
        The implementation to run.

    Raises:
        ValueError: On an unknown `impl`, or `"triton"` where it cannot run.

    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    on_cuda = device.type == "cuda"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' requested but the triton package is not installed")
        if not on_cuda and not interpreter_enabled():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run "
                "the kernels in Triton's CPU interpreter"
            )
        return "triton"
    if not on_cuda:
        _log_fallback(f"features on {device.type}, Triton kernels need CUDA")
        return "torch"
    if not triton_available():
        _log_fallback("triton is not installed")
        return "torch"
    return "triton"


def torch_budget(
    x: torch.Tensor, tau: float, lo: int, hi: int, *, memo_for: torch.Tensor | None = None
) -> torch.Tensor:
    """PyTorch budgets of validated `[B, N, D]` features: exact (certified) or bracketed sketch.

    Args:
        x: `[B, N, D]` features.
        tau: Energy fraction.
        lo: Lower clamp.
        hi: Upper clamp.
        memo_for: The caller's single-image tensor; its sketch is remembered for `select_tokens`.

    """
    if min(x.shape[-2], x.shape[-1]) <= EXACT_SHORT_SIDE:
        return exact_budget(x, tau, lo, hi)
    res = randomized_budget(x, tau, lo, hi, keep_basis=memo_for is not None)
    if memo_for is not None and res.bases and res.bases[0] is not None:
        basis_cache.put(memo_for, res.bases[0])
    return res.budget
