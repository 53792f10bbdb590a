"""Benchmark of the E-AdaPrune kernels: per-image time of budget + selection, and the tau sweep.

Run: `.venv/bin/python -m benchmarks.kernels` (add `--quick` for a smoke run, `--tau-sweep` to add
the tau sweep, `--tau-sweep-only` to run only the sweep). Writes
`benchmarks/results/kernels_<device>.json` and, with either sweep flag,
`benchmarks/results/kernels_tau.json`, each with its date, machine, load and command.

Timed, per image, side by side with the yardstick (one fp32 Gram product `X X^T` of the same
features, timed in the same repeat so both see the same load), for N x D in {576x1024, 576x4096,
729x1152, 1024x1536}, fp32, batch 1 and 64, at tau 0.99 (`--tau`):

- `exact`: the default CPU path, `spectral_budget(impl="torch")`: fp32 Gram eigenvalues with a
  float64 re-check near ties (`joulecap.kernels.certified`), solved by NumPy's bundled OpenBLAS
  (`ssyrk` + `ssyevd`, `joulecap.kernels.native_lapack`) where it loads.
- `exact-torch-solver`: the same rule with PyTorch's own (MKL) products and `eigvalsh`, the path
  taken where that library is missing.
- `syrk-only`: OpenBLAS' symmetric product alone (the Gram share of `exact`; not a budget).
- `syrk+syevd`: the two OpenBLAS calls alone, no totals and no float64 re-check (the floor of
  `exact` on this path; not a budget).
- `randomized`: the bracketed sketch (used above a short side of 2048).
- `svdvals`: fp32 `torch.linalg.svdvals` (one image).
- `exact+select`: the budget plus leverage selection (a request whose engine passed no basis).
- Triton: CUDA only; on CPU the JSON says "no GPU available: not measured".

Exactness: the exact and randomized k against the float64 reference on 64 projector images of
576 x 4096 and on 8 synthetic images with singular values exp(-0.02 i), at several tau, with the
number of images the exact path re-decided in float64 and the largest fp32 error over its bound.

Features are not random noise (whose flat spectrum is the worst case of every method and unlike
real visual tokens): they are patch pixels of the photographs bundled with scikit-image, passed
through a fixed random two-layer GELU MLP to D dims (a stand-in for the vision tower +
projector; no model weights can be downloaded here). Batch 64 cycles over the photographs with
random crops. `svdvals` is timed on one image only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

import numpy as np
import torch

from benchmarks._common import RunRecord, machine_info
from joulecap.kernels import native_lapack, select_tokens, spectral_budget
from joulecap.kernels.dispatch import triton_available
from joulecap.kernels.randomized import randomized_budget
from joulecap.kernels.reference import FLOAT64_SLACK, reference_budget
from joulecap.policies.config import SchedulerConfig

RESULTS = Path(__file__).parent / "results"
SHAPES = ((576, 1024), (576, 4096), (729, 1152), (1024, 1536))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
PATCH = 14


# ---------------------------------------------------------------------------------------- features
def photo_patches(grid: int, *, count: int, seed: int = 0) -> torch.Tensor:
    """`[count, grid^2, PATCH^2 * 3]` raw patch pixels of bundled photographs.

    The first `len(PHOTOS)` are the whole photographs, later ones random crops of them.
    """
    from skimage import data, transform

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = getattr(data, PHOTOS[i % len(PHOTOS)])()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        if i >= len(PHOTOS):
            h, w = img.shape[:2]
            ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
            y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            img = img[y0 : y0 + ch, x0 : x0 + cw]
        side = grid * PATCH
        img = transform.resize(img, (side, side), anti_aliasing=True)
        x = img.reshape(grid, PATCH, grid, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
        out.append(torch.tensor(x, dtype=torch.float32))
    return torch.stack(out)


def projector_features(n: int, d: int, *, count: int, seed: int = 0) -> torch.Tensor:
    """`[count, n, d]` features: photo patches through a fixed random GELU MLP (see module doc)."""
    grid = round(n**0.5)
    assert grid * grid == n, n
    patches = photo_patches(grid, count=count, seed=seed)
    g = torch.Generator().manual_seed(seed)
    d_in = patches.shape[-1]
    w1 = torch.randn(d_in, 1024, generator=g) / d_in**0.5
    w2 = torch.randn(1024, d, generator=g) / 1024**0.5
    return torch.nn.functional.gelu((patches - 0.5) @ w1) @ w2


# ---------------------------------------------------------------------------------------- methods
def gram_product(x: torch.Tensor) -> None:
    """The yardstick: one fp32 Gram product `X X^T` per image (2-D GEMM, as the budget runs them)."""
    for xi in x:
        a = xi.float()
        _ = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a


def budget_exact(x: torch.Tensor, tau: float, k_min: int) -> list[int]:
    """The default PyTorch path (`spectral_budget(impl="torch")`: exact, certified)."""
    return [int(k) for k in spectral_budget(x, tau, k_min=k_min, impl="torch").reshape(-1)]


def budget_exact_torch_solver(x: torch.Tensor, tau: float, k_min: int) -> list[int]:
    """The same exact rule solved with PyTorch's (MKL) Gram product and `eigvalsh`."""
    from joulecap.kernels.certified import certified_budget

    n = x.shape[1]
    return certified_budget(x.float(), tau, min(k_min, n), n, solver="torch").budget.tolist()


