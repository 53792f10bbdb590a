"""How steady is this machine? The same work, repeated, timed and (for the model) metered.

A predictor cannot beat the run-to-run variation of the energy it predicts. This benchmark
measures that variation for one fixed model request (forced output length, fixed visual tokens,
through the runtime's engine and meter) and, beside it, for three loops that need no model:
pure Python, a cache-resident matmul and a memory-bound sweep over 16 MB. For each it reports:

* `cv_pct`: coefficient of variation over all repetitions;
* `block_cv_pct`: the same for means of consecutive blocks (slow drift, phases);
* `adjacent_pct` / `random_pair_pct`: mean |a - b| / mean for neighbouring repetitions and for
  random pairs; adjacent well below random means phases, which a running average can follow
  (the predictor's speed factor) and a frozen model cannot.

It also counts CPU steal time (from /proc/stat) and page faults of this process during the model
repetitions, to tell a slow host from work joulecap itself adds. Prints a table, writes JSON (with
the date, the machine, its load average at start and end, and the command).

    python -m benchmarks.stability [--reps 600] [--out benchmarks/results/stability_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

import numpy as np

from benchmarks import _common as common

BLOCK = 50
"""Repetitions per block for `block_cv_pct`."""


def spread(values: list[float], seed: int = 0) -> dict[str, float]:
    """Variation figures of a series of repetitions (see the module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    n_blocks = len(v) // BLOCK
    blocks = v[: n_blocks * BLOCK].reshape(n_blocks, BLOCK).mean(1) if n_blocks >= 2 else v[:0]
    shuffled = np.random.default_rng(seed).permutation(v)
    return {
        "n": len(v),
        "mean": mean,
        "cv_pct": 100.0 * float(v.std()) / mean,
        "block_cv_pct": 100.0 * float(blocks.std()) / float(blocks.mean()) if len(blocks) else float("nan"),
        "adjacent_pct": 100.0 * float(np.mean(np.abs(np.diff(v)))) / mean,
        "random_pair_pct": 100.0 * float(np.mean(np.abs(v - shuffled))) / mean,
        "p99_over_median": float(np.percentile(v, 99) / np.median(v)),
    }


def _steal_ticks() -> int:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8])  # cpu user nice system idle iowait irq softirq steal
    except (OSError, IndexError, ValueError):
        return 0


def timed(work: Callable[[], object], reps: int) -> list[float]:
    """CPU seconds of `work` per repetition."""
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        work()
        out.append(time.process_time() - t0)
    return out


def loops() -> dict[str, Callable[[], object]]:
    """The model-free reference loops (each a few milliseconds)."""
    import torch

    small = torch.randn(128, 128)
    big = torch.randn(4_000_000)  # 16 MB: larger than the caches

    def python() -> int:
        total = 0
        for i in range(20_000):
            total += i * i
        return total

    def matmul() -> None:
        for _ in range(100):
            small @ small

    def memory() -> None:
        for _ in range(10):
            big.mul_(1.0000001)

    return {"python": python, "matmul_cached": matmul, "memory_16mb": memory}


def model_runs(reps: int, sample_hz: float) -> dict[str, Any]:
    """Energy and CPU time of one fixed request repeated `reps` times through the runtime."""
    from joulecap.runtime.calibrate import forced_length, run_measured
    from joulecap.runtime.calibrate_sweep import SweepPoint, make_request
    from joulecap.runtime.runtime import Runtime
    from joulecap.runtime.types import Plan

    cfg = common.bench_config(
        model=None,
        engine="transformers",
        meter="auto",
        work_dir=Path(tempfile.mkdtemp(prefix="joulecap-stability-")),
        sample_hz=sample_hz,
    )
    rt = Runtime(cfg)
    try:
        prepared = rt.engine.prepare(make_request(SweepPoint(128, 0.5, 20, 24, 0)))
        keep = tuple(round(0.5 * n) for n in prepared.visual_tokens)
        plan = Plan(keep, 24, 0.0, "stability", "fixed request", budget_j=None)
        energy, cpu = [], []
        steal0, usage0 = _steal_ticks(), resource.getrusage(resource.RUSAGE_SELF)
        with forced_length(rt.engine):
            for _ in range(3):  # warm-up
                run_measured(rt.engine, rt.monitor, prepared, plan)
            for _ in range(reps):
                t0 = time.process_time()
                energy.append(run_measured(rt.engine, rt.monitor, prepared, plan)[2])
                cpu.append(time.process_time() - t0)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        meter = dict(rt.monitor.describe())
    finally:
        rt.close()
    return {
        "energy_j": spread(energy),
        "cpu_s": spread(cpu),
        "steal_ticks": _steal_ticks() - steal0,
        "minor_faults": usage1.ru_minflt - usage0.ru_minflt,
        "major_faults": usage1.ru_majflt - usage0.ru_majflt,
        "system_cpu_share_pct": 100.0
        * (usage1.ru_stime - usage0.ru_stime)
        / max(1e-9, (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)),
        "meter": meter,
        "energy_label": common.energy_label(meter),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=600, help="Repetitions of each workload.")
    parser.add_argument("--sample-hz", type=float, default=10.0, help="Meter sampling rate.")
    parser.add_argument("--out", default="benchmarks/results/stability_cpu.json")
    args = parser.parse_args(argv)
    if args.reps < 2 * BLOCK:
        raise SystemExit(f"--reps must be >= {2 * BLOCK}")
    record = common.RunRecord.start("-m benchmarks.stability", argv)
    common.set_threads(1)
    model = model_runs(args.reps, args.sample_hz)
    rows = {"model request (energy)": model["energy_j"], "model request (CPU s)": model["cpu_s"]}
    for name, work in loops().items():
        rows[f"loop: {name} (CPU s)"] = spread(timed(work, args.reps))
    print(
        f"{'workload':<32}{'cv %':>8}{'block cv %':>12}{'adjacent %':>12}{'random pair %':>15}{'p99/p50':>9}"
    )
    for name, s in rows.items():
        print(
            f"{name:<32}{s['cv_pct']:>8.1f}{s['block_cv_pct']:>12.1f}{s['adjacent_pct']:>12.1f}"
            f"{s['random_pair_pct']:>15.1f}{s['p99_over_median']:>9.2f}"
        )
    print(
        f"during the model repetitions: steal {model['steal_ticks']} ticks, page faults "
        f"{model['minor_faults']} minor / {model['major_faults']} major, system CPU "
        f"{model['system_cpu_share_pct']:.1f}% of the process's CPU time; energy {model['energy_label']}"
    )
    result = {
        "benchmark": "stability",
        **record.fields(),
        "reps": args.reps,
        "block": BLOCK,
        "workloads": rows,
        "model": {k: v for k, v in model.items() if k not in ("energy_j", "cpu_s")},
        "notes": [
            "cv over all repetitions; block_cv over means of consecutive blocks; adjacent vs random "
            "pairs: mean |a - b| / mean. Adjacent well below random pair = phases a running average "
            "can follow.",
            "Loops need no model: when they vary like the model request, the host varies, not joulecap.",
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
