"""Stated minimums the server keeps: a retry at the minimum a 422 (or an estimate) stated is accepted.

The feasibility rule prices a request with its own measured encode, and encodes vary from one
attempt to the next. Without memory, a client that retries at exactly the stated minimum could be
refused again because the second encode came out a little dearer. So the scheduler remembers the
minimum it stated for each request (by content: messages, images, policy and options) for a while,
and accepts a retry at it. The retry then holds its budget within the encode's noise.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from joulecap.runtime.types import ImagePart, Request

HOLD_S = 600.0
"""How long a stated minimum is held."""
MAX_HELD = 4096
"""Most minimums held (the oldest are forgotten first)."""


def fingerprint(request: Request) -> str:
    """What makes two requests the same for planning: messages, images, policy and options."""
    h = hashlib.blake2b(digest_size=16)
    for message in request.messages:
        h.update(message.role.encode())
        for part in message.parts:
            if isinstance(part, ImagePart):
                image = request.images[part.index]
                h.update(f"<image {image.size}>".encode())
                h.update(image.tobytes())
            else:
                h.update(part.text.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    h.update(repr((request.policy, request.max_tokens, request.tau)).encode())
    return h.hexdigest()


class Promises:
    """Minimums stated per request fingerprint, held for `hold_s` seconds.

    Args:
        hold_s: How long a stated minimum is held.
        max_held: Most minimums held.
        clock: Monotonic clock (injectable for tests).

    """

    def __init__(
        self, hold_s: float = HOLD_S, max_held: int = MAX_HELD, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hold_s = hold_s
        self.max_held = max_held
        self._clock = clock
        self._held: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def hold(self, request: Request, min_j: float) -> None:
        """Remember that `min_j` was stated for `request` (the lowest stated is kept)."""
        key = fingerprint(request)
        with self._lock:
            now = self._clock()
            old = self._held.pop(key, None)
            if old is not None and old[1] > now:
                min_j = min(min_j, old[0])
            self._held[key] = (min_j, now + self.hold_s)
            while len(self._held) > self.max_held:
                self._held.popitem(last=False)

    def get(self, request: Request) -> float | None:
        """The minimum stated for `request` and still held, if any."""
        if not self._held:
            return None
        key = fingerprint(request)
        with self._lock:
            entry = self._held.get(key)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._held[key]
                return None
            return entry[0]
