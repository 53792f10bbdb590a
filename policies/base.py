"""What every policy shares: the planning context, the `Policy` base class and plan arithmetic."""

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
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import Plan, PreparedRequest


@dataclass(frozen=True)
class PlanContext:
    """Everything a policy needs besides the prepared request.

    Attributes:
        config: Scheduler configuration.
        predictor: The energy model of the served model on this device.
        tau: E-AdaPrune spectral-energy fraction for this request, in (0, 1].
        max_tokens: The client's own output cap, if any.
        budget_j: The request's joule budget, if any (already validated).
        spent_j: Energy the request has already spent when it is planned (the measured image
            preprocessing and vision encoder). Policies plan the run within `left_j`.
        feasibility_margin: The margin to accept budgets with now (the scheduler's learned
            `FeasibilityMargin`); None means the configured floor.

    """

    config: SchedulerConfig
    predictor: Predictor
    tau: float
    max_tokens: int | None = None
    budget_j: float | None = None
    spent_j: float = 0.0
    feasibility_margin: float | None = None

    @property
    def margin(self) -> float:
        """Relative margin the minimum answer's predicted run must leave within the budget."""
        return self.config.feasibility_margin if self.feasibility_margin is None else self.feasibility_margin

    @property
    def left_j(self) -> float | None:
        """The budget less what is already spent (None without a budget; may be <= 0)."""
        return None if self.budget_j is None else self.budget_j - self.spent_j


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

    # -------------------------------------------------------------- helpers for subclasses
    def make_plan(
        self,
        prepared: PreparedRequest,
        ctx: PlanContext,
        keep: Sequence[int],
        max_new_tokens: int,
        reason: str,
    ) -> Plan:
        """Assemble the plan with its prediction (spent so far plus the run) and brevity hint."""
        keep = tuple(int(k) for k in keep)
        run_j = ctx.predictor.predict(text_tokens(prepared, ctx), sum(keep), max_new_tokens).total_j
        predicted = ctx.spent_j + run_j
        return Plan(
            visual_keep=keep,
            max_new_tokens=max_new_tokens,
            predicted_j=predicted,
            policy=self.name,
            reason=reason,
            selection=ctx.config.selection,
            brevity_hint=brevity_hint(max_new_tokens) if hinted(prepared, ctx) else None,
            budget_j=ctx.budget_j,
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


def too_small(ctx: PlanContext, run_min_j: float, what: str) -> BudgetTooSmall:
    """The 422 error; its minimum joules are the encode plus the smallest run, with the margin.

    A retry encodes the images again, and that measured energy varies from run to run like a
    prediction's error, so the stated minimum carries the feasibility margin on the encode too.

    Args:
        ctx: The planning context (budget and energy already spent).
        run_min_j: Cost of the smallest run, feasibility margin included.
        what: What the smallest run is, for the message.

    """
    budget_j = ctx.budget_j if ctx.budget_j is not None else 0.0
    min_j = ctx.spent_j * (1.0 + ctx.margin) + run_min_j
    spent = f" ({ctx.spent_j:.4g} J already spent on encoding the images)" if ctx.spent_j > 0 else ""
    return BudgetTooSmall(
        f"Energy budget {budget_j:.4g} J is too small: {what} needs at least {min_j:.4g} J{spent}.",
        min_j=min_j,
    )
