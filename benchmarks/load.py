"""Load test: bounded concurrent clients against a real `joulecap serve` on 127.0.0.1.

Each client loops until the deadline, sending a mix of requests (text only, one or two images,
no budget / header budget / body budget, streamed or not). The server runs as a subprocess (as
it would in production) with a fresh SQLite ledger. At the end the run checks that:

- no response was a 5xx (and no stream ended in an error event),
- no request was lost: the ledger holds exactly one `ok` row per 200 response, by id,
- memory stayed bounded: the server's RSS after warm-up and after the run are reported.

It prints a table (p50/p99 latency per request kind, throughput) and writes JSON with the date,
the machine, its load average at start and end, and the command. Exit status 1 when a check fails.

    python benchmarks/load.py [--clients 16] [--duration-s 120] [--quick] [--model DIR]
                              [--out benchmarks/results/load_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(REPO)  # shadows HF `kernels`: use the root

import httpx  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import _common as common  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "load_cpu.json"
PROMPTS = ("What colour is the square?", "Where is the object?", "Describe the picture briefly.", "hi")


@dataclass
class Outcome:
    """One request as a client saw it."""

    kind: str
    status: int
    latency_s: float
    request_id: str | None = None
    stream_error: str | None = None


@dataclass
class RunStats:
    """Everything a run measured."""

    outcomes: list[Outcome] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)


def _png(size: int, seed: int) -> str:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    img.paste((rng.randrange(256), 20, 20), (x, y, x + size // 3, y + size // 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = tuple(_png(size, seed) for seed, size in enumerate((64, 96, 128, 160, 224)))


def _request(rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A random request: (kind label, JSON body, headers)."""
    n_images = rng.choice((0, 1, 1, 2))
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": rng.choice(IMAGES)}} for _ in range(n_images)
    ]
    content.append({"type": "text", "text": rng.choice(PROMPTS)})
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": rng.randint(1, max_tokens),
    }
    headers: dict[str, str] = {}
    budget = rng.choice(("none", "header", "body"))
    # Generous budgets: the load run tests the server, not the planner's refusals (422).
    if budget == "header":
        headers["X-Energy-Budget-J"] = f"{rng.uniform(40, 120):.3f}"
    elif budget == "body":
        body["energy_budget_j"] = round(rng.uniform(40, 120), 3)
    stream = rng.random() < 0.3
    body["stream"] = stream
    kind = f"{n_images}img/{'stream' if stream else 'json'}"
    return kind, body, headers


async def _one(
    client: httpx.AsyncClient, url: str, kind: str, body: dict[str, Any], headers: dict[str, str]
) -> Outcome:
    t0 = time.perf_counter()
    if not body["stream"]:
        resp = await client.post(url, json=body, headers=headers)
        rid = resp.json().get("id") if resp.status_code == 200 else None
        return Outcome(kind, resp.status_code, time.perf_counter() - t0, rid)
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        rid, error, done = None, None, False
        if resp.status_code != 200:
            await resp.aread()
            return Outcome(kind, resp.status_code, time.perf_counter() - t0)
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = str(event["error"].get("message"))
            rid = event.get("id", rid)
        if not done and error is None:
            error = "stream ended without [DONE]"
        return Outcome(kind, resp.status_code, time.perf_counter() - t0, rid, error)