def _openblas_calls(x: torch.Tensor, k_min: int, call: Callable[[np.ndarray], object]) -> list[int]:
    for xi in x:
        call(xi.float().contiguous().numpy())
    return [min(k_min, x.shape[1])] * x.shape[0]


def syrk_only(x: torch.Tensor, tau: float, k_min: int) -> list[int]:
    """OpenBLAS' `ssyrk` alone, no eigenvalues: how much of `exact` the Gram product is."""
    return _openblas_calls(x, k_min, native_lapack.gram)


def lapack_floor(x: torch.Tensor, tau: float, k_min: int) -> list[int]:
    """OpenBLAS' `ssyrk` + `ssyevd` alone, no totals and no re-check: the exact path's per-image floor."""
    return _openblas_calls(x, k_min, native_lapack.gram_eigenvalues)


def budget_randomized(x: torch.Tensor, tau: float, k_min: int) -> list[int]:
    """The bracketed randomized sketch (the path above a short side of 2048)."""
    return randomized_budget(x.float(), tau, k_min, x.shape[1]).budget.tolist()


def budget_svdvals(x: torch.Tensor, tau: float, k_min: int) -> list[int]:
    """fp32 `svdvals` (the baseline the first kernel issue quoted)."""
    s2 = torch.linalg.svdvals(x.float()).double() ** 2
    cum = s2.cumsum(-1)
    total = x.double().square().sum((-2, -1))
    ks = ((cum < (tau - FLOAT64_SLACK) * total.unsqueeze(-1)).sum(-1) + 1).clamp(min=k_min, max=x.shape[1])
    return ks.tolist()


def budget_and_select(x: torch.Tensor, tau: float, k_min: int) -> list[int]:
    """Budget plus leverage selection per image, as a request without an engine basis runs them."""
    ks = budget_exact(x, tau, k_min)
    for xi, k in zip(x, ks, strict=True):
        select_tokens(xi, k, impl="torch")
    return ks


METHODS: dict[str, Callable[[torch.Tensor, float, int], list[int]]] = {
    "exact": budget_exact,
    "exact-torch-solver": budget_exact_torch_solver,
    "syrk-only": syrk_only,
    "syrk+syevd": lapack_floor,
    "randomized": budget_randomized,
    "svdvals": budget_svdvals,
    "exact+select": budget_and_select,
}
SLOW = ("svdvals",)
"""Timed on one image only on CPU (no batching gain; seconds per batch)."""
NOT_A_BUDGET = ("syrk-only", "syrk+syevd")
"""Timed for the breakdown of the OpenBLAS path; their k is not a budget and is not compared."""


