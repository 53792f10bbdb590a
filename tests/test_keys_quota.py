"""Per-key joule quotas: keys file, reloads, constant-time lookup, the quota book, 429 on a live server."""

from __future__ import annotations

import hmac
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_ledger import make_result

from joulecap.runtime.api.middleware import GuardMiddleware
from joulecap.runtime.keys import KeysFileError, KeyStore, parse_keys
from joulecap.runtime.ledger import Ledger
from joulecap.runtime.quota import DAY_S, QuotaBook

GOOD = """\
# key            name     daily joules
sk-robot-7-aaaa  robot-7  50000
sk-robot-7-bbbb  robot-7  5e4   # the robot's rotated key: same name, same allowance
sk-ops-cccc      ops            # no quota
"""


def test_parse_keys_file() -> None:
    keys = parse_keys(GOOD, "keys.txt")
    assert [(k.name, k.daily_quota_j) for k in keys] == [("robot-7", 5e4), ("robot-7", 5e4), ("ops", None)]
    assert "sk-" not in repr(keys)  # the secret is never printed


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("sk-a a 10\nsk-b\n", r"keys\.txt:2: expected 'KEY NAME \[DAILY_QUOTA_J\]', got 1 field"),
        ("sk-a a 10 extra\n", r"keys\.txt:1: expected"),
        ("# c\nsk-a a 10\nsk-a b 20\n", r"keys\.txt:3: the key of 'b' is the same as the key on line 2"),
        ("sk-a a 0\n", r"keys\.txt:1: quota for 'a' must be a positive number .*remove the line"),
        ("sk-a a -5\n", r"keys\.txt:1: quota .* positive"),
        ("sk-a a nan\n", r"keys\.txt:1: quota .* positive"),
        ("sk-a a lots\n", r"keys\.txt:1: quota 'lots' for 'a' is not a number"),
        ("sk-a a 10\nsk-b a 20\n", r"keys\.txt:2: 'a' has quota 20.0 here but 10.0 on line 1"),
    ],
)
def test_malformed_files_name_the_line(text: str, match: str) -> None:
    with pytest.raises(KeysFileError, match=match):
        parse_keys(text, "keys.txt")


def test_startup_refuses_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("sk-a a\nsk-b\n")
    with pytest.raises(KeysFileError, match=rf"{path}:2:"):
        KeyStore(str(path))
    with pytest.raises(KeysFileError, match="cannot read"):
        KeyStore(str(tmp_path / "absent.txt"))


def test_reload_keeps_old_keys_on_a_malformed_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(GOOD)
    store = KeyStore(str(path), single_key="sk-single")
    assert store.lookup(b"sk-ops-cccc").name == "ops"  # type: ignore[union-attr]
    assert store.lookup(b"sk-single").name == "default"  # type: ignore[union-attr]
    path.write_text("sk-new new 1\nbroken line with too many fields\n")
    with caplog.at_level(logging.ERROR):
        assert store.reload() is False
    assert "keeping the 4 current keys" in caplog.text and ":2:" in caplog.text
    assert store.lookup(b"sk-ops-cccc") is not None and store.failed_reloads == 1
    path.write_text("sk-new new 1\n")
    assert store.reload() is True
    assert store.lookup(b"sk-ops-cccc") is None and store.lookup(b"sk-new").name == "new"  # type: ignore[union-attr]
    assert store.lookup(b"sk-single") is not None  # --api-key survives reloads


