"""The calibration sweep's grid, the request each point sends, and the sample a measured point gives."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from joulecap.runtime.types import ChatMessage, ImagePart, Request, TextPart

_WORDS = [
    "describe",
    "the",
    "scene",
    "carefully",
    "and",
    "list",
    "every",
    "object",
    "you",
    "can",
    "see",
    "with",
    "its",
    "colour",
    "position",
    "and",
    "size",
    "then",
    "say",
    "what",
    "the",
    "robot",
    "should",
    "do",
    "next",
    "and",
    "why",
]


@dataclass(frozen=True)
class SweepPoint:
    """One configuration of the sweep.

    Attributes:
        image_px: Side of the square test image in pixels (0 = no image).
        visual_frac: Fraction of the image's visual tokens kept, in [0, 1].
        text_words: Words in the prompt.
        out_tokens: Forced output length.
        rep: Repetition index.

    """

    image_px: int
    visual_frac: float
    text_words: int
    out_tokens: int
    rep: int

    @property
    def key(self) -> str:
        """Stable identifier used by the checkpoint."""
        return f"{self.image_px}|{self.visual_frac:.3f}|{self.text_words}|{self.out_tokens}|{self.rep}"


@dataclass(frozen=True)
class Sample:
    """One measured run (a line of the checkpoint)."""

    key: str
    image_px: int
    text_tokens: int
    visual_tokens: int
    visual_kept: int
    out_tokens: int
    energy_j: float
    duration_s: float
    source: str
    meter: str
    encode_j: float = 0.0
    """Energy of `Engine.prepare` (image preprocessing and vision encoder), measured apart: the
    runtime measures it before planning instead of predicting it, so `energy_j` excludes it."""

    @property
    def n_in(self) -> int:
        """Prompt tokens that entered the LM."""
        return self.text_tokens + self.visual_kept

    @property
    def power_w(self) -> float:
        """Mean power of the run."""
        return self.energy_j / self.duration_s if self.duration_s > 0 else math.nan


@dataclass(frozen=True)
class SweepSpec:
    """The grid of a sweep."""

    image_px: tuple[int, ...]
    visual_frac: tuple[float, ...]
    text_words: tuple[int, ...]
    out_tokens: tuple[int, ...]
    reps: int
    warmup: int

    def points(self) -> list[SweepPoint]:
        """All points, repetitions innermost-last so a partial sweep still covers the grid."""
        pts = []
        for rep in range(self.reps):
            for px in self.image_px:
                fracs = self.visual_frac if px else (0.0,)
                for frac in fracs:
                    for words in self.text_words:
                        for out in self.out_tokens:
                            pts.append(SweepPoint(px, frac, words, out, rep))
        return pts


QUICK = SweepSpec((64, 224), (0.0, 0.5, 1.0), (4, 80), (1, 12, 40), reps=1, warmup=2)
"""`--quick`: 36 runs, well under a minute for a tiny model on a CPU."""
FULL = SweepSpec((0, 64, 160, 384), (0.0, 0.25, 0.5, 1.0), (4, 60, 200), (1, 8, 32, 96), reps=3, warmup=3)
"""The default sweep: 3 repetitions of 156 configurations."""


def sweep_image(px: int, seed: int = 0) -> Image.Image:
    """A deterministic structured RGB image (gradient plus blocks) of side `px`."""
    rng = np.random.default_rng(seed + px)
    y, x = np.mgrid[0:px, 0:px]
    img = np.stack([(x * 255 // max(px - 1, 1)), (y * 255 // max(px - 1, 1)), np.full_like(x, 96)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(px - px // 4, 1), 2)
        img[y0 : y0 + px // 4, x0 : x0 + px // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def make_request(point: SweepPoint, request_id: str = "calibrate") -> Request:
    """The request of a sweep point."""
    text = " ".join(_WORDS[i % len(_WORDS)] for i in range(point.text_words))
    images = (sweep_image(point.image_px),) if point.image_px else ()
    parts: tuple[TextPart | ImagePart, ...] = (*(ImagePart(i) for i in range(len(images))), TextPart(text))
    return Request(
        request_id=request_id,
        messages=(ChatMessage("user", parts),),
        images=images,
        max_tokens=point.out_tokens,
    )
