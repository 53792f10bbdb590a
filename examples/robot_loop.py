"""A robot perception loop on the in-process joulecap Runtime, under a power envelope.

Each step takes a camera frame (generated here: a coloured square moving across the view),
asks the VLM about it with a joule budget that shrinks as the simulated battery drains, and
prints the energy the step cost. The loop's core (`PerceptionLoop.step`) needs no ROS; see the
README's "Robot loop" section for how the same class sits inside a ROS 2 node (a camera
subscriber calls `step(frame)` and publishes the answer).

Run: `python examples/robot_loop.py --steps 5` (offline; demo model unless --model).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import numpy as np

from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.errors import BudgetTooSmall, EnvelopeExhausted
from joulecap.runtime.runtime import Runtime


@dataclass
class Battery:
    """A simulated battery: joules left out of a capacity."""

    capacity_j: float
    level_j: float

    @property
    def fraction(self) -> float:
        """State of charge in [0, 1]."""
        return max(0.0, self.level_j / self.capacity_j)

    def draw(self, energy_j: float) -> None:
        """Take `energy_j` out of the battery."""
        self.level_j = max(0.0, self.level_j - energy_j)


def camera_frame(step: int, size: int = 128) -> np.ndarray:
    """A synthetic HxWx3 uint8 frame: a red square sliding left to right on grey."""
    frame = np.full((size, size, 3), 200, dtype=np.uint8)
    x = (step * 17) % (size - 32)
    frame[48:80, x : x + 32] = (220, 30, 30)
    return frame


@dataclass
class StepReport:
    """What one perception step did."""

    step: int
    battery_pct: float
    budget_j: float
    energy_j: float
    source: str
    answer: str
    stop_reason: str


class PerceptionLoop:
    """Ask the VLM about each frame with a budget scaled by the battery's state of charge.

    Args:
        runtime: The in-process joulecap runtime.
        battery: The battery to drain with each step's reported energy.
        full_budget_j: Per-step budget at a full battery; it scales down linearly to
            `min_fraction` of it as the battery empties.
        prompt: The question asked about every frame.

    """

    def __init__(
        self,
        runtime: Runtime,
        battery: Battery,
        *,
        full_budget_j: float,
        min_fraction: float = 0.2,
        prompt: str = "Where is the red square?",
    ) -> None:
        self.runtime = runtime
        self.battery = battery
        self.full_budget_j = full_budget_j
        self.min_fraction = min_fraction
        self.prompt = prompt

    def budget_j(self) -> float:
        """This step's joule budget."""
        scale = self.min_fraction + (1 - self.min_fraction) * self.battery.fraction
        return self.full_budget_j * scale

    def step(self, index: int, frame: np.ndarray) -> StepReport:
        """Run one frame through the runtime and account its energy against the battery."""
        budget = self.budget_j()
        try:
            result = self.runtime.chat(self.prompt, images=[frame], energy_budget_j=budget, max_tokens=24)
        except (BudgetTooSmall, EnvelopeExhausted) as exc:
            # Skipping a frame is the right reaction to an empty envelope: the robot keeps moving.
            return StepReport(index, 100 * self.battery.fraction, budget, 0.0, "skipped", str(exc), "skipped")
        self.battery.draw(result.energy.total_j)
        return StepReport(
            step=index,
            battery_pct=100 * self.battery.fraction,
            budget_j=budget,
            energy_j=result.energy.total_j,
            source=f"{result.energy.source}:{result.energy.meter}",
            answer=result.text.strip()[:60],
            stop_reason=result.generation.stop_reason,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hz", type=float, default=2.0, help="Frames per second the loop aims for.")
    parser.add_argument("--model", default=None, help="Model directory (default: the demo model).")
    parser.add_argument("--battery-j", type=float, default=200.0, help="Simulated battery capacity.")
    parser.add_argument("--full-budget-j", type=float, default=20.0, help="Per-step budget when full.")
    parser.add_argument("--envelope-w", type=float, default=30.0, help="Power envelope refill rate.")
    parser.add_argument("--envelope-j", type=float, default=60.0, help="Power envelope capacity.")
    parser.add_argument("--ledger", default=":memory:", help="Ledger path (default: not kept).")
    args = parser.parse_args(argv)

    base = JoulecapConfig()
    config = replace(
        base,
        engine=replace(base.engine, model=args.model),
        envelope=replace(base.envelope, power_envelope_w=args.envelope_w, power_envelope_j=args.envelope_j),
        paths=replace(base.paths, ledger_path=args.ledger),
    )
    battery = Battery(capacity_j=args.battery_j, level_j=args.battery_j)
    with Runtime(config) as runtime:
        loop = PerceptionLoop(runtime, battery, full_budget_j=args.full_budget_j)
        print(f"{'step':>4} {'batt%':>6} {'budget_J':>9} {'used_J':>8} {'stop':>13}  source / answer")
        period_s = 1.0 / args.hz
        for i in range(args.steps):
            t0 = time.monotonic()
            r = loop.step(i, camera_frame(i))
            print(
                f"{r.step:>4} {r.battery_pct:6.1f} {r.budget_j:9.3f} {r.energy_j:8.3f} {r.stop_reason:>13}  "
                f"{r.source} / {r.answer!r}"
            )
            time.sleep(max(0.0, period_s - (time.monotonic() - t0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
