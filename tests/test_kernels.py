"""Tests of joulecap.kernels (PyTorch paths): budget rule, validation, selection, adaptivity."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest
import torch

from joulecap.kernels import SELECTORS, merge_dropped, select_tokens, spectral_budget
from joulecap.kernels.dispatch import resolve_impl
from joulecap.kernels.randomized import SketchConfig, exact_budget, randomized_budget
from joulecap.kernels.reference import reference_budget
from joulecap.kernels.selection import leverage_scores


def with_spectrum(s: list[float], n: int, d: int, seed: int = 0) -> torch.Tensor:
    """An n x d matrix with singular values `s` (random orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def expected_k(s: list[float], tau: float) -> int:
    e = np.asarray(s, dtype=np.float64) ** 2
    return int(np.argmax(np.cumsum(e) >= tau * e.sum()) + 1)


# Spectra whose cumulative energies sit far from 0.5/0.8/0.9/0.95 (no rounding ambiguity).
GEOMETRIC = [0.8**i for i in range(40)]


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("shape", [(60, 200), (200, 60), (300, 400)])
def test_budget_matches_rule(tau: float, shape: tuple[int, int]) -> None:
    x = with_spectrum(GEOMETRIC, *shape).float()
    want = expected_k(GEOMETRIC, tau)
    assert int(reference_budget(x.unsqueeze(0), tau, 1, shape[0])[0]) == want
    assert int(spectral_budget(x, tau)) == want
    assert int(spectral_budget(x, tau, impl="torch")) == want
    assert int(exact_budget(x.unsqueeze(0), tau, 1, shape[0])[0]) == want


def test_randomized_brackets_and_grows() -> None:
    # A slowly decaying spectrum needs more than the first sketch rank: the rank must grow.
    s = [0.97**i for i in range(150)]
    x = with_spectrum(s, 200, 300).float().unsqueeze(0)
    want = expected_k(s, 0.9)
    res = randomized_budget(x, 0.9, 1, 200, config=SketchConfig(rank0=8, exact_fraction=0.9))
    assert int(res.k_lo[0]) <= want <= int(res.k_hi[0])
    assert int(res.budget[0]) == int(res.k_hi[0])
    assert int(res.rank[0]) > 8
    assert int(res.budget[0]) - want <= max(1, 0.25 * want)


@pytest.mark.parametrize("rank", [1, 3, 39, 41])
def test_randomized_low_rank_features(rank: int) -> None:
    # Sketch rank (40) above, at and below the rank of X: rank-deficient sketches stay correct.
    s = [0.8**i for i in range(rank)]
    x = with_spectrum(s, 300, 500, seed=rank).float()
    for tau in (0.5, 0.9, 0.99):
        want = int(reference_budget(x.unsqueeze(0).double(), tau, 1, 300)[0])
        assert int(spectral_budget(x, tau)) == want
        res = randomized_budget(x.unsqueeze(0), tau, 1, 300)
        assert int(res.k_lo[0]) <= want <= int(res.k_hi[0])


def test_leverage_reuses_budget_sketch(monkeypatch: pytest.MonkeyPatch) -> None:
    from joulecap.kernels import basis_cache, dispatch
    from joulecap.kernels.selection import exact_left_subspace

    # The sketch runs above the exact path's short side (2048): lower that limit for a small test.
    monkeypatch.setattr(dispatch, "EXACT_SHORT_SIDE", 128)
    basis_cache.clear()
    x = with_spectrum([0.85**i for i in range(100)], 300, 400, seed=5).float()
    k = int(spectral_budget(x, 0.9))
    memo = basis_cache.get(x)
    assert memo is not None and memo.q.shape == (300, 40)
    scores = leverage_scores(x, k)
    exact = exact_left_subspace(x, k).square().sum(-1)
    assert torch.allclose(scores, exact, atol=0.02)
    # An in-place change invalidates the memo; another tensor never hits it.
    assert basis_cache.get(x.clone()) is None
    x.mul_(2.0)
    assert basis_cache.get(x) is None


def test_exact_basis_gives_the_exact_leverage_and_selection_at_any_k() -> None:
    from joulecap.kernels import leverage_basis
    from joulecap.kernels.selection import EXACT_BASIS_MAX, exact_left_subspace

    # N <= D (tokens fewer than channels, as TinyVQA's 144 x 160) and N > D, full and deficient rank.
    cases = [
        with_spectrum([0.9**i for i in range(60)], 144, 160, seed=1).float(),
        with_spectrum([0.9**i for i in range(40)], 200, 64, seed=2).float(),
        with_spectrum([0.9**i for i in range(20)], 100, 120, seed=3).float(),
    ]
    for x in cases:
        with torch.inference_mode():  # engines prepare features in inference mode
            xi = x.clone()
            basis = leverage_basis(xi)
        assert basis is not None
        for k in (1, 8, 17, min(x.shape) - 1):
            exact = exact_left_subspace(x, k).square().sum(-1)
            torch.testing.assert_close(leverage_scores(x, k, basis), exact, rtol=1e-9, atol=1e-9)
            picked = select_tokens(xi, k, basis=basis)
            if k + 10 > 0.5 * min(x.shape) or min(x.shape) <= 128:  # where selection is exact too
                assert torch.equal(picked, select_tokens(xi, k))
            assert picked.shape == (k,) and torch.equal(picked, picked.sort().values)
    # Too large a short side: no basis (selection then decomposes as before).
    assert leverage_basis(torch.randn(EXACT_BASIS_MAX + 1, EXACT_BASIS_MAX + 2)) is None
    with pytest.raises(ValueError):
        leverage_basis(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]))


