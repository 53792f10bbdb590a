"""What every policy shares: the planning context, the `Policy` base class and plan arithmetic.

Policies sit on the core only (`joulecap.runtime.types`, `errors`, `brevity`, and `joulecap.kernels`):
they plan with any `CostModel`, and the runtime hands them its predictor.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from joulecap.kernels import spectral_budget
from joulecap.policies.config import SchedulerConfig
from joulecap.runtime.brevity import brevity_hint
from joulecap.runtime.errors import BudgetTooSmall, InvalidRequest
from joulecap.runtime.types import CostModel, Plan, PreparedRequest, Request

MIN_J_RESOLUTION = 1e-6
"""Stated minimums are rounded up to a microjoule, so the number a client reads back (header,
body, estimate) is itself accepted."""


@dataclass(frozen=True)
class PlanContext:
    """Everything a policy needs besides the prepared request.

    Attributes:
        config: Scheduler configuration.
        predictor: The energy model of the served model on this device.
        tau: E-AdaPrune spectral-energy fraction for this request, in (0, 1].
        max_tokens: The client's own output cap, if any.
        budget_j: The request's joule budget, if any (already validated).
        encode_j: Energy the request has already spent when it is planned (the measured image
            preprocessing and vision encoder). Policies plan the run within `left_j`.
        margin: The feasibility margin: the relative error the part of a run the governor cannot
            stop (the LM prefill to the first tokens) is allowed (learned, `runtime/margin.py`).
        plan_margin: The planning margin (at least `margin`): the same error further into its
            tail. It decides how much of an accepted budget a plan may fill (`visual_for`,
            `fits_plan`); admission and the stated minimum use `margin`.
        promised_min_j: The minimum this server stated for the same request earlier (a 422 or an
            estimate), if it is still held: a retry at it is accepted even when this attempt's
            encode came out dearer (`runtime/promises.py`).

    """

    config: SchedulerConfig
    predictor: CostModel
    tau: float
    max_tokens: int | None = None
    budget_j: float | None = None
    encode_j: float = 0.0
    margin: float = 0.0
    plan_margin: float = 0.0
    promised_min_j: float | None = None

    @property
    def planning_margin(self) -> float:
        """The margin plans are sized with: `plan_margin`, never below `margin`."""
        return max(self.margin, self.plan_margin)

    @property
    def left_j(self) -> float | None:
        """The budget less what is already spent (None without a budget; may be <= 0)."""
        return None if self.budget_j is None else self.budget_j - self.encode_j


class Policy(ABC):
    """Turns a prepared request into a `Plan`. Subclasses are registered with `@register(name)`.

    Attributes:
        name: Registry name (set by `register`).
        holds_budget: Whether the governor stops decoding at the request's budget for plans of
            this policy. Policies that ignore budgets (baselines) leave it False: the budget is
            still recorded in the plan and the ledger, so adherence can be measured.
        prunes_visual: Whether plans of this policy may keep fewer visual tokens than an image
            has. Only then does the engine decompose each image's features while preparing the
            request (the basis serves the spectral budget and leverage selection); a policy that
            keeps every token is spared that work (1.8 ms per 144-token image on one CPU core).

    """

    name: ClassVar[str] = ""
    holds_budget: ClassVar[bool] = False
    prunes_visual: ClassVar[bool] = False

    @abstractmethod
    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Decide visual tokens kept and max_new_tokens for `prepared`."""

    def prunes(self, request: Request) -> bool:
        """Whether a plan for `request` may keep fewer visual tokens than its images have.

        Asked before the images are encoded: only then does the engine decompose their features
        (and, on vLLM, run the vision tower in joulecap rather than pass the image natively).
        `prunes_visual` by default; a policy that prunes only under some budgets narrows it.
        """
        return self.prunes_visual

    def defers_bases(self, request: Request) -> bool:
        """Whether `request` may be planned from features without their decomposition first.

        A policy that says so plans a request prepared with `bases_pending` when it can keep
        every visual token, and raises `BasesNeeded` otherwise; the runtime then decomposes the
        images (measured with the encode) and asks again. A keep-all plan so spares the
        decomposition's energy. False by default: the images are decomposed while preparing
        whenever `prunes` says so.
        """
        return False

    # -------------------------------------------------------------- helpers for subclasses
    def make_plan(
        self,
        prepared: PreparedRequest,
        ctx: PlanContext,
        keep: Sequence[int],
        max_new_tokens: int,
        reason: str,
        *,
        min_j: float | None = None,
    ) -> Plan:
        """Assemble the plan with its prediction (encode spent plus the run) and brevity hint."""
        keep = tuple(int(k) for k in keep)
        run = ctx.predictor.predict(text_tokens(prepared, ctx), sum(keep), max_new_tokens)
        return Plan(
            visual_keep=keep,
            max_new_tokens=max_new_tokens,
            predicted_j=ctx.encode_j + run.total_j,
            policy=self.name,
            reason=reason,
            selection=ctx.config.selection,
            brevity_hint=brevity_hint(max_new_tokens) if hinted(prepared, ctx) else None,
            budget_j=ctx.budget_j,
            holds_budget=self.holds_budget,
            encode_j=ctx.encode_j,
            predicted_prefill_j=run.prefill_j,
            min_j=min_j,
            margin=ctx.margin,
            plan_margin=ctx.planning_margin,
        )


