"""`make gpu-check`: one command that checks joulecap on one NVIDIA GPU and writes the evidence.

Steps, in order (each is `ok`, `skipped` with its reason, or `failed` with the error), within an
overall time budget (`--budget-s`, default 470 s, under 8 minutes on one H100/H200):

1. `gpu_tests`: the `gpu`-marked tests (`pytest -m gpu`), JUnit XML kept.
2. `nvml_energy`: NVML's total-energy counter against the integral of its power samples over the
   same windows, while a matmul load runs (per-window relative difference).
3. `model`: a realistic-shape Idefics3 with random weights (SmolVLM-256M's vision tower and
   language model sizes, 512 px images, 64 visual tokens per image), built locally: no network.
4. `vllm_energy`: joulecap over vLLM with the NVML meter, concurrent requests under vLLM batching:
   the sum of per-request energies against the counter over the run.
5. `throughput`: `benchmarks/throughput.py` on that model (bare vLLM, `output_budget`, `joint`).
6. `kernels`: `benchmarks/kernels.py` (Triton spectral kernels against `torch.linalg.svdvals`,
   batch 1 and 64).

Everything lands in `--out` (default `benchmarks/results/gpu/`): `summary.json` (every step's
status, reason, duration and files, with the machine), and one file per step. Steps that need a
GPU, NVML, vLLM or Triton are skipped with the reason when those are missing, and a step that no
longer fits in what is left of the budget is skipped as such; the command fails (exit 1) only when
a step failed. Subprocesses run with `HF_HUB_OFFLINE=1`.

The GPU figures of these steps have not been measured yet: this script was written and its
CPU-side logic tested on a machine without a GPU (tests/test_gpu_check.py).

Run: `make gpu-check` or `python -m benchmarks.gpu_check [--only a,b] [--skip a,b] [--quick]`.
The vLLM steps run in `--vllm-python` (default: this interpreter), which needs CUDA vLLM
(`pip install 'joulecap[vllm]'`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: benchmarks/ is sys.path[0], use the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu"
DEFAULT_BUDGET_S = 470.0


class Skipped(Exception):
    """A step cannot run here; the message says why."""


@dataclass
class Context:
    """What every step gets."""

    out: Path
    work: Path
    python: str
    vllm_python: str
    deadline_s: float
    quick: bool = False
    shared: dict[str, Any] = field(default_factory=dict)

    def left_s(self) -> float:
        """Seconds left of the overall budget."""
        return self.deadline_s - time.monotonic()


@dataclass(frozen=True)
class Step:
    """One check: its name, what it needs (`estimate_s`) and what it does."""

    name: str
    estimate_s: float
    run: Callable[[Context], dict[str, Any]]
    description: str


# ---------------------------------------------------------------------------------------- helpers
def env() -> dict[str, str]:
    """Subprocess environment: offline hub, the repository importable."""
    out = dict(os.environ)
    out["HF_HUB_OFFLINE"] = "1"
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH", "")]))
    return out


def run_command(cmd: Sequence[str], timeout_s: float, log_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `cmd` from the repository root, its output saved to `log_path`.

    Raises:
        RuntimeError: It exited non-zero or ran past `timeout_s` (the log's tail in the message).

    """
    try:
        proc = subprocess.run(
            list(cmd), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=max(1.0, timeout_s)
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        log_path.write_text(f"$ {' '.join(cmd)}\n(timed out after {timeout_s:.0f} s)\n{partial}")
        raise RuntimeError(f"timed out after {timeout_s:.0f} s: {' '.join(cmd)}") from exc
    log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-1500:]
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def cuda_or_skip() -> None:
    """Skip unless torch sees a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise Skipped("no CUDA GPU visible to torch (torch.cuda.is_available() is False)")


def python_has(python: str, module: str) -> bool:
    """Whether `python` can import `module`."""
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True, env=env()).returncode == 0


def integrate_power_j(samples: Sequence[tuple[float, float]]) -> float:
    """Trapezoid integral of `(t_s, power_w)` samples, in joules."""
    pts = sorted(samples)
    return sum((t1 - t0) * (p0 + p1) / 2.0 for (t0, p0), (t1, p1) in itertools.pairwise(pts))


def compare_windows(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counter vs integrated power per window: relative differences and their summary.

    Each window has `counter_j` and `integrated_j`; the relative difference is
    `(integrated - counter) / counter`.
    """
    rel = [(w["integrated_j"] - w["counter_j"]) / w["counter_j"] for w in windows if w["counter_j"] > 0]
    return {
        "windows": len(windows),
        "rel_diff": rel,
        "rel_diff_mean": sum(rel) / len(rel) if rel else None,
        "rel_diff_max_abs": max((abs(r) for r in rel), default=None),
    }