def time_side_by_side(
    fn: Callable[[torch.Tensor, float, int], list[int]],
    x: torch.Tensor,
    tau: float,
    k_min: int,
    repeats: int,
) -> dict[str, Any]:
    """Alternate `fn` and the Gram yardstick on the same features; per-image times and their ratio.

    Each repeat times the Gram product and then the method back to back, so both see the same
    machine load; the ratio is taken per repeat and its median, min and max are reported (the
    spread is the machine's noise on this measurement).
    """
    fn(x, tau, k_min)  # warm-up (allocator, LAPACK workspaces, Gaussian test matrices)
    gram_product(x)
    grams, runs, ratios, cpus = [], [], [], []
    ks: list[int] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gram_product(x)
        t1, c1 = time.perf_counter(), time.process_time()
        ks = fn(x, tau, k_min)
        t2, c2 = time.perf_counter(), time.process_time()
        grams.append(t1 - t0)
        runs.append(t2 - t1)
        cpus.append(c2 - c1)
        ratios.append((t2 - t1) / (t1 - t0))
    b = x.shape[0]
    return {
        "per_image_ms": round(statistics.median(runs) / b * 1e3, 3),
        "per_image_cpu_ms": round(statistics.median(cpus) / b * 1e3, 3),
        "gram_per_image_ms": round(statistics.median(grams) / b * 1e3, 3),
        "ratio_to_gram": round(statistics.median(ratios), 3),
        "ratio_to_gram_min": round(min(ratios), 3),
        "ratio_to_gram_max": round(max(ratios), 3),
        "gram_spread_pct": round(100 * (max(grams) - min(grams)) / statistics.median(grams), 1),
        "repeats": repeats,
        "ks": ks,
    }


def slowly_decaying(n: int, d: int, count: int, rate: float = 0.02) -> torch.Tensor:
    """`[count, n, d]` fp32 features with singular values exp(-rate * i) (random factors)."""
    out = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        m = min(n, d)
        u, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
        s = torch.exp(-rate * torch.arange(m, dtype=torch.float64))
        out.append(((u * s) @ v.T).float())
    return torch.stack(out)


def agreement(x: torch.Tensor, taus: tuple[float, ...], k_min: int) -> list[dict[str, Any]]:
    """Exact and randomized budgets against the float64 reference, per tau.

    The float64 spectra (`svdvals`) are computed once per image and read at every tau.
    """
    from joulecap.kernels.certified import certified_budget
    from joulecap.kernels.reference import FLOAT64_SLACK, budget_from_energies, reference_energies

    n = x.shape[1]
    energies = torch.stack([reference_energies(xi) for xi in x])
    totals = x.double().square().sum((-2, -1))
    rows = []
    for tau in taus:
        lo = min(k_min, n)
        ref = budget_from_energies(energies, totals, tau, lo, n, slack=FLOAT64_SLACK)
        res = certified_budget(x, tau, lo, n)
        mkl = certified_budget(x, tau, lo, n, solver="torch")
        rnd = torch.tensor(budget_randomized(x, tau, k_min))
        rows.append(
            {
                "tau": tau,
                "images": x.shape[0],
                "k_mean": round(float(ref.double().mean()), 1),
                "exact_mismatches": int((res.budget != ref).sum()),
                "exact_rechecked_in_float64": int(res.rechecked.sum()),
                "exact_torch_solver_mismatches": int((mkl.budget != ref).sum()),
                "randomized_mismatches": int((rnd != ref).sum()),
            }
        )
    return rows


def bound_margin(x: torch.Tensor) -> float:
    """Largest observed fp32 cumulative-energy error over the certified path's bound."""
    from joulecap.kernels.certified import energy_bound_rel, fp32_energies
    from joulecap.kernels.reference import reference_energies

    worst = 0.0
    for xi in x:
        total = float(xi.double().square().sum())
        err = float((fp32_energies(xi).cumsum(-1) - reference_energies(xi).cumsum(-1)).abs().max()) / total
        worst = max(worst, err / energy_bound_rel(*xi.shape))
    return worst


