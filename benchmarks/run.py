"""Compare policies on a workload: energy, latency, quality and budget adherence per policy x budget.

Every request of the workload runs under every (policy, budget) pair, interleaved request by
request so that machine noise and the predictor's online learning touch all pairs alike. Energy
comes from the runtime's meter and is labelled with its source (`estimated` on a CPU-only box).

    python benchmarks/run.py --quick --out benchmarks/results/run_quick_cpu
    python benchmarks/run.py --model DIR --policies joint,baseline --budgets 5,10,20 --requests 100
    python benchmarks/run.py --workload my.jsonl   # {"image": PATH, "prompt": ..., "reference": ...}

The default workload, `tinyvqa-heldout`, is a held-out TinyVQA question set used for nothing
else: test-split examples drawn from dataset seeds `HELDOUT_SEED0 + i` (one seed per question),
a range no training, tuning (the tau sweep and the default policy's rule use the validation split,
seed 0) or other benchmark (test split, seed 0) draws from. `--workload tinyvqa` is the earlier
test-split, seed-0 set.

Writes DIR/results.json, DIR/results.csv, DIR/requests.jsonl and four PNG plots (Pareto view of
energy vs quality, quality vs energy per budget level, prefill/decode split, budget vs energy
used), and prints a table and, per budget level, whether the default policy holds the budget and
answers within a point of the best budget-holding policy that spends no more energy
(`benchmarks/_front.py`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

from tqdm import tqdm

from benchmarks import _common as common
from benchmarks import _front, _plots
from joulecap.runtime.errors import BudgetTooSmall, JoulecapError

if TYPE_CHECKING:  # the runtime (torch, transformers) is imported only when a run starts
    from joulecap.runtime.runtime import Runtime

log = logging.getLogger("benchmarks.run")

QUICK = {"requests": 30, "warmup": 6, "fractions": (0.35, 0.7, 1.4), "max_tokens": 64}
"""`--quick`: a run of a few minutes on a 2-core CPU with the tiny model."""

FULL = {"requests": 100, "warmup": 10, "fractions": (0.25, 0.5, 1.0, 2.0), "max_tokens": None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir or hub id (default: the runtime's demo model)")
    p.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    p.add_argument("--policies", default="all", help="comma-separated registered policies, or 'all'")
    p.add_argument(
        "--budgets",
        default="auto",
        help="comma-separated joule budgets, or 'auto': fractions (--budget-fractions) of the mean "
        "energy of the baseline policy measured on warm-up requests",
    )
    p.add_argument("--budget-fractions", default=None, help="fractions used by --budgets auto")
    p.add_argument(
        "--workload",
        default="tinyvqa-heldout",
        help="'tinyvqa-heldout' (held-out seeds, see the module doc), 'tinyvqa' or a JSONL file",
    )
    p.add_argument("--requests", type=int, default=None, help="requests per (policy, budget)")
    p.add_argument("--warmup", type=int, default=None, help="baseline warm-up requests (not scored)")
    p.add_argument("--max-tokens", type=int, default=None, help="client output cap per request (--quick: 64)")
    p.add_argument("--meter", default="auto", help="energy meter (auto, estimate, rapl, nvml, ...)")
    p.add_argument("--profile-dir", default=None, help="energy profiles (calibration); default: scratch")
    p.add_argument(
        "--calibrate",
        default="auto",
        choices=["auto", "yes", "no"],
        help="run `joulecap calibrate` (its quick sweep with --quick) before the benchmark; auto: "
        "unless --profile-dir is given (then its profile is used as it is)",
    )
    p.add_argument("--quick", action="store_true", help="a short run (a few minutes on a 2-core CPU)")
    p.add_argument("--out", default="benchmarks/results/run", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 resists CPU contention from other jobs",
    )
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.requests = args.requests or int(preset["requests"])  # type: ignore[call-overload]
    args.warmup = int(preset["warmup"]) if args.warmup is None else args.warmup  # type: ignore[call-overload]
    fractions = args.budget_fractions or ",".join(str(f) for f in preset["fractions"])  # type: ignore[attr-defined]
    args.fractions = [float(f) for f in fractions.split(",") if f.strip()]
    if args.max_tokens is None:
        args.max_tokens = preset["max_tokens"]
    return args


def select_policies(spec: str) -> list[str]:
    """Registered policies named by `spec` (`all` = every registered one, registry order)."""
    from joulecap.policies import available_policies

    known = list(available_policies())
    if spec == "all":
        return known
    chosen = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in known]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; registered: {known}")
    return chosen


HELDOUT_SEED0 = 100_000
"""First dataset seed of the held-out question set (question i: seed HELDOUT_SEED0 + i, index 0)."""


def load_heldout(n: int) -> list[common.WorkItem]:
    """The held-out TinyVQA questions: test split, one dataset seed each from `HELDOUT_SEED0`."""
    from benchmarks.tinyvqa.generate import make_example

    items = []
    for i in range(n):
        ex, image = make_example("test", 0, seed=HELDOUT_SEED0 + i)
        kind = "list" if ex.qtype == "describe" else "short"
        items.append(
            common.WorkItem(
                image=image.convert("RGB"), prompt=ex.question, reference=ex.answer, kind=kind, tag=ex.qtype
            )
        )
    return items


def load_items(spec: str, n: int, seed: int) -> list[common.WorkItem]:
    """`tinyvqa-heldout`, `tinyvqa` or a JSONL file -> `n` work items."""
    return load_heldout(n) if spec == "tinyvqa-heldout" else common.load_workload(spec, n, seed)


# ---------------------------------------------------------------------------------------- one request
def run_one(
    rt: Runtime,
    item: common.WorkItem,
    policy: str,
    budget_j: float | None,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Any]:
    """Plan and run one request; return its record (refusals included, never raises on 4xx)."""
    request = rt.build_request(
        item.prompt,
        [item.image],
        energy_budget_j=budget_j,
        max_tokens=args.max_tokens,
        policy=policy,
        seed=seed,
    )
    rec: dict[str, Any] = {"policy": policy, "budget_j": budget_j, "tag": item.tag, "kind": item.kind}
    t0 = time.perf_counter()
    try:
        prepared, plan = rt.plan(request)
    except BudgetTooSmall as exc:
        rec.update(refused=True, error=f"422: {exc}", quality=0.0, latency_s=time.perf_counter() - t0)
        return rec
    plan_s = time.perf_counter() - t0
    # Image preprocessing and the vision encoder run while planning; the runtime measures that
    # window (charged to the request's prefill, taken off the budget before planning the run).
    encode_j = prepared.encode_j
    # The predictor learns from each request after it runs; predict now, before that update, for
    # every output length the plan allows, so the error below is a true out-of-sample error (of
    # the whole request: the measured encode plus the predicted run).
    kept = sum(plan.visual_keep)
    prior = [
        encode_j + rt.predictor.predict(prepared.text_tokens, kept, n).total_j
        for n in range(plan.max_new_tokens + 1)
    ]
    t1 = time.perf_counter()
    try:
        result = rt.run_planned(prepared, plan)
    except JoulecapError as exc:
        rec.update(refused=True, error=f"{exc.http_status}: {exc}", quality=0.0, latency_s=plan_s)
        return rec
    latency_s = plan_s + time.perf_counter() - t1
    gen, energy = result.generation, result.energy
    out_n = len(gen.token_ids)
    predicted = prior[min(out_n, len(prior) - 1)]
    rec.update(
        refused=False,
        energy_j=energy.total_j,
        prefill_j=energy.prefill_j,
        decode_j=energy.decode_j,
        idle_j=energy.idle_j,
        encode_j=encode_j,
        duration_s=energy.duration_s,
        source=energy.source,
        meter=energy.meter,
        latency_s=latency_s,
        output_tokens=out_n,
        text_tokens=prepared.text_tokens,
        visual_tokens_in=gen.visual_tokens_in,
        visual_tokens_kept=gen.visual_tokens_kept,
        max_new_tokens=plan.max_new_tokens,
        planned_j=plan.predicted_j,
        predicted_j=predicted,
        predictor_error_pct=100.0 * abs(predicted - energy.total_j) / energy.total_j
        if energy.total_j > 0
        else math.nan,
        violated=budget_j is not None and energy.total_j > budget_j,
        stop_reason=gen.stop_reason,
        quality=common.score(result.text, item.reference, item.kind),
        text=result.text,
        reference=item.reference,
    )
    return rec


def summarize(recs: list[dict[str, Any]], policy: str, budget_j: float | None) -> dict[str, Any]:
    """One table row from the records of one (policy, budget) pair."""
    done = [r for r in recs if not r["refused"]]

    def col(key: str, rows: list[dict[str, Any]] = done) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]

    energy = col("energy_j")
    short = [r for r in recs if r["kind"] == "short"]
    listed = [r for r in recs if r["kind"] == "list"]
    return {
        "policy": policy,
        "budget_j": budget_j,
        "requests": len(recs),
        "completed": len(done),
        "energy_j_mean": common.mean(energy),
        "energy_j_p50": common.pct(energy, 50),
        "energy_j_p95": common.pct(energy, 95),
        "energy_source": ",".join(sorted({str(r["source"]) for r in done})) or None,
        "energy_meter": ",".join(sorted({str(r["meter"]) for r in done})) or None,
        "prefill_j_mean": common.mean(col("prefill_j")),
        "decode_j_mean": common.mean(col("decode_j")),
        "encode_j_mean": common.mean(col("encode_j")),
        "latency_s_p50": common.pct(col("latency_s", recs), 50),
        "latency_s_p95": common.pct(col("latency_s", recs), 95),
        "output_tokens_mean": common.mean(col("output_tokens")),
        "visual_tokens_in_mean": common.mean(col("visual_tokens_in")),
        "visual_tokens_kept_mean": common.mean(col("visual_tokens_kept")),
        "quality": common.mean(col("quality", recs)),
        "exact_match": common.mean(col("quality", short)),
        "recall": common.mean(col("quality", listed)),
        "violations_pct": 100.0 * sum(1 for r in done if r["violated"]) / len(recs) if recs else math.nan,
        "refused_pct": 100.0 * (len(recs) - len(done)) / len(recs) if recs else math.nan,
        "utilization": common.mean([e / budget_j for e in energy]) if budget_j else math.nan,
        "predictor_mape_pct": common.mean(col("predictor_error_pct")),
        "stop_reasons": dict(Counter(str(r["stop_reason"]) for r in done)),
    }


# ---------------------------------------------------------------------------------------- output
COLUMNS = [
    ("policy", "policy", "{}"),
    ("budget_j", "budget J", "{:.2f}"),
    ("requests", "n", "{}"),
    ("energy_j_mean", "E mean J", "{:.3f}"),
    ("energy_j_p50", "E p50", "{:.3f}"),
    ("energy_j_p95", "E p95", "{:.3f}"),
    ("latency_s_p50", "lat p50 s", "{:.3f}"),
    ("latency_s_p95", "lat p95", "{:.3f}"),
    ("output_tokens_mean", "out tok", "{:.1f}"),
    ("visual_tokens_kept_mean", "vis kept", "{:.1f}"),
    ("quality", "quality", "{:.3f}"),
    ("violations_pct", "viol %", "{:.1f}"),
    ("refused_pct", "422 %", "{:.1f}"),
    ("utilization", "util", "{:.2f}"),
    ("predictor_mape_pct", "pred err %", "{:.1f}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The result table as aligned text, or as a Markdown table for the README."""
    head = [h for _, h, _ in COLUMNS]
    body = [[_cell(r.get(k), f) for k, _, f in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def fmt_row(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt_row(head), fmt_row(["-" * w for w in widths]), *(fmt_row(b) for b in body)])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = [k for k in rows[0] if k != "stop_reasons"] + ["stop_reasons"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({**common.clean_json(r), "stop_reasons": json.dumps(r["stop_reasons"])})


# ---------------------------------------------------------------------------------------- main
def warm_up(rt: Runtime, items: list[common.WorkItem], args: argparse.Namespace) -> list[float]:
    """Run baseline requests without a budget (not scored); returns their energies.

    They load caches, let the predictor's online update see this machine, and set the scale of
    `--budgets auto`.
    """
    energies = []
    for i, item in enumerate(tqdm(items, desc="warm-up (baseline)", leave=False)):
        rec = run_one(rt, item, "baseline", None, args, seed=args.seed + i)
        if not rec["refused"]:
            energies.append(rec["energy_j"])
    return energies


def main(argv: list[str] | None = None) -> int:
    from joulecap.runtime.runtime import Runtime

    args = parse_args(argv)
    record = common.RunRecord.start("benchmarks/run.py", argv)
    common.set_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policies = select_policies(args.policies)
    items = load_items(args.workload, args.requests + args.warmup, args.seed)
    warm_items, items = items[: args.warmup], items[args.warmup :]
    if not items:
        raise SystemExit("the workload has no requests left after the warm-up")

    scratch = tempfile.TemporaryDirectory(prefix="joulecap-bench-")  # profiles, calibration checkpoint
    work = Path(scratch.name)
    config = common.bench_config(
        model=args.model, engine=args.engine, meter=args.meter, work_dir=work, profile_dir=args.profile_dir
    )
    started = time.time()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    calibrated_here = args.calibrate == "yes" or (args.calibrate == "auto" and args.profile_dir is None)
    if calibrated_here:
        from joulecap.runtime.calibrate import calibrate_command

        # Without a profile of this device the predictor starts from the universal default, which
        # can be orders of magnitude off for a small model: plans and the governor would be judged
        # on a guess. Calibrating first is what a user is told to do; the benchmark does the same.
        code = calibrate_command(
            replace(config, calibration=replace(config.calibration, quick=args.quick, resume=False))
        )
        if code != 0:
            raise SystemExit(f"calibration failed with exit code {code}")
    with Runtime(config) as rt:
        predictor_start = rt.predictor.stats()
        meter_facts = dict(rt.monitor.describe())
        source_label = common.energy_label(meter_facts)
        print(f"model {rt.info.model} ({rt.info.engine}, {rt.info.device}); energy {source_label}")
        if rt.info.random_weights:
            print("!! the model has RANDOM weights: its answers are noise, so quality is meaningless here")
        warm = warm_up(rt, warm_items, args) if warm_items else []
        if args.budgets == "auto":
            if not warm:
                raise SystemExit("--budgets auto needs --warmup >= 1")
            scale = common.mean(warm)
            budgets: list[float | None] = [round(f * scale, 3) for f in args.fractions]
            budget_note = (
                f"auto: {args.fractions} x {scale:.3f} J "
                f"(mean baseline energy of {len(warm)} warm-up requests)"
            )
        else:
            budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
            budget_note = "given on the command line"
        pairs = [(p, b) for p in policies for b in budgets]
        records: dict[tuple[str, float | None], list[dict[str, Any]]] = {pair: [] for pair in pairs}
        with tqdm(total=len(items) * len(pairs), desc="requests", unit="req") as bar:
            for i, item in enumerate(items):
                for policy, budget in pairs:
                    rec = run_one(rt, item, policy, budget, args, seed=args.seed + 1000 + i)
                    records[(policy, budget)].append(rec)
                    bar.update(1)
        predictor_stats = rt.predictor.stats()
        info = rt.info
    rows = [summarize(records[pair], *pair) for pair in pairs]
    from joulecap.policies.config import SchedulerConfig

    default_policy = SchedulerConfig().policy
    verdict = _front.judge(rows, default_policy) if default_policy in policies else None

    result = {
        "benchmark": "run",
        "machine": {**common.machine_info(), "load_avg_at_start": load_start},
        "device": info.device,
        "meter": {**meter_facts, "label": source_label},
        "model": {
            "name": info.model,
            "path": info.model_path,
            "family": info.family,
            "params_b": info.params_b,
            "dtype": info.dtype,
            "random_weights": info.random_weights,
        },
        "engine": info.engine,
        "workload": args.workload,
        "seed": args.seed,
        "quick": args.quick,
        "requests_per_pair": len(items),
        "warmup_requests": len(warm_items),
        "max_tokens": args.max_tokens,
        "budgets_j": budgets,
        "budgets_note": budget_note,
        "notes": _notes(meter_facts, info.random_weights),
        "calibration": {
            "run_here": calibrated_here,
            "sweep": ("quick" if args.quick else "full") if calibrated_here else None,
            "profile_dir": args.profile_dir,
            "predictor_at_start": predictor_start,
        },
        "predictor": predictor_stats,
        "started_unix": started,
        "duration_s": time.time() - started,
        "rows": rows,
        "front": verdict,
    }
    common.write_json(out / "results.json", record.stamp(result, result["machine"]))
    write_csv(rows, out / "results.csv")
    with (out / "requests.jsonl").open("w", encoding="utf-8") as fh:
        for pair in pairs:
            for rec in records[pair]:
                fh.write(json.dumps(common.clean_json(rec)) + "\n")
    plots = _plots.run_plots(rows, out, source_label, f"{info.model} on {info.device}")
    if default_policy in policies:
        plots.append(
            _front.front_plot(rows, out, default_policy, f"{info.model}, {args.workload}; {source_label}")
        )
    caption = (
        f"Model `{info.model}` ({info.engine}, {info.device}), workload {args.workload}, "
        f"{len(items)} requests per row, budgets {budget_note}. Energy: {source_label}. "
        f"Machine: {result['machine']['label']}."
    )
    (out / "table.md").write_text(
        format_table(rows, markdown=True) + "\n\n" + caption + "\n" + _front.text(verdict, markdown=True),
        encoding="utf-8",
    )

    print()
    print(format_table(rows))
    print()
    print(f"energy: {source_label}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(_front.text(verdict))
    print(f"wrote {out}/results.json, results.csv, requests.jsonl, table.md, {', '.join(plots)}")
    scratch.cleanup()
    return 0


def _notes(meter_facts: dict[str, Any], random_weights: bool) -> list[str]:
    notes = []
    if meter_facts.get("source") == "estimated":
        notes.append(
            "Energy is ESTIMATED from wall and CPU time (no energy counter readable on this machine); "
            "it ranks policies by compute spent, not by measured joules."
        )
    if random_weights:
        notes.append("The model has random weights: quality figures are meaningless for it.")
    notes.append(
        "energy_j is the runtime's per-request figure, what budgets are held to: image preprocessing and "
        "the vision encoder (run while planning) plus prefill and decode; encode_j_mean is the first part."
    )
    notes.append(
        "violations_pct: requests whose energy exceeded the budget, over all requests of the row; "
        "refused_pct: budgets refused up front (422, no energy spent, quality 0)."
    )
    notes.append(
        "predictor_mape_pct: |predicted - energy| / energy, predicted before each request ran "
        "(before the online update) at its actual token counts."
    )
    return notes


if __name__ == "__main__":
    raise SystemExit(main())
