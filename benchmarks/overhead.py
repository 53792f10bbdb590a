"""Per-request overhead of joulecap (runtime, and server + runtime) over a bare `generate`.

Runs the same tiny model on the same inputs three ways, interleaved in one run so machine
noise hits all three alike: bare transformers `generate(**processor(...))`, the in-process
`Runtime.chat`, and HTTP through a real uvicorn server on 127.0.0.1. Reports medians of at
least 30 requests each and the overhead against the target (at most 5 ms or 3% per request,
whichever is larger). Prints a table and writes JSON.

    python benchmarks/overhead.py [--requests 30] [--model DIR] [--out benchmarks/results/overhead_cpu.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

import httpx
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from benchmarks import _common as common
from joulecap.runtime.api.app import create_app
from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.runtime import Runtime
from joulecap.runtime.tiny_models import build_tiny_model

PROMPT = "What colour is the square?"


def _image() -> Image.Image:
    img = Image.new("RGB", (96, 96), (230, 230, 230))
    img.paste((200, 20, 20), (24, 24, 60, 60))
    return img


def _serve(runtime: Runtime) -> tuple[object, int, threading.Thread]:
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, port, thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model", default=None, help="Model dir (default: a tiny Idefics3 built locally)")
    parser.add_argument("--out", default="benchmarks/results/overhead_cpu.json")
    args = parser.parse_args(argv)
    record = common.RunRecord.start("benchmarks/overhead.py", argv)
    torch.manual_seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="joulecap-overhead-"))
    model_dir = Path(args.model) if args.model else build_tiny_model("idefics3", tmp / "model")
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    image = _image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def bare() -> int:
        inputs = processor(text=text, images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_tokens, do_sample=False)
        return int(out.shape[1] - inputs["input_ids"].shape[1])

    base = JoulecapConfig()
    config = replace(
        base,
        engine=replace(base.engine, model=str(model_dir)),
        energy=replace(base.energy, meter="estimate"),
        scheduler=replace(base.scheduler, policy="baseline"),
        paths=replace(
            base.paths,
            cache_dir=str(tmp / "cache"),
            profile_dir=str(tmp / "profiles"),
            ledger_path=str(tmp / "ledger.sqlite3"),
        ),
        calibration=replace(base.calibration, auto_calibrate=False),
    )
    runtime = Runtime(config)
    server, port, thread = _serve(runtime)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "model": "default",
        "max_tokens": args.max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ],
    }
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)

    def in_process() -> int:
        return runtime.chat(PROMPT, images=[image], max_tokens=args.max_tokens).completion_tokens

    def http() -> int:
        resp = client.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        return int(resp.json()["usage"]["completion_tokens"])

    paths = {"bare generate": bare, "Runtime.chat": in_process, "HTTP server": http}
    times: dict[str, list[float]] = {k: [] for k in paths}
    tokens: dict[str, set[int]] = {k: set() for k in paths}
    for fn in paths.values():  # warm-up
        fn()
    for _ in range(args.requests):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            tokens[name].add(fn())
            times[name].append(time.perf_counter() - t0)
    server.should_exit = True  # type: ignore[attr-defined]
    thread.join(timeout=10)
    runtime.close()

    bare_med = statistics.median(times["bare generate"])
    rows: list[dict[str, Any]] = []
    for name in paths:
        med = statistics.median(times[name])
        over = med - bare_med
        target = max(0.005, 0.03 * bare_med)
        rows.append(
            {
                "path": name,
                "median_s": med,
                "p90_s": statistics.quantiles(times[name], n=10)[-1],
                "overhead_s": over,
                "overhead_pct": 100 * over / bare_med,
                "target_s": target,
                "meets_target": over <= target,
                "completion_tokens": sorted(tokens[name]),
            }
        )
    print(f"{'path':16s} {'median ms':>10s} {'p90 ms':>8s} {'overhead ms':>12s} {'%':>6s}  target ms  ok")
    for r in rows:
        print(
            f"{r['path']:16s} {1e3 * r['median_s']:10.2f} {1e3 * r['p90_s']:8.2f} "
            f"{1e3 * r['overhead_s']:12.2f} {r['overhead_pct']:6.1f}  {1e3 * r['target_s']:9.2f}  "
            f"{'yes' if r['meets_target'] else 'NO'}"
        )
    result = {
        "benchmark": "overhead",
        "device": "cpu",
        "model": "a tiny Idefics3 built locally" if not args.model else str(model_dir),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "energy_source": "estimated (estimate:cpu meter; overhead is wall time)",
        "rows": rows,
    }
    out = Path(args.out)
    common.write_json(out, record.stamp(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
