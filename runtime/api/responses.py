"""Build OpenAI-shaped response bodies (and joulecap's `usage.energy`) from results."""

from __future__ import annotations

import time
from typing import Any

from joulecap.runtime.errors import BudgetTooSmall
from joulecap.runtime.types import ChatResult, Plan, PreparedRequest, StopReason

# OpenAI's finish_reason enum has no energy value: a budget stop truncated the answer, which
# clients already handle as "length"; the precise reason is in usage.energy.stop_reason.
FINISH_REASON: dict[StopReason, str] = {
    "stop": "stop",
    "length": "length",
    "energy_budget": "length",
    "aborted": "length",
}


def _note(result: ChatResult) -> str | None:
    """Why a figure is an estimate or interpolated, a budget the policy ignores, an uncalibrated profile."""
    plan = result.plan
    notes = [result.energy.note]
    if plan.budget_j is not None and not plan.holds_budget:
        notes.append(f"policy {plan.policy} does not hold budgets: the budget was recorded, not enforced")
    notes.append(result.profile_note)
    return "; ".join(n for n in notes if n) or None


def energy_usage(result: ChatResult) -> dict[str, Any]:
    """The `usage.energy` object (see ../shared/DESIGN.md)."""
    e, g, p = result.energy, result.generation, result.plan
    return {
        "budget_j": p.budget_j,
        "budget_exceeded": result.budget_exceeded,
        "predicted_j": round(p.predicted_j, 6),
        "measured_j": round(e.total_j, 6),
        "encode_j": round(e.encode_j, 6),
        "prefill_j": round(e.prefill_j, 6),
        "decode_j": round(e.decode_j, 6),
        "run_j": round(e.run_j, 6),
        "idle_j": round(e.idle_j, 6),
        "duration_s": round(e.duration_s, 6),
        "source": e.source,
        "meter": e.meter,
        "interpolated": e.interpolated,
        "note": _note(result),
        "policy": p.policy,
        "min_j": p.min_j,
        "margin": round(p.margin, 6),
        "plan_margin": round(p.plan_margin, 6),
        "visual_tokens_in": g.visual_tokens_in,
        "visual_tokens_kept": g.visual_tokens_kept,
        "max_new_tokens_planned": p.max_new_tokens,
        "stop_reason": g.stop_reason,
    }


def usage(result: ChatResult) -> dict[str, Any]:
    """OpenAI `usage` plus `energy`."""
    prompt = result.generation.prefill_tokens
    completion = result.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"image_tokens": result.generation.visual_tokens_kept},
        "energy": energy_usage(result),
    }


def energy_headers(result: ChatResult) -> dict[str, str]:
    """`X-Energy-Used-J`, `X-Energy-Predicted-J`, `X-Energy-Source` response headers."""
    return {
        "X-Energy-Used-J": f"{result.energy.total_j:.6f}",
        "X-Energy-Predicted-J": f"{result.plan.predicted_j:.6f}",
        "X-Energy-Source": f"{result.energy.source}; meter={result.energy.meter}",
    }


def completion_body(result: ChatResult) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": result.request_id,
        "object": "chat.completion",
        "created": int(result.created_s),
        "model": result.model,
        "system_fingerprint": "joulecap",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "finish_reason": FINISH_REASON[result.generation.stop_reason],
                "logprobs": None,
            }
        ],
        "usage": usage(result),
    }


def chunk_body(
    request_id: str,
    model: str,
    created_s: float,
    *,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    result: ChatResult | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`; with `result` and no delta it is the final usage chunk."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(created_s),
        "model": model,
        "system_fingerprint": "joulecap",
        "choices": [],
    }
    if delta is not None or finish_reason is not None:
        body["choices"] = [
            {"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}
        ]
    if result is not None:
        body["usage"] = usage(result)
    return body


def estimate_body(
    model: str, prepared: PreparedRequest, plan: Plan | None, refusal: BudgetTooSmall | None = None
) -> dict[str, Any]:
    """`POST /v1/energy/estimate` response: feasibility, the stated minimum, the plan and its joules.

    `min_j` is the number admission compares the budget with (the same as a 422's); `feasible`
    says whether this budget would be accepted now.
    """
    body: dict[str, Any] = {
        "object": "energy.estimate",
        "model": model,
        "created": int(time.time()),
        "feasible": plan is not None,
        "min_j": refusal.min_j if refusal is not None else (plan.min_j if plan is not None else None),
        "encode_j": round(prepared.encode_j, 6),
        "prompt": {
            "text_tokens": prepared.text_tokens,
            "visual_tokens": list(prepared.visual_tokens),
        },
    }
    if refusal is not None:
        body["reason"] = refusal.message
    if plan is None:
        return body
    return {
        **body,
        "predicted_j": round(plan.predicted_j, 6),
        "margin": round(plan.margin, 6),
        "plan_margin": round(plan.plan_margin, 6),
        "plan": {
            "policy": plan.policy,
            "reason": plan.reason,
            "max_new_tokens": plan.max_new_tokens,
            "visual_keep": list(plan.visual_keep),
            "selection": plan.selection,
            "brevity_hint": plan.brevity_hint,
            "budget_j": plan.budget_j,
            "holds_budget": plan.holds_budget,
        },
    }
