"""Parity of the Triton kernels with the float64 reference, under Triton's CPU interpreter.

`TRITON_INTERPRET=1` must be set before triton is imported, and other tests in the same pytest
process may already have imported it, so the checks run in a child process (this file executed
as a script, once per module) and report JSON; the tests below assert on that report. Shapes are
tiny because the interpreter runs every program instance in numpy.

When a CUDA GPU is present, `test_gpu_parity` runs the same checks on the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TAUS = (0.5, 0.8, 0.9, 0.95, 0.99)
AMBIGUITY = 1e-4  # relative distance of a cumulative energy to tau*total counted as "rounding"


def _spectra(torch: Any) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, d, decay in ((17, 40, 0.8), (33, 20, 0.9), (48, 48, 0.95), (5, 64, 0.5), (40, 24, 1.0)):
        s = torch.tensor([decay**i for i in range(min(n, d))], dtype=torch.float64)
        u, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))
        out.append(torch.stack([(u * s) @ v.T, torch.randn(n, d, generator=g, dtype=torch.float64)]))
    return out


def _ambiguous(torch: Any, x: Any, tau: float) -> list[bool]:
    """Per image: is some cumulative energy within AMBIGUITY of the threshold?"""
    from joulecap.kernels.reference import reference_energies

    e = reference_energies(x)
    cum = e.cumsum(-1) / e.sum(-1, keepdim=True)
    return ((cum - tau).abs() < AMBIGUITY).any(-1).tolist()


def child_checks() -> dict[str, Any]:
    """Run every parity check (in the interpreter process); returns name -> (ok, detail)."""
    import torch

    from joulecap.kernels import select_tokens, spectral_budget
    from joulecap.kernels.randomized import SketchConfig, first_reaching, randomized_budget
    from joulecap.kernels.reference import reference_budget, reference_energies
    from joulecap.kernels.selection import exact_left_subspace
    from joulecap.kernels.triton_spectral import (
        TRITON_OPS,
        bmm,
        gram_energies_and_total,
        sum_squares,
        triton_leverage_scores,
    )
    from joulecap.kernels.triton_spectral import first_reaching as tl_first_reaching

    device = os.environ.get("JOULECAP_PARITY_DEVICE", "cpu")
    res: dict[str, Any] = {}
    g = torch.Generator().manual_seed(1)

    for dt in (torch.float32, torch.float16, torch.bfloat16):
        a = torch.randn(3, 24, 40, generator=g).to(device, dt)
        ref = a.double() @ a.double().mT
        gram = bmm(a, a.mT).double()
        rel = float((gram - ref).abs().max() / ref.abs().max())
        tot = sum_squares(a)
        rel_tot = float(((tot - a.double().square().sum((1, 2))).abs() / tot).max())
        e, total = gram_energies_and_total(a)
        er = reference_energies(a).to(e.device)
        rel_e = float(((e.double() - er).abs().max(-1).values / er.sum(-1)).max())
        rel_t = float(((total - er.sum(-1)).abs() / er.sum(-1)).max())
        res[f"gram_{dt}"] = (rel < 1e-5 and rel_tot < 1e-5 and rel_e < 1e-3 and rel_t < 1e-3, [rel, rel_e])

    energies = torch.rand(4, 37, generator=g).sort(-1, descending=True).values.to(device)
    offset = torch.tensor([0.0, 0.5, 1.0, 100.0], device=device)
    target = energies.sum(-1) * torch.tensor([0.3, 0.9, 0.99, 0.5], device=device)
    want = first_reaching(offset, energies, target)
    got = tl_first_reaching(offset, energies, target)
    res["threshold"] = (got.tolist() == want.tolist(), [got.tolist(), want.tolist()])

    mismatches = []
    checked = 0
    for x64 in _spectra(torch):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = x64.to(dt)
            xr = x.double()  # reference on the same rounded values the kernel sees
            for tau in TAUS:
                got = spectral_budget(x.to(device), tau, impl="triton").tolist()
                ref = reference_budget(xr, tau, 1, x.shape[1]).tolist()
                amb = _ambiguous(torch, xr, tau)
                for i, (k1, k2, a_) in enumerate(zip(got, ref, amb, strict=True)):
                    checked += 1
                    if k1 != k2 and not a_:
                        mismatches.append((tuple(x.shape), str(dt), tau, i, k1, k2))
    res["budget_parity"] = (not mismatches and checked > 100, {"checked": checked, "mismatches": mismatches})

    edge = {
        "n0": spectral_budget(torch.zeros(2, 0, 8, device=device), 0.9, impl="triton").tolist() == [0, 0],
        "n1": int(spectral_budget(torch.ones(1, 8, device=device), 0.9, impl="triton")) == 1,
        "zeros": int(spectral_budget(torch.zeros(6, 8, device=device), 0.9, k_min=2, impl="triton")) == 2,
        "kmin_gt_n": int(spectral_budget(torch.randn(6, 8, device=device), 0.5, k_min=99, impl="triton"))
        == 6,
    }
    try:
        bad = torch.randn(6, 8, device=device)
        bad[1, 1] = float("nan")
        spectral_budget(bad, 0.9, impl="triton")
        edge["nan_raises"] = False
    except ValueError:
        edge["nan_raises"] = True
    res["edges"] = (all(edge.values()), edge)

    # Randomized route with Triton primitives (forced small rank so the sketch must grow).
    x = _spectra(torch)[2].float().to(device)
    bracket_ok = []
    for tau in (0.8, 0.9, 0.95):
        r = randomized_budget(x, tau, 1, 48, config=SketchConfig(rank0=4, exact_fraction=0.9), ops=TRITON_OPS)
        ref = reference_budget(x.cpu(), tau, 1, 48)
        bracket_ok.append(bool(((r.k_lo <= ref) & (ref <= r.k_hi)).all()))
    res["randomized_bracket"] = (all(bracket_ok), bracket_ok)

    # Leverage: the sketch is full rank here, so the scores are exact up to rounding.
    lev_err = []
    for n, d, k in ((40, 20, 5), (24, 50, 8), (30, 30, 3)):
        s = torch.tensor([0.7**i for i in range(min(n, d))])
        y = torch.randn(n, min(n, d), generator=g) @ torch.diag(s) @ torch.randn(min(n, d), d, generator=g)
        got_l = triton_leverage_scores(y.to(device), k).double().cpu()
        want_l = exact_left_subspace(y, k).square().sum(-1)
        lev_err.append(float((got_l - want_l).abs().max()))
    res["leverage_scores"] = (max(lev_err) < 1e-3, lev_err)

    z = 0.01 * torch.randn(40, 30, generator=g)
    for i, j in ((3, 0), (17, 1), (31, 2)):
        z[i, j] += 10.0
    sel = select_tokens(z.to(device), 3, impl="triton").tolist()
    res["leverage_select"] = (sel == [3, 17, 31], sel)
    return res


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHECKS = [
    "gram_torch.float32",
    "gram_torch.float16",
    "gram_torch.bfloat16",
    "threshold",
    "budget_parity",
    "edges",
    "randomized_bracket",
    "leverage_scores",
    "leverage_select",
]


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter_parity(report: dict[str, Any], name: str) -> None:
    ok, detail = report[name]
    assert ok, detail


@pytest.mark.gpu
def test_gpu_parity() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU in this environment")
    os.environ["JOULECAP_PARITY_DEVICE"] = "cuda"
    failed = {k: v for k, v in child_checks().items() if not v[0]}
    assert not failed, failed


if __name__ == "__main__":
    print(json.dumps(child_checks(), default=str))
