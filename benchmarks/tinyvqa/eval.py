"""Accuracy of the trained TinyVQA model: per question type, vs visual tokens kept, vs max_new_tokens.

Held-out test examples (`make_example("test", i)`, never seen in training) are answered greedily.
Visual-token pruning is done exactly as the transformers engine does it: the image features of
`get_image_features` are reduced to the kept tokens (`joulecap.kernels.select_tokens`, or a
`spectral_budget` count then leverage selection for E-AdaPrune) and spliced in place of the
`<image>` placeholders, so the LM input really gets shorter. A `max_new_tokens` cap is scored by
truncating the uncapped greedy answer to its first `cap` tokens, which is exactly what greedy decoding
under that cap returns.

    python -m benchmarks.tinyvqa.eval --model runtime/data/tinyvqa --n 500

writes `benchmarks/results/tinyvqa_accuracy.json` (with the date, the machine, its load average at
start and end, and the command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.tinyvqa.generate import COLORS, SHORT_QTYPES, Example, make_example, parse_objects
from benchmarks.tinyvqa.model import messages

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "runtime" / "data" / "tinyvqa"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "tinyvqa_accuracy.json"
CAPS = (1, 2, 4, 8, 12, 16, 24, 32)
MAX_NEW_TOKENS = 48

Selector = Callable[[torch.Tensor], torch.Tensor]
"""Features `[N, D]` of one image -> sorted indices of the kept tokens."""


@dataclass(frozen=True)
class Condition:
    """One way of choosing the visual tokens."""

    name: str
    method: str
    keep_frac: float | None = None
    tau: float | None = None
    center: bool = False


CONDITIONS = (
    Condition("full", "all", 1.0),
    Condition("uniform@50%", "uniform", 0.5),
    Condition("uniform@25%", "uniform", 0.25),
    Condition("leverage@50%", "leverage", 0.5),
    Condition("leverage@25%", "leverage", 0.25),
    Condition("random@50%", "random", 0.5),
    Condition("random@25%", "random", 0.25),
    Condition("e-adaprune tau=0.99", "adaptive", tau=0.99),
    Condition("e-adaprune tau=0.95", "adaptive", tau=0.95),
)


def load(model_dir: Path | str) -> tuple[Any, Any]:
    """Model (eval mode) and processor through the ordinary `from_pretrained` path."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    return model, processor


def keep_indices(cond: Condition, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Kept token indices (sorted) for one image's features under `cond`."""
    from joulecap.kernels import select_tokens, spectral_budget
    from joulecap.policies.config import SchedulerConfig

    n = feats.shape[0]
    if cond.method == "all":
        return torch.arange(n)
    if cond.method == "adaptive":
        assert cond.tau is not None
        # As the scheduler's E-AdaPrune does it: spectral budget floored at `k_min` tokens.
        k = int(spectral_budget(feats, cond.tau, k_min=SchedulerConfig().k_min, center=cond.center))
        return select_tokens(feats, k, method="leverage") if k < n else torch.arange(n)
    assert cond.keep_frac is not None
    k = max(1, round(n * cond.keep_frac))
    if cond.method == "random":
        return torch.randperm(n, generator=gen)[:k].sort().values
    return select_tokens(feats, k, method=cond.method)


class Answerer:
    """Greedy answers with a chosen subset of the visual tokens spliced into the prompt."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = int(model.config.image_token_index)
        stop = model.generation_config.eos_token_id
        self.stop_ids = set(stop if isinstance(stop, list) else [stop])

    @torch.inference_mode()
    def encode(self, image: Any, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids (with every placeholder) and the image's `[N, D]` features."""
        text = self.processor.apply_chat_template(
            messages(question), add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=text, images=image, return_tensors="pt")
        out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        return inputs["input_ids"][0], out.pooler_output[0]

    @torch.inference_mode()
    def answer_ids(self, ids: torch.Tensor, feats: torch.Tensor, keep: torch.Tensor) -> list[int]:
        """Greedy output ids (stop token excluded) with only `keep` visual tokens in the prompt."""
        embeds = self.model.get_input_embeddings()(ids)
        pos = (ids == self.image_id).nonzero().flatten()
        embeds[pos] = feats.to(embeds.dtype)
        mask = torch.ones(ids.shape[0], dtype=torch.bool)
        dropped = torch.ones(pos.numel(), dtype=torch.bool)
        dropped[keep] = False
        mask[pos[dropped]] = False
        embeds = embeds[mask].unsqueeze(0)
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
        )[0].tolist()
        return [t for t in out[: next((i for i, t in enumerate(out) if t in self.stop_ids), len(out))]]

    def text(self, ids: Sequence[int]) -> str:
        """Decoded answer."""
        return str(self.tok.decode(list(ids), skip_special_tokens=True)).strip()


