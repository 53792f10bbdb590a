"""Linear probes of where a TinyVQA model keeps the positions that position questions need.

For held-out position questions ("is the circle left of the red square?"), at every LM layer:

* `answer_step_offset_r2`: how well a ridge probe on the hidden state of the step that emits the
  answer recovers the two named objects' offset (first minus second centre, x and y);
* `shape_word_centre_r2`: the same for each shape word's hidden state and its object's centre.

Probes are fitted on two thirds of the questions and scored (R^2) on the rest. In a model trained
without `ref_aux.relation_target` that answered position at chance, they found the shape words
grounded and the answer step empty (R^2 below 0 at every layer); that loss is what fills it.

    python -m benchmarks.tinyvqa.probe --model DIR [--n 450]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.tinyvqa.eval import DEFAULT_MODEL
from benchmarks.tinyvqa.generate import make_example
from benchmarks.tinyvqa.model import messages
from benchmarks.tinyvqa.ref_aux import referents, shape_token_ids

FIRST_INDEX = 20_000
"""Validation examples from this index on (away from the ones `eval --split val` scores)."""


def ridge_r2(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> list[float]:
    """R^2 per target column of a ridge probe fitted on the first 2/3 of rows, scored on the rest."""
    m = len(x) * 2 // 3
    mu, sd = x[:m].mean(0), x[:m].std(0) + 1e-6
    xs = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(xs[:m].T @ xs[:m] + alpha * np.eye(xs.shape[1]), xs[:m].T @ y[:m])
    pred, test = xs[m:] @ w, y[m:]
    return [
        round(
            float(1 - ((pred[:, k] - test[:, k]) ** 2).sum() / ((test[:, k] - test[:, k].mean()) ** 2).sum()),
            3,
        )
        for k in range(y.shape[1])
    ]


@torch.no_grad()
def probe(model_dir: Path, n: int) -> dict[str, Any]:
    """Hidden states of `n` position questions, probed layer by layer (see the module docstring)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    shape_ids = shape_token_ids(processor.tokenizer)
    answer: dict[int, list[np.ndarray]] = {}
    words: dict[int, list[np.ndarray]] = {}
    offsets, centres = [], []
    for i in range(n):
        ex, img = make_example("val", FIRST_INDEX + i, qtype="position")
        (xa, ya), (xb, yb) = referents(ex)
        text = processor.apply_chat_template(
            messages(ex.question), add_generation_prompt=True, tokenize=False
        )
        inputs = processor(text=text, images=img, return_tensors="pt")
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        cols = [c for c, t in enumerate(inputs["input_ids"][0].tolist()) if t in shape_ids]
        for layer, h in enumerate(hidden):
            answer.setdefault(layer, []).append(h[0, -1].numpy())
            words.setdefault(layer, []).extend(h[0, cols].numpy())
        offsets.append((xa - xb, ya - yb))
        centres += [(xa, ya), (xb, yb)]
    y_off, y_ctr = np.asarray(offsets), np.asarray(centres)
    return {
        "model": str(model_dir),
        "questions": n,
        "layers": {
            layer: {
                "answer_step_offset_r2": ridge_r2(np.asarray(answer[layer]), y_off),
                "shape_word_centre_r2": ridge_r2(np.asarray(words[layer]), y_ctr),
            }
            for layer in answer
        },
    }


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=450, help="Position questions to probe.")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(probe(args.model, args.n), indent=1))


if __name__ == "__main__":
    main()
