"""Write the README example: a held-out TinyVQA image and the shipped model's answers about it.

    python -m benchmarks.tinyvqa.examples

writes `benchmarks/tinyvqa/examples/shapes.png` and `shapes.json` (questions, the model's answers
through the joulecap runtime with greedy decoding, under the default policy and under `joint`
with the README's 5 J budget, and with every visual token kept (`baseline`), and the reference
answers; each row names the policy that answered).
The image is the first held-out `describe` example with at least three objects: nothing is picked by
how well the model does on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.tinyvqa.generate import Example, make_example

OUT_DIR = Path(__file__).resolve().parent / "examples"
README_BUDGET_J = 5.0
"""The budget of the README's curl example (`X-Energy-Budget-J: 5`)."""


def pick() -> tuple[Example, Any]:
    """The first held-out describe example with >= 3 objects and a shape that occurs once."""
    i = 0
    while True:
        ex, img = make_example("test", i, qtype="describe")
        shapes = [o.shape for o in ex.objects]
        if len(ex.objects) >= 3 and any(shapes.count(s) == 1 for s in shapes):
            return ex, img
        i += 1


def questions(ex: Example) -> list[tuple[str, str]]:
    """(question, reference answer) about the picked scene."""
    shapes = [o.shape for o in ex.objects]
    single = next(o for o in ex.objects if shapes.count(o.shape) == 1)
    color = ex.objects[0].color
    count = sum(o.color == color for o in ex.objects)
    return [
        (ex.question, ex.answer),
        (f"what color is the {single.shape}?", single.color),
        (f"how many {color} objects are there?", str(count)),
    ]


def main() -> None:
    """CLI entry point."""
    from joulecap.runtime.config import JoulecapConfig
    from joulecap.runtime.runtime import Runtime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args()
    ex, img = pick()
    args.out.mkdir(parents=True, exist_ok=True)
    img.save(args.out / "shapes.png", optimize=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = JoulecapConfig()
        cfg = replace(
            base,
            engine=replace(base.engine, model=None),
            energy=replace(base.energy, meter="estimate"),
            paths=replace(
                base.paths,
                cache_dir=str(Path(tmp) / "cache"),
                ledger_path=str(Path(tmp) / "ledger.sqlite3"),
                profile_dir=str(Path(tmp) / "profiles"),
            ),
            calibration=replace(base.calibration, auto_calibrate=False),
        )
        rt = Runtime(cfg)
        try:
            rows = []
            for question, reference in questions(ex):
                # The default policy with the README curl's budget, `joint` (E-AdaPrune + output
                # budget) with the same budget, then every visual token kept.
                for policy, budget_j in (
                    (None, README_BUDGET_J),
                    ("joint", README_BUDGET_J),
                    ("baseline", None),
                ):
                    res = rt.chat(
                        question,
                        images=[img],
                        max_tokens=48,
                        temperature=0.0,
                        policy=policy,
                        energy_budget_j=budget_j,
                    )
                    rows.append(
                        {
                            "question": question,
                            "answer": res.text,
                            "reference": reference,
                            "visual_tokens_kept": list(res.plan.visual_keep),
                            "policy": res.plan.policy,
                            "budget_j": budget_j,
                            "right": res.text.strip() == reference,
                        }
                    )
        finally:
            rt.close()
    doc = {"image": "shapes.png", "split": "test", "index": ex.index, "model": rt.info.model, "qa": rows}
    (args.out / "shapes.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
