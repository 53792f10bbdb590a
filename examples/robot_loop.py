"""A robot perception loop on the in-process joulecap Runtime, under a joule budget that binds.

Each step takes a camera frame (drawn here: three coloured shapes on a table, a red circle
rolling between the other two), asks the demo model TinyVQA a question it was trained on, and pays for
the answer from a simulated battery. The per-step budget is derived from the runtime itself
before the loop starts:

- `full_j`: the predicted cost of a whole description of the scene (`Runtime.estimate` with an
  ample budget, the same numbers `POST /v1/energy/estimate` returns);
- `floor_j`: the stated minimum for it (what a 422 would state), with `FLOOR_HEADROOM` on top:
  at the bare minimum the plan keeps a handful of visual tokens, too few to see a colour by.
  The minimum moves with the machine (each request's encode is measured, the margins learn from
  every run): when the runtime refuses a step's budget, the 422's own minimum raises the floor
  to `FLOOR_HEADROOM` x it (never lowers it) and the frame is asked once more.

Each step's budget is `floor_j + (full_j - floor_j) x battery charge`, so it binds: as the
battery drains, the runtime plans fewer output tokens (the description of the scene is cut
short) and, when even a short answer no longer fits with every visual token, keeps fewer of
them, while short answers (a colour, yes/no) stay right. The loop plans with the runtime's default
policy, `answers_first` (`--policy` picks another budget-holding one). Every step prints its plan
(visual tokens kept of those in, output tokens planned), the joules measured, how generation
stopped, and the answer.

Run: `python examples/robot_loop.py` (10 steps) (offline; the demo model unless --model). The
loop's core, `PerceptionLoop.step`, needs no ROS; `ros2_node.py` wraps it in an rclpy node.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.errors import BudgetTooSmall, EnvelopeExhausted
from joulecap.runtime.runtime import Runtime
from joulecap.runtime.types import ChatResult

FRAME_PX = 120
"""TinyVQA's image side: the demo model was trained on 120x120 scenes."""
DESCRIBE = "what is in the image?"
QUESTIONS = (
    DESCRIBE,
    "what color is the circle?",
    DESCRIBE,
    "is there a green diamond?",
    DESCRIBE,
    "what color is the square?",
)
"""What the robot asks, in turn: the scene (a long answer the budget cuts) and short checks."""
MAX_TOKENS = 32
AMPLE_J = 1000.0
"""A budget that never binds, for the estimate that states the minimum and the full cost."""
FLOOR_HEADROOM = 1.5
"""The empty battery's budget over the stated minimum: room for E-AdaPrune's visual tokens, not
just the few of the smallest plan (plans that fill a budget keep the planning margin clear, and
that margin reads the tail of the prefill's error), and for the minimum to drift with the
machine between the estimate and the step."""


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


def camera_frame(step: int) -> Image.Image:
    """A synthetic camera frame: a red circle rolling between a yellow triangle and a blue square."""
    img = Image.new("RGB", (FRAME_PX, FRAME_PX), (238, 238, 238))
    draw = ImageDraw.Draw(img)
    x = 44 + 6 * (step % 4)  # the circle's centre, 6 px further each frame, then back
    draw.ellipse((x - 11, 20, x + 11, 42), fill=(215, 35, 35))
    draw.rectangle((70, 70, 88, 88), fill=(35, 75, 215))  # square, half side 9
    draw.polygon([(28, 70), (16, 94), (40, 94)], fill=(235, 195, 20))  # triangle
    return img


@dataclass
class StepReport:
    """What one perception step did."""

    step: int
    question: str
    battery_pct: float
    budget_j: float
    floor_j: float
    energy_j: float
    visual_kept: int
    visual_in: int
    max_new_tokens: int
    stop_reason: str
    answer: str


class PerceptionLoop:
    """Ask the VLM about each frame under a budget scaled by the battery's state of charge.

    Args:
        runtime: The in-process joulecap runtime.
        battery: The battery to drain with each step's measured energy.
        floor_j: The budget at an empty battery (at least the runtime's stated minimum); raised
            to `floor_headroom` x the minimum of a refusal that states more.
        full_j: The budget at a full battery.
        questions: Asked in turn, one per step.
        policy: A budget-holding planning policy; None: the runtime's default.
        floor_headroom: The floor over a refusal's stated minimum.

    """

    def __init__(
        self,
        runtime: Runtime,
        battery: Battery,
        *,
        floor_j: float,
        full_j: float,
        questions: tuple[str, ...] = QUESTIONS,
        policy: str | None = None,
        floor_headroom: float = FLOOR_HEADROOM,
    ) -> None:
        self.runtime = runtime
        self.battery = battery
        self.floor_j = floor_j
        self.full_j = max(full_j, floor_j)
        self.questions = questions
        self.policy = policy
        self.floor_headroom = floor_headroom

    def budget_j(self) -> float:
        """This step's joule budget."""
        return self.floor_j + (self.full_j - self.floor_j) * self.battery.fraction

    def step(self, index: int, frame: Image.Image | np.ndarray) -> StepReport:
        """Run one frame through the runtime and account its energy against the battery."""
        question = self.questions[index % len(self.questions)]
        try:
            budget, result = self._ask(question, frame)
        except (BudgetTooSmall, EnvelopeExhausted) as exc:
            # Skipping a frame is the right reaction to an empty envelope: the robot keeps moving.
            pct, budget = 100 * self.battery.fraction, self.budget_j()
            return StepReport(
                index, question, pct, budget, self.floor_j, 0.0, 0, 0, 0, "skipped", str(exc)[:60]
            )
        self.battery.draw(result.energy.total_j)
        return StepReport(
            step=index,
            question=question,
            battery_pct=100 * self.battery.fraction,
            budget_j=budget,
            floor_j=self.floor_j,
            energy_j=result.energy.total_j,
            visual_kept=sum(result.plan.visual_keep),
            visual_in=result.generation.visual_tokens_in,
            max_new_tokens=result.plan.max_new_tokens,
            stop_reason=result.generation.stop_reason,
            answer=result.text.strip(),
        )

    def _ask(self, question: str, frame: Image.Image | np.ndarray) -> tuple[float, ChatResult]:
        """`(budget, result)` of one question, asked again once at a floor a refusal raised."""
        try:
            return self._chat(question, frame)
        except BudgetTooSmall as exc:
            # The floor is defined as headroom over the stated minimum, and the minimum moved
            # (a slower encode, a wider margin): follow it up, or skip if it did not move past it.
            if self.floor_headroom * exc.min_j <= self.floor_j:
                raise
            self.floor_j = self.floor_headroom * exc.min_j
            self.full_j = max(self.full_j, self.floor_j)
            return self._chat(question, frame)

    def _chat(self, question: str, frame: Image.Image | np.ndarray) -> tuple[float, ChatResult]:
        budget = self.budget_j()
        result = self.runtime.chat(
            question, images=[frame], energy_budget_j=budget, max_tokens=MAX_TOKENS, policy=self.policy
        )
        return budget, result


