"""The symmetric rank-k update and eigenvalue solver of NumPy's bundled OpenBLAS, for CPU budgets.

Why: the exact budget needs a Gram matrix and its eigenvalues. PyTorch's CPU wheel reaches both
through MKL, which has no symmetric product in its API (`X @ X.T` is a full GEMM) and whose
`eigvalsh` of a 576 x 576 fp32 matrix measured 17-21 ms on the project's AMD EPYC CPU. The
OpenBLAS that NumPy's wheels bundle (`numpy.libs/libscipy_openblas64_*.so`, LAPACK 3.11+) exports
`cblas_ssyrk` (half the flops of the GEMM) and `LAPACKE_ssyevd` (11-12 ms on the same matrix).
Both are called here through `ctypes`, on the caller's own NumPy arrays, one OpenBLAS thread per
call: OpenBLAS' worker pool spinning beside PyTorch's OpenMP pool measured 3-4x slower on two
cores, and one thread keeps the two pools from meeting. `float64_gram_eigenvalues` (the float64
re-check) feeds `dsyrk` fp32 features a column block at a time.

`is_available()` finds the library lazily (nothing is loaded at import). NumPy builds without
that library (conda's MKL NumPy, macOS Accelerate) make it False and the callers keep PyTorch's
path; the answers are the same rule either way (the certified path's error bound covers both).
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

_ROW_MAJOR, _COL_MAJOR = 101, 102
_UPPER, _NO_TRANS = 121, 111
FLOAT64_BLOCK_COLUMNS = 512
"""Columns converted to float64 at a time by `float64_gram_eigenvalues` (see its docstring)."""


@dataclass(frozen=True)
class _Lib:
    """The resolved entry points (64-bit integer interface)."""

    syrk: dict[str, Any]
    syevd: dict[str, Any]
    set_threads_local: Callable[[int], int]
    path: str


def _library_paths() -> list[str]:
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    return sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so*")))


@cache
def _load() -> _Lib | None:
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
            syrk = {"float32": lib.scipy_cblas_ssyrk64_, "float64": lib.scipy_cblas_dsyrk64_}
            syevd = {"float32": lib.scipy_LAPACKE_ssyevd64_, "float64": lib.scipy_LAPACKE_dsyevd64_}
            set_local = lib.openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for name, fn in syrk.items():
            real = ctypes.c_float if name == "float32" else ctypes.c_double
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, real, ptr, i64, real]
            fn.argtypes += [ptr, i64]
        for fn in syevd.values():
            fn.restype = i64
            fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, i64, ptr, i64, ptr]
        set_local.restype = ctypes.c_int
        set_local.argtypes = [ctypes.c_int]
        return _Lib(syrk=syrk, syevd=syevd, set_threads_local=set_local, path=path)
    return None


def is_available() -> bool:
    """Whether NumPy's bundled OpenBLAS with `ssyrk`/`ssyevd` (64-bit interface) can be loaded."""
    return _load() is not None


def library_path() -> str | None:
    """Path of the loaded library, or None (shown by the kernel benchmark)."""
    lib = _load()
    return lib.path if lib else None


def _checked(a: np.ndarray) -> _Lib:
    lib = _load()
    if lib is None:
        raise RuntimeError("NumPy's bundled OpenBLAS is not available (see is_available())")
    if a.ndim != 2 or a.dtype.name not in lib.syrk or not a.flags.c_contiguous:
        raise ValueError(f"need a C-contiguous 2-D float32/float64 array, got {a.dtype} {a.shape}")
    return lib


@contextmanager
def _one_thread(lib: _Lib) -> Iterator[None]:
    # This thread's OpenBLAS calls run on one thread; the caller's setting comes back after.
    previous = lib.set_threads_local(1)
    try:
        yield
    finally:
        lib.set_threads_local(previous)


def _syrk(lib: _Lib, a: np.ndarray) -> np.ndarray:
    m, n = a.shape
    g = np.zeros((m, m), dtype=a.dtype)
    if m:
        lib.syrk[a.dtype.name](
            _ROW_MAJOR, _UPPER, _NO_TRANS, m, n, 1.0, a.ctypes.data, max(n, 1), 0.0, g.ctypes.data, m
        )
    return g


