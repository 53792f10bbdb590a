"""Reproduce the measurements of *Seeing is Free, Speaking is Not* on the device at hand.

Each finding is measured here and printed beside the paper's figure:

1. average power, and its variation across image sizes, image content and prompts (paper: < 5%);
2. the decode share of request energy (paper: 86-97%);
3. time per output token over time per input token (paper: 11-39x);
4. energy saved by dropping every visual token (paper: at most ~10% for fixed-token models) vs by
   shortening the output (paper: up to 97%);
5. a linear energy predictor's R2 and MAPE on held-out requests (paper: 0.986 and 10.3%).

Requests run through the joulecap `Runtime` with plans built here (visual tokens kept, output
length), so energy is what the runtime itself reports. Output lengths are forced (end-of-sequence
ignored) where the engine allows it, so that "N output tokens" means N. With the estimate meter
(no energy counter, e.g. this CPU box) power is a model of CPU time, and findings 1, 2, 4 and 5 are
then statements about time, not energy: the output says so next to each of them.

    python benchmarks/paper.py --quick
    python benchmarks/paper.py --model DIR --reps 5 --out benchmarks/results/paper_gpu.json

On a slow device and a realistic-shape model (`joulecap make-tiny-model --shape NAME DIR`), the
sweep can be cut down: `--power-reps 0` skips the power sweep (power variation is then read from
the token sweep's groups), `--outs`, `--keeps` and `--prompts` choose the token sweep's points, and
`--longest-edge` sets an Idefics3/SmolVLM processor's resize edge (SmolVLM's documented
`size={"longest_edge": N*512}`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from benchmarks import _common as common
from benchmarks import _plots
from benchmarks._paper_analysis import (
    caveats,
    comparison,
    decode_share,
    power_variation,
    predictor_fit,
    savings,
    token_times,
)
from joulecap.runtime.calibrate import forced_length
from joulecap.runtime.runtime import Runtime
from joulecap.runtime.types import Plan

log = logging.getLogger("benchmarks.paper")

SHORT_PROMPT = "What is in the image?"
LONG_PROMPT = (
    "Look carefully at the picture. List every object you can see, with its colour, its shape, "
    "its size and where it is in the frame, then say which objects are closest to each other "
    "and whether anything is partly hidden. Answer in complete sentences."
)
SIZES = (64, 128, 256, 512)
CONTENTS = ("plain", "noise", "shapes")


def make_image(size: int, content: str, seed: int) -> Image.Image:
    """A test image: a plain grey field, uniform noise, or coloured shapes on a light field."""
    rng = np.random.default_rng(seed)
    if content == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    img = Image.new("RGB", (size, size), (128, 128, 128) if content == "plain" else (235, 235, 230))
    if content == "shapes":
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.integers(0, size * 3 // 4, 2)
            r = int(rng.integers(size // 10, size // 4))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            box = (int(x), int(y), int(x) + r, int(y) + r)
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def measure(
    rt: Runtime, image: Image.Image, prompt: str, keep_frac: float, n_out: int, seed: int
) -> dict[str, Any]:
    """One request under a hand-made plan; energy as the runtime reports it, plus phase times."""
    request = rt.build_request(prompt, [image], max_tokens=n_out, policy="baseline", seed=seed)
    t0 = time.monotonic()
    prepared = rt.engine.prepare(request)
    t1 = time.monotonic()
    keep = tuple(round(keep_frac * n) for n in prepared.visual_tokens)
    plan = Plan(
        visual_keep=keep,
        max_new_tokens=n_out,
        predicted_j=0.0,
        policy="paper",
        reason=f"paper.py sweep: keep {keep_frac:.0%} of visual tokens, {n_out} output tokens",
    )
    result = rt.run_planned(prepared, plan)
    gen, energy, times = result.generation, result.energy, result.generation.times
    encode = rt.monitor.energy_between(t0, t1)
    return {
        "keep_frac": keep_frac,
        "visual_tokens_in": gen.visual_tokens_in,
        "visual_tokens_kept": gen.visual_tokens_kept,
        "text_tokens": prepared.text_tokens,
        "input_tokens": gen.prefill_tokens,
        "output_tokens": len(gen.token_ids),
        "max_new": n_out,
        "energy_j": energy.total_j,
        "prefill_j": energy.prefill_j,
        "decode_j": energy.decode_j,
        "encode_j": encode.energy_j,
        "encode_s": t1 - t0,
        "prefill_s": times.first_token_s - times.start_s,
        "decode_s": times.end_s - times.first_token_s,
        "duration_s": energy.duration_s,
        "power_w": energy.total_j / energy.duration_s if energy.duration_s > 0 else math.nan,
        "source": energy.source,
        "meter": energy.meter,
        "stop_reason": gen.stop_reason,
    }


# ---------------------------------------------------------------------------------------- sweeps
def power_sweep(rt: Runtime, reps: int, n_out: int, seed: int, bar: tqdm) -> list[dict[str, Any]]:
    """Finding 1: every image size x content x prompt, all visual tokens, fixed output length.

    The points run in a seeded random order, so that a drift of the machine (other jobs, heat)
    is not mistaken for an effect of the factor that happens to change slowest.
    """
    points = [
        (rep, size, content, name, prompt)
        for rep in range(reps)
        for size in SIZES
        for content in CONTENTS
        for name, prompt in (("short", SHORT_PROMPT), ("long", LONG_PROMPT))
    ]
    random.Random(seed).shuffle(points)
    recs = []
    for rep, size, content, name, prompt in points:
        rec = measure(rt, make_image(size, content, seed + rep), prompt, 1.0, n_out, seed + rep)
        recs.append({**rec, "size": size, "content": content, "prompt": name})
        bar.update(1)
    return recs


PROMPTS = {"short": SHORT_PROMPT, "long": LONG_PROMPT}


def token_sweep(
    rt: Runtime,
    reps: int,
    outs: tuple[int, ...],
    keeps: tuple[float, ...],
    seed: int,
    bar: tqdm,
    prompts: tuple[str, ...] = ("short", "long"),
) -> list[dict[str, Any]]:
    """Findings 2-5: visual tokens kept x prompt length x output length, in a seeded random order."""
    points = [
        (rep, keep, name, PROMPTS[name], n_out)
        for rep in range(reps)
        for keep in keeps
        for name in prompts
        for n_out in outs
    ]
    random.Random(seed + 1).shuffle(points)
    recs = []
    for rep, keep, name, prompt, n_out in points:
        image = make_image(128, "shapes", seed + 100 + rep)
        rec = measure(rt, image, prompt, keep, n_out, seed + rep)
        recs.append({**rec, "prompt": name})
        bar.update(1)
    return recs


# ---------------------------------------------------------------------------------------- main
QUICK = {"power_reps": 2, "power_out": 16, "token_reps": 4, "outs": (2, 8, 16, 32), "keeps": (0.0, 0.5, 1.0)}
FULL = {
    "power_reps": 3,
    "power_out": 64,
    "token_reps": 3,
    "outs": (2, 16, 64, 128),
    "keeps": (0.0, 0.25, 0.5, 0.75, 1.0),
}


def model_marker(path: str) -> dict[str, Any] | None:
    """The `joulecap.json` marker of a locally built model (None for a released checkpoint)."""
    marker = Path(path) / "joulecap.json"
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def set_longest_edge(rt: Runtime, edge: int) -> None:
    """Resize an Idefics3/SmolVLM processor's images to `edge` px on the longest side.

    Raises:
        SystemExit: The served model's image processor has no `longest_edge` size.

    """
    from transformers.image_utils import SizeDict

    image_processor = getattr(getattr(rt.engine, "processor", None), "image_processor", None)
    size = getattr(image_processor, "size", None)
    if getattr(size, "longest_edge", None) is None:  # a SizeDict in transformers 5
        raise SystemExit("--longest-edge needs an Idefics3/SmolVLM model on the transformers engine")
    tile = dict(getattr(image_processor, "max_image_size", None) or {}).get("longest_edge", 1)
    if edge % int(tile):
        raise SystemExit(f"--longest-edge must be a multiple of the tile size {tile}")
    image_processor.size = SizeDict(longest_edge=edge)  # type: ignore[union-attr]  # checked above


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir or hub id (default: the demo model)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--meter", default="auto", help="energy meter (auto, estimate, rapl, nvml, ...)")
    parser.add_argument("--sample-hz", type=float, default=100.0, help="meter sampling rate (short windows)")
    parser.add_argument("--quick", action="store_true", help="a short run (a minute or two on a 2-core CPU)")
    parser.add_argument("--out", default=None, help="JSON path; the PNG is written beside it")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of every sweep point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 resists CPU contention from other jobs",
    )
    parser.add_argument("--power-reps", type=int, default=None, help="power sweep reps (0: skip it)")
    parser.add_argument("--outs", default=None, help="output lengths of the token sweep, e.g. 2,8,16")
    parser.add_argument("--keeps", default=None, help="visual-token fractions kept, e.g. 0,1")
    parser.add_argument("--prompts", default="short,long", help="token sweep prompts: short,long")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up requests before the sweeps")
    parser.add_argument("--note", default="", help="free text saved in the JSON (conditions of the run)")
    parser.add_argument(
        "--longest-edge",
        type=int,
        default=None,
        help="Idefics3/SmolVLM only: resize images to this longest edge (a multiple of the tile, 512 "
        "for SmolVLM; the released default is 2048, i.e. 16 tiles plus a global image)",
    )
    args = parser.parse_args(argv)
    record = common.RunRecord.start("benchmarks/paper.py", argv)
    common.set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    preset: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.reps is not None:
        preset.update(power_reps=args.reps, token_reps=args.reps)
    if args.power_reps is not None:
        preset["power_reps"] = args.power_reps
    if args.outs:
        preset["outs"] = tuple(int(x) for x in args.outs.split(","))
    if args.keeps:
        preset["keeps"] = tuple(float(x) for x in args.keeps.split(","))
    prompts = tuple(p for p in args.prompts.split(",") if p)
    if not prompts or any(p not in PROMPTS for p in prompts):
        parser.error(f"--prompts takes a comma list of {sorted(PROMPTS)}")
    out = Path(args.out or f"benchmarks/results/paper_{'quick_' if args.quick else ''}run.json")
    scratch = tempfile.TemporaryDirectory(prefix="joulecap-paper-")  # profiles, calibration checkpoint
    work = Path(scratch.name)
    config = common.bench_config(
        model=args.model, engine=args.engine, meter=args.meter, work_dir=work, sample_hz=args.sample_hz
    )
    n_power = preset["power_reps"] * len(SIZES) * len(CONTENTS) * 2
    n_tokens = preset["token_reps"] * len(preset["keeps"]) * len(prompts) * len(preset["outs"])
    with Runtime(config) as rt, forced_length(rt.engine) as forced:
        if args.longest_edge is not None:
            set_longest_edge(rt, args.longest_edge)
        meter_facts = dict(rt.monitor.describe())
        label = common.energy_label(meter_facts)
        print(
            f"model {rt.info.model} ({rt.info.params_b * 1e3:.2f} M params, {rt.info.device}); energy {label}"
        )
        for i in range(args.warmup):  # warm-up: caches, allocator, first-call costs
            measure(rt, make_image(128, "shapes", i), SHORT_PROMPT, 1.0, 8, args.seed)
        with tqdm(total=n_power + n_tokens, desc="paper sweeps", unit="req") as bar:
            power_runs = power_sweep(rt, preset["power_reps"], preset["power_out"], args.seed, bar)
            token_runs = token_sweep(
                rt, preset["token_reps"], preset["outs"], preset["keeps"], args.seed, bar, prompts
            )
        info = rt.info
        online = rt.predictor.stats()
    n_max = max(preset["outs"])
    res: dict[str, Any] = {
        # Without a power sweep, power is compared across the token sweep's own groups.
        "power": power_variation(power_runs)
        if power_runs
        else power_variation(token_runs, ("keep_frac", "prompt") if len(prompts) > 1 else ("keep_frac",)),
        "decode_share": decode_share([r for r in token_runs if r["output_tokens"] >= 2]),
        "token_times": token_times(token_runs),
        "savings": savings(token_runs, n_max),
        "predictor": predictor_fit(token_runs),
        "runs": {"power": power_runs, "tokens": token_runs},
    }
    notes = caveats(str(meter_facts.get("source")), forced, info.params_b)
    rows = comparison(res, notes)
    result = {
        "benchmark": "paper",
        "paper": "Seeing is Free, Speaking is Not (figures as quoted in joulecap issue 7)",
        **record.fields(),
        "device": info.device,
        "meter": {**meter_facts, "label": label},
        "model": {
            "name": info.model,
            "path": info.model_path,
            "family": info.family,
            "params_b": info.params_b,
            # What built it (a tiny or realistic-shape model's joulecap.json: shape, source, seed).
            "built": model_marker(info.model_path),
        },
        "note": args.note,
        "engine": info.engine,
        "quick": args.quick,
        "settings": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()},
            "prompts": list(prompts),
            "warmup": args.warmup,
            "longest_edge": args.longest_edge,
        },
        "forced_output_length": forced,
        "caveats": notes,
        "comparison": rows,
        "runtime_online_predictor": online,
        **res,
    }
    common.write_json(out, result)
    png = out.with_suffix(".png")
    _plots.paper_figure(
        res, png, f"{info.model} ({info.params_b * 1e3:.1f} M params) on {info.device}; energy {label}"
    )

    width = max(len(r["finding"]) for r in rows)
    print(f"\n{'finding'.ljust(width)}  {'this device':>32s}  paper")
    for r in rows:
        print(f"{r['finding'].ljust(width)}  {r['this_device']:>32s}  {r['paper']}")
    print(f"\nenergy: {label}")
    for key, note in notes.items():
        print(f"caveat ({key}): {note}")
    print(f"wrote {out} and {png}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
