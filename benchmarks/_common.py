"""Shared pieces of the benchmarks (`benchmarks/*.py`).

Machine facts and the record every result file carries (`RunRecord`: date, command, machine,
load), the runtime config a benchmark runs under, workloads (TinyVQA or a JSONL file), answer
scoring, and small statistics helpers. Nothing here runs a model by itself.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
import string
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from joulecap.runtime.config import JoulecapConfig


# ---------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(label: str | None = None) -> dict[str, Any]:
    """Facts about the machine a benchmark ran on (stored with every result).

    Args:
        label: The machine's name as the caller gives it (`--machine`); None: the detected one.

    """
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU available"
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "label": label or f"{os.cpu_count()}-core CPU ({cpu_model()}), {gpu}",
        # Timing-based figures suffer when other jobs share the CPU: keep the evidence with them.
        "load_avg_1_5_15": load_avg(),
    }


def load_avg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (`2026-12-03T09:47:43+00:00`)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def reproduce_command(invocation: str, argv: Sequence[str] | None = None) -> str:
    """The shell line that reproduces this run, from the repository root.

    Args:
        invocation: How the script is started after `python`: `benchmarks/load.py` or
            `-m benchmarks.stability`.
        argv: The arguments the script parsed; None reads them from `sys.argv`.

    """
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", *shlex.split(invocation), *args])


@dataclass
class RunRecord:
    """Where a result came from: every benchmark's JSON carries the same fields, from here.

    Start it before the measurement (`RunRecord.start`) so that the date and the load average at
    start describe the run; `fields()` at the end adds the machine, the load at the end (timing
    figures suffer when other jobs share the CPU: the evidence stays with them) and the duration.
    """

    command: str
    date: str = field(default_factory=utc_now)
    load_at_start: list[float] | None = field(default_factory=load_avg)
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, invocation: str, argv: Sequence[str] | None = None) -> RunRecord:
        """Begin the record of a run of `python INVOCATION ARGV` (see `reproduce_command`)."""
        return cls(command=reproduce_command(invocation, argv))

    def fields(self, machine: dict[str, Any] | None = None) -> dict[str, Any]:
        """`date`, `command`, `machine`, load averages at start and end, `duration_s`.

        Args:
            machine: Facts to record instead of `machine_info()` (e.g. with a caller's `label`).

        """
        facts = machine_info() if machine is None else machine
        return {
            "date": self.date,
            "command": self.command,
            "machine": facts,
            "load_avg_1_5_15_at_start": self.load_at_start,
            "load_avg_1_5_15_at_end": load_avg(),
            "duration_s": round(time.monotonic() - self.started, 3),
        }

    def stamp(self, doc: dict[str, Any], machine: dict[str, Any] | None = None) -> dict[str, Any]:
        """`doc` with `fields()` after its `benchmark` key (theirs replace the same keys of `doc`)."""
        record = self.fields(machine)
        head = {"benchmark": doc["benchmark"]} if "benchmark" in doc else {}
        return {**head, **record, **{k: v for k, v in doc.items() if k not in record and k not in head}}


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (None leaves torch's default); recorded by `machine_info`.

    On a CPU shared with other jobs, several spinning OpenMP threads per process make step times
    erratic; one thread per process keeps timings (and time-based energy estimates) steadier.
    """
    if threads is None:
        return
    import torch

    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- config
def bench_config(
    *,
    model: str | None,
    engine: str,
    meter: str,
    work_dir: Path,
    profile_dir: str | None = None,
    sample_hz: float | None = None,
) -> JoulecapConfig:
    """A runtime config for a benchmark: its own cache, an in-memory ledger, the chosen meter.

    Args:
        model: Model directory or hub id; None serves the runtime's demo model.
        engine: `transformers` or `vllm`.
        meter: Meter backend (`auto`, `estimate`, `rapl`, `nvml`, ...).
        work_dir: Scratch directory (profiles unless `profile_dir`). The demo model stays in the
            runtime's usual cache directory so it is built once, not per run.
        profile_dir: Where energy profiles are read and written (calibration results).
        sample_hz: Meter sampling rate; None keeps the runtime's default.

    """
    base = JoulecapConfig()
    return replace(
        base,
        engine=replace(base.engine, engine=engine, model=model),
        energy=replace(base.energy, meter=meter, sample_hz=sample_hz or base.energy.sample_hz),
        paths=replace(
            base.paths, profile_dir=profile_dir or str(work_dir / "profiles"), ledger_path=":memory:"
        ),
        # Benchmarks calibrate explicitly (or not, to measure the uncalibrated default).
        calibration=replace(base.calibration, auto_calibrate=False),
    )


def energy_label(meter_facts: dict[str, Any]) -> str:
    """One line saying where the energy figures come from, for tables and JSON."""
    source = str(meter_facts.get("source", "?"))
    name = str(meter_facts.get("name", "?"))
    if source == "estimated":
        return (
            f"ESTIMATED by {name} (power model: {meter_facts.get('estimate_base_w')} W x wall time + "
            f"{meter_facts.get('estimate_core_w')} W x CPU seconds of this process); not a measurement"
        )
    if source == "replayed":
        return f"REPLAYED from a recorded trace by {name}; not a measurement of this machine"
    return f"measured by {name}"


# ---------------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class WorkItem:
    """One benchmark request: an image, a question and the reference answer.

    Attributes:
        image: The image (RGB).
        prompt: The question.
        reference: The expected answer.
        kind: `short` (scored by exact match) or `list` (scored by recall of the reference's items).
        tag: Free label (question type, image size) used to group results.

    """

    image: Image.Image
    prompt: str
    reference: str
    kind: str = "short"
    tag: str = ""


_LIST_SPLIT = re.compile(r",|;|\band\b|\n")


def guess_kind(reference: str) -> str:
    """`list` when the reference enumerates several items (comma/`and` separated), else `short`."""
    items = [p for p in _LIST_SPLIT.split(reference) if p.strip()]
    return "list" if len(items) >= 2 else "short"


def load_jsonl(path: Path, n: int, seed: int) -> list[WorkItem]:
    """Read `{"image": PATH, "prompt": ..., "reference": ..., ["kind"], ["tag"]}` lines.

    TinyVQA's own files (`python -m benchmarks.tinyvqa.generate --out DIR`) are read as they
    are: `question`, `answer` and `qtype` stand in for `prompt`, `reference` and `tag`/`kind`.
    Image paths are relative to the file. The first `n` lines are used (all if fewer); `seed`
    does not reorder them so that a file is a fixed workload.
    """
    del seed
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image_path = Path(row["image"])
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            with Image.open(image_path) as img:
                image = img.convert("RGB")
            reference = str(row["reference"] if "reference" in row else row["answer"])
            tag = str(row.get("tag", row.get("qtype", "")))
            kind = row.get("kind") or ("list" if tag == "describe" else guess_kind(reference))
            items.append(
                WorkItem(
                    image=image,
                    prompt=str(row["prompt"] if "prompt" in row else row["question"]),
                    reference=reference,
                    kind=str(kind),
                    tag=tag,
                )
            )
        except (KeyError, ValueError, OSError) as exc:
            raise SystemExit(f"{path}:{lineno}: bad workload line ({exc})") from exc
        if len(items) >= n:
            break
    if not items:
        raise SystemExit(f"{path}: no workload lines")
    return items


def load_tinyvqa(n: int, seed: int, split: str = "test") -> list[WorkItem]:
    """The first `n` TinyVQA examples of `split` (held out from training), as work items.

    `seed` is the dataset seed of `benchmarks.tinyvqa.generate`; every test example is unseen by
    the trained model whatever the seed, since examples are a pure function of (split, seed, index).
    """
    try:
        from benchmarks.tinyvqa.generate import make_example
    except ImportError as exc:
        raise SystemExit(
            f"the TinyVQA generator (benchmarks/tinyvqa) is not importable: {exc}; "
            "pass --workload FILE.jsonl instead"
        ) from exc
    items = []
    for i in range(n):
        ex, image = make_example(split, i, seed=seed)
        items.append(
            WorkItem(
                image=image.convert("RGB"),
                prompt=ex.question,
                reference=ex.answer,
                kind="list" if ex.qtype == "describe" else "short",
                tag=ex.qtype,
            )
        )
    return items


def load_workload(spec: str, n: int, seed: int) -> list[WorkItem]:
    """`tinyvqa` or a JSONL file path -> `n` work items."""
    if spec == "tinyvqa":
        return load_tinyvqa(n, seed)
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--workload: {spec} is neither 'tinyvqa' nor a file")
    return load_jsonl(path, n, seed)


# ---------------------------------------------------------------------------------------- quality
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style)."""
    text = text.lower().translate(_PUNCT)
    words = [w for w in text.split() if w not in {"a", "an", "the"}]
    return " ".join(words)


def list_items(text: str) -> list[str]:
    """Normalised items of an enumeration (`a red circle, a blue square and ...`)."""
    return [normalize(p) for p in _LIST_SPLIT.split(text) if normalize(p)]


def score(output: str, reference: str, kind: str) -> float:
    """Quality of one answer in [0, 1].

    `short`: exact match after normalisation (the answer's first line; a trailing explanation
    does not count against it only if the first line already matches). `list`: recall, the
    fraction of the reference's items that appear in the output, counting repeats (two red
    circles in the reference need two in the answer).
    """
    if kind == "list":
        wanted = Counter(list_items(reference))
        if not wanted:
            return 1.0
        got = normalize(output)
        found = sum(
            min(len(re.findall(rf"(?<!\S){re.escape(item)}(?!\S)", got)), k) for item, k in wanted.items()
        )
        return found / sum(wanted.values())
    first = output.strip().splitlines()[0] if output.strip() else ""
    return 1.0 if normalize(first) == normalize(reference) else 0.0


# ---------------------------------------------------------------------------------------- stats
def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, NaN when empty."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else math.nan


def median(values: Sequence[float]) -> float:
    """Median, NaN when empty."""
    return float(np.median(np.asarray(values, dtype=float))) if len(values) else math.nan


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, NaN when empty."""
    return float(np.mean(np.asarray(values, dtype=float))) if len(values) else math.nan


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: map non-finite numbers to null."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def clean_json(obj: Any) -> Any:
    """Recursively replace NaN/inf by None (valid JSON) and keep 6 significant digits.

    Six digits are far finer than any energy or timing measured here, and keep committed files small.
    """
    if isinstance(obj, float):
        value = finite_or_none(obj)
        return None if value is None else float(f"{value:.6g}")
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented, strictly valid JSON (NaN -> null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean_json(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