def hinted(prepared: PreparedRequest, ctx: PlanContext) -> bool:
    """Whether the plan carries a brevity hint: configured, and the engine can add one."""
    return ctx.config.brevity and prepared.hint_tokens > 0


def text_tokens(prepared: PreparedRequest, ctx: PlanContext) -> int:
    """The prompt's text tokens as planned: with the brevity hint's reserve when it is added.

    The hint goes in after planning, so the plan pays for the most tokens any of its wordings adds.
    """
    return prepared.text_tokens + (prepared.hint_tokens if hinted(prepared, ctx) else 0)


def output_cap(prepared: PreparedRequest, ctx: PlanContext, visual_kept: int) -> int:
    """Most tokens the request may generate regardless of energy: client cap, default, context.

    Raises:
        InvalidRequest: The prompt leaves no room in the context for `min_output_tokens`.

    """
    cap = ctx.max_tokens if ctx.max_tokens is not None else ctx.config.default_max_tokens
    # The engine drops the hint when it would not fit, so the context check ignores its reserve.
    room = prepared.context_length - prepared.text_tokens - visual_kept
    if room < ctx.config.min_output_tokens:
        raise InvalidRequest(
            f"The prompt takes {prepared.text_tokens + visual_kept} of the model's "
            f"{prepared.context_length} context tokens, leaving no room for an answer.",
            param="messages",
        )
    return max(1, min(cap, room))


def all_visual(prepared: PreparedRequest) -> tuple[int, ...]:
    """Keep every visual token."""
    return tuple(prepared.visual_tokens)


def spectral_keep(prepared: PreparedRequest, ctx: PlanContext) -> tuple[int, ...]:
    """E-AdaPrune: per image, the fewest tokens covering `tau` of the spectral energy (>= k_min)."""
    keep = []
    for i, (n, feats) in enumerate(zip(prepared.visual_tokens, prepared.features, strict=True)):
        if n == 0:
            keep.append(0)
            continue
        # The engine's basis (computed and measured in prepare) already holds the exact spectrum.
        k = int(spectral_budget(feats, ctx.tau, k_min=ctx.config.k_min, basis=prepared.basis(i)))
        keep.append(max(0, min(n, k)))
    return tuple(keep)


def lower_visual(keep: Sequence[int], floors: Sequence[int], total: int) -> tuple[int, ...]:
    """Shrink `keep` to at most `total` tokens, never below `floors`, proportionally to what is above.

    Args:
        keep: Current tokens kept per image.
        floors: Fewest tokens per image (`<= keep`).
        total: Target total (`>= sum(floors)`).

    """
    excess = sum(keep) - total
    if excess <= 0:
        return tuple(keep)
    room = [k - f for k, f in zip(keep, floors, strict=True)]
    room_total = sum(room)
    cut = [math.ceil(excess * r / room_total) if room_total else 0 for r in room]
    out = [max(f, k - c) for k, f, c in zip(keep, floors, cut, strict=True)]
    return tuple(out)


