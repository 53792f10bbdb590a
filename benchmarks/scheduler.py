"""Budget scheduler benchmark: adherence and utilisation per policy, held-out MAPE, planning cost.

On one machine and one model (the tiny random-weight demo model unless `--model`), it

1. warms the engine, calibrates the energy profile with a sweep (`joulecap.runtime.calibrate`,
   the same code as `joulecap calibrate`),
2. measures the calibrated predictor's MAPE on held-out requests (varied images, prompts and
   output lengths, none on the sweep grid), with the predictor frozen,
3. runs one workload of `--requests` requests (varied images, prompts, budgets) under every
   registered policy, each starting from the calibrated predictor and learning online as the
   server would, and reports budget adherence (share of requests at or under budget), refusals
   (422) and utilisation (mean used/budget over the requests where the budget binds, i.e.
   where the `baseline` run of the same request used more than the budget),
4. times `Scheduler.plan` (p50) per policy, and the spectral computation alone,
5. runs a slice of the workload with and without the brevity instruction.

Targets (issue 4): joint >= 99% of requests at or under budget and >= 85% mean use where the
budget binds; calibrated MAPE <= 5%; planning <= 1 ms p50 besides the spectral computation.
Energy comes from the active meter and is labelled (on a CPU box: the estimate meter, not a
measurement). Prints a table and writes JSON.

    python benchmarks/scheduler.py [--requests 100] [--model DIR] [--meter auto]
        [--out benchmarks/results/scheduler_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

import contextlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmarks import _common as common
from benchmarks._heldout import held_out_mape

log = logging.getLogger("benchmarks.scheduler")

PROMPTS = (
    "What is in the image?",
    "Describe the scene in detail, listing every object with its colour and position.",
    "Is there a red block on the left? Answer yes or no.",
    "Count the shapes.",
    "The robot must pick up the largest object in view. Explain which one it is, where it is, "
    "how the gripper should approach it and what could go wrong during the grasp.",
    "Summarise the picture in one sentence.",
)


@dataclass(frozen=True)
class Item:
    """One workload request."""

    seed: int
    image_px: int
    prompt: str
    max_tokens: int
    budget_scale: float


def make_image(px: int, seed: int) -> Image.Image:
    """A random scene: a background gradient and a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:px, 0:px]
    base = rng.integers(0, 255, 3)
    img = np.stack(
        [(x * 255 // px + base[0]) % 256, (y * 255 // px + base[1]) % 256, np.full_like(x, base[2])], -1
    )
    for _ in range(int(rng.integers(1, 6))):
        w, h = rng.integers(px // 8, px // 2, 2)
        x0, y0 = rng.integers(0, px - w), rng.integers(0, px - h)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def workload(n: int, seed: int) -> list[Item]:
    """`n` varied requests; budgets are drawn later relative to each request's baseline cost."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        items.append(
            Item(
                seed=seed * 100_000 + i,
                image_px=int(rng.choice([48, 96, 160, 256, 384])),
                prompt=str(rng.choice(PROMPTS)),
                max_tokens=int(rng.choice([4, 8, 16, 24])),
                # < 1: the budget binds; > 1: it does not (mix of both, as in real traffic).
                budget_scale=float(rng.choice([0.3, 0.5, 0.7, 0.85, 1.0, 1.5])),
            )
        )
    return items


def within_budget(row: dict[str, Any]) -> bool:
    """Whether a request that ran stayed at or under its budget (the adherence the targets count)."""
    return bool(row["used_j"] <= row["budget_j"])


def planning_p50_ms(planning: dict[str, Any]) -> float:
    """The planning time judged against the target: the slowest policy's p50 besides the spectral part."""
    return max(v["besides_spectral_p50_ms"] for v in planning.values() if isinstance(v, dict))


def judge_targets(within_pct: float, use_pct: float, mape_pct: float, planning_ms: float) -> dict[str, bool]:
    """Issue 4's targets: joint adherence and use where binding, held-out MAPE, planning p50."""
    return {
        "joint_within_budget_pct>=99": within_pct >= 99.0,
        "joint_mean_use_binding_pct>=85": use_pct >= 85.0,
        "calibrated_heldout_mape_pct<=5": mape_pct <= 5.0,
        "planning_besides_spectral_p50_ms<=1": planning_ms <= 1.0,
    }


def run_policy(rt: Any, items: list[Item], budgets: list[float | None], policy: str) -> list[dict[str, Any]]:
    """Run the workload under `policy`; one record per request (refusals included)."""
    from joulecap.runtime.errors import BudgetTooSmall

    rows = []
    for item, budget in zip(tqdm(items, desc=policy, leave=False), budgets, strict=True):
        image = make_image(item.image_px, item.seed)
        try:
            res = rt.chat(
                item.prompt, images=[image], energy_budget_j=budget, max_tokens=item.max_tokens, policy=policy
            )
        except BudgetTooSmall as exc:
            rows.append({"budget_j": budget, "refused": True, "min_j": exc.min_j})
            continue
        rows.append(
            {
                "budget_j": budget,
                "refused": False,
                "used_j": res.energy.total_j,
                "prefill_j": res.energy.prefill_j,
                "decode_j": res.energy.decode_j,
                "predicted_j": res.plan.predicted_j,
                # The predictor has already learned from this request: a diagnostic, not the
                # prediction the plan was made with (that one is in `predicted_j`, encode included).
                "predicted_prefill_j": rt.predictor.predict(
                    res.generation.prefill_tokens - res.generation.visual_tokens_kept,
                    res.generation.visual_tokens_kept,
                    0,
                ).total_j,
                "tokens": res.completion_tokens,
                "max_new_tokens": res.plan.max_new_tokens,
                "visual_kept": res.generation.visual_tokens_kept,
                "visual_in": res.generation.visual_tokens_in,
                "stop_reason": res.generation.stop_reason,
                "source": res.energy.source,
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]], binds: list[bool]) -> dict[str, Any]:
    """Adherence, refusals and utilisation of one policy's run."""
    ran = [(r, b) for r, b in zip(rows, binds, strict=True) if not r["refused"]]
    within = [within_budget(r) for r, _ in ran]
    use_binding = [r["used_j"] / r["budget_j"] for r, b in ran if b]
    over = [r["used_j"] / r["budget_j"] - 1 for r, _ in ran if r["used_j"] > r["budget_j"]]
    return {
        "requests": len(rows),
        "ran": len(ran),
        "refused_422": sum(r["refused"] for r in rows),
        "within_budget_pct": 100.0 * sum(within) / len(ran) if ran else float("nan"),
        "binding": len(use_binding),
        "mean_use_binding_pct": 100.0 * statistics.fmean(use_binding) if use_binding else float("nan"),
        "max_overshoot_pct": 100.0 * max(over) if over else 0.0,
        "mean_tokens": statistics.fmean(r["tokens"] for r, _ in ran) if ran else float("nan"),
        "mean_visual_kept": statistics.fmean(r["visual_kept"] for r, _ in ran) if ran else float("nan"),
        "mean_energy_j": statistics.fmean(r["used_j"] for r, _ in ran) if ran else float("nan"),
        "stopped_by_governor": sum(r["stop_reason"] == "energy_budget" for r, _ in ran),
    }


def planning_overhead(rt: Any, items: list[Item], budgets: list[float | None], reps: int) -> dict[str, Any]:
    """p50 of `Scheduler.plan` per policy, with the spectral computation timed apart per call.

    The policies' `spectral_budget` is wrapped by a timer for the measurement, so "besides the
    spectral computation" is each call's total minus the spectral time inside that same call.
    """
    import joulecap.policies.base as policy_base
    from joulecap.policies import available_policies
    from joulecap.runtime.scheduler import Scheduler

    prepared = []
    for item, budget in zip(items, budgets, strict=True):
        req = rt.build_request(item.prompt, [make_image(item.image_px, item.seed)], energy_budget_j=budget)
        prepared.append(rt.engine.prepare(req))
    sched = Scheduler(rt.config.scheduler, rt.predictor)
    inner = {"ns": 0}
    real = policy_base.spectral_budget

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return real(*args, **kwargs)
        finally:
            inner["ns"] += time.perf_counter_ns() - t0

    policy_base.spectral_budget = timed
    out: dict[str, Any] = {}
    try:
        for name in available_policies():
            total, besides, spectral = [], [], []
            for p in prepared:
                named = _with_policy(p, name)
                for _ in range(reps):
                    inner["ns"] = 0
                    t0 = time.perf_counter_ns()
                    with contextlib.suppress(Exception):  # 422s are part of planning cost too
                        sched.plan(named)
                    dt = time.perf_counter_ns() - t0
                    total.append(dt / 1e6)
                    besides.append((dt - inner["ns"]) / 1e6)
                    spectral.append(inner["ns"] / 1e6)
            out[name] = {
                "p50_ms": common.pct(total, 50),
                "p90_ms": common.pct(total, 90),
                "besides_spectral_p50_ms": common.pct(besides, 50),
                "spectral_p50_ms": common.pct(spectral, 50),
            }
    finally:
        policy_base.spectral_budget = real
    out["joint_besides_spectral_p50_ms"] = out["joint"]["besides_spectral_p50_ms"]
    return out


def _with_policy(prepared: Any, name: str) -> Any:
    # Request and PreparedRequest are frozen; planning only reads them.
    request = replace(prepared.request, policy=name)
    return replace(prepared, request=request)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=100, help="Workload size per policy (>= 100 for the report)."
    )
    parser.add_argument("--heldout", type=int, default=40, help="Held-out requests for the MAPE.")
    parser.add_argument("--model", default=None, help="Model directory (default: the tiny demo model).")
    parser.add_argument("--meter", default="auto", help="Meter backend (auto picks the best available).")
    parser.add_argument("--quick-calibration", action="store_true", help="Use the --quick sweep.")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (0 = torch's default). 1 by default: on a small shared CPU, "
        "PyTorch's spinning worker threads make a tiny model's energy vary 10x between identical runs.",
    )
    parser.add_argument(
        "--sample-hz",
        type=float,
        default=100.0,
        help="Meter sampling rate. The governor sees energy only as fast as the sampler reads it; "
        "at the runtime's default 10 Hz a 0.2 s request gets one or two readings.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--session-note",
        default=None,
        help="Free text saved as the JSON's `session_note`: which code and conditions "
        "(benchmarks/pool.py shows it).",
    )
    parser.add_argument("--out", default="benchmarks/results/scheduler_cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from joulecap.policies import available_policies
    from joulecap.runtime.calibrate import QUICK, SweepSpec, calibrate, format_table
    from joulecap.runtime.runtime import Runtime
    from joulecap.runtime.scheduler import Scheduler

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="joulecap-sched-bench-"))
    cfg = common.bench_config(
        model=args.model, engine="transformers", meter=args.meter, work_dir=work, sample_hz=args.sample_hz
    )
    rt = Runtime(cfg)
    try:
        meter_facts = dict(rt.monitor.describe()) if hasattr(rt.monitor, "describe") else {}
        label = common.energy_label(meter_facts)
        print(
            f"model {rt.info.model} ({rt.info.params_b * 1e3:.2f} M params) on {rt.info.device}; "
            f"energy {label}"
        )

        # 1. calibrate (a mid-size sweep by default, 112 runs, whose output lengths span the held-out
        # requests' 2-43; the CLI default sweep is larger)
        spec = (
            QUICK
            if args.quick_calibration
            else SweepSpec((0, 64, 256), (0.0, 0.5, 1.0), (4, 60), (1, 8, 24, 48), reps=2, warmup=3)
        )
        t0 = time.time()
        cal = calibrate(rt.engine, rt.monitor, spec, work / "sweep.jsonl", header={"bench": 1})
        print(format_table(cal).split("\n\n")[-1])
        calibration_s = time.time() - t0

        # 2. held-out MAPE of the frozen calibrated predictor
        # Beside the frozen predictor, the online one as the server runs it (RLS and speed factor,
        # from the scheduler config) and RLS alone, each a copy learning from every measurement.
        online = {
            "server": _fresh(cal, rt.config.learning.speed_alpha),
            "rls_only": _fresh(cal, 0.0),
        }
        heldout = held_out_mape(
            rt,
            cal.predictor,
            args.heldout,
            args.seed + 7,
            prompts=PROMPTS,
            make_image=make_image,
            online=online,
        )
        print(
            f"held-out MAPE {heldout['mape_pct']:.1f}% frozen, "
            f"{heldout['online']['server']['mape_pct']:.1f}% online over {heldout['requests']} requests"
        )

        # 3. workload under every policy; budgets relative to each request's measured cost when
        # run without limits (a first baseline pass), so "binding" does not depend on the fit.
        items = workload(args.requests, args.seed)
        policies = ["baseline"] + [p for p in available_policies() if p != "baseline"]
        # Interleaved: each request runs unconstrained (its budget is a fraction of that measured
        # energy), then under every policy back to back, so load swings from other jobs on the
        # machine hit all policies alike. Each policy keeps its own predictor and scheduler (with
        # its learned feasibility margin), learning online.
        arms = {name: Scheduler(rt.config.scheduler, _fresh(cal)) for name in [*policies, "free"]}
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in policies}
        budgets: list[float | None] = []
        free_j: list[float] = []
        for item in tqdm(items, desc="workload"):
            rt.scheduler = arms["free"]
            rt.predictor = rt.scheduler.predictor
            free = run_policy(rt, [item], [None], "baseline")[0]
            free_j.append(free["used_j"])
            budget = round(free["used_j"] * item.budget_scale, 4)
            budgets.append(budget)
            for name in policies:
                rt.scheduler = arms[name]
                rt.predictor = rt.scheduler.predictor
                results[name].extend(run_policy(rt, [item], [budget], name))
        binds = [(not r["refused"]) and r["used_j"] > r["budget_j"] for r in results["baseline"]]
        summary = {name: summarise(rows, binds) for name, rows in results.items()}
        online_mape = {name: arms[name].predictor.stats()["mape"] for name in policies}
        margins = {name: arms[name].margin.stats() for name in policies}
        first_steps = {name: arms[name].first_step.stats() for name in policies}

        # 4. planning overhead
        rt.predictor = _fresh(cal)
        rt.scheduler = Scheduler(rt.config.scheduler, rt.predictor)
        overhead = planning_overhead(rt, items[:30], budgets[:30], reps=20)

        # 5. brevity on a slice
        n_brev = min(24, len(items))
        brevity: dict[str, Any] = {}
        for flag in (False, True):
            rt.predictor = _fresh(cal)
            rt.scheduler = Scheduler(replace(rt.config.scheduler, brevity=flag), rt.predictor)
            rows = run_policy(rt, items[:n_brev], budgets[:n_brev], "joint")
            brevity["on" if flag else "off"] = summarise(rows, binds[:n_brev])
    finally:
        rt.close()

    _print_table(summary, heldout, overhead, brevity)
    joint = summary["joint"]
    planning_ms = planning_p50_ms(overhead)
    server_mape = heldout["online"]["server"]["mape_pct"]
    use_pct = joint["mean_use_binding_pct"]
    targets = judge_targets(joint["within_budget_pct"], use_pct, server_mape, planning_ms)
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'NOT MET'}")
    result = {
        "benchmark": "scheduler",
        "session_note": args.session_note,
        "machine": common.machine_info(),
        "model": {
            "name": rt.info.model,
            "params_b": rt.info.params_b,
            "device": rt.info.device,
            "dtype": rt.info.dtype,
            "random_weights": rt.info.random_weights,
        },
        "energy_source": label,
        "meter": meter_facts,
        "free_pass_mean_energy_j": statistics.fmean(free_j),
        "workload": {
            "requests": args.requests,
            "seed": args.seed,
            "budget_scales": sorted({i.budget_scale for i in items}),
            "binding_requests": sum(binds),
        },
        "calibration": {
            "spec": spec.__dict__,
            "runs": len(cal.samples),
            "seconds": calibration_s,
            "r2": cal.joules.r2,
            "fit_mape_pct": 100 * cal.joules.mape,
            "a_d_over_a_p": cal.per_model.a_d_over_a_p,
            "coefficients": cal.joules.coefficients,
        },
        "heldout": heldout,
        "online_rolling_mape_pct": {k: None if v is None else 100 * v for k, v in online_mape.items()},
        "feasibility_margin_at_end": margins,
        "first_step_premium_at_end": first_steps,
        "policies": summary,
        # Per-request rows of the budget-holding policies, for diagnosing overshoots.
        "requests": {name: results[name] for name in ("joint", "output_budget") if name in results},
        "planning": overhead,
        "brevity": brevity,
        "targets": targets,
        "duration_s": time.time() - started,
        "notes": [
            "Budgets are each request's measured energy in a first unconstrained baseline pass times a "
            "scale in {0.3 .. 1.5}; 'binding' = the baseline run with the budget (not held) used more "
            "than the budget.",
            "Policies that do not hold budgets (baseline, fixed_output, fixed_prune, eadaprune) show how "
            "often budgets are exceeded without the scheduler.",
            "Requests are interleaved (unconstrained pass, then every policy, per request) so load swings "
            "hit all policies alike; each policy starts from the same calibrated predictor and learns "
            "online, as a server does (online_rolling_mape_pct: its last-100 MAPE at the end).",
            f"torch intra-op threads: {torch.get_num_threads()} (--torch-threads); meter sampling "
            f"{args.sample_hz:g} Hz (--sample-hz).",
            "heldout.repeat_ape_pct, heldout.refit_loo_mape_pct and heldout.reference_ape_pct are floors "
            "set by the machine and the meter, not by the predictor (see benchmarks/_heldout.py): when "
            "they exceed 5%, a frozen predictor of this form cannot show the MAPE target here.",
            "heldout.mape_pct scores the calibrated predictor frozen; heldout.online the same predictor "
            "learning from each held-out measurement after predicting it: 'server' as the runtime runs "
            "it (RLS and the speed factor), 'rls_only' with speed_alpha 0. The MAPE target is judged on "
            "'server', the predictor a deployment plans with.",
            (
                "Random-weight model: answers are meaningless and rarely stop early, so output lengths "
                "run to the plan; the brevity instruction cannot change its answers, only the prompt."
                if rt.info.random_weights
                else "The brevity instruction is a system message the model may not have been trained "
                "on (TinyVQA was not): plans pay for its prompt tokens (PreparedRequest.hint_tokens), "
                "so 'on' shows its cost as much as any change in answer length."
            ),
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {out}")
    return 0


def _fresh(cal: Any, speed_alpha: float) -> Any:
    """A copy of the calibrated predictor (each run learns on its own copy)."""
    from joulecap.runtime.predictor import Predictor

    p = cal.predictor
    return Predictor(
        *p.coefficients,
        calibrated=True,
        source=p.source,
        forgetting=p.forgetting,
        covariance=p.covariance(),
        fit=p.fit,
        power_w=p.power_w,
        speed_alpha=speed_alpha,
    )


def _print_table(
    summary: dict[str, Any], heldout: dict[str, Any], overhead: dict[str, Any], brevity: dict[str, Any]
) -> None:
    head = (
        f"{'policy':<14}{'ran':>5}{'422':>5}{'<=budget %':>12}{'use % (binding)':>17}{'max over %':>12}"
        f"{'tokens':>8}{'vis kept':>10}{'gov stops':>11}{'plan p50 ms':>13}"
    )
    print()
    print(head)
    for name, s in summary.items():
        print(
            f"{name:<14}{s['ran']:>5}{s['refused_422']:>5}{s['within_budget_pct']:>12.1f}"
            f"{s['mean_use_binding_pct']:>17.1f}{s['max_overshoot_pct']:>12.1f}{s['mean_tokens']:>8.1f}"
            f"{s['mean_visual_kept']:>10.1f}{s['stopped_by_governor']:>11}{overhead[name]['p50_ms']:>13.3f}"
        )
    print(
        f"\njoint: spectral computation p50 {overhead['joint']['spectral_p50_ms']:.3f} ms; "
        f"joint besides spectral p50 {overhead['joint_besides_spectral_p50_ms']:.3f} ms"
    )
    print(
        f"held-out MAPE, frozen calibrated predictor: {heldout['mape_pct']:.1f}% of the run (median "
        f"{heldout['median_ape_pct']:.1f}%, p90 {heldout['p90_ape_pct']:.1f}%); "
        f"{heldout['request_mape_pct']:.1f}% of the whole request with the encode measured "
        f"({heldout['encode_share_pct']:.0f}% of it)"
    )
    for name, o in heldout["online"].items():
        print(
            f"held-out MAPE, online ({name}, speed_alpha {o['speed_alpha']:g}): {o['mape_pct']:.1f}% "
            f"(median {o['median_ape_pct']:.1f}%)"
        )
    print(
        f"this machine's floors: repeat run-to-run {heldout['repeat_ape_pct']:.1f}%, "
        f"held-out refit (leave-one-out) {heldout['refit_loo_mape_pct']:.1f}%, fixed reference "
        f"request against its own mean {heldout['reference_ape_pct']:.1f}%"
    )
    for k, s in brevity.items():
        print(
            f"brevity {k:<3}: tokens {s['mean_tokens']:.1f}, energy {s['mean_energy_j']:.3f} J, "
            f"<= budget {s['within_budget_pct']:.1f}%, governor stops {s['stopped_by_governor']}"
        )


if __name__ == "__main__":
    sys.exit(main())