def gram(a: np.ndarray) -> np.ndarray:
    """`A A^T` of a C-contiguous `[m, n]` array, upper triangle only (row-major; the rest is 0).

    Raises:
        RuntimeError: When the library is missing.
        ValueError: On a dtype other than float32/float64 or a non-contiguous array.

    """
    lib = _checked(a)
    with _one_thread(lib):
        return _syrk(lib, a)


def gram_eigenvalues(a: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of `A A^T` for a C-contiguous `[m, n]` float32/float64 array.

    One `syrk` into the upper triangle (row-major), read by `syevd` as the column-major lower
    triangle of the same buffer (no copy), eigenvalues only.

    Raises:
        RuntimeError: When the library is missing or `syevd` reports failure.
        ValueError: On a dtype other than float32/float64 or a non-contiguous array.

    """
    lib = _checked(a)
    m = a.shape[0]
    w = np.empty(m, dtype=a.dtype)
    if m == 0:
        return w
    with _one_thread(lib):
        g = _syrk(lib, a)
        info = lib.syevd[a.dtype.name](_COL_MAJOR, b"N", b"L", m, g.ctypes.data, m, w.ctypes.data)
    if info != 0:
        raise RuntimeError(f"LAPACKE_?syevd failed (info={info})")
    return w


def float64_gram_eigenvalues(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Ascending float64 eigenvalues of `A A^T` and its trace, for a 2-D float32/float64 array.

    Why: the re-check's earlier form, a float64 copy of the whole image then the sum of its
    squares (another full-size temporary), measured 0.37x + 0.43x of one fp32 `A @ A.T` on
    top of `dsyrk` + `dsyevd` (1.1x + 0.6x) on the project's CPU. Here `FLOAT64_BLOCK_COLUMNS`
    columns at a time are converted into one reused buffer (2.4 MB instead of 19 MB for a
    576 x 4096 image; widths 256-4096 measured within 3% of each other) and accumulated by
    `dsyrk` (`beta = 1` after the first block), and the total is the float64 Gram's trace: the
    same float64 quantities summed in another order (differences ~1e-16 relative, far inside
    the rule's `FLOAT64_SLACK`). The whole re-check measured 1.8x of the fp32 product (2.6x
    before). `a` may have any strides (a transposed view is read as it is).

    Raises:
        RuntimeError: When the library is missing or `dsyevd` reports failure.
        ValueError: On an array that is not 2-D float32/float64.

    """
    lib = _load()
    if lib is None:
        raise RuntimeError("NumPy's bundled OpenBLAS is not available (see is_available())")
    if a.ndim != 2 or a.dtype.name not in lib.syrk:
        raise ValueError(f"need a 2-D float32/float64 array, got {a.dtype} {a.shape}")
    m, n = a.shape
    w = np.zeros(m, dtype=np.float64)
    if m == 0 or n == 0:
        return w, 0.0
    g = np.zeros((m, m), dtype=np.float64)
    width = min(n, FLOAT64_BLOCK_COLUMNS)
    flat = np.empty(m * width, dtype=np.float64)
    with _one_thread(lib):
        for c0 in range(0, n, width):
            cols = min(width, n - c0)
            block = flat[: m * cols].reshape(m, cols)  # contiguous, whatever the block's width
            np.copyto(block, a[:, c0 : c0 + cols])
            beta = 0.0 if c0 == 0 else 1.0
            lib.syrk["float64"](
                _ROW_MAJOR, _UPPER, _NO_TRANS, m, cols, 1.0, block.ctypes.data, cols, beta, g.ctypes.data, m
            )
        trace = float(np.trace(g))
        info = lib.syevd["float64"](_COL_MAJOR, b"N", b"L", m, g.ctypes.data, m, w.ctypes.data)
    if info != 0:
        raise RuntimeError(f"LAPACKE_dsyevd failed (info={info})")
    return w, trace
