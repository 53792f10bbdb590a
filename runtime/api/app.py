"""FastAPI app factory: OpenAI-style chat completions with joule budgets, plus energy endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from joulecap.runtime.api import responses
from joulecap.runtime.api.middleware import GuardMiddleware
from joulecap.runtime.api.schema import BUDGET_HEADER, ChatCompletionRequest, to_request
from joulecap.runtime.errors import (
    BudgetTooSmall,
    EngineError,
    InvalidRequest,
    JoulecapError,
    ModelNotFound,
    RequestTimeout,
)
from joulecap.runtime.operations import guard_options
from joulecap.runtime.runtime import Runtime
from joulecap.runtime.types import ChatResult, Plan, PreparedRequest, Request, RequestStatus

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks whether its client is still connected."""


def _error_response(error: JoulecapError) -> JSONResponse:
    headers = dict(error.headers)
    if isinstance(error, BudgetTooSmall):
        headers["X-Energy-Min-J"] = f"{error.min_j:.6f}"
    return JSONResponse(error.to_body(), status_code=error.http_status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "Request body is not valid JSON.", None
    param = ".".join(loc) or None
    return f"Invalid value for {param or 'body'}: {first.get('msg', 'invalid')}.", param


def create_app(runtime: Runtime) -> FastAPI:
    """Build the HTTP app around a running `Runtime` (which the caller owns and closes)."""
    server = runtime.config.server
    app = FastAPI(
        title="joulecap",
        version="0.1.0",
        description="Energy-aware VLM serving: OpenAI chat completions under a joule budget.",
    )
    app.state.runtime = runtime
    model_name = runtime.info.model

    @app.exception_handler(JoulecapError)
    async def _joulecap_error(_req: HttpRequest, exc: JoulecapError) -> JSONResponse:
        runtime.metrics.observe_error(exc.http_status)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return await _joulecap_error(_req, InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        error = JoulecapError(str(exc.detail), code=str(exc.status_code), headers=dict(exc.headers or {}))
        error.http_status = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_req: HttpRequest, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        runtime.metrics.observe_error(500)
        return _error_response(JoulecapError(f"Internal error: {type(exc).__name__}"))

    async def _await(future: Any, deadline_s: float, cancelled: threading.Event | None = None) -> Any:
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), max(0.0, deadline_s - time.monotonic())
            )
        except asyncio.TimeoutError as exc:
            if cancelled is not None:
                cancelled.set()
            future.cancel()
            raise RequestTimeout(
                f"Request exceeded {server.request_timeout_s:g} s (server option --request-timeout-s)."
            ) from exc

    def _to_request(body: ChatCompletionRequest, http: HttpRequest) -> Request:
        if body.model not in (model_name, "default"):
            raise ModelNotFound(
                f"The model '{body.model}' does not exist; this server serves '{model_name}' "
                "(or use 'default').",
                param="model",
                code="model_not_found",
            )
        request = to_request(body, header_budget=http.headers.get(BUDGET_HEADER), limits=runtime.limits)
        # The guard middleware names the API key (never the key itself) for the ledger and quotas.
        return dataclasses.replace(request, key_name=getattr(http.state, "key_name", None))

    async def _to_request_off_loop(body: ChatCompletionRequest, http: HttpRequest) -> Request:
        # Decoding a large image takes a while: off the event loop, so /health and other
        # requests stay responsive while it runs. Text alone is validated in place (a thread hop
        # would cost more than the work).
        if not any(isinstance(m.content, list) and len(m.content) > 0 for m in body.messages):
            return _to_request(body, http)
        return await asyncio.to_thread(_to_request, body, http)

    def _abandon_late(future: Any, status: RequestStatus, reason: str) -> None:
        # A plan that finishes after its client left has spent its encode: record it.
        def done(f: Any) -> None:
            if not f.cancelled() and f.exception() is None:
                prepared, plan = f.result()
                runtime.abandon(prepared, plan, status, reason)

        future.add_done_callback(done)

    async def _plan(request: Request, deadline_s: float) -> tuple[PreparedRequest, Plan]:
        future = runtime.submit(runtime.plan, request)
        try:
            return await _await(future, deadline_s)
        except (RequestTimeout, asyncio.CancelledError):
            _abandon_late(future, "aborted", "timed out or disconnected before running")
            raise

    def _submit_run(prepared: PreparedRequest, plan: Plan, **kw: Any) -> Any:
        try:
            return runtime.submit(runtime.run_planned, prepared, plan, **kw)
        except JoulecapError as exc:  # 503: the encode is spent, the run never queued
            runtime.abandon(prepared, plan, "refused", f"{type(exc).__name__}: {exc.message}")
            raise

    def _cancel_run(future: Any, prepared: PreparedRequest, plan: Plan, reason: str) -> None:
        if future.cancel():  # still queued: it never runs, but its encode was spent
            runtime.abandon(prepared, plan, "aborted", reason)

    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest) -> Response:
        deadline_s = time.monotonic() + server.request_timeout_s
        request = await _to_request_off_loop(body, http)
        if request.stream:
            prepared, plan = await _plan(request, deadline_s)
            return StreamingResponse(
                _stream(prepared, plan, deadline_s),
                media_type="text/event-stream",
                headers={"X-Energy-Predicted-J": f"{plan.predicted_j:.6f}", "Cache-Control": "no-cache"},
            )
        # Plan and run as one job on the engine pool: one thread hop, and a request still queued
        # when its client leaves or its time runs out is dropped before it spends anything.
        cancelled = threading.Event()
        future = runtime.submit(runtime.execute, request, cancelled=cancelled)
        watcher = asyncio.create_task(_cancel_on_disconnect(http, future, cancelled))
        try:
            result: ChatResult = await _await(future, deadline_s, cancelled)
        finally:
            watcher.cancel()
        return JSONResponse(responses.completion_body(result), headers=responses.energy_headers(result))

    async def _cancel_on_disconnect(http: HttpRequest, future: Any, cancelled: threading.Event) -> None:
        # A client that hangs up (or gives up on its own timeout) before the answer stops the
        # generation: nobody would read it, so spending more joules on it is waste. The energy
        # spent so far is still recorded (as an aborted request).
        while not future.done():
            if await http.is_disconnected():
                cancelled.set()
                future.cancel()  # still queued: it never runs, nothing was spent
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    async def _stream(prepared: PreparedRequest, plan: Plan, deadline_s: float) -> AsyncIterator[str]:
        request = prepared.request
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        cancelled = threading.Event()

        def on_token(_token_id: int, text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        future = _submit_run(prepared, plan, on_token=on_token, cancelled=cancelled)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, None))

        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def chunk(**kw: Any) -> str:
            return event(responses.chunk_body(request.request_id, model_name, request.created_s, **kw))

        try:
            yield chunk(delta={"role": "assistant", "content": ""})
            while True:
                remaining = deadline_s - time.monotonic()
                try:
                    text = await asyncio.wait_for(queue.get(), max(0.0, remaining))
                except asyncio.TimeoutError:
                    cancelled.set()
                    runtime.metrics.observe_error(RequestTimeout.http_status)
                    yield event(RequestTimeout("Request exceeded the server's request timeout.").to_body())
                    return
                if text is None:
                    break
                if text:
                    yield chunk(delta={"content": text})
            try:
                result: ChatResult = future.result()
            except Exception as exc:
                # Headers are gone: the error travels as an OpenAI error event in the stream.
                error = exc if isinstance(exc, JoulecapError) else EngineError(type(exc).__name__)
                if not isinstance(exc, JoulecapError):
                    log.error("stream of %s failed: %s", request.request_id, type(exc).__name__)
                runtime.metrics.observe_error(error.http_status)
                yield event(error.to_body())
                return
            finish = responses.FINISH_REASON[result.generation.stop_reason]
            yield chunk(delta={}, finish_reason=finish)
            yield chunk(result=result)
            yield "data: [DONE]\n\n"
        finally:
            # Client went away (or we timed out): stop decoding; the runtime still records
            # the energy spent so far in the ledger as an aborted request.
            if not future.done():
                cancelled.set()
                _cancel_run(future, prepared, plan, "client disconnected while queued")

    app.post("/v1/chat/completions", summary="Chat completion under a joule budget")(chat_completions)
    app.post("/chat", summary="Alias of /v1/chat/completions")(chat_completions)

    @app.post("/v1/energy/estimate", summary="Plan a request and predict its energy without running it")
    async def estimate(body: ChatCompletionRequest, http: HttpRequest) -> JSONResponse:
        deadline_s = time.monotonic() + server.request_timeout_s
        request = await _to_request_off_loop(body, http)
        prepared, plan, refusal = await _await(runtime.submit(runtime.estimate, request), deadline_s)
        return JSONResponse(responses.estimate_body(model_name, prepared, plan, refusal))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = runtime.info
        entry: dict[str, Any] = {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "joulecap",
            "joulecap": {
                "engine": info.engine,
                "family": info.family,
                "params_b": info.params_b,
                "device": info.device,
                "dtype": info.dtype,
                "context_length": info.context_length,
                "random_weights": info.random_weights,
                "meter": runtime.meter.name,
                "energy_source": runtime.meter.source,
            },
        }
        if info.random_weights:
            entry["joulecap"]["warning"] = "Demo model with RANDOM weights: its answers are meaningless."
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "meter": runtime.meter.name,
            "inflight": runtime.inflight,
            "ledger_path": runtime.paths.ledger_path,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = runtime.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/energy/ledger")
    async def ledger(
        since: float | None = Query(default=None, description="Unix time; rows created after it"),
        limit: int = Query(default=100, ge=1, le=10_000),
    ) -> dict[str, Any]:
        rows = await asyncio.to_thread(runtime.ledger.query, since, limit)
        return {"object": "list", "data": rows}

    @app.get("/v1/energy/profile")
    async def profile() -> dict[str, Any]:
        profile = runtime.profile
        return {
            "object": "energy.profile",
            "model": model_name,
            **runtime.predictor.stats(),
            "profile": {"how": profile.how, "detail": profile.detail, "note": profile.note or None},
            **runtime.learner.stats(),
            **runtime.operations.profile_status(*runtime.profile_keys()),
        }

    guard = guard_options(
        server, runtime.metrics, ledger_path=runtime.paths.ledger_path, operations=runtime.operations
    )
    app.add_middleware(GuardMiddleware, max_body_bytes=server.max_body_bytes, **guard)
    return app
