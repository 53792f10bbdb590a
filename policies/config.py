"""Scheduler and policy configuration."""

from __future__ import annotations

from dataclasses import dataclass, field


def _policies() -> list[str]:
    from joulecap.policies.registry import available_policies

    return available_policies()


def _selectors() -> list[str]:
    from joulecap.kernels import SELECTORS

    return sorted(SELECTORS)


@dataclass(frozen=True)
class SchedulerConfig:
    """How budgets become plans."""

    policy: str = field(default="answers_first", metadata={"choices": _policies})
    """Policy used when a request names none (see `joulecap policies`; how the default was chosen:
    docs/policies.md)."""
    tau: float = 0.99999999
    """E-AdaPrune: fraction of spectral energy the kept visual tokens must cover, in (0, 1]
    (chosen on answers: docs/policies.md)."""
    k_min: int = 16
    """E-AdaPrune: fewest visual tokens kept per image."""
    selection: str = field(default="leverage", metadata={"choices": _selectors})
    """Which visual tokens stay."""
    default_max_tokens: int = 256
    """Output cap when neither the client nor the budget sets one."""
    min_output_tokens: int = 1
    """Smallest answer worth running; a budget that cannot pay for it is refused with 422."""
    budget_min_j: float = 0.0
    """Smallest energy budget accepted (J); a budget below it is refused with 400 (budgets must
    also be > 0)."""
    budget_max_j: float = 1_000_000.0
    """Largest energy budget accepted (J); a budget above it is refused with 400."""
    budget_headroom: float = 0.03
    """Fraction of a budget the planned output leaves unspent to absorb prediction error (the
    governor holds the rest); never makes an accepted budget a refusal."""
    fixed_output_tokens: int = 64
    """`fixed_output` policy: output cap N."""
    fixed_prune_ratio: float = 0.5
    """`fixed_prune` policy: fraction r of each image's visual tokens kept, in (0, 1]."""
    visual_floor_tokens: int = 4
    """`joint` policy: fewest visual tokens kept per image when a tight budget forces it below
    the E-AdaPrune budget (0 allows dropping an image's tokens entirely)."""
    answer_floor_tokens: int = 1
    """`answers_first` policy: output tokens kept for the answer before visual tokens are given up
    (capped by the client's max_tokens); raise it for traffic of long answers (docs/policies.md)."""
    brevity: bool = False
    """Add a system instruction asking for an answer sized to the planned output tokens."""

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if not 0.0 < self.fixed_prune_ratio <= 1.0:
            raise ValueError(f"fixed_prune_ratio must be in (0, 1], got {self.fixed_prune_ratio}")
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
