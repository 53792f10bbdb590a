"""HTTP server configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front end, limits and access control."""

    host: str = "127.0.0.1"
    """Address to bind; loopback by default."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Require `Authorization: Bearer <key>`; also read from `JOULECAP_API_KEY`."""
    api_keys: str | None = None
    """Keys file: one `KEY NAME [DAILY_QUOTA_J]` per line, `#` comments; re-read on SIGHUP. Each
    key's NAME is recorded in the ledger and metrics; a key past its daily joule quota gets 429."""
    allow_local_files: str | None = None
    """Directory from which `file://` or plain-path images may be read; none by default."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs (off: they are refused with 400)."""
    max_body_bytes: int = 20_000_000
    """Largest request body accepted (413 above)."""
    max_image_pixels: int = 16_000_000
    """Largest decoded image, width x height (413 above; decompression-bomb guard)."""
    max_images: int = 8
    """Most images in one request."""
    max_tokens_limit: int = 4096
    """Largest `max_tokens` a client may ask for."""
    queue_limit: int = 64
    """Requests waiting for the engine before new ones get 503 with Retry-After."""
    request_timeout_s: float = 300.0
    """Longest a request may wait and run before it is aborted with 504."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_body_bytes", "max_image_pixels", "max_images", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0, got {self.queue_limit}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
