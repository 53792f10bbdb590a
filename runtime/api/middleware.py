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


class _BodyTooLarge(Exception):
    pass


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
                    "Missing or invalid API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key"
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
        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await send_error(send, too_large)
