"""What an image has cost recently: an upper estimate of a request's keep-all cost before its encode.

A policy that prunes only when the budget binds (`answers_first`) is asked before the images are
encoded whether it may prune (`Policy.prunes`): only then are the images decomposed, which costs
energy the answer then lacks. The scheduler answers with this estimate, built from the last
`WINDOW` prepared requests: the most visual tokens and the dearest measured encode an image has
had, the prompt's text at one token per UTF-8 byte plus a chat-template allowance (a tokenizer
never makes more tokens than bytes), and the predictor's run at the planning margin, all times
`SAFETY`. It errs high: a budget below it only costs the decomposition, a budget above it that
binds after all is planned without pruning on an engine that has no features (vLLM's native
path) and with features computed on demand otherwise.
"""

from __future__ import annotations

import threading
from collections import deque

from joulecap.runtime.types import CostModel, PreparedRequest, Request

WINDOW = 64
"""Prepared requests remembered (the estimate follows a change of image sizes or machine load)."""
SAFETY = 2.0
"""Factor on the whole estimate: a budget must clear twice the dearest recent keep-all cost."""
TEMPLATE_TOKENS = 64
"""Allowance for the chat template's own tokens (role markers, image delimiters)."""


class ImageCosts:
    """Recent per-image visual tokens and encode energy, and the keep-all bound built on them."""

    def __init__(self) -> None:
        self._seen: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self._lock = threading.Lock()

    def observe(self, prepared: PreparedRequest) -> None:
        """Remember a prepared request's per-image tokens and its measured encode per image."""
        images = len(prepared.visual_tokens)
        if images == 0 or prepared.encode is None:
            return
        per_image_j = prepared.encode_j / images
        with self._lock:
            for n in prepared.visual_tokens:
                self._seen.append((int(n), per_image_j))

    def keep_all_bound_j(
        self, request: Request, predictor: CostModel, output_tokens: int, margin: float
    ) -> float | None:
        """Upper estimate of `request` with every visual token and `output_tokens` (None: no history)."""
        images = len(request.images)
        with self._lock:
            seen = list(self._seen)
        if images and not seen:
            return None
        visual = images * max((n for n, _ in seen), default=0)
        encode_j = images * max((j for _, j in seen), default=0.0)
        text = TEMPLATE_TOKENS + sum(len(m.text.encode("utf-8")) for m in request.messages)
        run_j = predictor.predict(text, visual, output_tokens).total_j * (1.0 + max(0.0, margin))
        return SAFETY * (encode_j + run_j)