def minimum_j(
    prepared: PreparedRequest, ctx: PlanContext, visual_kept: int, margin: float | None = None
) -> float:
    """The feasibility rule: the smallest budget accepted for a minimum answer with `visual_kept`.

    The encode is spent and measured when a request is planned; the part of the run the governor
    cannot stop (the LM prefill up to the first `min_output_tokens`) must fit with the feasibility
    margin: `encode_j + predicted run of the minimum answer * (1 + margin)`, rounded up to
    `MIN_J_RESOLUTION`. A policy states and admits with `stated_min_j` (this at its smallest plan,
    or the minimum already stated for the same request if lower); admission (`fits`), the 422's
    message and `X-Energy-Min-J`, and `/v1/energy/estimate` all read that one number.
    `margin` overrides `ctx.margin` (`fits_plan` sizes plans with the planning margin).
    """
    run = ctx.predictor.predict(text_tokens(prepared, ctx), visual_kept, ctx.config.min_output_tokens)
    raw = ctx.encode_j + run.total_j * (1.0 + (ctx.margin if margin is None else margin))
    return math.ceil(raw / MIN_J_RESOLUTION - 1e-6) * MIN_J_RESOLUTION


def stated_min_j(prepared: PreparedRequest, ctx: PlanContext, visual_kept: int) -> float:
    """The minimum a policy states for its smallest plan (`visual_kept` tokens).

    `minimum_j`, or the minimum this server already stated for the same request if that is lower
    (a retry at a stated minimum is accepted even when its encode came out dearer).
    """
    min_j = minimum_j(prepared, ctx, visual_kept)
    return min_j if ctx.promised_min_j is None else min(min_j, ctx.promised_min_j)


def fits(ctx: PlanContext, min_j: float) -> bool:
    """Whether the request's budget is accepted against `min_j` (True without a budget)."""
    return ctx.budget_j is None or ctx.budget_j >= min_j


def fits_plan(prepared: PreparedRequest, ctx: PlanContext, visual_kept: int) -> bool:
    """Whether a plan may keep `visual_kept` tokens: its minimum answer fits with the planning margin.

    Admission asks `fits` against the stated minimum (feasibility margin); a plan that would fill
    the budget asks this, so it keeps clear of the error's tail (`PlanContext.plan_margin`).
    """
    return fits(ctx, minimum_j(prepared, ctx, visual_kept, margin=ctx.planning_margin))


def visual_for(prepared: PreparedRequest, ctx: PlanContext, output_tokens: int | None = None) -> int:
    """The most visual tokens (in total) an answer of `output_tokens` may keep and be accepted.

    -1 when none; `output_tokens` defaults to the minimum answer. The inverse of `minimum_j` in
    the visual tokens with the planning margin, also leaving the configured headroom of the budget
    unplanned when that is tighter.
    """
    if ctx.budget_j is None or ctx.left_j is None:
        raise ValueError("visual_for needs a budget")
    headroom_j = ctx.budget_j * ctx.config.budget_headroom
    run_j = min(ctx.left_j / (1.0 + ctx.planning_margin), ctx.left_j - headroom_j)
    if run_j <= 0:
        return -1
    out = ctx.config.min_output_tokens if output_tokens is None else output_tokens
    return ctx.predictor.max_visual_tokens(run_j, text_tokens(prepared, ctx), out)


def too_small(ctx: PlanContext, min_j: float, what: str) -> BudgetTooSmall:
    """The 422 error, stating `min_j` (from `minimum_j`: the same number admission compared).

    Args:
        ctx: The planning context (budget and energy already spent).
        min_j: The smallest accepted budget.
        what: What the smallest run is, for the message.

    """
    budget_j = ctx.budget_j if ctx.budget_j is not None else 0.0
    spent = f" ({ctx.encode_j:.6f} J already spent on encoding the images)" if ctx.encode_j > 0 else ""
    return BudgetTooSmall(
        f"Energy budget {budget_j:.6f} J is too small: {what} needs at least {min_j:.6f} J "
        f"(margin {ctx.margin:.3f}){spent}.",
        min_j=min_j,
    )