def test_budget_read_off_the_exact_basis_is_the_reference_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from joulecap.kernels import dispatch, leverage_basis

    # Full and deficient rank, N <= D and N > D, a short side over the Gram path's 128, and an
    # all-zero image; every tau of the rule's range including 1.
    cases = [
        with_spectrum([0.9**i for i in range(60)], 144, 160, seed=1).float(),
        with_spectrum([0.9**i for i in range(40)], 200, 64, seed=2).float(),
        with_spectrum([0.97**i for i in range(150)], 200, 240, seed=4).float(),
        with_spectrum([0.8**i for i in range(20)], 100, 120, seed=3).float(),
        torch.zeros(30, 40),
    ]
    bases = [leverage_basis(x) for x in cases]
    want = {
        (i, tau, k_min): int(reference_budget(x.unsqueeze(0), tau, min(k_min, x.shape[0]), x.shape[0])[0])
        for i, x in enumerate(cases)
        for tau in (0.5, 0.9, 0.99, 1.0)
        for k_min in (1, 16)
    }

    calls: list[str] = []

    def counted(name: str) -> Any:
        real = getattr(dispatch, name)

        def wrapper(*args: Any, **kw: Any) -> Any:
            calls.append("decomposed")
            return real(*args, **kw)

        return wrapper

    for name in ("exact_budget", "randomized_budget"):
        monkeypatch.setattr(dispatch, name, counted(name))
    for (i, tau, k_min), k in want.items():
        basis = bases[i]
        assert basis is not None
        assert int(spectral_budget(cases[i], tau, k_min=k_min, basis=basis)) == k, (i, tau, k_min)
        # Below tau = 1 the basis decides alone (at 1, null directions it dropped may matter).
        assert not calls or tau == 1.0
    # A basis missing directions that carry energy cannot decide: the usual path does.
    x = cases[2]
    full = bases[2]
    assert full is not None
    short = dataclasses.replace(full, q=full.q[:, :5], energies=full.energies[:5], evecs=full.evecs[:5, :5])
    calls.clear()
    assert int(spectral_budget(x, 0.9, basis=short)) == want[(2, 0.9, 1)] and calls == ["decomposed"]
    with pytest.raises(ValueError, match="basis is for 144 tokens"):
        spectral_budget(cases[1], 0.9, basis=bases[0])


def test_budget_and_selection_on_inference_mode_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Features made under torch.inference_mode() have no version counter: they are not memoised,
    # and the budget and selection match those of an ordinary tensor.
    from joulecap.kernels import basis_cache, dispatch

    monkeypatch.setattr(dispatch, "EXACT_SHORT_SIDE", 128)
    basis_cache.clear()
    x = with_spectrum([0.85**i for i in range(100)], 300, 400, seed=5).float()
    with torch.inference_mode():
        xi = x.clone()
        k = int(spectral_budget(xi, 0.9))
        assert basis_cache.get(xi) is None
        scores = leverage_scores(xi, k)
    assert k == int(spectral_budget(x, 0.9))
    assert torch.allclose(scores, leverage_scores(x, k), atol=0.02)


def test_randomized_falls_back_to_exact_for_flat_spectrum() -> None:
    x = torch.randn(1, 160, 200, generator=torch.Generator().manual_seed(3))
    res = randomized_budget(x, 0.95, 1, 160)
    assert int(res.rank[0]) == 0  # exact Gram path used
    assert int(res.budget[0]) == int(reference_budget(x, 0.95, 1, 160)[0])


def test_total_energy_is_accurate() -> None:
    # Regression: a single fp32 norm over all N*D values was 6e-5 low on a 576 x 4096 image,
    # which moved k by one at tau = 0.99.
    from joulecap.kernels.reference import sum_squares

    x = torch.rand(2, 576, 4096, generator=torch.Generator().manual_seed(0)) + 0.5
    want = x.double().square().sum((-2, -1))
    assert float(((sum_squares(x) - want).abs() / want).max()) < 1e-6


