"""Plots of `benchmarks/run.py` and `benchmarks/paper.py` (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def run_plots(rows: list[dict[str, Any]], out: Path, source_label: str, model_label: str) -> list[str]:
    """Write the three PNG plots; returns their file names."""
    plt = _pyplot()
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    budgets = list(dict.fromkeys(r["budget_j"] for r in rows))
    cmap = plt.get_cmap("tab10")
    color = {p: cmap(i % 10) for i, p in enumerate(policies)}
    subtitle = textwrap.fill(f"{model_label}; energy {source_label}", 95)
    names = []

    fig, ax = plt.subplots(figsize=(7.5, 5))
    pts = [(r["energy_j_mean"], r["quality"]) for r in rows if finite(r["energy_j_mean"], r["quality"])]
    front = pareto_front(pts)
    if front:
        ax.plot(
            *zip(*front, strict=True), "k--", lw=1, alpha=0.6, label="Pareto front", drawstyle="steps-post"
        )
    for p in policies:
        mine = [r for r in rows if r["policy"] == p and finite(r["energy_j_mean"], r["quality"])]
        ax.plot(
            [r["energy_j_mean"] for r in mine], [r["quality"] for r in mine], "o-", color=color[p], label=p
        )
        for r in mine:
            ax.annotate(f"{r['budget_j']:.1f} J", (r["energy_j_mean"], r["quality"]), fontsize=7, alpha=0.7)
    ax.set(xlabel="energy per request, mean (J)", ylabel="quality (exact match / recall)")
    ax.set_title(f"Energy vs quality per policy (labels: budget)\n{subtitle}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    names.append("pareto.png")

    fig, ax = plt.subplots(figsize=(max(7.5, 0.5 * len(rows)), 5))
    width = 0.8 / max(1, len(budgets))
    for j, b in enumerate(budgets):
        for i, p in enumerate(policies):
            match = [r for r in rows if r["policy"] == p and r["budget_j"] == b]
            if not match or not finite(match[0]["prefill_j_mean"], match[0]["decode_j_mean"]):
                continue
            r = match[0]
            x = i + (j - (len(budgets) - 1) / 2) * width
            # Encode, LM prefill and decode stacked: together the request's energy.
            bottom = 0.0
            for key, part_color, label in (
                ("encode_j_mean", "tab:green", "encode"),
                ("prefill_j_mean", "tab:blue", "prefill"),
                ("decode_j_mean", "tab:orange", "decode"),
            ):
                value = r.get(key) or 0.0
                ax.bar(
                    x,
                    value,
                    width * 0.9,
                    bottom=bottom,
                    color=part_color,
                    label=label if i == j == 0 else None,
                )
                bottom += value
    ax.set_xticks(range(len(policies)), policies, rotation=20)
    ax.set(ylabel="energy per request, mean (J)")
    ax.set_title(
        f"Encode / prefill / decode per policy (bars left to right: budgets {budgets})\n{subtitle}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "energy_split.png", dpi=120)
    plt.close(fig)
    names.append("energy_split.png")

    fig, ax = plt.subplots(figsize=(7.5, 5))
    lim = max([b for b in budgets if b] + [r["energy_j_p95"] for r in rows if finite(r["energy_j_p95"])])
    ax.plot([0, lim], [0, lim], "k:", lw=1, label="energy = budget")
    for p in policies:
        mine = [r for r in rows if r["policy"] == p and finite(r["energy_j_mean"]) and r["budget_j"]]
        ax.plot(
            [r["budget_j"] for r in mine],
            [r["energy_j_mean"] for r in mine],
            "o-",
            color=color[p],
            label=f"{p}",
        )
        ax.plot(
            [r["budget_j"] for r in mine], [r["energy_j_p95"] for r in mine], "^", color=color[p], alpha=0.5
        )
    ax.set(xlabel="budget (J)", ylabel="energy used per request (J): o mean, ^ p95")
    ax.set_title(f"Budget vs energy used\n{subtitle}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "budget_vs_energy.png", dpi=120)
    plt.close(fig)
    names.append("budget_vs_energy.png")
    return names


def finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated (less energy and at least the quality of another), by energy."""
    front: list[tuple[float, float]] = []
    for e, q in sorted(points, key=lambda t: (t[0], -t[1])):
        if not front or q > front[-1][1]:
            front.append((e, q))
    return front


def paper_figure(res: dict[str, Any], path: Path, title: str) -> None:
    """One figure, six panels: power groups, decode share, token times (2), savings, predictor."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (a_pow, a_share, a_pre), (a_dec, a_save, a_pred) = axes
    labels, values = [], []
    for factor, facts in res["power"]["factors"].items():
        for group, watts in facts["mean_power_w"].items():
            labels.append(f"{factor}={group}")
            values.append(watts)
    a_pow.bar(range(len(values)), values, color="tab:blue")
    a_pow.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    a_pow.set(
        ylabel="mean power (W)", title=f"1. power by group (spread {res['power']['max_spread_pct']:.1f}%)"
    )

    per_n = res["decode_share"]["per_output_tokens"]
    ns = [int(n) for n in per_n]
    a_share.plot(ns, [per_n[str(n)]["energy_share_pct"] for n in ns], "o-", label="energy share")
    a_share.plot(ns, [per_n[str(n)]["time_share_pct"] for n in ns], "s--", label="time share (incl. encode)")
    a_share.axhspan(86, 97, color="grey", alpha=0.2, label="paper 86-97%")
    a_share.set(xlabel="output tokens", ylabel="decode share (%)", title="2. decode share")
    a_share.legend(fontsize=7)

    recs = res["runs"]["tokens"]
    tt = res["token_times"]
    xs = np.array([r["input_tokens"] for r in recs])
    a_pre.plot(xs, [1e3 * r["prefill_s"] for r in recs], ".", alpha=0.6)
    grid = np.linspace(xs.min(), xs.max(), 10)
    a_pre.plot(grid, 1e3 * (tt["prefill_slope_s_per_token"] * grid + tt["prefill_intercept_s"]), "k-")
    a_pre.set(xlabel="input tokens (prefill)", ylabel="prefill time (ms)", title="3a. prefill time vs input")
    dec = [r for r in recs if r["output_tokens"] >= 2]
    a_dec.plot([r["output_tokens"] for r in dec], [1e3 * r["decode_s"] for r in dec], ".", alpha=0.6)
    a_dec.set(
        xlabel="output tokens",
        ylabel="decode time (ms)",
        title=f"3b. decode time vs output ({tt['ratio_average']:.0f}x per token vs input; paper 11-39x)",
    )

    sv = res["savings"]["request"]
    keys = list(sv)
    a_save.bar(range(len(keys)), [sv[k] for k in keys], color=["tab:green", "tab:orange", "tab:red"])
    a_save.set_xticks(range(len(keys)), [k.removesuffix("_pct").replace("_", " ") for k in keys], fontsize=8)
    a_save.set(ylabel="energy saved (%)", title="4. savings vs all tokens, longest output")

    pf = res["predictor"]
    a_pred.plot(pf["test_measured_j"], pf["test_predicted_j"], "o", alpha=0.6)
    lim = max(pf["test_measured_j"] + pf["test_predicted_j"])
    a_pred.plot([0, lim], [0, lim], "k:")
    a_pred.set(
        xlabel="measured J (held out)",
        ylabel="predicted J",
        title=f"5. linear predictor R2 {pf['r2']:.3f}, MAPE {pf['mape_pct']:.1f}%",
    )
    fig.suptitle(textwrap.fill(title, 160), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