def bench(quick: bool, tau: float) -> dict[str, Any]:
    k_min = SchedulerConfig().k_min
    rows = []
    shapes = SHAPES[:2] if quick else SHAPES
    batches = (1, 4) if quick else (1, 64)
    reps = 3 if quick else 7
    for n, d in shapes:
        base = projector_features(n, d, count=max(batches))
        for batch in batches:
            xb = base[:batch]
            ref_k = reference_budget(xb.double(), tau, k_min, n).tolist()
            for name, fn in METHODS.items():
                sub = xb[:1] if name in SLOW else xb
                breakdown_missing = name in NOT_A_BUDGET and not native_lapack.is_available()
                if (name in SLOW and batch > 1) or breakdown_missing:
                    continue  # svdvals on one image only; the OpenBLAS breakdown only where it loads
                r = time_side_by_side(fn, sub, tau, k_min, 1 if name in SLOW else (reps if batch == 1 else 3))
                ks = r.pop("ks")
                row: dict[str, Any] = {"n": n, "d": d, "dtype": "float32", "batch": batch, "method": name}
                row.update(r)
                row["k_mean"] = round(float(np.mean(ks)), 1)
                row["k_mismatch_vs_float64"] = (
                    None
                    if name in NOT_A_BUDGET
                    else sum(int(a != b) for a, b in zip(ks, ref_k, strict=False))
                )
                rows.append(row)
                print(_fmt(row), flush=True)
    cuda = torch.cuda.is_available() and triton_available()
    triton_row = None if cuda else "no GPU available: not measured"
    # Exactness beyond the timed images: the benchmark's photos at 576 x 4096 (64, incl. crops)
    # and synthetic slowly decaying spectra (singular values exp(-0.02 i)), at every tau.
    taus = (0.9, 0.95, 0.97, 0.99, 0.995, 1.0)
    photos = projector_features(576, 4096, count=8 if quick else 64)
    synth = slowly_decaying(576, 4096, 2 if quick else 8)
    exactness = {
        "photos_576x4096": agreement(photos, taus, k_min),
        "exp_decay_0.02_576x4096": agreement(synth, taus, k_min),
    }
    for label, ag in exactness.items():
        for a in ag:
            print(label, a, flush=True)
    margin = max(bound_margin(photos[:8]), bound_margin(synth))
    at_576x4096 = {
        (r["batch"], r["method"]): r["ratio_to_gram"] for r in rows if (r["n"], r["d"]) == (576, 4096)
    }
    return {
        "benchmark": "kernels",
        "machine": machine_info(),
        "gpu_note": triton_row,
        "tau": tau,
        "k_min": k_min,
        "yardstick": "PyTorch `a @ a.T` in fp32 per image (a full GEMM through PyTorch's MKL)",
        "openblas_library": native_lapack.library_path(),
        "features": "bundled scikit-image photos -> patch pixels -> fixed random GELU MLP (see module doc)",
        "targets": {
            "576x4096_fp32_batch1_ratio_to_gram_max": 1.5,
            "576x4096_fp32_batch64_ratio_to_gram_max": 1.0,
            "mismatches_vs_float64": 0,
        },
        "measured": {
            "576x4096_fp32_batch1_ratio_to_gram": at_576x4096.get((1, "exact")),
            "576x4096_fp32_batch64_ratio_to_gram": at_576x4096.get((64, "exact")),
            # ssyrk + ssyevd alone (no totals, no re-check): what no certification can go below here.
            "576x4096_fp32_batch64_syrk_syevd_ratio_to_gram": at_576x4096.get((64, "syrk+syevd")),
            "exact_mismatches_vs_float64": sum(
                a["exact_mismatches"] for ag in exactness.values() for a in ag
            ),
            "exact_torch_solver_mismatches_vs_float64": sum(
                a["exact_torch_solver_mismatches"] for ag in exactness.values() for a in ag
            ),
            "fp32_error_over_bound_max": round(margin, 4),
        },
        "exactness": exactness,
        "load_note": "the CPU is shared with other jobs: every ratio is measured side by side with the Gram "
        "product in the same repeat; ratio_to_gram_min/max and gram_spread_pct are the noise",
        "quick": quick,
        "rows": rows,
    }