def test_sighup_reloads(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("sk-one one\n")
    store = KeyStore(str(path))
    previous = signal.getsignal(signal.SIGHUP)
    try:
        assert store.install_sighup()
        path.write_text("sk-two two\n")
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while store.reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert store.lookup(b"sk-two") is not None and store.lookup(b"sk-one") is None


def test_every_lookup_is_one_constant_time_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore()
    store._set(parse_keys("k1 a\nk2 b\nk3 c\nk4 d\n"))
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, name in ((b"k1", "a"), (b"k4", "d"), (b"nope", None), (b"k", None), (b"k44", None)):
        calls.clear()
        found = store.lookup(presented)
        assert (found.name if found else None) == name
        # Right or wrong, exactly one comparison of the presented key with a configured key.
        assert len(calls) == 1 and calls[0][0] == presented and calls[0][1] in {b"k1", b"k2", b"k3", b"k4"}
    assert KeyStore().lookup(b"anything") is None


def test_quota_book_day_and_retry_after(tmp_path: Path) -> None:
    now = [3 * DAY_S + 20 * 3600.0]  # 20:00 UTC
    book = QuotaBook({"robot": 10.0, "ops": None}.get, clock=lambda: now[0])
    book.charge("robot", 4.0)
    assert book.remaining_j("robot") == 6.0 and not book.exhausted("robot")
    book.charge("robot", 7.0)
    assert book.exhausted("robot") and book.remaining_j("robot") == 0.0
    assert book.retry_after_s() == 4 * 3600
    book.charge("ops", 1e9)
    assert not book.exhausted("ops") and book.remaining_j("ops") is None
    for bad in (float("nan"), -1.0, None):
        book.charge("robot", bad)
    now[0] = 4 * DAY_S + 1.0  # past midnight: refilled
    assert not book.exhausted("robot") and book.spent_j("robot") == 0.0
    # Seeded from the ledger: only today's rows of each key name count.
    ledger_path = tmp_path / "l.sqlite3"
    ledger = Ledger(str(ledger_path))
    ledger.record_result(make_result("y", created_s=4 * DAY_S - 10, total_j=100.0), key_name="robot")
    ledger.record_result(make_result("t1", created_s=4 * DAY_S + 0.5, total_j=3.0), key_name="robot")
    ledger.record_result(make_result("t2", created_s=4 * DAY_S + 0.6, total_j=2.0), key_name="robot")
    ledger.record_result(make_result("n", created_s=4 * DAY_S + 0.7, total_j=9.0))
    ledger.close()
    fresh = QuotaBook({"robot": 10.0}.get, clock=lambda: now[0])
    assert fresh.seed_from_ledger(str(ledger_path)) == {"robot": pytest.approx(5.0)}
    assert fresh.remaining_j("robot") == pytest.approx(5.0)


# ---------------------------------------------------------------- live server
@pytest.fixture
def guarded(config_factory: Any, tmp_path: Path) -> Any:
    """The real app over the tiny model, behind a GuardMiddleware with a keys file."""
    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.api.server import BackgroundServer
    from joulecap.runtime.runtime import Runtime

    keys = tmp_path / "keys.txt"
    keys.write_text("sk-robot-1111 robot 1e-9\nsk-ops-2222 ops\n")
    runtime = Runtime(config_factory(energy={"idle_baseline_s": 0.0}))
    store = KeyStore(str(keys), single_key="sk-single-3333")
    book = QuotaBook(store.quota_j)
    app = GuardMiddleware(
        create_app(runtime), max_body_bytes=1_000_000, keys=store, quotas=book, metrics=runtime.metrics
    )
    server = BackgroundServer(app).start()
    yield server, runtime, book
    server.stop()
    runtime.close()


def _chat(base: str, key: str | None) -> httpx.Response:
    headers = {"X-Energy-Budget-J": "30"} | ({"Authorization": f"Bearer {key}"} if key else {})
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_quota_answers_429_with_retry_after(guarded: Any) -> None:
    server, _runtime, book = guarded
    base = server.base_url
    assert _chat(base, None).status_code == 401
    assert _chat(base, "sk-robot-111").status_code == 401  # a prefix of a key is not a key
    first = _chat(base, "sk-robot-1111")
    assert first.status_code == 200  # nothing spent yet: admitted, then charged
    assert book.spent_j("robot") == pytest.approx(float(first.headers["X-Energy-Used-J"]))
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-robot-1111", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    response = err.value.response
    assert response.status_code == 429 and err.value.code == "energy_quota_exceeded"
    retry = int(response.headers["Retry-After"])
    expected = DAY_S - time.time() % DAY_S
    assert retry >= 1 and abs(retry - expected) <= 5  # seconds to 00:00 UTC
    assert "robot" in err.value.message and "sk-robot" not in err.value.message
    # The spent key can still read; other keys and --api-key are unaffected.
    auth = {"Authorization": "Bearer sk-robot-1111"}
    assert httpx.get(f"{base}/v1/models", headers=auth).status_code == 200
    assert _chat(base, "sk-ops-2222").status_code == 200
    assert _chat(base, "sk-single-3333").status_code == 200
    metrics = httpx.get(f"{base}/metrics", headers=auth).text
    assert 'joulecap_key_quota_refusals_total{key="robot"} 1.0' in metrics
    assert 'joulecap_key_energy_joules_total{key="ops"}' in metrics
    assert 'joulecap_key_energy_joules_total{key="default"}' in metrics
    assert "sk-" not in metrics  # names only, never keys
