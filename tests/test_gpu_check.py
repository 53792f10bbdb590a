"""`make gpu-check`'s CPU-side logic: arguments, skips with reasons, the budget, result files.

Its GPU figures are not measured here (no GPU on this machine); these tests check that on a
machine without one every step is skipped with its reason and the summary is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _factories import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of scripts, not an installed package

from benchmarks import gpu_check as gc

NO_GPU = not __import__("torch").cuda.is_available()


def test_step_selection_and_bad_arguments() -> None:
    assert [s.name for s in gc.select_steps(None, None)] == [s.name for s in gc.STEPS]
    assert [s.name for s in gc.select_steps("kernels,model", None)] == ["model", "kernels"]  # run order kept
    assert [s.name for s in gc.select_steps(None, "gpu_tests,throughput")] == [
        "nvml_energy",
        "model",
        "vllm_energy",
        "kernels",
    ]
    with pytest.raises(ValueError, match="unknown step"):
        gc.select_steps("warp_drive", None)
    for bad in (["--only", "nope"], ["--skip", "x"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit) as exc:
            gc.parse_args(bad)
        assert exc.value.code == 2


def test_default_budget_fits_the_eight_minutes() -> None:
    assert gc.DEFAULT_BUDGET_S < 8 * 60
    assert sum(s.estimate_s for s in gc.STEPS) <= gc.DEFAULT_BUDGET_S


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU behaviour")
def test_without_a_gpu_every_step_is_skipped_with_its_reason(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    assert gc.main(["--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in summary["steps"]] == [s.name for s in gc.STEPS]
    for record in summary["steps"]:
        assert record["status"] == "skipped"
        assert "no CUDA GPU" in record["reason"]
        assert record["duration_s"] >= 0
    assert summary["machine"]["gpu"] == "no GPU available"
    assert summary["command"].startswith("python -m benchmarks.gpu_check")
    assert not (tmp_path / "work" / "smolvlm256m-shape-random").exists()  # nothing built for nothing


def test_a_step_past_the_budget_is_skipped_as_such(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    assert gc.main(["--out", str(out), "--budget-s", "5", "--only", "model,kernels"]) == 0
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [r["status"] for r in steps] == ["skipped", "skipped"]
    assert all("not enough time left" in r["reason"] for r in steps)


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    def boom(_ctx: gc.Context) -> dict[str, Any]:
        raise RuntimeError("kaput")

    def fine(_ctx: gc.Context) -> dict[str, Any]:
        return {"figure": 1.5}

    def absent(_ctx: gc.Context) -> dict[str, Any]:
        raise gc.Skipped("no widget here")

    ctx = gc.Context(
        out=tmp_path, work=tmp_path, python=sys.executable, vllm_python=sys.executable, deadline_s=1e12
    )
    steps = [gc.Step("a", 0, boom, "fails"), gc.Step("b", 0, fine, "works"), gc.Step("c", 0, absent, "skips")]
    records = gc.run_steps(steps, ctx)
    assert [r["status"] for r in records] == ["failed", "ok", "skipped"]
    assert "RuntimeError: kaput" in records[0]["reason"] and "traceback" in records[0]
    assert records[1]["figure"] == 1.5
    assert records[2]["reason"] == "no widget here"


def test_run_command_keeps_the_log_and_reports_failures(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    proc = gc.run_command([sys.executable, "-c", "print('hello')"], 30, log)
    assert proc.returncode == 0 and "hello" in log.read_text()
    with pytest.raises(RuntimeError, match="exit 3"):
        gc.run_command([sys.executable, "-c", "import sys; print('bad'); sys.exit(3)"], 30, log)
    with pytest.raises(RuntimeError, match="timed out"):
        gc.run_command([sys.executable, "-c", "import time; time.sleep(5)"], 1, log)
    assert "timed out" in log.read_text()
    # Subprocesses are offline and see the repository.
    proc = gc.run_command(
        [sys.executable, "-c", "import os, benchmarks; print(os.environ['HF_HUB_OFFLINE'])"], 30, log
    )
    assert proc.stdout.strip() == "1"


def test_power_integral_and_window_comparison() -> None:
    # 100 W for 2 s, then a ramp to 300 W over 1 s: 200 + 200 = 400 J.
    samples = [(0.0, 100.0), (1.0, 100.0), (2.0, 100.0), (3.0, 300.0)]
    assert gc.integrate_power_j(samples) == pytest.approx(400.0)
    assert gc.integrate_power_j(list(reversed(samples))) == pytest.approx(400.0)
    assert gc.integrate_power_j([(0.0, 50.0)]) == 0.0
    cmp = gc.compare_windows(
        [{"counter_j": 400.0, "integrated_j": 404.0}, {"counter_j": 100.0, "integrated_j": 98.0}]
    )
    assert cmp["windows"] == 2
    assert cmp["rel_diff"] == pytest.approx([0.01, -0.02])
    assert cmp["rel_diff_max_abs"] == pytest.approx(0.02)
    assert gc.compare_windows([])["rel_diff_mean"] is None


def test_runs_as_a_script_with_help() -> None:
    root = Path(gc.__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--budget-s" in proc.stdout


def test_makefile_has_the_target() -> None:
    makefile = (Path(gc.__file__).resolve().parents[1] / "Makefile").read_text()
    assert "gpu-check:" in makefile and "benchmarks.gpu_check" in makefile


@pytest.mark.slow
def test_realistic_model_is_consistent(tmp_path: Path) -> None:
    """The SmolVLM-256M-shaped model: ~0.26 B parameters, 64 visual tokens per image, and its vision
    tower's features fill exactly the processor's placeholders (one CPU encode)."""
    from PIL import Image

    from joulecap.runtime.engines.config import EngineConfig
    from joulecap.runtime.engines.transformers_engine import TransformersEngine
    from joulecap.runtime.types import ChatMessage, ImagePart, Request, TextPart

    path = gc.build_realistic_idefics3(tmp_path / "m")
    engine = TransformersEngine(EngineConfig(model=str(path), device="cpu"))
    try:
        assert 0.2 < engine.info.params_b < 0.3
        request = Request(
            "r",
            (ChatMessage("user", (ImagePart(0), TextPart("hi"))),),
            images=(Image.new("RGB", (640, 480)),),
        )
        prepared = engine.prepare(request, bases=False)
        assert prepared.visual_tokens == (64,)
        assert prepared.features[0].shape == (64, 576)
    finally:
        engine.close()
