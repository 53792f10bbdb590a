"""The throughput benchmark's sides: one closed batch through bare vLLM, the Runtime, or the engine alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

BARE = "bare_vllm"
SIDES = (BARE, "output_budget", "joint", "joint_unlocked", "native_engine")
"""Result keys: bare vLLM, then joulecap rows named by policy (and variant)."""


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
    tokens = sum(len(r.generation.token_ids) for r in results)
    row = summarize(system or policy, wall, finished, tokens)
    row["policy"] = policy
    row["budget_j"] = budget_j
    row["refused"] = refused
    # A repeat whose every request was refused (a binding budget in a slow phase of the machine)
    # served nothing: it stays in the run as 0 tokens/s rather than aborting the other repeats.
    row["last_refusal"] = refusal or None
    row["reported_energy_j"] = sum(r.energy.total_j for r in results)
    row["energy_source"] = results[0].energy.source if results else None
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