def test_batched_each_image_own_k() -> None:
    a = with_spectrum([1.0], 150, 160, seed=1)
    b = with_spectrum(GEOMETRIC, 150, 160, seed=2)
    x = torch.stack([a, b]).float()
    k = spectral_budget(x, 0.9)
    assert k.dtype == torch.int64 and k.shape == (2,)
    assert k.tolist() == [1, expected_k(GEOMETRIC, 0.9)]
    assert spectral_budget(a.float(), 0.9).shape == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    x = with_spectrum(GEOMETRIC, 150, 200).to(dtype)
    assert int(spectral_budget(x, 0.9)) == expected_k(GEOMETRIC, 0.9)


def test_clamps_and_edge_sizes() -> None:
    x = with_spectrum(GEOMETRIC, 50, 60).float()
    k = expected_k(GEOMETRIC, 0.9)
    assert int(spectral_budget(x, 0.9, k_min=k + 3)) == k + 3
    assert int(spectral_budget(x, 0.9, k_max=2)) == 2
    # k_min larger than N clamps to N (keep all), documented.
    assert int(spectral_budget(x, 0.9, k_min=500)) == 50
    assert int(spectral_budget(x, 0.9, k_min=500, k_max=20)) == 20
    assert int(spectral_budget(torch.zeros(0, 8), 0.9)) == 0
    assert int(spectral_budget(torch.ones(1, 8), 0.9)) == 1
    assert int(spectral_budget(torch.ones(1, 8), 0.9, k_min=0)) == 1
    assert int(spectral_budget(torch.zeros(5, 8), 0.9, k_min=2)) == 2
    assert int(spectral_budget(torch.zeros(5, 8), 0.9, k_min=0)) == 0
    assert spectral_budget(torch.zeros(3, 0, 8), 0.9).tolist() == [0, 0, 0]


def test_tau_one_is_numerical_rank() -> None:
    x = with_spectrum([3.0, 2.0, 1.0], 40, 50).float()
    assert int(spectral_budget(x, 1.0)) == 3
    assert int(spectral_budget(with_spectrum([3.0, 2.0, 1.0], 200, 250).float(), 1.0)) == 3


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, float("nan"), float("inf")])
def test_tau_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        spectral_budget(torch.randn(4, 4), bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_raise(value: float) -> None:
    x = torch.randn(10, 6)
    x[3, 2] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        spectral_budget(x, 0.9)
    with pytest.raises(ValueError, match="NaN or infinite"):
        spectral_budget(x.unsqueeze(0).repeat(2, 1, 1), 0.9)
    for method in SELECTORS:
        with pytest.raises(ValueError, match="NaN or infinite"):
            select_tokens(x, 3, method=method, attention=torch.ones(10))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        spectral_budget(torch.randn(4), 0.9)
    with pytest.raises(TypeError):
        spectral_budget(torch.ones(4, 4, dtype=torch.long), 0.9)
    with pytest.raises(ValueError, match="k_min"):
        spectral_budget(torch.randn(4, 4), 0.9, k_min=-1)
    with pytest.raises(ValueError, match="impl"):
        spectral_budget(torch.randn(4, 4), 0.9, impl="cuda")
    with pytest.raises(ValueError, match="method"):
        select_tokens(torch.randn(4, 4), 2, method="random")
    with pytest.raises(ValueError, match="k must"):
        select_tokens(torch.randn(4, 4), -1)


def test_centering_option() -> None:
    # Rank-1 after centering: a constant offset plus one direction.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, generator=g) * 10 + torch.randn(40, 1, generator=g) * torch.randn(
        1, 30, generator=g
    )
    assert int(spectral_budget(x, 0.999, center=True)) == 1
    assert int(spectral_budget(x, 0.999)) == 2