def derive_budgets(
    runtime: Runtime, frame: Image.Image, policy: str | None = None, warmup: int = 2
) -> tuple[float, float, float]:
    """`(floor_j, full_j, answer_j)` for the describe question about `frame`.

    A few unconstrained answers first let the online predictor see this machine as it is now
    (`answer_j` is their mean measured cost). Then one estimate with an ample budget gives the
    stated minimum (`floor_j` is `FLOOR_HEADROOM` x it) and the predicted cost of the whole answer (`full_j`):
    budgets between them bind.
    """
    costs = [
        runtime.chat(DESCRIBE, images=[frame], policy="baseline", max_tokens=MAX_TOKENS).energy.total_j
        for _ in range(warmup)
    ]
    request = runtime.build_request(
        DESCRIBE, [frame], energy_budget_j=AMPLE_J, max_tokens=MAX_TOKENS, policy=policy
    )
    _, plan, refusal = runtime.estimate(request)
    if plan is None or plan.min_j is None:
        raise RuntimeError(f"no plan with a stated minimum ({refusal}): use a budget-holding policy")
    floor_j = FLOOR_HEADROOM * plan.min_j
    return floor_j, max(plan.predicted_j, floor_j), sum(costs) / len(costs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hz", type=float, default=2.0, help="Frames per second the loop aims for.")
    parser.add_argument("--model", default=None, help="Model directory (default: the demo model).")
    parser.add_argument(
        "--battery-steps",
        type=float,
        default=4.0,
        help="Battery capacity in unconstrained answers' joules (small, so the demo drains it).",
    )
    parser.add_argument(
        "--policy",
        default=None,
        choices=["answers_first", "output_budget", "joint"],
        help="Planning policy (default: the runtime's, answers_first).",
    )
    parser.add_argument("--envelope-w", type=float, default=None, help="Power envelope refill rate (off).")
    parser.add_argument("--envelope-j", type=float, default=None, help="Power envelope capacity.")
    parser.add_argument("--ledger", default=":memory:", help="Ledger path (default: not kept).")
    args = parser.parse_args(argv)

    base = JoulecapConfig()
    config = replace(
        base,
        engine=replace(base.engine, model=args.model),
        envelope=replace(base.envelope, power_envelope_w=args.envelope_w, power_envelope_j=args.envelope_j),
        paths=replace(base.paths, ledger_path=args.ledger),
    )
    with Runtime(config) as runtime:
        floor_j, full_j, answer_j = derive_budgets(runtime, camera_frame(0), args.policy)
        capacity_j = args.battery_steps * answer_j
        battery = Battery(capacity_j=capacity_j, level_j=capacity_j)
        print(
            f"unconstrained answer: {answer_j:.3f} J measured; budget per step from {full_j:.3f} J "
            f"(the whole answer, predicted) at a full battery to {floor_j:.3f} J "
            f"({FLOOR_HEADROOM:g} x the stated minimum) at an empty one; battery {capacity_j:.3f} J"
        )
        loop = PerceptionLoop(runtime, battery, floor_j=floor_j, full_j=full_j, policy=args.policy)
        print(
            f"{'step':>4} {'batt%':>6} {'budget_J':>9} {'used_J':>8} {'visual':>7} {'max_new':>7} "
            f"{'stop':>13}  question -> answer"
        )
        period_s = 1.0 / args.hz
        for i in range(args.steps):
            t0 = time.monotonic()
            floor_before_j = loop.floor_j
            r = loop.step(i, camera_frame(i))
            if r.floor_j != floor_before_j:
                print(
                    f"floor now {r.floor_j:.3f} J ({loop.floor_headroom:g} x the minimum stated at step {i})"
                )
            visual = f"{r.visual_kept}/{r.visual_in}"
            print(
                f"{r.step:>4} {r.battery_pct:6.1f} {r.budget_j:9.3f} {r.energy_j:8.3f} {visual:>7} "
                f"{r.max_new_tokens:>7} {r.stop_reason:>13}  {r.question} -> {r.answer}"
            )
            time.sleep(max(0.0, period_s - (time.monotonic() - t0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
