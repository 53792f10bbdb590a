"""Faults: a failing meter, a failing engine, disconnects, kill -9, interrupted writes, overload.

Everything real (uvicorn on 127.0.0.1, the tiny transformers model, SQLite); faults are injected
only at component boundaries: a meter object that stands in for absent hardware, a wrapper around
the real engine, a real client that hangs up, a real SIGKILL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _factories import REPO, free_port, serve_cmd

from joulecap.runtime.api.app import create_app
from joulecap.runtime.api.server import BackgroundServer
from joulecap.runtime.energy.base import Availability, MeterError, MeterReading
from joulecap.runtime.engines.base import RunHooks
from joulecap.runtime.engines.factory import create_engine
from joulecap.runtime.runtime import Runtime
from joulecap.runtime.types import GenerationResult, Plan, PreparedRequest, Request


# ---------------------------------------------------------------------------------------- boundaries
class FakeCounterMeter:
    """Stands in for an absent hardware energy counter (a steady 20 W device), with a fault switch.

    `failing` makes every read raise `MeterError`, as a vanished sensor would.
    """

    name = "fakehw:0"
    source = "measured"
    update_period_s = 0.0

    def __init__(self, power_w: float = 20.0) -> None:
        self.power_w = power_w
        self.failing = threading.Event()
        self.t0 = time.monotonic()

    def is_available(self) -> Availability:
        return Availability.yes("test double")

    def read(self) -> MeterReading:
        if self.failing.is_set():
            raise MeterError("sensor vanished (injected)")
        t = time.monotonic()
        return MeterReading(t_s=t, energy_j=self.power_w * (t - self.t0))

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "source": self.source}

    def close(self) -> None:
        pass


def _prompt_text(request: Request) -> str:
    return " ".join(m.text for m in request.messages)


class FaultyEngine:
    """The real engine behind a wrapper at the `Engine` boundary.

    Args:
        inner: The real engine.
        token_delay_s: Sleep after each token (makes a request last long enough to interfere with).
        fail_marker: A request whose prompt contains it raises after its first token.
        on_token_n: Called with the token count after each token (fault scripts).

    """

    def __init__(
        self,
        inner: Any,
        *,
        token_delay_s: float = 0.0,
        fail_marker: str = "BOOM",
        on_token_n: Callable[[int], None] | None = None,
    ) -> None:
        self.inner = inner
        self.info = inner.info
        self.max_concurrency = getattr(inner, "max_concurrency", 1)
        self.token_delay_s = token_delay_s
        self.fail_marker = fail_marker
        self.on_token_n = on_token_n
        self.runs = 0

    def prepare(self, request: Request, *, bases: bool = True) -> PreparedRequest:
        return self.inner.prepare(request, bases=bases)

    def run(self, prepared: PreparedRequest, plan: Plan, hooks: RunHooks) -> GenerationResult:
        self.runs += 1
        fail = self.fail_marker in _prompt_text(prepared.request)
        count = 0
        inner_on_token = hooks.on_token

        def on_token(token_id: int, text: str) -> None:
            nonlocal count
            count += 1
            if fail:
                raise RuntimeError("injected engine fault")
            if self.on_token_n is not None:
                self.on_token_n(count)
            if inner_on_token is not None:
                inner_on_token(token_id, text)
            if self.token_delay_s:
                time.sleep(self.token_delay_s)

        return self.inner.run(prepared, plan, dataclasses.replace(hooks, on_token=on_token))

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def serve(config_factory: Any) -> Iterator[Callable[..., tuple[BackgroundServer, Runtime, Any]]]:
    """Start `(server, runtime, engine)` over the tiny model; `engine_wrap` wraps the real engine."""
    opened: list[tuple[BackgroundServer, Runtime]] = []

    def start(
        *,
        engine_wrap: Callable[[Any], Any] | None = None,
        meter: Any = None,
        **sections: dict[str, Any],
    ) -> tuple[BackgroundServer, Runtime, Any]:
        energy = {"idle_baseline_s": 0.0, **sections.pop("energy", {})}
        cfg = config_factory(energy=energy, **sections)
        engine = create_engine(cfg.engine)
        if engine_wrap is not None:
            engine = engine_wrap(engine)
        runtime = Runtime(cfg, engine=engine, meter=meter)
        server = BackgroundServer(create_app(runtime)).start()
        opened.append((server, runtime))
        return server, runtime, engine

    yield start
    for server, runtime in opened:
        server.stop()
        runtime.close()


def _body(text: str = "hi", max_tokens: int = 3, **extra: Any) -> dict[str, Any]:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        **extra,
    }


def _post(server: BackgroundServer, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=timeout)


def _wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _row(runtime: Runtime, request_id: str) -> dict[str, Any] | None:
    rows = [r for r in runtime.ledger.query(limit=10_000) if r["id"] == request_id]
    return rows[0] if rows else None


def _error_count(server: BackgroundServer, status: int) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    for line in text.splitlines():
        if line.startswith("joulecap_errors_total{") and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------------------------------- meter
def test_meter_read_fails_mid_request_report_falls_back_and_says_so(serve: Any) -> None:
    meter = FakeCounterMeter()
    armed = threading.Event()

    def script(n: int) -> None:
        # Once armed, reads fail from the 2nd to the 5th token: the sampler (50 Hz) hits the outage.
        if not armed.is_set():
            return
        if n == 2:
            meter.failing.set()
        elif n == 5:
            meter.failing.clear()
            armed.clear()

    server, runtime, _ = serve(
        engine_wrap=lambda e: FaultyEngine(e, token_delay_s=0.08, on_token_n=script),
        meter=meter,
        energy={"sample_hz": 50.0},
    )
    healthy = _post(server, _body("first", max_tokens=3))
    assert healthy.status_code == 200, healthy.text
    assert healthy.json()["usage"]["energy"]["source"] == "measured"
    assert healthy.json()["usage"]["energy"]["meter"] == "fakehw:0"

    armed.set()
    faulted = _post(server, _body("second", max_tokens=8))
    assert faulted.status_code == 200, faulted.text
    energy = faulted.json()["usage"]["energy"]
    assert energy["source"] == "estimated"
    assert energy["meter"].startswith("estimate:")
    assert "fakehw:0" in energy["note"] and "failed" in energy["note"]
    assert energy["measured_j"] > 0
    assert faulted.headers["X-Energy-Source"].startswith("estimated")
    row = _row(runtime, faulted.json()["id"])
    assert row is not None and row["source"] == "estimated" and "failed" in row["energy_note"]

    # The meter is back: the server keeps serving, with measured figures again.
    after = _post(server, _body("third", max_tokens=3))
    assert after.status_code == 200, after.text
    assert after.json()["usage"]["energy"]["source"] == "measured"
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------------------- engine
def test_engine_fault_is_500_for_that_request_only_and_recorded(
    serve: Any, openai_schemas: dict[str, Any]
) -> None:
    import jsonschema

    server, runtime, engine = serve(engine_wrap=FaultyEngine)
    runs_at_start = engine.runs  # the runtime's start-up warm-up
    before_500 = _error_count(server, 500)
    bad = _post(server, _body("BOOM now", max_tokens=4))
    assert bad.status_code == 500, bad.text
    jsonschema.validate(bad.json(), openai_schemas["error"])
    assert bad.json()["error"]["type"] == "server_error"
    assert "RuntimeError" in bad.json()["error"]["message"]
    # Counted once, by the layer that answered.
    assert _error_count(server, 500) == before_500 + 1

    failed = [r for r in runtime.ledger.query(limit=100) if r["status"] == "error"]
    assert len(failed) == 1
    assert "injected engine fault" in failed[0]["error"]
    assert failed[0]["measured_j"] is not None and failed[0]["measured_j"] > 0  # its encode, at least
    assert failed[0]["source"]

    ok = _post(server, _body("fine now", max_tokens=3))
    assert ok.status_code == 200, ok.text
    assert _row(runtime, ok.json()["id"])["status"] == "ok"  # type: ignore[index]
    assert engine.runs - runs_at_start == 2


def test_engine_fault_while_streaming_ends_stream_with_error_event(serve: Any) -> None:
    server, runtime, _ = serve(engine_wrap=FaultyEngine)
    body = _body("BOOM in a stream", max_tokens=4, stream=True)
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200  # headers went out before the engine failed
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["type"] == "server_error"
    assert [r["status"] for r in runtime.ledger.query(limit=10)] == ["error"]
    assert _post(server, _body("after", max_tokens=2)).status_code == 200


# ---------------------------------------------------------------------------------------- disconnect
def test_client_disconnect_mid_stream_aborts_generation_and_keeps_energy(serve: Any) -> None:
    server, runtime, _ = serve(engine_wrap=lambda e: FaultyEngine(e, token_delay_s=0.1))
    body = _body("tell me a long story", max_tokens=80, stream=True)
    request_id = None
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                request_id = chunk["id"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    break  # hang up after the first generated text
    assert request_id is not None
    started = time.monotonic()
    row = _wait_for(lambda: _row(runtime, request_id), timeout_s=30, what="the aborted row")
    # 80 tokens at >= 0.1 s each would take >= 8 s; the abort must come long before.
    assert time.monotonic() - started < 6.0
    assert row["status"] == "aborted" and row["stop_reason"] == "aborted"
    assert 1 <= row["completion_tokens"] < 80
    assert row["measured_j"] > 0 and row["source"] == "estimated"
    _wait_for(lambda: runtime.inflight == 0, what="the engine to be free")
    assert _post(server, _body("next", max_tokens=2)).status_code == 200


def test_client_giving_up_on_a_plain_request_stops_generation(serve: Any) -> None:
    server, runtime, _ = serve(engine_wrap=lambda e: FaultyEngine(e, token_delay_s=0.1))
    with pytest.raises(httpx.ReadTimeout):  # the client's own timeout: it hangs up
        httpx.post(server.base_url + "/v1/chat/completions", json=_body("long", max_tokens=80), timeout=1.5)
    started = time.monotonic()
    rows = _wait_for(lambda: runtime.ledger.query(limit=10), timeout_s=30, what="the aborted row")
    assert time.monotonic() - started < 5.0  # 80 tokens would take >= 8 s
    assert rows[0]["status"] == "aborted" and 1 <= rows[0]["completion_tokens"] < 80
    assert rows[0]["measured_j"] > 0
    _wait_for(lambda: runtime.inflight == 0, what="the engine to be free")
    assert _post(server, _body("next", max_tokens=2)).status_code == 200


# ---------------------------------------------------------------------------------------- overload
def test_queue_full_is_503_with_retry_after_then_recovers(serve: Any) -> None:
    server, runtime, _ = serve(
        engine_wrap=lambda e: FaultyEngine(e, token_delay_s=0.1), server={"queue_limit": 0}
    )
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(_post(server, _body("slow", max_tokens=25))))
    first.start()
    _wait_for(lambda: runtime.inflight >= 1, what="the first request to occupy the engine")
    time.sleep(0.3)  # past planning, into the run
    refused = _post(server, _body("second", max_tokens=2))
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
    assert "queue-limit" in refused.json()["error"]["message"]
    first.join(timeout=60)
    assert results and results[0].status_code == 200
    assert _post(server, _body("third", max_tokens=2)).status_code == 200
    # The refused request never reached the engine, so it has no ledger row.
    assert runtime.ledger.count() == 2


def test_request_timeout_is_504_and_stops_the_engine(serve: Any) -> None:
    server, runtime, _ = serve(
        engine_wrap=lambda e: FaultyEngine(e, token_delay_s=0.1), server={"request_timeout_s": 1.0}
    )
    started = time.monotonic()
    resp = _post(server, _body("slow", max_tokens=100))
    assert resp.status_code == 504, resp.text
    assert "request-timeout-s" in resp.json()["error"]["message"]
    assert time.monotonic() - started < 5.0
    rows = _wait_for(lambda: runtime.ledger.query(limit=10), what="the aborted row")
    assert rows[0]["status"] == "aborted" and rows[0]["completion_tokens"] < 100
    _wait_for(lambda: runtime.inflight == 0, what="the engine to be free")
    assert _post(server, _body("quick", max_tokens=2)).status_code == 200


# ---------------------------------------------------------------------------------------- kill -9
def _spawn(model: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JOULECAP_CACHE_DIR": str(work / "cache")}
    proc = subprocess.Popen(
        serve_cmd(model, work, port, log_level="warning"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"joulecap serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(up, timeout_s=120, what="joulecap serve to start")
    return proc, url


@pytest.mark.slow
def test_kill_9_under_load_then_restart_keeps_every_200(tiny_idefics3: Path, tmp_path: Path) -> None:
    proc, url = _spawn(tiny_idefics3, tmp_path)
    ok_ids: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                resp = httpx.post(
                    url + "/v1/chat/completions",
                    json=_body(f"client {i} request {n}", max_tokens=2),
                    timeout=30,
                )
            except httpx.HTTPError:
                return  # the server died under us
            if resp.status_code == 200:
                with lock:
                    ok_ids.append(resp.json()["id"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(ok_ids) >= 6, timeout_s=120, what="six answered requests")
        os.kill(proc.pid, signal.SIGKILL)  # with requests still in flight
        proc.wait(timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        if proc.poll() is None:
            proc.kill()
    answered = set(ok_ids)

    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in db.execute("SELECT id FROM requests WHERE status = 'ok'")}
    assert answered <= ids, f"lost {len(answered - ids)} answered requests"

    proc, url = _spawn(tiny_idefics3, tmp_path)
    try:
        resp = httpx.post(url + "/v1/chat/completions", json=_body("after restart", max_tokens=2), timeout=60)
        assert resp.status_code == 200, resp.text
        rows = httpx.get(url + "/v1/energy/ledger", params={"limit": 10_000}).json()["data"]
        assert answered | {resp.json()["id"]} <= {r["id"] for r in rows}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------- writes
_LEDGER_WRITER = textwrap.dedent(
    """
    import sys
    from joulecap.runtime.ledger import Ledger
    ledger = Ledger(sys.argv[1])
    i = 0
    while True:
        ledger.record_failure(f"w{i}", "m", None, None, status="aborted", error="x" * 2000)
        print(f"w{i}", flush=True)  # acknowledged: record_failure returned
        i += 1
    """
)


def test_ledger_write_killed_midway_keeps_previous_rows_and_acknowledged_ones(tmp_path: Path) -> None:
    from joulecap.runtime.ledger import Ledger

    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(str(path))
    for i in range(20):
        ledger.record_failure(f"old{i}", "m", None, None, status="error", error=f"previous {i}")
    previous = ledger.query(limit=100)
    ledger.close()

    proc = subprocess.Popen(
        [sys.executable, "-c", _LEDGER_WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    acknowledged: list[str] = []
    assert proc.stdout is not None
    while len(acknowledged) < 200:
        line = proc.stdout.readline().decode().strip()
        assert line, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        acknowledged.append(line)
    os.kill(proc.pid, signal.SIGKILL)  # mid-write: it never stops writing
    rest, _ = proc.communicate(timeout=30)
    acknowledged += [x for x in rest.decode().split() if x]

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    reopened = Ledger(str(path))
    try:
        rows = {r["id"]: r for r in reopened.query(limit=100_000)}
        for old in previous:
            assert rows[old["id"]] == old
        assert set(acknowledged) <= set(rows)
    finally:
        reopened.close()


def _save(profile_dir: Path, b_j: float, *, extra: dict[str, Any] | None = None) -> Path:
    from joulecap.runtime.predictor import Predictor
    from joulecap.runtime.profiles import save_profile

    predictor = Predictor(b_j, 0.01, 0.1, calibrated=True, source="test")
    return save_profile(profile_dir, "m", "cpu", "float32", predictor, params_b=0.5, extra=extra)


def test_profile_write_failing_midway_keeps_previous_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from joulecap.runtime import profiles as profiles_mod

    path = _save(tmp_path, 1.25)
    before = path.read_bytes()

    def dump_then_fail(obj: Any, fh: Any, **kw: Any) -> None:
        text = json.dumps(obj, **kw)
        fh.write(text[: len(text) // 2])  # half the new profile reaches the disk ...
        raise OSError(28, "No space left on device")  # ... then the write fails

    monkeypatch.setattr(profiles_mod.json, "dump", dump_then_fail)
    with pytest.raises(OSError):
        _save(tmp_path, 9.0)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    loaded = profiles_mod.load_profile(tmp_path, "m", "cpu", "float32", 0.5)
    assert loaded.calibrated and loaded.coefficients[0] == pytest.approx(1.25)


_PROFILE_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from joulecap.runtime.predictor import Predictor
    from joulecap.runtime.profiles import save_profile
    i = 0
    while True:
        i += 1
        p = Predictor(float(i), 0.01, 0.1, calibrated=True, source="test")
        save_profile(Path(sys.argv[1]), "m", "cpu", "float32", p, params_b=0.5,
                     extra={"padding": ["x" * 1000] * 200})
        print(i, flush=True)
    """
)


