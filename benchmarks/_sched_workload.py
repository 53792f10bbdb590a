"""The scheduler benchmark's workload: varied images, prompts, output caps and budget scales."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

PROMPTS = (
    "What is in the image?",
    "Describe the scene in detail, listing every object with its colour and position.",
    "Is there a red block on the left? Answer yes or no.",
    "Count the shapes.",
    "The robot must pick up the largest object in view. Explain which one it is, where it is, "
    "how the gripper should approach it and what could go wrong during the grasp.",
    "Summarise the picture in one sentence.",
)

BUDGET_SCALES = (0.1, 2.0)
"""Default range of budget / unconstrained cost (drawn log-uniformly): from well below the
cheapest answer (about 0.3-0.5 of the unconstrained cost here) to above the unconstrained cost."""


@dataclass(frozen=True)
class Item:
    """One workload request."""

    seed: int
    image_px: int
    prompt: str
    max_tokens: int
    budget_scale: float


def make_image(px: int, seed: int) -> Image.Image:
    """A random scene: a background gradient and a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:px, 0:px]
    base = rng.integers(0, 255, 3)
    img = np.stack(
        [(x * 255 // px + base[0]) % 256, (y * 255 // px + base[1]) % 256, np.full_like(x, base[2])], -1
    )
    for _ in range(int(rng.integers(1, 6))):
        w, h = rng.integers(px // 8, px // 2, 2)
        x0, y0 = rng.integers(0, px - w), rng.integers(0, px - h)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def workload(n: int, seed: int, scales: tuple[float, float] = BUDGET_SCALES) -> list[Item]:
    """`n` varied requests; each budget is later `budget_scale` x the request's unconstrained cost."""
    lo, hi = scales
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < low <= high budget scale, got {lo}, {hi}")
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        items.append(
            Item(
                seed=seed * 100_000 + i,
                image_px=int(rng.choice([48, 96, 160, 256, 384])),
                prompt=str(rng.choice(PROMPTS)),
                max_tokens=int(rng.choice([4, 8, 16, 24])),
                budget_scale=float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
            )
        )
    return items
