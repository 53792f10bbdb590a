"""Error types that carry their HTTP status and OpenAI error fields.

The in-process API raises these; the HTTP layer turns them into OpenAI-style error JSON
(`{"error": {"message", "type", "param", "code"}}`) with `http_status`.
"""

from __future__ import annotations


class JoulecapError(Exception):
    """Base error. Subclasses fix the HTTP status and OpenAI error type."""

    http_status: int = 500
    error_type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_body(self) -> dict[str, object]:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(JoulecapError):
    """Malformed or out-of-range input (400)."""

    http_status = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    """Body or image over a configured limit (413)."""

    http_status = 413


class Unauthorized(JoulecapError):
    """Missing or wrong API key (401)."""

    http_status = 401
    error_type = "authentication_error"


class ModelNotFound(JoulecapError):
    """The request names a model this server does not serve (404)."""

    http_status = 404
    error_type = "invalid_request_error"


class BudgetTooSmall(JoulecapError):
    """The budget cannot pay for even the smallest useful plan (422).

    Attributes:
        min_j: The smallest budget, in joules, that would be accepted for this request.

    """

    http_status = 422
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, min_j: float, param: str | None = "energy_budget_j") -> None:
        super().__init__(message, param=param, code="energy_budget_too_small")
        self.min_j = min_j


class EnvelopeExhausted(JoulecapError):
    """The shared power envelope cannot cover the request right now (429)."""

    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(
            message,
            code="power_envelope_exhausted",
            headers={"Retry-After": str(max(1, int(retry_after_s + 0.999)))},
        )
        self.retry_after_s = retry_after_s


class Overloaded(JoulecapError):
    """The request queue is full (503)."""

    http_status = 503
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(
            message, code="overloaded", headers={"Retry-After": str(max(1, int(retry_after_s + 0.999)))}
        )


class RequestTimeout(JoulecapError):
    """The request waited or ran longer than the configured timeout (504)."""

    http_status = 504
    error_type = "server_error"


class EngineError(JoulecapError):
    """The engine failed on this request (500); the server keeps serving."""

    http_status = 500
    error_type = "server_error"


class BasesNeeded(Exception):
    """A policy needs the decomposition a request was prepared without (`bases_pending`).

    Not an error a client sees: the runtime catches it, decomposes the images (measured as
    encode energy) and plans again.
    """
