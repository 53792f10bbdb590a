r"""Copy a trained TinyVQA checkpoint into the package data directory with its `joulecap.json` marker.

    python -m benchmarks.tinyvqa.package --src /tmp/tinyvqa_ckpt/final \
        --accuracy benchmarks/results/tinyvqa_accuracy.json

Only the files `from_pretrained` needs are copied; the marker records that the weights are trained
(`random_weights: false`), the task and the measured held-out accuracy, so the server can report it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.tinyvqa.eval import DEFAULT_MODEL

_KEEP = (".json", ".safetensors", ".jinja", ".txt")
MAX_WEIGHTS_BYTES = 20 * 1024 * 1024
MAX_STAGES = 8
"""`train_stages` stops following `init_from` after this many records (a cycle guard)."""


def train_stages(src: Path) -> list[dict[str, Any]]:
    """The `train_meta.json` of `src` and of each checkpoint it was started from, oldest first.

    Follows `init_from` while the earlier checkpoint's record is still on disk, so a two-stage
    model records both stages (the last one alone would not say how its start was trained).
    """
    stages: list[dict[str, Any]] = []
    meta_path: Path | None = src / "train_meta.json"
    while meta_path is not None and meta_path.is_file() and len(stages) < MAX_STAGES:
        meta = json.loads(meta_path.read_text())
        stages.insert(0, meta)
        init = meta.get("init_from")
        meta_path = Path(init) / "train_meta.json" if isinstance(init, str) else None
    return stages


def package(src: Path, dst: Path, accuracy_json: Path) -> dict[str, object]:
    """Copy `src` to `dst` (replacing it) and write the marker; returns the marker."""
    weights = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    if not weights or size > MAX_WEIGHTS_BYTES:
        raise SystemExit(f"{src}: weights {size} bytes (need 1 B .. {MAX_WEIGHTS_BYTES} B of safetensors)")
    doc = json.loads(accuracy_json.read_text())
    full = next(r for r in doc["results"] if r["condition"] == "full")
    stages = train_stages(src)
    marker: dict[str, object] = {
        "random_weights": False,
        "arch": "llava",
        "task": "tinyvqa",
        "accuracy": round(full["exact_short"], 4),
        "accuracy_by_type": {
            k.removeprefix("exact_"): round(v, 4)
            for k, v in full.items()
            if k.startswith("exact_") and isinstance(v, float)
        },
        "describe_recall": round(full["describe_recall"], 4),
        "describe_precision": round(full["describe_precision"], 4),
        "eval": {"split": doc["split"], "n_examples": doc["n_examples"], "seed": doc["seed"]},
        "train": stages[-1] if stages else None,
        "stages": stages,
        "total_train_s": sum(float(m.get("train_s", 0.0)) for m in stages),
        "trained_by": "python -m benchmarks.tinyvqa.train",
    }
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in _KEEP and p.name != "train_meta.json":
            shutil.copy2(p, dst / p.name)
    (dst / "joulecap.json").write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--dst", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--accuracy", type=Path, required=True)
    args = ap.parse_args()
    print(json.dumps(package(args.src, args.dst, args.accuracy), indent=2))


if __name__ == "__main__":
    main()
