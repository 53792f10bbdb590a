"""The start-up warm-up request: what a real first request looks like, built through the real path."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from joulecap.runtime.requests import RequestLimits, RequestOptions, build_request, prompt_messages
from joulecap.runtime.types import Request

WARMUP_IMAGE_PX = 384
"""Side of the warm-up image: larger than the processors' tile size, so resizing and splitting run."""


def warmup_request(limits: RequestLimits, policy: str) -> Request:
    """A camera-like PNG (decoded like a client's), a short question, a budget the governor polls."""
    rng = np.random.default_rng(0)
    side = min(WARMUP_IMAGE_PX, math.isqrt(limits.images.max_pixels))  # within the server's own limit
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    messages, images = prompt_messages("What is in the picture?", [buf.getvalue()], limits)
    # A budget large enough never to bind, so that the governor reads the meter at every token.
    options = RequestOptions(max_tokens=4, energy_budget_j=min(1e4, limits.budget_max_j), policy=policy)
    return build_request(messages, images, options, limits)