# ---------------------------------------------------------------------------------------- steps
def step_gpu_tests(ctx: Context) -> dict[str, Any]:
    cuda_or_skip()
    xml = ctx.out / "pytest_gpu.xml"
    cmd = [
        ctx.python,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "tests",
    ]
    proc = run_command(cmd, min(150.0, ctx.left_s()), ctx.out / "pytest_gpu.log")
    return {"files": [xml.name, "pytest_gpu.log"], "summary": proc.stdout.strip().splitlines()[-1:]}


def step_nvml_energy(ctx: Context) -> dict[str, Any]:
    cuda_or_skip()
    try:
        import pynvml
    except ImportError as exc:
        raise Skipped("pynvml is not installed (pip install nvidia-ml-py)") from exc
    import torch

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError as exc:
            raise Skipped(f"this GPU has no NVML total-energy counter: {exc}") from exc
        stop = threading.Event()

        def load() -> None:  # keeps the GPU busy and its power moving (bursts and pauses)
            a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
            while not stop.is_set():
                for _ in range(50):
                    a = (a @ a).clamp_(-1, 1)
                torch.cuda.synchronize()
                time.sleep(0.05)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        windows = []
        window_s, count = (2.0, 3) if ctx.quick else (5.0, 6)
        try:
            for _ in range(count):
                samples = []
                e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                t0 = time.monotonic()
                while time.monotonic() - t0 < window_s:
                    samples.append((time.monotonic(), pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0))
                    time.sleep(0.01)
                e1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                windows.append(
                    {
                        "duration_s": time.monotonic() - t0,
                        "counter_j": (e1 - e0) / 1000.0,
                        "integrated_j": integrate_power_j(samples),
                        "samples": len(samples),
                    }
                )
        finally:
            stop.set()
            worker.join(timeout=30)
        result = {"gpu": pynvml.nvmlDeviceGetName(handle), "per_window": windows, **compare_windows(windows)}
    finally:
        pynvml.nvmlShutdown()
    (ctx.out / "nvml_energy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return {"files": ["nvml_energy.json"], "rel_diff_max_abs": result["rel_diff_max_abs"]}


def build_realistic_idefics3(out_dir: Path, *, seed: int = 0) -> Path:
    """A SmolVLM-256M-shaped Idefics3 with random weights, built locally (no download).

    The `smolvlm-256m` shape of `joulecap.runtime.shapes` (SigLIP-B/16 on 512 px tiles, scale
    factor 4, the SmolLM2-135M language model; about 0.26 B parameters), with the processor held
    to one 512 px tile per image: 64 visual tokens, so the GPU check's requests stay short.
    """
    from transformers import AutoProcessor

    from joulecap.runtime.shapes import build_shape_model

    path = build_shape_model("smolvlm-256m", out_dir, seed=seed)
    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor.size = {"longest_edge": 512}
    processor.image_processor.max_image_size = {"longest_edge": 512}
    processor.save_pretrained(path)
    return path


def step_model(ctx: Context) -> dict[str, Any]:
    cuda_or_skip()
    path = ctx.work / "smolvlm256m-shape-random"
    if not (path / "config.json").is_file():
        build_realistic_idefics3(path)
    ctx.shared["model"] = path
    return {"model": str(path)}


def step_vllm_energy(ctx: Context) -> dict[str, Any]:
    cuda_or_skip()
    if not python_has(ctx.vllm_python, "vllm"):
        raise Skipped(f"vLLM is not importable by {ctx.vllm_python} (pip install 'joulecap[vllm]')")
    model = ctx.shared.get("model")
    if model is None:
        raise Skipped("no model: the `model` step did not run")
    out = ctx.out / "vllm_energy.json"
    cmd = [
        ctx.vllm_python,
        "-m",
        "benchmarks.gpu_check",
        "--internal-vllm-energy",
        str(model),
        "--out",
        str(ctx.out),
        "--work-dir",
        str(ctx.work),
    ]
    run_command(cmd, min(180.0, ctx.left_s()), ctx.out / "vllm_energy.log")
    figures = json.loads(out.read_text())
    return {"files": [out.name, "vllm_energy.log"], "rel_diff": figures.get("rel_diff")}


def vllm_energy(model: str, out: Path, work: Path, requests: int = 32) -> dict[str, Any]:
    """Per-request energies under vLLM batching summed against the NVML counter over the run."""
    import asyncio
    from dataclasses import replace

    from benchmarks.throughput import workload
    from joulecap.runtime.config import JoulecapConfig
    from joulecap.runtime.engines.vllm_engine import VLLMEngine
    from joulecap.runtime.runtime import Runtime

    base = JoulecapConfig()
    engine_cfg = replace(base.engine, engine="vllm", model=model, device="cuda", max_concurrency=16)
    cfg = replace(
        base,
        engine=engine_cfg,
        energy=replace(base.energy, meter="nvml"),
        ledger=replace(base.ledger, ledger_path=":memory:"),
        scheduler=replace(base.scheduler, profile_dir=str(work / "profiles")),
    )
    rt = Runtime(cfg, engine=VLLMEngine(engine_cfg))
    try:
        items = workload(requests)
        policies = ["output_budget", "joint", "baseline", "fixed_output"]

        async def ask_all() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(
                        rt.achat(q, [img], max_tokens=32 + 8 * (i % 4), policy=policies[i % len(policies)])
                        for i, (q, img) in enumerate(items)
                    )
                )
            )

        rt.monitor.fresh_sample()
        t0 = time.monotonic()
        results = asyncio.run(ask_all())
        t1 = time.monotonic()
        rt.monitor.fresh_sample()
        counter_j = float(rt.monitor.energy_between(t0, t1).energy_j)
        summed_j = sum(r.energy.total_j for r in results)
        figures = {
            "meter": rt.meter.name,
            "requests": len(results),
            "counter_j_over_run": counter_j,
            "sum_request_j": summed_j,
            "rel_diff": (summed_j - counter_j) / counter_j if counter_j > 0 else None,
            "note": "requests' energies exclude idle gaps (no request working) and count encodes "
            "measured apart; the sum is expected at or just below the counter",
        }
    finally:
        rt.close()
    (out / "vllm_energy.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def step_throughput(ctx: Context) -> dict[str, Any]:
    cuda_or_skip()
    if not python_has(ctx.vllm_python, "vllm"):
        raise Skipped(f"vLLM is not importable by {ctx.vllm_python} (pip install 'joulecap[vllm]')")
    model = ctx.shared.get("model")
    if model is None:
        raise Skipped("no model: the `model` step did not run")
    out = ctx.out / "throughput_gpu.json"
    size = ["--requests", "32", "--repeats", "2"] if ctx.quick else ["--requests", "128", "--repeats", "3"]
    cmd = [
        ctx.vllm_python,
        "-m",
        "benchmarks.throughput",
        "--device",
        "cuda",
        "--model",
        str(model),
        "--concurrency",
        "32",
        "--max-tokens",
        "64",
        "--meter",
        "nvml",
        *size,
        "--out",
        str(out),
    ]
    run_command(cmd, min(240.0, ctx.left_s()), ctx.out / "throughput_gpu.log")
    figures = json.loads(out.read_text())
    return {
        "files": [out.name, "throughput_gpu.log"],
        "output_budget_paired_ratio_median": figures.get("output_budget", {}).get("paired_ratio_median"),
        "joint_paired_ratio_median": figures.get("joint", {}).get("paired_ratio_median"),
    }


def step_kernels(ctx: Context) -> dict[str, Any]:
    cuda_or_skip()
    if not python_has(ctx.python, "triton"):
        raise Skipped("Triton is not installed")
    out = ctx.out / "kernels_gpu.json"
    cmd = [ctx.python, "-m", "benchmarks.kernels", "--out", str(out), *(["--quick"] if ctx.quick else [])]
    run_command(cmd, min(150.0, ctx.left_s()), ctx.out / "kernels_gpu.log")
    return {"files": [out.name, "kernels_gpu.log"]}


STEPS = (
    Step("gpu_tests", 90.0, step_gpu_tests, "the gpu-marked tests"),
    Step("nvml_energy", 40.0, step_nvml_energy, "NVML counter vs integrated power samples"),
    Step("model", 30.0, step_model, "realistic-shape random-weight Idefics3"),
    Step("vllm_energy", 90.0, step_vllm_energy, "per-request energy under vLLM batching vs the counter"),
    Step("throughput", 150.0, step_throughput, "throughput benchmark on the realistic model"),
    Step("kernels", 60.0, step_kernels, "Triton vs torch.linalg.svdvals, batch 1 and 64"),
)


# ---------------------------------------------------------------------------------------- driver
def select_steps(only: str | None, skip: str | None) -> list[Step]:
    """The steps to run, in order.

    Raises:
        ValueError: An unknown step name.

    """
    names = [s.name for s in STEPS]
    chosen = [n.strip() for n in only.split(",") if n.strip()] if only else names
    skipped = [n.strip() for n in skip.split(",") if n.strip()] if skip else []
    unknown = sorted(set(chosen + skipped) - set(names))
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; steps are {names}")
    return [s for s in STEPS if s.name in chosen and s.name not in skipped]


def run_steps(steps: Sequence[Step], ctx: Context) -> list[dict[str, Any]]:
    """Run each step; record ok / skipped (reason) / failed (error) with its duration."""
    records = []
    for step in steps:
        record: dict[str, Any] = {"step": step.name, "description": step.description}
        t0 = time.monotonic()
        if ctx.left_s() < step.estimate_s:
            record.update(
                status="skipped",
                reason=f"not enough time left: {max(0.0, ctx.left_s()):.0f} s of the budget, "
                f"the step needs about {step.estimate_s:.0f} s",
            )
        else:
            try:
                record.update(status="ok", **step.run(ctx))
            except Skipped as exc:
                record.update(status="skipped", reason=str(exc))
            except Exception as exc:  # one failing step must not hide the others' results
                record.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
                record["traceback"] = traceback.format_exc()[-3000:]
        record["duration_s"] = round(time.monotonic() - t0, 3)
        print(
            f"  {step.name:<12} {record['status']:<8} {record['duration_s']:7.1f} s  "
            f"{record.get('reason', '')}"
        )
        records.append(record)
    return records


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder")
    parser.add_argument("--only", default=None, help=f"comma-separated steps: {[s.name for s in STEPS]}")
    parser.add_argument("--skip", default=None, help="comma-separated steps to leave out")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "joulecap-gpu-check",
        help="where the random-weight model and profiles go (not under results)",
    )
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="overall time budget")
    parser.add_argument("--quick", action="store_true", help="smaller runs (smoke test of the steps)")
    parser.add_argument("--vllm-python", default=sys.executable, help="interpreter with CUDA vLLM")
    parser.add_argument("--internal-vllm-energy", default=None, metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    try:
        args.steps = select_steps(args.only, args.skip)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.internal_vllm_energy:  # the vllm_energy step, in the vLLM interpreter
        vllm_energy(args.internal_vllm_energy, args.out, args.work_dir)
        return 0
    from benchmarks._common import machine_info

    started = time.time()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        out=args.out,
        work=args.work_dir,
        python=sys.executable,
        vllm_python=args.vllm_python,
        deadline_s=time.monotonic() + args.budget_s,
        quick=args.quick,
    )
    print(f"gpu-check: {len(args.steps)} step(s), budget {args.budget_s:.0f} s, results in {args.out}")
    records = run_steps(args.steps, ctx)
    summary = {
        "benchmark": "gpu_check",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "budget_s": args.budget_s,
        "wall_s": round(time.time() - started, 3),
        "steps": records,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'summary.json'}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
