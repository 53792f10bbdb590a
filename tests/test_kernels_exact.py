"""The exact PyTorch budget path (fp32 Gram eigenvalues, float64 re-check near ties) against float64."""

from __future__ import annotations

import math

import pytest
import torch

from joulecap.kernels import certified, native_lapack, spectral_budget
from joulecap.kernels.certified import certified_budget, energy_bound_rel, fp32_energies
from joulecap.kernels.reference import reference_budget, reference_energies


def with_spectrum(s: list[float], n: int, d: int, seed: int = 0) -> torch.Tensor:
    """An n x d float64 matrix with singular values `s` (random orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


TAUS = (0.5, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 1.0)
OPENBLAS = pytest.param(
    "openblas",
    marks=pytest.mark.skipif(
        not native_lapack.is_available(), reason="NumPy's bundled OpenBLAS is not installed here"
    ),
)
SOLVERS = [OPENBLAS, "torch"]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape", [(200, 400), (400, 150)])
def test_slowly_decaying_spectra_match_float64(shape: tuple[int, int], solver: str) -> None:
    # Singular values exp(-0.02 i): the spectrum where the sketch returned k + 1 at tau 0.9.
    n, d = shape
    s = [math.exp(-0.02 * i) for i in range(min(n, d))]
    xs = torch.stack([with_spectrum(s, n, d, seed=i).float() for i in range(3)])
    for tau in TAUS:
        want = reference_budget(xs.double(), tau, 1, n)
        assert torch.equal(spectral_budget(xs, tau, impl="torch"), want), tau
        assert torch.equal(certified_budget(xs, tau, 1, n, solver=solver).budget, want), tau
        for i in range(xs.shape[0]):
            assert int(spectral_budget(xs[i], tau, impl="torch")) == int(want[i]), (tau, i)


@pytest.mark.parametrize("solver", SOLVERS)
def test_fp32_energy_error_stays_well_inside_the_bound(solver: str) -> None:
    s = [math.exp(-0.02 * i) for i in range(200)]
    for seed in range(3):
        x = with_spectrum(s, 200, 400, seed=seed).float()
        total = float(x.double().square().sum())
        err = (fp32_energies(x, solver).cumsum(-1) - reference_energies(x).cumsum(-1)).abs().max() / total
        assert float(err) < 0.25 * energy_bound_rel(200, 400)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_threshold_on_a_cumulative_energy_is_decided_in_float64(solver: str) -> None:
    # Four equal singular values: tau = 0.5 puts the threshold exactly on the second cumulative
    # energy, where fp32 rounding could go either way; the float64 re-check decides, as the
    # reference does.
    x = with_spectrum([1.0, 1.0, 1.0, 1.0], 60, 90, seed=1).float()
    res = certified_budget(x.unsqueeze(0), 0.5, 1, 60, solver=solver)
    assert bool(res.rechecked[0])
    assert int(res.budget[0]) == int(reference_budget(x.unsqueeze(0).double(), 0.5, 1, 60)[0]) == 2
    # Far from any tie, fp32 decides alone.
    y = with_spectrum([0.7**i for i in range(30)], 60, 90).float()
    far = certified_budget(y.unsqueeze(0), 0.9, 1, 60, solver=solver)
    assert not bool(far.rechecked[0])


@pytest.mark.parametrize("solver", SOLVERS)
def test_tau_one_on_a_rank_deficient_image_keeps_its_rank(solver: str) -> None:
    for rank in (1, 7, 40):
        x = with_spectrum([0.9**i for i in range(rank)], 120, 200, seed=rank).float()
        assert int(spectral_budget(x, 1.0, impl="torch")) == rank
        assert int(certified_budget(x.unsqueeze(0), 1.0, 1, 120, solver=solver).budget[0]) == rank
        assert int(reference_budget(x.unsqueeze(0).double(), 1.0, 1, 120)[0]) == rank


@pytest.mark.parametrize("solver", SOLVERS)
def test_all_equal_features_are_rank_one(solver: str) -> None:
    x = torch.full((144, 160), 0.37)
    for tau in (0.5, 0.99, 1.0):
        assert int(spectral_budget(x, tau, impl="torch")) == 1
        assert int(certified_budget(x.unsqueeze(0), tau, 1, 144, solver=solver).budget[0]) == 1
        assert int(spectral_budget(x, tau, k_min=16, impl="torch")) == 16


def test_k_min_above_the_token_count_keeps_every_token_without_decomposing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_eig(*_a: object, **_k: object) -> object:
        raise AssertionError("decomposed although the clamp decides")

    monkeypatch.setattr(certified, "fp32_energies", no_eig)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    assert int(spectral_budget(x, 0.9, k_min=16, impl="torch")) == 10
    assert spectral_budget(x.expand(3, 10, 64), 0.99, k_min=11, impl="torch").tolist() == [10, 10, 10]


def test_gram_blocks_equal_the_full_product() -> None:
    a = torch.randn(37, 53, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for blocks in (1, 2, 4, 8):
        torch.testing.assert_close(certified.gram(a, blocks), a @ a.T)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_batch_is_decided_on_pytorchs_thread_count_with_the_same_answers(
    solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each OpenBLAS call runs on one thread, so a batch is spread over torch.get_num_threads()
    # threads; PyTorch's solver is multi-threaded itself and keeps one image at a time.
    import threading
    import time

    s = [math.exp(-0.05 * i) for i in range(60)]
    xs = torch.stack([with_spectrum(s, 60, 90, seed=i).float() for i in range(6)])
    threads: set[str] = set()
    real = certified.fp32_energies

    def seen(a: torch.Tensor, solver: str = "auto") -> torch.Tensor:
        threads.add(threading.current_thread().name)
        time.sleep(0.02)  # long enough that a second pool thread always takes an image
        return real(a, solver)

    monkeypatch.setattr(certified, "fp32_energies", seen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = certified_budget(xs, 0.99, 1, 60, solver=solver)
        assert threads == {threading.current_thread().name}
        threads.clear()
        torch.set_num_threads(3)
        many = certified_budget(xs, 0.99, 1, 60, solver=solver)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.budget, many.budget) and torch.equal(one.rechecked, many.rechecked)
    assert torch.equal(many.budget, reference_budget(xs.double(), 0.99, 1, 60))
    if solver == "openblas":
        assert len(threads) > 1 and all(t.startswith("joulecap-budget") for t in threads)
    else:
        assert threads == {threading.current_thread().name}
