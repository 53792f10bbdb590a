"""NumPy's bundled OpenBLAS binding (`ssyrk` + `ssyevd`) against PyTorch, and its fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from joulecap.kernels import certified, native_lapack

needs_lib = pytest.mark.skipif(
    not native_lapack.is_available(), reason="NumPy's bundled OpenBLAS is not installed here"
)


@needs_lib
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_and_eigenvalues_match_pytorch(dtype: type) -> None:
    a: np.ndarray = np.random.default_rng(0).standard_normal((37, 53)).astype(dtype)
    g = native_lapack.gram(a)
    want = a.astype(np.float64) @ a.astype(np.float64).T
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(np.triu(g), np.triu(want), rtol=tol, atol=tol * 53)
    assert not np.tril(g, -1).any()  # only the upper triangle is written
    w = native_lapack.gram_eigenvalues(a)
    assert w.dtype == dtype
    ref = torch.linalg.eigvalsh(torch.from_numpy(want)).numpy()
    np.testing.assert_allclose(w, ref, rtol=tol, atol=tol * float(ref.max()))


@needs_lib
def test_empty_and_degenerate_shapes() -> None:
    assert native_lapack.gram_eigenvalues(np.zeros((0, 5), np.float32)).shape == (0,)
    np.testing.assert_array_equal(native_lapack.gram_eigenvalues(np.zeros((3, 0), np.float32)), 0)
    ones = np.full((4, 6), 2.0, np.float32)  # rank one: eigenvalues 0, 0, 0, 4 * 6 * 4
    np.testing.assert_allclose(native_lapack.gram_eigenvalues(ones), [0, 0, 0, 96], atol=1e-4)


@needs_lib
@pytest.mark.parametrize("layout", ["fp32", "fp32-transposed-view", "fp64"])
def test_float64_gram_in_column_blocks_matches_the_whole_product(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seven columns a block: 53 columns take eight blocks, the last one narrower than the rest.
    monkeypatch.setattr(native_lapack, "FLOAT64_BLOCK_COLUMNS", 7)
    base = np.random.default_rng(1).standard_normal((37, 53))
    if layout == "fp64":
        a = base
    elif layout == "fp32":
        a = base.astype(np.float32)
    else:
        a = np.ascontiguousarray(base.T.astype(np.float32)).T  # 37 x 53, Fortran-ordered
        assert not a.flags.c_contiguous
    w, trace = native_lapack.float64_gram_eigenvalues(a)
    exact = a.astype(np.float64)
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, np.linalg.eigvalsh(exact @ exact.T), rtol=1e-12, atol=1e-11)
    assert trace == pytest.approx(float(np.square(exact).sum()), rel=1e-14)
    for empty in (np.zeros((0, 5), np.float32), np.zeros((3, 0), np.float32)):
        w0, t0 = native_lapack.float64_gram_eigenvalues(empty)
        assert w0.shape == (empty.shape[0],) and not w0.any() and t0 == 0.0
    with pytest.raises(ValueError, match="2-D float32/float64"):
        native_lapack.float64_gram_eigenvalues(np.zeros((2, 3), np.int32))


@needs_lib
def test_the_float64_recheck_gives_the_same_k_through_either_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_lapack, "FLOAT64_BLOCK_COLUMNS", 64)
    g = torch.Generator().manual_seed(3)
    for shape in ((100, 300), (300, 100)):  # the short side is the rows, then the columns
        x = torch.randn(*shape, generator=g) @ torch.diag(torch.linspace(2.0, 0.01, shape[1]))
        lo, hi = 1, shape[0]
        for tau in (0.5, 0.9, 0.99, 1.0):
            want = certified.float64_budget(x, tau, lo, hi, solver="torch")
            assert certified.float64_budget(x, tau, lo, hi, solver="openblas") == want, (shape, tau)
    half = torch.randn(40, 90, generator=g).to(torch.bfloat16)  # no bf16 in NumPy: widened first
    assert certified.float64_budget(half, 0.9, 1, 40, "openblas") == certified.float64_budget(
        half, 0.9, 1, 40, "torch"
    )


@needs_lib
def test_bad_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="C-contiguous"):
        native_lapack.gram(np.zeros((4, 6), np.float32).T)
    with pytest.raises(ValueError, match="float32/float64"):
        native_lapack.gram(np.zeros((4, 6), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        native_lapack.gram_eigenvalues(np.zeros((2, 4, 6), np.float32))


def test_without_the_library_auto_uses_pytorch_and_openblas_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    native_lapack._load.cache_clear()
    monkeypatch.setattr(native_lapack, "_library_paths", lambda: [])
    try:
        assert not native_lapack.is_available()
        assert certified.resolve_solver("auto", torch.device("cpu")) == "torch"
        with pytest.raises(ValueError, match="openblas"):
            certified.resolve_solver("openblas", torch.device("cpu"))
        with pytest.raises(RuntimeError, match="not available"):
            native_lapack.gram_eigenvalues(np.zeros((2, 3), np.float32))
        x = torch.randn(1, 20, 30, generator=torch.Generator().manual_seed(0))
        assert certified.certified_budget(x, 0.9, 1, 20).budget.tolist()[0] >= 1
    finally:
        native_lapack._load.cache_clear()


def test_unknown_solver_is_refused() -> None:
    with pytest.raises(ValueError, match="solver must be one of"):
        certified.resolve_solver("lapacke", torch.device("cpu"))


@needs_lib
def test_meta_tensors_cannot_take_openblas() -> None:
    # Off-CPU features (CUDA here when lent, meta in this test) never go through NumPy.
    assert certified.resolve_solver("auto", torch.device("meta")) == "torch"
    with pytest.raises(ValueError, match="CPU tensors"):
        certified.resolve_solver("openblas", torch.device("meta"))


@needs_lib
def test_auto_takes_openblas_on_cpu_where_it_loads() -> None:
    assert certified.resolve_solver("auto", torch.device("cpu")) == "openblas"
