"""Run the HTTP app on a background thread: for robot stacks that also expose HTTP, and tests.

`joulecap serve` runs uvicorn in the foreground; a robot process that already owns its main
loop (or a test, or a benchmark) starts `BackgroundServer(create_app(runtime))` instead.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class BackgroundServer:
    """uvicorn serving an ASGI app from a daemon thread, on a socket bound before it starts.

    Binding first (port 0 picks a free port) means the port is known and held before the
    server thread runs, so two servers can never race for the same free port.

    Args:
        app: The ASGI app (usually `create_app(runtime)`).
        host: Address to bind; loopback by default.
        port: TCP port; 0 picks a free one.
        log_level: uvicorn's log level.
        start_timeout_s: Longest `start()` waits for uvicorn to accept connections.

    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        start_timeout_s: float = 30.0,
    ) -> None:
        import uvicorn

        self.host = host
        self.start_timeout_s = start_timeout_s
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="joulecap-http"
        )

    @property
    def base_url(self) -> str:
        """`http://host:port` of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Start serving; returns once uvicorn accepts connections.

        Raises:
            RuntimeError: uvicorn did not start within `start_timeout_s`.

        """
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask uvicorn to finish in-flight requests and exit, then wait for the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
