"""Access control: API key, loopback bind, confined local files, no remote fetches, quiet logs."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from _factories import free_port, serve_cmd
from PIL import Image

from joulecap.runtime import keys as api_keys
from joulecap.runtime.api.app import create_app
from joulecap.runtime.api.server import BackgroundServer
from joulecap.runtime.runtime import Runtime
from joulecap.runtime.server_config import ServerConfig

KEY = "sk-test-4f1c9a77e2"


@pytest.fixture
def serve(config_factory: Any) -> Iterator[Any]:
    """Start `(server, runtime)` over the tiny model with config section overrides."""
    opened: list[tuple[BackgroundServer, Runtime]] = []

    def start(**sections: dict[str, Any]) -> tuple[BackgroundServer, Runtime]:
        energy = {"idle_baseline_s": 0.0, **sections.pop("energy", {})}
        runtime = Runtime(config_factory(energy=energy, **sections))
        server = BackgroundServer(create_app(runtime)).start()
        opened.append((server, runtime))
        return server, runtime

    yield start
    for server, runtime in opened:
        server.stop()
        runtime.close()


GOOD = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _chat(
    server: BackgroundServer, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        server.base_url + "/v1/chat/completions", json=body or GOOD, headers=headers or {}, timeout=60
    )


# ---------------------------------------------------------------------------------------- API key
def _assert_401(resp: httpx.Response, schema: dict[str, Any]) -> None:
    assert resp.status_code == 401, resp.text
    jsonschema.validate(resp.json(), schema)
    assert resp.json()["error"]["type"] == "authentication_error"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_api_key_gates_everything_but_health(serve: Any, openai_schemas: dict[str, Any]) -> None:
    server, runtime = serve(server={"api_key": KEY})
    schema = openai_schemas["error"]
    _assert_401(_chat(server), schema)
    _assert_401(_chat(server, headers={"Authorization": "Bearer wrong"}), schema)
    _assert_401(_chat(server, headers={"Authorization": f"Bearer {KEY}x"}), schema)
    _assert_401(_chat(server, headers={"Authorization": f"Bearer {KEY[:-1]}"}), schema)
    _assert_401(_chat(server, headers={"Authorization": f"Basic {KEY}"}), schema)
    for path in ("/v1/models", "/metrics", "/v1/energy/ledger", "/v1/energy/profile", "/openapi.json"):
        _assert_401(httpx.get(server.base_url + path), schema)
    # Nothing ran for the refused requests.
    assert runtime.ledger.count() == 0

    assert httpx.get(server.base_url + "/health").status_code == 200
    assert _chat(server, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert _chat(server, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert _chat(server, headers={"X-API-Key": KEY}).status_code == 200
    assert runtime.ledger.count() == 3

    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    answered = good.chat.completions.create(**GOOD)  # type: ignore[call-overload]
    assert answered.usage is not None and answered.usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**GOOD)  # type: ignore[call-overload]


def test_api_key_from_environment(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from joulecap.runtime.cli import SERVE, build_parser, config_from

    monkeypatch.setenv("JOULECAP_API_KEY", KEY)  # read where every option's variable is: the CLI's config
    server, _ = serve(
        server={"api_key": config_from(build_parser().parse_args(["serve"]), SERVE).server.api_key}
    )
    assert _chat(server).status_code == 401
    assert _chat(server, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_no_key_configured_means_open(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOULECAP_API_KEY", raising=False)
    server, _ = serve()
    assert _chat(server).status_code == 200
    assert _chat(server, headers={"Authorization": "Bearer anything"}).status_code == 200


def test_key_comparison_goes_through_compare_digest_for_every_attempt(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Behaviour, not source reading: every presented key (right, wrong, prefix, longer,
    # non-ASCII) reaches hmac.compare_digest with the configured key, and only the right one passes.
    calls: list[tuple[bytes, bytes]] = []
    real = api_keys.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    server, _ = serve(server={"api_key": KEY})
    attempts = {
        KEY: 200,
        KEY[:8]: 401,
        KEY + "0": 401,
        "x" * len(KEY): 401,
        "ключ": 401,
    }
    for presented, status in attempts.items():
        headers = [(b"authorization", b"Bearer " + presented.encode())]
        resp = httpx.post(server.base_url + "/v1/chat/completions", json=GOOD, headers=headers, timeout=60)
        assert resp.status_code == status, (presented, resp.text)
    presented_bytes = [a for a, _ in calls]
    assert presented_bytes == [p.encode() for p in attempts]
    assert all(b == KEY.encode() for _, b in calls)


def test_default_bind_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from joulecap.runtime.cli import SERVE, build_parser, config_from

    assert ServerConfig().host == "127.0.0.1"
    monkeypatch.delenv("JOULECAP_HOST", raising=False)
    monkeypatch.delenv("JOULECAP_PORT", raising=False)
    args = build_parser().parse_args(["serve"])
    assert config_from(args, SERVE).server.host == "127.0.0.1"
    assert config_from(args, SERVE).server.allow_remote_images is False
    assert config_from(args, SERVE).server.allow_local_files is None


def test_cli_api_key_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from joulecap.runtime.cli import SERVE, build_parser, config_from

    monkeypatch.delenv("JOULECAP_API_KEY", raising=False)
    assert config_from(build_parser().parse_args(["serve"]), SERVE).server.api_key is None
    args = build_parser().parse_args(["serve", "--api-key", KEY])
    assert config_from(args, SERVE).server.api_key == KEY
    monkeypatch.setenv("JOULECAP_API_KEY", KEY)
    assert config_from(build_parser().parse_args(["serve"]), SERVE).server.api_key == KEY


# ---------------------------------------------------------------------------------------- local files
def _png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", (48, 48), color).save(path, format="PNG")
    return path


def _image_body(url: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 1}


@pytest.fixture
def file_tree(tmp_path: Path) -> dict[str, Path]:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    evil = tmp_path / "allowed_evil"  # shares the allowed dir's name as a string prefix
    evil.mkdir()
    tree = {
        "allowed": allowed,
        "ok": _png(allowed / "ok.png"),
        "nested": _png(allowed / "sub" / "nested.png"),
        "secret": _png(tmp_path / "secret.png", (0, 0, 0)),
        "evil": _png(evil / "secret.png", (0, 0, 0)),
    }
    (allowed / "escape.png").symlink_to(tree["secret"])
    (allowed / "escape_dir").symlink_to(tmp_path)
    (allowed / "inside_link.png").symlink_to(allowed / "ok.png")
    (allowed / "loop_a").symlink_to(allowed / "loop_b")
    (allowed / "loop_b").symlink_to(allowed / "loop_a")
    os.mkfifo(allowed / "fifo.png")  # reading it would block forever
    (allowed / "not_an_image.png").write_bytes(b"hello, not a PNG")
    return tree


def test_local_files_only_from_the_allowed_dir(serve: Any, file_tree: dict[str, Path]) -> None:
    allowed = file_tree["allowed"]
    server, runtime = serve(server={"allow_local_files": str(allowed)})
    accepted = [
        "ok.png",
        "sub/nested.png",
        "sub/../ok.png",
        str(file_tree["ok"]),
        f"file://{file_tree['ok']}",
    ]
    accepted += ["inside_link.png"]
    refused = {
        "../secret.png": "path_not_allowed",
        "sub/../../secret.png": "path_not_allowed",
        str(file_tree["secret"]): "path_not_allowed",
        f"file://{file_tree['secret']}": "path_not_allowed",
        f"file://localhost{file_tree['secret']}": "path_not_allowed",
        "file://" + str(allowed) + "/%2e%2e/secret.png": "path_not_allowed",
        str(file_tree["evil"]): "path_not_allowed",
        "../allowed_evil/secret.png": "path_not_allowed",
        "escape.png": "path_not_allowed",
        "escape_dir/secret.png": "path_not_allowed",
        "/etc/passwd": "path_not_allowed",
        "loop_a": "path_not_allowed",
        "ok\x00.png": "path_not_allowed",
        "missing.png": "not_found",
        "sub": "not_found",
        "fifo.png": "not_found",
        "not_an_image.png": "invalid_image",
    }
    for url in accepted:
        resp = httpx.post(server.base_url + "/v1/chat/completions", json=_image_body(url), timeout=60)
        assert resp.status_code == 200, (url, resp.text)
    for url, code in refused.items():
        resp = httpx.post(server.base_url + "/v1/chat/completions", json=_image_body(url), timeout=60)
        assert resp.status_code == 400, (url, resp.text)
        assert resp.json()["error"]["code"] == code, (url, resp.json())
        assert str(file_tree["secret"]) not in resp.text
    assert runtime.ledger.count() == len(accepted)


def test_local_files_refused_when_no_dir_is_allowed(serve: Any, file_tree: dict[str, Path]) -> None:
    server, _ = serve()
    for url in (str(file_tree["ok"]), f"file://{file_tree['ok']}", "ok.png"):
        resp = httpx.post(server.base_url + "/v1/chat/completions", json=_image_body(url), timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "local_files_disabled"


# ---------------------------------------------------------------------------------------- remote
class _Listener:
    """A loopback TCP listener that counts the connections it gets (it must get none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_remote_image_urls_refused_without_any_connection(serve: Any) -> None:
    server, _ = serve()
    listener = _Listener()
    try:
        for url in (
            f"http://127.0.0.1:{listener.port}/cat.png",
            f"https://127.0.0.1:{listener.port}/cat.png",
            f"HTTP://127.0.0.1:{listener.port}/cat.png",
        ):
            resp = httpx.post(server.base_url + "/v1/chat/completions", json=_image_body(url), timeout=60)
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "remote_images_disabled"
        for url in (f"ftp://127.0.0.1:{listener.port}/cat.png", f"gopher://127.0.0.1:{listener.port}/x"):
            resp = httpx.post(server.base_url + "/v1/chat/completions", json=_image_body(url), timeout=60)
            assert resp.status_code == 400, resp.text
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()


# ---------------------------------------------------------------------------------------- logs


def test_default_log_level_leaks_no_content_or_keys(tiny_idefics3: Path, tmp_path: Path) -> None:
    """A real `joulecap serve` at its default log level: its whole stderr has no prompt or key."""
    port = free_port()
    cmd = serve_cmd(tiny_idefics3, tmp_path, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULECAP_")}
    env.update(HF_HUB_OFFLINE="1", JOULECAP_API_KEY=KEY, JOULECAP_CACHE_DIR=str(tmp_path / "cache"))
    # uvicorn's access log goes to stdout, everything else to stderr: read both, as one.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    canary = "PROMPT-CANARY-7f3e"
    wrong_key = "sk-WRONG-CANARY-91ab"
    auth = {"Authorization": f"Bearer {KEY}"}
    url = base + "/v1/chat/completions"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        body = {**GOOD, "messages": [{"role": "user", "content": f"my secret is {canary}"}]}
        assert httpx.post(url, json=body, headers=auth, timeout=60).status_code == 200
        stream = {**body, "stream": True}
        assert httpx.post(url, json=stream, headers=auth, timeout=60).status_code == 200
        bad_budget = {**auth, "X-Energy-Budget-J": canary}
        assert httpx.post(url, json=body, headers=bad_budget).status_code == 400
        bad_image = _image_body(f"file:///{canary}.png")
        assert httpx.post(url, json=bad_image, headers=auth).status_code == 400
        long_prompt = {**GOOD, "messages": [{"role": "user", "content": (canary + " ") * 3000}]}
        assert httpx.post(url, json=long_prompt, headers=auth).status_code == 400
        wrong = {"Authorization": f"Bearer {wrong_key}"}
        assert httpx.post(url, json=body, headers=wrong).status_code == 401
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    log_text = out.decode(errors="replace")
    assert "POST /v1/chat/completions" in log_text  # the access log is on: it just carries no content
    for secret in (canary, KEY, wrong_key):
        assert secret not in log_text, secret
