"""One vLLM request's outputs, forwarded to the calling thread's queue with their token work logged."""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass
from typing import Any

from joulecap.runtime.energy.worklog import WorkLog
from joulecap.runtime.errors import InvalidRequest


@dataclass(frozen=True)
class PromptLength:
    """The prompt length vLLM reports with a request's first output."""

    tokens: int


@dataclass(frozen=True)
class Chunk:
    """New tokens of one request from one engine output."""

    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None


async def pump(
    llm: Any,
    work_log: WorkLog,
    prompt: dict[str, Any],
    params: Any,
    vllm_id: str,
    request_id: str,
    prefill: int,
    out: queue.SimpleQueue[Any],
) -> None:
    """Forward vLLM's outputs to the caller's queue and log the token work at step times."""
    first = True
    try:
        async for res in llm.generate(prompt, params, vllm_id):
            comp = res.outputs[0]
            new = tuple(int(t) for t in comp.token_ids)
            if first and res.prompt_token_ids is not None:
                # vLLM's own count (native path: its processor expanded the placeholders).
                prefill = len(res.prompt_token_ids)
                out.put(PromptLength(prefill))
            if new:
                stamp = float(getattr(res.metrics, "last_token_ts", 0.0) or 0.0) or time.monotonic()
                work_log.record(
                    request_id,
                    prefill_tokens=prefill if first else 0,
                    decode_tokens=len(new) - (1 if first else 0),
                    t_s=stamp,
                )
                first = False
            out.put(Chunk(new, bool(res.finished), comp.finish_reason))
    except asyncio.CancelledError:
        raise
    except ValueError as exc:
        if first:  # refused before it ran: vLLM's input processing (e.g. its image processor)
            out.put(InvalidRequest(f"Could not process the request: {exc}", param="messages"))
        else:
            out.put(exc)
    except BaseException as exc:
        out.put(exc)
    finally:
        out.put(None)
