"""ASGI middleware: API-key check and request-body size limit, both answering OpenAI errors."""

from __future__ import annotations

import hmac
import json
from typing import Any

from joulecap.runtime.errors import JoulecapError, PayloadTooLarge, Unauthorized

Scope = dict[str, Any]
Receive = Any
Send = Any

OPEN_PATHS = frozenset({"/health"})
"""Paths served without an API key (liveness probes)."""


async def send_error(send: Send, error: JoulecapError) -> None:
    """Send `error` as a complete JSON response."""
    body = json.dumps(error.to_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Refuse unauthenticated requests (401) and bodies over `max_body_bytes` (413).

    The key is compared in constant time; `/health` stays open.
    """

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(token, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key and the body size, then pass the request on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await send_error(
                send,
                Unauthorized(
                    "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
            return
        too_large = PayloadTooLarge(
            f"Request body exceeds {self.max_body_bytes} bytes (server option --max-body-bytes).",
            code="body_too_large",
        )
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await send_error(send, too_large)
            return
        # Read the whole body here, bounded: a chunked upload without Content-Length is refused
        # with 413 as soon as it passes the limit, before any handler (whose body parser would
        # turn a mid-read error into a 400) sees it. Handlers need the full JSON body anyway.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay_receive() -> Any:
            # The buffered body once, then the real channel (streaming handlers watch it for
            # http.disconnect to stop generation when the client goes away).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)
