"""Cost and agreement of joulecap's energy meters.

1. Sampler CPU overhead at 10 and 100 Hz: this process's CPU seconds (all threads) over wall
   seconds while the background sampler reads the auto-detected meter and the main thread
   sleeps, minus the same measurement with no sampler, in % of one core. Target: < 1 % at
   10 Hz.
2. Read latency of each backend present here (median and p99 of `meter.read()`). Backends read
   from test fixtures (a replay trace, an INA3221 sysfs tree in a temp dir) are labelled as
   such: they measure the file and parsing cost, not a sensor.
3. On an NVIDIA GPU only: NVML's energy counter vs polled power (trapezoid) over the same
   fixed matmul load of 2, 5 and 10 s, sampled side by side; elsewhere skipped with a message.

Prints a table and writes JSON (with the date, the machine, its load average at start and end,
and the command).

    python benchmarks/meters.py [--duration 5] [--machine LABEL]
        [--out benchmarks/results/meters_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

from benchmarks import _common as common
from joulecap.runtime.energy.base import Meter
from joulecap.runtime.energy.config import EnergyConfig
from joulecap.runtime.energy.factory import AUTO_ORDER, METERS, create_meter
from joulecap.runtime.energy.sampler import Sampler

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "energy"
TARGET_OVERHEAD_PCT_10HZ = 1.0


def sampler_overhead(meter: Meter, hz: float, duration_s: float) -> dict[str, Any]:
    """CPU % of one core used by this process while sampling at `hz` (main thread asleep)."""
    sampler = Sampler(meter, sample_hz=hz)
    cpu0, wall0 = time.process_time(), time.monotonic()
    sampler.start()
    time.sleep(duration_s)
    sampler.stop()
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {
        "sample_hz": hz,
        "wall_s": wall,
        "cpu_s": cpu,
        "samples": sampler.reads,
        "cpu_pct_of_core": 100.0 * cpu / wall,
        "cpu_us_per_sample": 1e6 * cpu / max(1, sampler.reads),
    }


def idle_baseline(duration_s: float) -> dict[str, Any]:
    """Measure the same with no sampler (what an idle process costs)."""
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(duration_s)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"wall_s": wall, "cpu_s": cpu, "cpu_pct_of_core": 100.0 * cpu / wall}


def read_latency(meter: Meter, n: int = 2000) -> dict[str, float]:
    """Median and p99 of `meter.read()` in microseconds."""
    meter.read()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        meter.read()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "reads": n,
        "median_us": 1e6 * statistics.median(times),
        "p99_us": 1e6 * times[int(0.99 * (n - 1))],
    }


def _fixture_sysfs(root: Path) -> None:
    hw = root / "sys/bus/i2c/devices/1-0040/hwmon/hwmon1"
    hw.mkdir(parents=True)
    for n, (label, mv, ma) in enumerate(
        [("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 180), ("VDD_SOC", 5000, 320)], 1
    ):
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{mv}\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
    drv = root / "sys/bus/i2c/drivers/ina3221"
    drv.mkdir(parents=True)
    (drv / "1-0040").symlink_to(os.path.relpath(hw.parents[1], drv))


def latencies(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name in AUTO_ORDER:
        meter = METERS[name](EnergyConfig())
        if meter.is_available().ok:
            rows.append(
                {"backend": name, "meter": meter.name, "origin": "this machine", **read_latency(meter)}
            )
        meter.close()
    _fixture_sysfs(tmp)
    fixtures: list[tuple[str, EnergyConfig]] = [
        ("jetson", EnergyConfig(sysfs_root=str(tmp))),
        ("replay", EnergyConfig(replay_trace=str(FIXTURES / "orin_nano_trace.csv"))),
    ]
    for name, cfg in fixtures:
        if any(r["backend"] == name for r in rows):
            continue
        meter = METERS[name](cfg)
        if meter.is_available().ok:
            rows.append(
                {
                    "backend": name,
                    "meter": meter.name,
                    "origin": "test fixture, not hardware",
                    **read_latency(meter),
                }
            )
        meter.close()
    return rows


def nvml_counter_vs_polled(loads_s: tuple[float, ...]) -> dict[str, Any]:
    """Counter and polled-power energy over the same load windows, or why this was skipped."""
    counter = METERS["nvml"](EnergyConfig(nvml_mode="counter"))
    availability = counter.is_available()
    if not availability.ok:
        counter.close()
        return {"skipped": f"no NVIDIA GPU with an energy counter here: {availability.reason}"}
    try:
        import torch
    except ImportError:
        counter.close()
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        counter.close()
        return {"skipped": "torch has no CUDA"}
    polled = METERS["nvml"](EnergyConfig(nvml_mode="power"))
    assert polled.is_available().ok
    s_counter, s_polled = Sampler(counter, sample_hz=10), Sampler(polled, sample_hz=10)
    s_counter.start()
    s_polled.start()
    a = torch.randn(8192, 8192, device="cuda")
    rows = []
    try:
        for load_s in loads_s:
            time.sleep(1.0)
            t0 = time.monotonic()
            while time.monotonic() - t0 < load_s:
                a = (a @ a).tanh_()
                torch.cuda.synchronize()
            t1 = time.monotonic()
            time.sleep(0.3)  # let both buffers pass t1 (counter period ~0.1 s)
            e_counter = s_counter.integrate(t0, t1).energy_j
            e_polled = s_polled.integrate(t0, t1).energy_j
            rows.append(
                {
                    "load_s": round(t1 - t0, 3),
                    "counter_j": e_counter,
                    "polled_j": e_polled,
                    "diff_pct": 100.0 * (e_polled - e_counter) / e_counter if e_counter else None,
                    "mean_power_w": e_counter / (t1 - t0),
                }
            )
    finally:
        s_counter.stop()
        s_polled.stop()
        counter.close()
        polled.close()
    return {"device": torch.cuda.get_device_name(0), "sample_hz": 10, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per overhead measurement")
    parser.add_argument(
        "--machine", default=None, help="machine label stored with the results (default: the detected one)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON output (default benchmarks/results/meters_<cpu|gpu>.json)"
    )
    args = parser.parse_args(argv)
    record = common.RunRecord.start("benchmarks/meters.py", argv)

    meter = create_meter(EnergyConfig())
    base = idle_baseline(args.duration)
    overhead = []
    for hz in (10.0, 100.0):
        row = sampler_overhead(meter, hz, args.duration)
        row["net_cpu_pct_of_core"] = row["cpu_pct_of_core"] - base["cpu_pct_of_core"]
        overhead.append(row)
    meter_name = meter.name
    meter.close()
    with tempfile.TemporaryDirectory() as tmp:
        lat = latencies(Path(tmp))
    gpu = nvml_counter_vs_polled((2.0, 5.0, 10.0))

    machine = common.machine_info(args.machine)
    result = {
        "benchmark": "meters",
        **record.fields(machine),
        "sampled_meter": meter_name,
        "seconds_per_measurement": args.duration,
        "idle_baseline": base,
        "sampler_overhead": overhead,
        "target_pct_of_core_at_10hz": TARGET_OVERHEAD_PCT_10HZ,
        "meets_target": overhead[0]["net_cpu_pct_of_core"] < TARGET_OVERHEAD_PCT_10HZ,
        "read_latency": lat,
        "nvml_counter_vs_polled": gpu,
    }

    print(f"machine: {machine['label']}   sampled meter: {meter_name}   {args.duration:.0f} s per row")
    print(f"{'sampler':>10} {'samples':>8} {'cpu %core':>10} {'net %core':>10} {'us/sample':>10}")
    print(f"{'none':>10} {'-':>8} {base['cpu_pct_of_core']:>10.3f} {'-':>10} {'-':>10}")
    for row in overhead:
        print(
            f"{row['sample_hz']:>8.0f}Hz {row['samples']:>8d} {row['cpu_pct_of_core']:>10.3f} "
            f"{row['net_cpu_pct_of_core']:>10.3f} {row['cpu_us_per_sample']:>10.1f}"
        )
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(f"target: < {TARGET_OVERHEAD_PCT_10HZ}% of one core at 10 Hz -> {verdict}\n")
    print(f"{'backend':>10} {'meter':>28} {'median us':>10} {'p99 us':>10}  origin")
    for r in lat:
        print(
            f"{r['backend']:>10} {r['meter']:>28} {r['median_us']:>10.1f} {r['p99_us']:>10.1f}  {r['origin']}"
        )
    print()
    if "skipped" in gpu:
        print(f"NVML counter vs polled power: skipped ({gpu['skipped']})")
    else:
        print(f"NVML counter vs polled power on {gpu['device']} (10 Hz each)")
        print(f"{'load s':>8} {'counter J':>10} {'polled J':>10} {'diff %':>8} {'mean W':>8}")
        for r in gpu["rows"]:
            print(
                f"{r['load_s']:>8.2f} {r['counter_j']:>10.1f} {r['polled_j']:>10.1f} "
                f"{r['diff_pct']:>8.2f} {r['mean_power_w']:>8.1f}"
            )

    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / ("meters_cpu.json" if "skipped" in gpu else "meters_gpu.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