def test_profile_writer_killed_midway_leaves_a_whole_profile(tmp_path: Path) -> None:
    from joulecap.runtime.profiles import load_profile, profile_path

    _save(tmp_path, 0.5)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROFILE_WRITER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    for _ in range(20):  # let it overwrite the profile many times, then kill it mid-loop
        assert proc.stdout.readline(), proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    last_acknowledged = int(out.split()[-1]) if out.split() else 20
    data = json.loads(profile_path(tmp_path, "m", "cpu", "float32").read_text())  # whole JSON
    b_j = data["coefficients"]["b_j"]
    # The file is the last acknowledged save or the one being written when it was killed.
    assert last_acknowledged <= b_j <= last_acknowledged + 1
    loaded = load_profile(tmp_path, "m", "cpu", "float32", 0.5)
    assert loaded.calibrated and loaded.coefficients[0] == pytest.approx(b_j)


# ---------------------------------------------------------------------------------------- load
@pytest.mark.slow
def test_load_quick_form_no_5xx_and_no_lost_requests(tiny_idefics3: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    script = str(REPO / "benchmarks" / "load.py")
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--model", str(tiny_idefics3), "--out", str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["server_errors_5xx"] == 0 and not result["stream_errors"]
    assert result["ok_200"] > 0 and result["ledger_ok_rows"] == result["ok_200"] == result["ledger_rows"]
    assert not result["lost_ids"] and result["server_inflight_after"] == 0
    assert result["rss_after_mb"] > 0 and "p99" in " ".join(proc.stdout.split())
