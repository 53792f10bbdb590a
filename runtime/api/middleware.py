"""ASGI middleware: API keys, per-key joule quotas and the request-body size limit (OpenAI errors).

Keys come from a `KeyStore` (`--api-keys FILE` and/or `--api-key`). An authenticated request
carries its key's NAME to the handlers in `scope["state"]["key_name"]` (FastAPI:
`request.state.key_name`); the key itself goes no further than this module.

A key whose daily quota is spent gets 429 with `Retry-After` on the endpoints that spend
energy (`QUOTA_PATHS`); it can still read `/v1/models`, `/metrics` and the ledger.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from joulecap.runtime.errors import JoulecapError, PayloadTooLarge, Unauthorized
from joulecap.runtime.keys import ApiKey, KeyStore
from joulecap.runtime.quota import QuotaBook, QuotaExceeded

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.metrics import Metrics

Scope = dict[str, Any]
Receive = Any
Send = Any

OPEN_PATHS = frozenset({"/health"})
"""Paths served without an API key (liveness probes)."""

QUOTA_PATHS = frozenset({"/v1/chat/completions", "/chat", "/v1/energy/estimate"})
"""Paths refused once a key's quota is spent: they run the model (the estimate runs the encoder)."""

ENERGY_USED_HEADER = b"x-energy-used-j"


async def send_error(send: Send, error: JoulecapError) -> None:
    """Send `error` as a complete JSON response."""
    body = json.dumps(error.to_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Refuse unauthenticated requests (401), spent quotas (429) and bodies over `max_body_bytes` (413).

    Args:
        app: The ASGI app to guard.
        api_key: The single `--api-key` (used when `keys` is None).
        max_body_bytes: Largest request body.
        keys: The key store (`--api-keys` and `--api-key`); None builds one from `api_key`.
        quotas: The quota book; None builds one over `keys`' quotas.
        metrics: Where per-key energy and refusals are counted, if anywhere.
        charge_from_headers: Charge each response's `X-Energy-Used-J` to its key. On by
            default; a runtime that charges the book itself (streams and failed requests
            included) turns it off so nothing is counted twice.

    """

    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None = None,
        max_body_bytes: int,
        keys: KeyStore | None = None,
        quotas: QuotaBook | None = None,
        metrics: Metrics | None = None,
        charge_from_headers: bool = True,
    ) -> None:
        self.app = app
        self.keys = keys if keys is not None else KeyStore(single_key=api_key)
        self.quotas = quotas if quotas is not None else QuotaBook(self.keys.quota_j)
        self.metrics = metrics
        self.charge_from_headers = charge_from_headers
        self.max_body_bytes = max_body_bytes

    def _authenticate(self, scope: Scope) -> tuple[bool, ApiKey | None]:
        if not self.keys.enabled or scope["path"] in OPEN_PATHS:
            return True, None
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        key = self.keys.lookup(token)
        return key is not None, key

    def _quota_error(self, key: ApiKey, scope: Scope) -> QuotaExceeded | None:
        if scope["path"] not in QUOTA_PATHS or not self.quotas.exhausted(key.name):
            return None
        quota = self.keys.quota_j(key.name) or 0.0
        if self.metrics is not None:
            self.metrics.ops.observe_quota_refusal(key.name)
        return QuotaExceeded(key.name, quota, self.quotas.spent_j(key.name), self.quotas.retry_after_s())

    def _charging_send(self, send: Send, key: ApiKey) -> Send:
        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers") or []:
                    if name.lower() == ENERGY_USED_HEADER:
                        try:
                            joules = float(value)
                        except ValueError:
                            break
                        if math.isfinite(joules):
                            self.quotas.charge(key.name, joules)
                            if self.metrics is not None:
                                self.metrics.ops.observe_key_energy(key.name, joules)
                        break
            await send(message)

        return wrapped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key, its quota and the body size, then pass the request on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ok, key = self._authenticate(scope)
        if not ok:
            await send_error(
                send,
                Unauthorized(
                    "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
            return
        if key is not None:
            refused = self._quota_error(key, scope)
            if refused is not None:
                await send_error(send, refused)
                return
            scope.setdefault("state", {})["key_name"] = key.name
            if self.charge_from_headers:
                send = self._charging_send(send, key)
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
