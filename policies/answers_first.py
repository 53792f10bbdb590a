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
   image, with the minimum answer; below that the request is refused (422) with the minimum joules
   the shared feasibility rule states for that smallest plan (`stated_min_j`).

The governor holds the budget (`holds_budget`). Steps 2-4 prune, so a request with a budget may
need its images decomposed (`prunes`); without a budget they are not, and on vLLM they go
natively. Step 1 needs no decomposition, so it is made first (`defers_bases`): where the engine
can decompose later (the transformers engine), a request is prepared without it, and only when
step 1 does not fit are its images decomposed (measured with the encode) and the request planned
again. A budget that pays for every visual token thus pays nothing for pruning it did not use.
A plan made that way states no minimum (`min_j` None): the smallest plan would have needed the
decomposition, whose cost was not measured.
"""

from __future__ import annotations

from joulecap.policies.base import (
    PlanContext,
    Policy,
    all_visual,
    fits,
    fits_plan,
    lower_visual,
    output_cap,
    spectral_keep,
    stated_min_j,
    too_small,
    visual_for,
)
from joulecap.policies.output_budget import budgeted_output
from joulecap.policies.registry import register
from joulecap.runtime.errors import BasesNeeded
from joulecap.runtime.types import Plan, PreparedRequest, Request


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
            # Nothing to prune for (`prunes`: the images were not decomposed), and no minimum is
            # stated: this encode did not pay for the decomposition a budgeted request's smallest
            # plan needs, so a number stated from it would sit below what that request costs.
            reason = "answers_first: no budget, every visual token"
            return self.make_plan(prepared, ctx, full, cap, reason, min_j=None)
        if prepared.bases_pending:
            return self._keep_all_or_decompose(prepared, ctx, full, cap)
        spectral = spectral_keep(prepared, ctx)
        floors = tuple(min(k, ctx.config.visual_floor_tokens) for k in spectral)
        min_j = stated_min_j(prepared, ctx, sum(floors))
        budget = ctx.budget_j
        if not fits(ctx, min_j):
            min_out = ctx.config.min_output_tokens
            what = f"the prompt with {sum(floors)} visual token(s) and {min_out} output token(s)"
            raise too_small(ctx, min_j, what)
        # 1. Every visual token, output from what is left, while the answer floor fits.
        room = self._room(prepared, ctx, cap)
        if room >= sum(full):
            return self._keep_all(prepared, ctx, full, cap, min_j)
        # 2. Lower visual tokens toward the spectral budget, keeping the answer floor.
        if room >= sum(spectral):
            keep = lower_visual(full, spectral, room)
            n = self._output(prepared, ctx, keep)
            reason = (
                f"answers_first: budget {budget:.4g} J tight, visual tokens lowered to {sum(keep)} "
                f"(spectral budget {sum(spectral)}, tau {ctx.tau:g}), {n} output tokens"
            )
            return self.make_plan(prepared, ctx, keep, n, reason, min_j=min_j)
        # 3. The spectral budget's tokens with a shorter answer.
        if fits_plan(prepared, ctx, sum(spectral)):
            n = self._output(prepared, ctx, spectral)
            reason = (
                f"answers_first: budget {budget:.4g} J tight, spectral budget {sum(spectral)} "
                f"(tau {ctx.tau:g}), answer shortened to {n} tokens"
            )
            return self.make_plan(prepared, ctx, spectral, n, reason, min_j=min_j)
        # 4. Below the spectral budget, toward the per-image floor, with the minimum answer.
        keep = lower_visual(spectral, floors, max(sum(floors), visual_for(prepared, ctx)))
        n = self._output(prepared, ctx, keep)
        reason = (
            f"answers_first: budget {budget:.4g} J below the spectral budget, visual tokens lowered "
            f"to {sum(keep)}, {n} output tokens"
        )
        return self.make_plan(prepared, ctx, keep, n, reason, min_j=min_j)

    def prunes(self, request: Request) -> bool:
        """Only a budget makes this policy prune: without one it keeps every visual token."""
        return request.energy_budget_j is not None

    def defers_bases(self, request: Request) -> bool:
        """Step 1 needs no decomposition: plan it first (see the module docstring)."""
        return self.prunes(request)

    def _keep_all_or_decompose(
        self, prepared: PreparedRequest, ctx: PlanContext, full: tuple[int, ...], cap: int
    ) -> Plan:
        """Step 1 for a request prepared without its decomposition, which any other step needs."""
        if self._room(prepared, ctx, cap) < sum(full):
            raise BasesNeeded("answers_first: the budget binds; the images must be decomposed")
        return self._keep_all(prepared, ctx, full, cap, None)

    def _keep_all(
        self,
        prepared: PreparedRequest,
        ctx: PlanContext,
        full: tuple[int, ...],
        cap: int,
        min_j: float | None,
    ) -> Plan:
        """Step 1's plan: every visual token and output from what is left (the floor fits)."""
        n = budgeted_output(prepared, ctx, sum(full), cap)
        why = "the whole answer" if n >= cap else f"{n} output tokens"
        reason = f"answers_first: every visual token and {why} fit {ctx.budget_j:.4g} J"
        return self.make_plan(prepared, ctx, full, n, reason, min_j=min_j)

    @staticmethod
    def _room(prepared: PreparedRequest, ctx: PlanContext, cap: int) -> int:
        """Visual tokens the budget pays for beside the answer floor (`answer_floor_tokens`)."""
        floor_out = max(ctx.config.min_output_tokens, min(cap, ctx.config.answer_floor_tokens))
        return visual_for(prepared, ctx, floor_out)

    @staticmethod
    def _output(prepared: PreparedRequest, ctx: PlanContext, keep: tuple[int, ...]) -> int:
        """Output tokens for `keep` (at least the minimum answer: the caller checked it is accepted)."""
        return budgeted_output(prepared, ctx, sum(keep), output_cap(prepared, ctx, sum(keep)))