async def _client(idx: int, url: str, deadline: float, max_tokens: int, seed: int, stats: RunStats) -> None:
    rng = random.Random(seed * 1000 + idx)
    timeout = httpx.Timeout(300.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        while time.monotonic() < deadline:
            kind, body, headers = _request(rng, max_tokens)
            try:
                stats.outcomes.append(await _one(client, url, kind, body, headers))
            except httpx.HTTPError as exc:
                stats.transport_errors.append(f"{kind}: {type(exc).__name__}: {exc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(model: str, work: Path, meter: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    joulecap = Path(sys.executable).parent / "joulecap"
    cmd = [
        str(joulecap), "--log-level", "warning", "serve",
        "--model", model, "--port", str(port), "--meter", meter,
        "--ledger-path", str(work / "ledger.sqlite3"),
        "--profile-dir", str(work / "profiles"),
        "--cache-dir", str(work / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=(work / "server.log").open("wb"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(work / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start in 180 s")
        time.sleep(0.2)


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace, record: common.RunRecord) -> dict[str, Any]:
    """Run the load test and return the result document (`record`: its date, command, machine)."""
    with tempfile.TemporaryDirectory(prefix="joulecap-load-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from joulecap.runtime.tiny_models import build_tiny_model

            model = str(build_tiny_model("idefics3", work / "tiny-idefics3", seed=0))
        proc, base = _start_server(model, work, args.meter)
        url = base + "/v1/chat/completions"
        try:
            for _ in range(2):  # warm-up: first-request allocations are not a leak
                httpx.post(url, json={"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": IMAGES[0]}},
                    {"type": "text", "text": "warm up"}]}], "max_tokens": 2}, timeout=300)  # fmt: skip
            warm_rows = _ledger_ids(work)
            rss_before = _rss_mb(proc.pid)
            stats = RunStats()
            started = time.monotonic()
            deadline = started + args.duration_s

            async def main() -> None:
                await asyncio.gather(
                    *(
                        _client(i, url, deadline, args.max_tokens, args.seed, stats)
                        for i in range(args.clients)
                    )
                )

            asyncio.run(main())
            wall_s = time.monotonic() - started
            rss_after = _rss_mb(proc.pid)
            health = httpx.get(base + "/health", timeout=10).json()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        ledger = {k: v for k, v in _ledger_ids(work).items() if k not in warm_rows}
    return _summarise(args, stats, ledger, wall_s, rss_before, rss_after, health, record)


def _ledger_ids(work: Path) -> dict[str, str]:
    with sqlite3.connect(work / "ledger.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return dict(db.execute("SELECT id, status FROM requests").fetchall())


def _summarise(
    args: argparse.Namespace,
    stats: RunStats,
    ledger: dict[str, str],
    wall_s: float,
    rss_before: float,
    rss_after: float,
    health: dict[str, Any],
    record: common.RunRecord,
) -> dict[str, Any]:
    outcomes = stats.outcomes
    ok = [o for o in outcomes if o.status == 200 and o.stream_error is None]
    server_errors = [o for o in outcomes if o.status >= 500]
    stream_errors = [o for o in outcomes if o.stream_error is not None]
    client_errors = [o for o in outcomes if 400 <= o.status < 500]
    ok_ids = {o.request_id or "" for o in ok}
    ledger_ok = {k for k, v in ledger.items() if v == "ok"}
    lost = sorted(i for i in ok_ids if i not in ledger_ok)
    extra = sorted(set(ledger) - ok_ids)
    kinds: dict[str, dict[str, Any]] = {}
    for kind in sorted({o.kind for o in outcomes}):
        lat = [o.latency_s for o in ok if o.kind == kind]
        kinds[kind] = {
            "requests": sum(1 for o in outcomes if o.kind == kind),
            "ok": len(lat),
            "p50_s": _pct(lat, 0.5),
            "p99_s": _pct(lat, 0.99),
        }
    all_lat = [o.latency_s for o in ok]
    checks = {
        "no_5xx": not server_errors and not stream_errors and not stats.transport_errors,
        "no_lost_requests": not lost and not extra and len(ledger_ok) == len(ok),
        "rss_growth_mb": round(rss_after - rss_before, 1),
    }
    return {
        "benchmark": "load",
        **record.fields(),
        "config": {
            "clients": args.clients,
            "duration_s": args.duration_s,
            "max_tokens": args.max_tokens,
            "meter": args.meter,
            "model": args.model or "tiny-idefics3 (random weights, built locally)",
            "seed": args.seed,
            "mix": "0/1/1/2 images; no/header/body budget; 30% streamed",
        },
        "wall_s": round(wall_s, 2),
        "requests": len(outcomes),
        "ok_200": len(ok),
        "client_errors_4xx": len(client_errors),
        "client_error_statuses": sorted({o.status for o in client_errors}),
        "server_errors_5xx": len(server_errors),
        "stream_errors": [o.stream_error for o in stream_errors][:10],
        "transport_errors": stats.transport_errors[:10],
        "ledger_rows": len(ledger),
        "ledger_ok_rows": len(ledger_ok),
        "lost_ids": lost[:10],
        "unexpected_ledger_ids": extra[:10],
        "throughput_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "latency_p50_s": _pct(all_lat, 0.5),
        "latency_p99_s": _pct(all_lat, 0.99),
        "latency_mean_s": statistics.fmean(all_lat) if all_lat else None,
        "by_kind": kinds,
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "server_inflight_after": health.get("inflight"),
        "checks": checks,
        "passed": bool(checks["no_5xx"] and checks["no_lost_requests"]),
    }


def _print(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"load: {cfg['clients']} clients x {cfg['duration_s']} s on {result['machine'].get('label', '?')}")
    print(f"{'kind':<14}{'requests':>9}{'ok':>6}{'p50 s':>9}{'p99 s':>9}")
    for kind, k in result["by_kind"].items():
        print(f"{kind:<14}{k['requests']:>9}{k['ok']:>6}{k['p50_s']:>9.3f}{k['p99_s']:>9.3f}")
    print(
        f"{'all':<14}{result['requests']:>9}{result['ok_200']:>6}"
        f"{result['latency_p50_s']:>9.3f}{result['latency_p99_s']:>9.3f}"
    )
    print(
        f"throughput {result['throughput_rps']} req/s; 4xx {result['client_errors_4xx']}; "
        f"5xx {result['server_errors_5xx']}; stream errors {len(result['stream_errors'])}; "
        f"ledger ok rows {result['ledger_ok_rows']} vs 200s {result['ok_200']}; "
        f"RSS {result['rss_before_mb']} -> {result['rss_after_mb']} MB"
    )
    print("PASS" if result["passed"] else f"FAIL: {result['checks']}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=8, help="Upper end of each request's max_tokens.")
    parser.add_argument("--quick", action="store_true", help="4 clients x 8 s (the test suite's form).")
    parser.add_argument("--model", default=None, help="Model directory (default: a tiny model built here).")
    parser.add_argument("--meter", default="estimate", help="Meter backend for the server.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)}).")
    args = parser.parse_args(argv)
    record = common.RunRecord.start("benchmarks/load.py", argv)
    if args.quick:
        args.clients, args.duration_s = min(args.clients, 4), min(args.duration_s, 8.0)
    result = run(args, record)
    _print(result)
    out = Path(args.out) if args.out else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