def describe_counts(pred: str, truth: str) -> tuple[int, int, int]:
    """(matched, predicted, true) object counts of a describe answer (multisets of colour+shape)."""
    p, t = Counter(parse_objects(pred)), Counter(parse_objects(truth))
    return sum((p & t).values()), sum(p.values()), sum(t.values())


def subtype(ex: Example) -> str:
    """A finer label than `qtype` that separates what the model must see to answer.

    Colour of a lone object needs no shape recognition, colour among several does; counting a
    colour needs none either, counting a shape does; yes/no types are split by the true answer
    (a model stuck on one constant answer scores 100% on one half and 0% on the other).
    """
    if ex.qtype == "count":
        return "count_of_colour" if any(w in COLORS for w in ex.question.split()) else "count_of_shape"
    if ex.qtype in ("presence", "position"):
        return f"{ex.qtype}_{ex.answer}"
    if ex.qtype == "color":
        return "color_lone_object" if len(ex.objects) == 1 else "color_among_several"
    return ex.qtype


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact match per type and subtype, short-question overall, describe recall/precision."""
    res: dict[str, Any] = {}
    for qt in (*SHORT_QTYPES, "describe"):
        sel = [r for r in rows if r["qtype"] == qt]
        if sel:
            res[f"exact_{qt}"] = sum(r["pred"] == r["answer"] for r in sel) / len(sel)
    short = [r for r in rows if r["qtype"] in SHORT_QTYPES]
    res["exact_short"] = sum(r["pred"] == r["answer"] for r in short) / max(1, len(short))
    desc = [describe_counts(r["pred"], r["answer"]) for r in rows if r["qtype"] == "describe"]
    matched, predicted, true = (sum(x) for x in zip(*desc, strict=True)) if desc else (0, 0, 0)
    res["describe_recall"] = matched / max(1, true)
    res["describe_precision"] = matched / max(1, predicted)
    res["n_short"], res["n_describe"] = len(short), len(desc)
    subtypes = sorted({r["subtype"] for r in rows if "subtype" in r and r["qtype"] in SHORT_QTYPES})
    res["exact_by_subtype"] = {
        st: _mean([float(r["pred"] == r["answer"]) for r in rows if r.get("subtype") == st])
        for st in subtypes
    }
    return res


def evaluate(
    model_dir: Path | str,
    n: int,
    seed: int = 0,
    conditions: Sequence[Condition] = CONDITIONS,
    split: str = "test",
) -> dict[str, Any]:
    """Run every condition on the first `n` examples of `split`; returns the result document.

    Report the test split; choose between candidate models on the validation split, so that the
    reported figure is not the best of several looks at the test questions.
    """
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):  # results are keyed by name: a repeat would merge two conditions
        raise ValueError(f"condition names must be unique, got {names}")
    model, processor = load(model_dir)
    ans = Answerer(model, processor)
    gen = torch.Generator().manual_seed(seed)
    per_cond: dict[str, list[dict[str, Any]]] = {c.name: [] for c in conditions}
    t0 = time.time()
    for i in range(n):
        ex, img = make_example(split, i, seed=seed)
        ids, feats = ans.encode(img, ex.question)
        for cond in conditions:
            keep = keep_indices(cond, feats, gen)
            out = ans.answer_ids(ids, feats, keep)
            per_cond[cond.name].append(
                {
                    "qtype": ex.qtype,
                    "subtype": subtype(ex),
                    "answer": ex.answer,
                    "ids": out,
                    "pred": ans.text(out),
                    "kept": int(keep.numel()),
                    "visual": int(feats.shape[0]),
                }
            )
    results = []
    for cond in conditions:
        rows = per_cond[cond.name]
        entry = {
            "condition": cond.name,
            "method": cond.method,
            "keep_frac": cond.keep_frac,
            "tau": cond.tau,
            "center": cond.center,
            "mean_kept_frac": sum(r["kept"] / r["visual"] for r in rows) / len(rows),
            **score(rows),
            "by_max_new_tokens": {
                str(cap): score([{**r, "pred": ans.text(r["ids"][:cap])} for r in rows]) for cap in CAPS
            },
        }
        results.append(entry)
    return {
        "model_dir": str(model_dir),
        "n_examples": n,
        "split": split,
        "seed": seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eval_s": round(time.time() - t0, 1),
        "answer_lengths_tokens": {
            "describe_mean": _mean(
                [len(r["ids"]) for r in per_cond[conditions[0].name] if r["qtype"] == "describe"]
            ),
            "short_mean": _mean(
                [len(r["ids"]) for r in per_cond[conditions[0].name] if r["qtype"] != "describe"]
            ),
        },
        "results": results,
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def table(doc: dict[str, Any]) -> str:
    """Plain-text tables: conditions, then max_new_tokens caps with all visual tokens."""
    cols = ("exact_short", *(f"exact_{q}" for q in SHORT_QTYPES), "describe_recall", "describe_precision")
    names = [c.replace("exact_", "").replace("describe_", "desc_") for c in cols]
    head = f"{'condition':<22}{'kept':>6}" + "".join(f"{c:>11}" for c in names)
    lines = [head, "-" * len(head)]
    for r in doc["results"]:
        lines.append(
            f"{r['condition']:<22}{r['mean_kept_frac']:>6.2f}"
            + "".join(f"{r.get(c, float('nan')):>11.3f}" for c in cols)
        )
    full = next(r for r in doc["results"] if r["condition"] == "full")
    lines += ["", "all visual tokens, by subtype:"]
    lines += [f"  {st:<24}{acc:>7.3f}" for st, acc in full["exact_by_subtype"].items()]
    lines += ["", "all visual tokens, answer truncated at max_new_tokens:"]
    lines += [f"{'max_new_tokens':<28}" + "".join(f"{c:>11}" for c in names)]
    for cap, s in full["by_max_new_tokens"].items():
        lines.append(f"{cap:<28}" + "".join(f"{s.get(c, float('nan')):>11.3f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    from benchmarks._common import RunRecord

    ap = argparse.ArgumentParser(description="TinyVQA accuracy vs visual tokens kept and max_new_tokens.")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="test", choices=["val", "test"], help="val: to choose between models.")
    args = ap.parse_args(argv)
    record = RunRecord.start("-m benchmarks.tinyvqa.eval", argv)
    torch.set_num_threads(args.threads)
    doc = evaluate(args.model, args.n, args.seed, split=args.split)
    doc["model_dir"] = _repo_relative(args.model)
    meta = args.model / "joulecap.json"
    if meta.is_file():
        doc["model_meta"] = json.loads(meta.read_text())
    doc = record.stamp({"benchmark": "tinyvqa_accuracy", **doc})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\nwrote {args.out} ({doc['eval_s']} s)")


def _repo_relative(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (results name no checkout)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
