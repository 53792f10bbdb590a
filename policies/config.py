"""Scheduler and policy configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """How budgets become plans."""

    policy: str = "answers_first"
    """Policy used when a request names none (see `joulecap policies`). `answers_first` keeps every
    visual token while the budget pays for them and the answer (docs/policies.md)."""
    tau: float = 0.99999999
    """E-AdaPrune: fraction of spectral energy the kept visual tokens must cover, in (0, 1].
    Chosen on answers (docs/policies.md, benchmarks/results/tinyvqa_tau_sweep*.json, 300 TinyVQA
    validation questions): the smallest tau within 1 point of every token on short answers and
    descriptions. 1 - 1e-8 keeps 64% of the tokens (short 98.0 vs 97.6%, description recall 86.3
    vs 84.3%); every tau up to 0.9999 leaves k_min (16 of 144 tokens: 93.3%, 79.7%) and
    0.99999-1e-7 lose 2-13 points. This close to 1 the fp32 budget cannot decide and the exact
    path re-decides in float64 (cheap at TinyVQA's 144 tokens; engines hold a float64 basis)."""
    k_min: int = 16
    """E-AdaPrune: fewest visual tokens kept per image."""
    selection: str = "leverage"
    """Which visual tokens stay: `leverage`, `norm`, `diversity`, `uniform`."""
    default_max_tokens: int = 256
    """Output cap when neither the client nor the budget sets one."""
    min_output_tokens: int = 1
    """Smallest answer worth running; below it a budget is refused with 422."""
    profile_dir: str | None = None
    """Directory of energy profiles (JSON per model, device, dtype); default `<cache dir>/profiles`."""
    budget_min_j: float = 0.0
    """Smallest energy budget accepted (J); a budget below it is refused with 400 (budgets must
    also be > 0)."""
    budget_max_j: float = 1_000_000.0
    """Largest energy budget accepted (J); a budget above it is refused with 400."""
    budget_headroom: float = 0.03
    """Fraction of a budget the planned output leaves unspent to absorb prediction error (the
    governor holds the rest); never makes a feasible budget infeasible."""
    feasibility_margin: float = 0.15
    """Budget-holding policies accept a budget only when the predicted cost of the minimum answer
    times (1 + this margin) fits it: the prefill cannot be stopped by the governor, so prediction
    error there would overshoot the budget. The 422's minimum joules include the margin. This is
    the floor: once runs are observed, the margin follows `feasibility_quantile`."""
    feasibility_quantile: float = 0.99
    """Quantile of the measured prefill's relative overshoot over its prediction (last 200 runs)
    used as the feasibility margin when larger than `feasibility_margin` (from 5 runs on), so
    that about this share of accepted minimum answers stay within budget on a noisy device."""
    fixed_output_tokens: int = 64
    """`fixed_output` policy: output cap N."""
    fixed_prune_ratio: float = 0.5
    """`fixed_prune` policy: fraction r of each image's visual tokens kept, in (0, 1]."""
    visual_floor_tokens: int = 4
    """`joint` policy: fewest visual tokens kept per image when a tight budget forces it below
    the E-AdaPrune budget (0 allows dropping an image's tokens entirely)."""
    answer_floor_tokens: int = 1
    """`answers_first` policy: output tokens kept for the answer before visual tokens are given up
    (capped by the client's max_tokens). 1: a TinyVQA short answer is one token, and with every
    visual token kept it is 8 points more often right than with E-AdaPrune's 16 (docs/policies.md);
    raise it for traffic of long answers (descriptions: 12 tokens on average)."""
    brevity: bool = False
    """Add a system instruction asking for an answer sized to the planned output tokens."""
    rls_forgetting: float = 0.98
    """Predictor online update: forgetting factor of recursive least squares, in (0, 1]
    (1 = never forget; 0.98 weighs the last ~50 requests)."""
    speed_alpha: float = 0.2
    """Predictor online update: weight of the newest measurement in the speed factor, a running
    average of measured over predicted joules that multiplies every prediction, in [0, 1] (0 = off;
    0.2 weighs the last ~5 requests). It follows what changes faster than RLS can (a throttled or
    contended device): on the 2-core benchmark VM, held-out MAPE averaged 10.3% with it and 12.4%
    with RLS alone over seven scheduler-benchmark runs."""
    power_envelope_w: float | None = None
    """Power envelope refill rate in watts (with --power-envelope-j; None = no envelope)."""
    power_envelope_j: float | None = None
    """Power envelope capacity in joules (with --power-envelope-w; None = no envelope)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if not 0.0 < self.fixed_prune_ratio <= 1.0:
            raise ValueError(f"fixed_prune_ratio must be in (0, 1], got {self.fixed_prune_ratio}")
        if not 0.0 < self.rls_forgetting <= 1.0:
            raise ValueError(f"rls_forgetting must be in (0, 1], got {self.rls_forgetting}")
        if not 0.0 <= self.speed_alpha <= 1.0:
            raise ValueError(f"speed_alpha must be in [0, 1], got {self.speed_alpha}")
        if not 0.0 < self.feasibility_quantile <= 1.0:
            raise ValueError(f"feasibility_quantile must be in (0, 1], got {self.feasibility_quantile}")
        if not 0.0 <= self.feasibility_margin <= 10.0:
            raise ValueError(f"feasibility_margin must be in [0, 10], got {self.feasibility_margin}")
        if not 0.0 <= self.budget_headroom < 1.0:
            raise ValueError(f"budget_headroom must be in [0, 1), got {self.budget_headroom}")
        if not 0.0 <= self.budget_min_j <= self.budget_max_j:
            raise ValueError(
                f"need 0 <= budget_min_j <= budget_max_j, got {self.budget_min_j}, {self.budget_max_j}"
            )
        for name in (
            "k_min",
            "default_max_tokens",
            "min_output_tokens",
            "fixed_output_tokens",
            "answer_floor_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.visual_floor_tokens < 0:
            raise ValueError(f"visual_floor_tokens must be >= 0, got {self.visual_floor_tokens}")
        for name in ("power_envelope_w", "power_envelope_j"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 when set, got {value}")