def _fmt(row: dict[str, Any]) -> str:
    shape = f"{row['n']}x{row['d']}"
    return (
        f"{shape:>10} b{row['batch']:<3} {row['method']:>13} {row['per_image_ms']:9.2f} ms "
        f"gram {row['gram_per_image_ms']:7.2f} ms  ratio {row['ratio_to_gram']:5.2f} "
        f"[{row['ratio_to_gram_min']:.2f}-{row['ratio_to_gram_max']:.2f}]  k~{row['k_mean']:<6} "
        f"mism {row['k_mismatch_vs_float64'] if row['k_mismatch_vs_float64'] is not None else '-'}"
    )


# ---------------------------------------------------------------------------------------- tau sweep
def tau_sweep() -> dict[str, Any]:
    """Budget vs a reconstruction proxy over tau, on raw photo patches and projector features.

    Proxy: relative Frobenius error of rebuilding every token of the image from the span of the
    kept (leverage-selected) tokens, `||X - X P||_F / ||X||_F`: how much of the image's feature
    content the kept tokens still carry. For raw pixels also the PSNR of the image rebuilt that way.
    """
    taus = (0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
    sets = {
        "raw_patches_576x588": photo_patches(24, count=len(PHOTOS)),
        "projector_576x1024": projector_features(576, 1024, count=len(PHOTOS)),
    }
    out: dict[str, Any] = {}
    for label, xs in sets.items():
        rows = []
        for tau in taus:
            ks, errs, psnrs = [], [], []
            for x in xs:
                k = int(spectral_budget(x, tau, k_min=1))
                keep = select_tokens(x, k)
                xd = x.double()
                kept = xd[keep]
                # Projection of every token onto the row space of the kept tokens.
                coef = torch.linalg.lstsq(kept.T, xd.T).solution
                rec = (kept.T @ coef).T
                err = float((xd - rec).norm() / xd.norm())
                ks.append(k)
                errs.append(err)
                if label.startswith("raw"):
                    mse = float((xd - rec.clamp(0, 1)).square().mean())
                    psnrs.append(10 * np.log10(1.0 / max(mse, 1e-12)))
            row = {
                "tau": tau,
                "k_mean": float(np.mean(ks)),
                "keep_fraction": float(np.mean(ks)) / xs.shape[1],
                "rel_error_mean": float(np.mean(errs)),
            }
            if psnrs:
                row["psnr_db_mean"] = float(np.mean(psnrs))
            rows.append(row)
            print(label, {k: round(v, 4) for k, v in row.items()}, flush=True)
        out[label] = rows
    return {"benchmark": "kernels_tau", "photos": list(PHOTOS), "sweep": out}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, batch 1 and 4 (smoke run)")
    ap.add_argument("--tau-sweep", action="store_true", help="also run the tau measurement")
    ap.add_argument(
        "--tau-sweep-only", action="store_true", help="run only the tau measurement (no kernel timing)"
    )
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default under benchmarks/results)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--tau", type=float, default=0.99, help="tau of the timed rows (targets: 0.99)")
    args = ap.parse_args(argv)
    if args.threads:
        # On a shared, overloaded CPU two spinning OpenMP threads inflate both wall and CPU time
        # many-fold; one thread gives stable numbers (recorded in machine.torch_threads).
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    if not args.tau_sweep_only:
        record = RunRecord.start("-m benchmarks.kernels", argv)
        result = bench(args.quick, args.tau)
        dev = "gpu" if torch.cuda.is_available() else "cpu"
        out = args.out or RESULTS / f"kernels_{dev}.json"
        out.write_text(json.dumps(record.stamp(result, result["machine"]), indent=2) + "\n")
        print(f"wrote {out}")
    if args.tau_sweep or args.tau_sweep_only:
        # The sweep's own record: its command runs the sweep alone.
        record = RunRecord.start("-m benchmarks.kernels", [*_threads_args(args), "--tau-sweep-only"])
        sweep = record.stamp(tau_sweep())
        path = RESULTS / "kernels_tau.json"
        path.write_text(json.dumps(sweep, indent=2) + "\n")
        print(f"wrote {path}")


def _threads_args(args: argparse.Namespace) -> list[str]:
    return ["--threads", str(args.threads)] if args.threads else []


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
