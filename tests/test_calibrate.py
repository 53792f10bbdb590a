"""Calibration: a real sweep on the tiny model with the estimate meter, checkpoint resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from joulecap.runtime.calibrate import calibrate, read_checkpoint, sweep_header
from joulecap.runtime.calibrate_fit import Calibration, fit_samples, format_table
from joulecap.runtime.calibrate_sweep import Sample, SweepSpec
from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.energy.factory import create_meter
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.engines.factory import create_engine
from joulecap.runtime.profiles import load_profile, save_profile

SPEC = SweepSpec((64,), (0.0, 1.0), (4, 40), (1, 6), reps=1, warmup=1)


@pytest.fixture(scope="module")
def rig(tiny_idefics3: Path) -> Iterator[tuple[Any, EnergyMonitor]]:
    base = JoulecapConfig()
    engine = create_engine(replace(base.engine, model=str(tiny_idefics3)))
    energy = replace(base.energy, meter="estimate", idle_baseline_s=0.0)
    meter = create_meter(energy)
    monitor = EnergyMonitor(meter, energy)
    monitor.start()
    yield engine, monitor
    monitor.stop()
    meter.close()
    engine.close()


@pytest.fixture(scope="module")
def swept(rig: tuple[Any, EnergyMonitor], tmp_path_factory: pytest.TempPathFactory) -> Calibration:
    engine, monitor = rig
    return calibrate(engine, monitor, SPEC, tmp_path_factory.mktemp("cal") / "sweep.jsonl", header={"m": 1})


def test_sweep_covers_the_grid_with_forced_lengths(swept: Calibration, rig: tuple[Any, Any]) -> None:
    engine, _ = rig
    assert len(swept.samples) == len(SPEC.points()) == 8
    visual = {s.visual_tokens for s in swept.samples}
    assert len(visual) == 1 and visual.pop() > 0
    assert {s.visual_kept for s in swept.samples} == {0, swept.samples[0].visual_tokens}
    # Stop tokens are suppressed: every run generated exactly the forced length.
    assert sorted({s.out_tokens for s in swept.samples}) == [1, 6]
    assert all(s.energy_j > 0 and s.source == "estimated" for s in swept.samples)
    # The encode (image preprocessing, vision tower) is measured apart from the run, as the runtime does.
    assert all(s.encode_j > 0 for s in swept.samples)
    assert engine.stop_ids  # restored after the sweep


def test_fit_is_usable_and_profile_round_trips(swept: Calibration, tmp_path: Path) -> None:
    pred = swept.predictor
    b_j, in_j, out_j = pred.coefficients
    assert b_j >= 0 and in_j >= 0 and out_j > 0
    assert pred.calibrated and "estimate" in pred.source and "(estimated)" in pred.source
    assert swept.joules.n == 8
    table = format_table(swept)
    assert "R2" in table and "MAPE" in table and "a_d/a_p" in table and "encode J" in table
    save_profile(tmp_path, "m", "cpu", "float32", pred, params_b=0.001)
    loaded = load_profile(tmp_path, "m", "cpu", "float32", 0.001)
    assert loaded.calibrated and loaded.coefficients == pytest.approx(pred.coefficients)


def test_interrupted_sweep_resumes_from_the_checkpoint(
    rig: tuple[Any, EnergyMonitor], tmp_path: Path
) -> None:
    engine, monitor = rig
    ckpt = tmp_path / "sweep.jsonl"
    calls = {"n": 0}

    def interrupt_after_three(_step: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    spec = replace(SPEC, warmup=0)
    with pytest.raises(KeyboardInterrupt):
        calibrate(engine, monitor, spec, ckpt, header={"m": 1}, progress=interrupt_after_three)
    done = read_checkpoint(ckpt, sweep_header({"m": 1}, spec))
    assert len(done) == 3
    # A cut last line (killed mid-write) is skipped, not fatal.
    with ckpt.open("a") as fh:
        fh.write('{"key": "64|0.000|4')
    resumed = {"n": 0}
    cal = calibrate(
        engine,
        monitor,
        spec,
        ckpt,
        header={"m": 1},
        progress=lambda _: resumed.__setitem__("n", resumed["n"] + 1),
    )
    assert resumed["n"] == 5
    assert len(cal.samples) == 8
    first_three = {s.key for s in done.values()}
    assert first_three <= {s.key for s in cal.samples}
    # Another sweep's checkpoint is not reused.
    assert read_checkpoint(ckpt, sweep_header({"m": 2}, spec)) == {}


def test_fit_needs_samples() -> None:
    one = Sample("k", 64, 10, 64, 64, 4, 1.0, 0.1, "estimated", "estimate:cpu")
    with pytest.raises(ValueError, match="at least 3"):
        fit_samples([one, one], 0.001)


@pytest.mark.slow
def test_cli_quick_calibration_writes_a_profile(tiny_idefics3: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "joulecap.runtime.cli",
        "calibrate",
        "--quick",
        "--model",
        str(tiny_idefics3),
    ]
    cmd += [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--meter",
        "estimate",
        "--profile-dir",
        str(tmp_path / "p"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ONLY AN ESTIMATE METER" in proc.stderr
    assert "wrote profile" in proc.stdout and "MAPE" in proc.stdout
    files = list((tmp_path / "p").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["energy_source"] == ["estimated"]
    assert not list((tmp_path / "p").glob("*.sweep.jsonl"))  # checkpoint removed when done