def test_impl_resolution_logs_fallback(caplog: pytest.LogCaptureFixture) -> None:
    from joulecap.kernels import dispatch

    dispatch._log_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger="joulecap.kernels.dispatch"):
        assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert "Triton kernels need CUDA" in caplog.text
    assert resolve_impl("torch", torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        spectral_budget(torch.randn(8, 8), 0.9, impl="triton")


# --- selection -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize("n", [1, 7, 40])
def test_selection_contract(method: str, n: int) -> None:
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(n))
    att = torch.rand(n, generator=torch.Generator().manual_seed(1))
    for k in (0, 1, n // 2, n, n + 5):
        idx = select_tokens(x, k, method=method, attention=att)
        assert idx.dtype == torch.long
        assert idx.tolist() == sorted(set(idx.tolist()))
        assert len(idx) == min(k, n)
        assert all(0 <= i < n for i in idx.tolist())


def test_leverage_prefers_dominant_subspace() -> None:
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(300, 200, generator=g)
    # Tokens 5, 77, 250 carry three strong, distinct directions.
    for i, j in ((5, 0), (77, 1), (250, 2)):
        x[i, j] += 10.0
    assert select_tokens(x, 3).tolist() == [5, 77, 250]
    # Randomized subspace (short side > 128) agrees with exact float64 scores.
    big = torch.randn(300, 200, generator=g) @ torch.diag(torch.tensor([0.9**i for i in range(200)]))
    from joulecap.kernels.selection import exact_left_subspace

    exact = exact_left_subspace(big, 10).square().sum(-1)
    approx = leverage_scores(big, 10)
    assert torch.allclose(approx, exact, atol=0.05)


def test_norm_attention_uniform_diversity_semantics() -> None:
    x = torch.ones(10, 4)
    x[2] *= 5
    x[8] *= 3
    assert select_tokens(x, 2, method="norm").tolist() == [2, 8]
    att = torch.arange(10.0)
    assert select_tokens(x, 3, method="attention", attention=att).tolist() == [7, 8, 9]
    assert select_tokens(x, 5, method="uniform").tolist() == [1, 3, 5, 7, 9]
    # Diversity: two clusters plus an outlier -> one from each.
    y = torch.zeros(9, 3)
    y[:4, 0] = 1.0
    y[4:8, 1] = 1.0
    y[8, 2] = 1.0
    y[0, 0] = 2.0  # largest norm: the first pick
    assert select_tokens(y, 3, method="diversity").tolist() in ([0, 4, 8], [0, 5, 8], [0, 6, 8], [0, 7, 8])


def test_attention_needs_scores() -> None:
    with pytest.raises(ValueError, match="attention scores"):
        select_tokens(torch.randn(6, 4), 2, method="attention")
    with pytest.raises(ValueError, match="shape"):
        select_tokens(torch.randn(6, 4), 2, method="attention", attention=torch.ones(5))


def test_merge_dropped() -> None:
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.0, 2.0]])
    keep = torch.tensor([0, 2])
    merged = merge_dropped(x, keep)
    assert merged.shape == (2, 2)
    assert torch.allclose(merged[0], (x[0] + x[1]) / 2)
    assert torch.allclose(merged[1], (x[2] + x[3] + x[4]) / 3)
    assert merge_dropped(x, torch.arange(5)).tolist() == x.tolist()
    assert merge_dropped(x, torch.zeros(0, dtype=torch.long)).shape == (0, 2)


# --- adaptivity on real photographs ----------------------------------------------------------


def patch_features(img: np.ndarray, grid: int = 24, patch: int = 14) -> torch.Tensor:
    """Raw patch pixels [grid^2, patch^2 * 3] of an image resized to grid*patch square."""
    from skimage import transform

    img = transform.resize(img, (grid * patch, grid * patch), anti_aliasing=True)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    x = img[..., :3].reshape(grid, patch, grid, patch, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    return torch.tensor(x, dtype=torch.float32)


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    from skimage import data

    # Bundled with scikit-image (no download).
    return {
        name: patch_features(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")
    }


def synthetic_images(size: int = 336) -> dict[str, torch.Tensor]:
    flat = np.full((size, size, 3), (0.3, 0.5, 0.7))
    two = np.zeros((size, size, 3))
    two[:, : size // 2] = (0.9, 0.1, 0.1)
    two[:, size // 2 :] = (0.1, 0.2, 0.8)
    two_diag = np.where(
        (np.add.outer(np.arange(size), np.arange(size)) < size)[..., None], 0.8, 0.2
    ) * np.ones(3)
    return {name: patch_features(img) for name, img in (("flat", flat), ("two", two), ("two_diag", two_diag))}


def test_photographs_get_larger_budgets(photos: dict[str, torch.Tensor]) -> None:
    from joulecap.policies.config import SchedulerConfig

    # Raw pixels are dominated by the mean colour (the DC direction), so uncentered they only
    # separate at a high tau (at 0.95 chelsea gets 1 token, like a flat image: measured); with
    # centering the default tau separates them. Both settings are checked.
    for tau, center in ((SchedulerConfig().tau, True), (0.99, False)):
        synth = {n: int(spectral_budget(x, tau, center=center)) for n, x in synthetic_images().items()}
        real = {n: int(spectral_budget(x, tau, center=center)) for n, x in photos.items()}
        assert max(synth.values()) < min(real.values()), (tau, center, synth, real)
        # Batched call agrees with per-image calls.
        batch = spectral_budget(torch.stack(list(photos.values())), tau, center=center)
        assert batch.tolist() == list(real.values())
