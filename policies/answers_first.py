"""`answers_first` (default): every visual token while the budget pays for it and the answer.

Visual tokens are the cheap part of a request (prefill), output tokens the dear one (decode), and on
TinyVQA a short answer is one token while pruning to E-AdaPrune's budget costs ~8 points of
exact match (docs/policies.md has the measurements). So the plan gives up answers last:

1. Every visual token, and the client's whole answer (`max_tokens`, else the default cap) when the
   budget pays for both, or for both less some output: output gets what the budget leaves, as
   long as at least `answer_floor_tokens` fit (no budget: every token, the usual cap).
2. Budget too tight for the answer floor with every token: visual tokens are lowered
   (proportionally per image) to the most that still leave the answer floor, but not below
   E-AdaPrune's spectral budget (tau), the principled floor.
3. Still too tight at the spectral budget: the answer is shortened toward `min_output_tokens`
   with the spectral budget's tokens.
4. Still too tight: visual tokens go below the spectral budget, toward `visual_floor_tokens` per
   image, with the minimum answer; below that the request is refused (422) with the minimum joules,
   through the shared `too_small` helper.

The governor holds the budget (`holds_budget`), and the engine decomposes images while preparing
(`prunes_visual`), since steps 2-4 prune.
"""

from __future__ import annotations

from joulecap.policies.base import (
    PlanContext,
    Policy,
    all_visual,
    lower_visual,
    output_cap,
    spectral_keep,
    text_tokens,
    too_small,
)
from joulecap.policies.output_budget import budgeted_output
from joulecap.policies.registry import register
from joulecap.runtime.types import Plan, PreparedRequest


def visual_room(prepared: PreparedRequest, ctx: PlanContext, output_tokens: int) -> int:
    """Most visual tokens (in total) a run with `output_tokens` may keep within the budget left.

    The same spendable part as `joint`: the budget less headroom, and never the margin that
    absorbs the prediction error of the prefill. -1 when not even no visual token fits.
    """
    if ctx.budget_j is None or ctx.left_j is None:
        raise ValueError("visual_room needs a budget")
    left = ctx.left_j
    spendable = min(left - ctx.budget_j * ctx.config.budget_headroom, left / (1.0 + ctx.margin))
    if spendable <= 0:
        return -1
    return ctx.predictor.max_visual_tokens(spendable, text_tokens(prepared, ctx), output_tokens)


@register("answers_first")
class AnswersFirst(Policy):
    """Every visual token while the budget pays for it and the answer; then E-AdaPrune; then lower."""

    holds_budget = True
    prunes_visual = True

    def plan(self, prepared: PreparedRequest, ctx: PlanContext) -> Plan:
        """Plan under the budget; see the module docstring."""
        full = all_visual(prepared)
        cap = output_cap(prepared, ctx, sum(full))
        if ctx.budget_j is None:
            return self.make_plan(prepared, ctx, full, cap, "answers_first: no budget, every visual token")
        budget = ctx.budget_j
        floor_out = max(ctx.config.min_output_tokens, min(cap, ctx.config.answer_floor_tokens))
        # 1. Every visual token, output from what is left, while the answer floor fits.
        n = budgeted_output(prepared, ctx, sum(full), cap)
        if n is not None and n >= floor_out:
            why = "the whole answer" if n >= cap else f"{n} output tokens"
            return self.make_plan(
                prepared, ctx, full, n, f"answers_first: every visual token and {why} fit {budget:.4g} J"
            )
        # 2. Lower visual tokens toward the spectral budget, keeping the answer floor.
        spectral = spectral_keep(prepared, ctx)
        room = visual_room(prepared, ctx, floor_out)
        if room >= sum(spectral):
            keep = lower_visual(full, spectral, room)
            n = self._output(prepared, ctx, keep)
            return self.make_plan(
                prepared,
                ctx,
                keep,
                n,
                f"answers_first: budget {budget:.4g} J tight, visual tokens lowered to {sum(keep)} "
                f"(spectral budget {sum(spectral)}, tau {ctx.tau:g}), {n} output tokens",
            )
        # 3. The spectral budget's tokens with a shorter answer.
        cap = output_cap(prepared, ctx, sum(spectral))
        n = budgeted_output(prepared, ctx, sum(spectral), cap)
        if n is not None:
            return self.make_plan(
                prepared,
                ctx,
                spectral,
                n,
                f"answers_first: budget {budget:.4g} J tight, spectral budget {sum(spectral)} "
                f"(tau {ctx.tau:g}), answer shortened to {n} tokens",
            )
        # 4. Below the spectral budget, toward the per-image floor, with the minimum answer.
        min_out = ctx.config.min_output_tokens
        floors = tuple(min(k, ctx.config.visual_floor_tokens) for k in spectral)
        room = visual_room(prepared, ctx, min_out)
        if room < sum(floors):
            run_min_j = (1.0 + ctx.margin) * ctx.predictor.predict(
                text_tokens(prepared, ctx), sum(floors), min_out
            ).total_j
            raise too_small(
                ctx, run_min_j, f"the prompt with {sum(floors)} visual token(s) and {min_out} output token(s)"
            )
        keep = lower_visual(spectral, floors, room)
        n = self._output(prepared, ctx, keep)
        return self.make_plan(
            prepared,
            ctx,
            keep,
            n,
            f"answers_first: budget {budget:.4g} J below the spectral budget, visual tokens lowered "
            f"to {sum(keep)}, {n} output tokens",
        )

    @staticmethod
    def _output(prepared: PreparedRequest, ctx: PlanContext, keep: tuple[int, ...]) -> int:
        """Output tokens for `keep`, at least the minimum answer (the caller checked it fits)."""
        cap = output_cap(prepared, ctx, sum(keep))
        n = budgeted_output(prepared, ctx, sum(keep), cap)
        # lower_visual only ever rounds tokens away, so the checked answer still fits.
        return ctx.config.min_output_tokens if n is None else n
