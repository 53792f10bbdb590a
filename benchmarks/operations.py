"""Cost of the fleet-operations features per request: key lookup, power state, ledger extras.

1. API-key lookup (`KeyStore.lookup`) with 1, 100 and 10,000 configured keys, for a right and
   a wrong key. Target: the same cost whatever the number of keys (ratio 10,000 / 1 <= 1.5,
   measured side by side) and whatever key is presented.
2. Power state: an uncached `JetsonPowerReader.read()` on an AGX Orin layout built in a temp
   folder (this measures Python's file and parsing cost on tmpfs/disk, not a real sysfs, whose
   reads go to drivers) and `PowerStateCache.current()` with the refresh thread running (what
   a request pays). Target: <= 5 us.
3. Ledger rows with and without the operations columns (power state, quality, key name), in
   alternating blocks on the same file (each insert is fsynced: the disk dominates). Target:
   the extras add <= 10 % per row.

Prints a table and writes JSON (with the date, the machine, its load average at start and end,
and the command).

    python benchmarks/operations.py [--rows 300] [--out benchmarks/results/operations_cpu.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script, benchmarks/ is sys.path[0] and its kernels.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # shadows HF `kernels`: use the root

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from benchmarks import _common as common

TARGET_KEYS_RATIO = 1.5
TARGET_CACHED_US = 5.0
TARGET_LEDGER_EXTRA_PCT = 10.0


def _per_call_us(fn: Callable[[], object], n: int, repeats: int = 7) -> float:
    """Median over `repeats` of the mean microseconds per call over `n` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def bench_keys(n_calls: int) -> dict[str, Any]:
    from joulecap.runtime.keys import KeyStore, parse_keys

    stores = {}
    for n_keys in (1, 100, 10_000):
        text = "\n".join(f"sk-{i:06d}-{'x' * 24} name{i} 1000" for i in range(n_keys))
        store = KeyStore()
        store._set(parse_keys(text))
        stores[n_keys] = store
    right = {n: f"sk-{n - 1:06d}-{'x' * 24}".encode() for n in stores}
    wrong = b"sk-999999-" + b"y" * 24
    # Side by side: each repeat runs every configuration once, so machine noise hits all alike.
    results: dict[tuple[int, str], list[float]] = {}
    for _ in range(5):
        for n_keys, store in stores.items():
            for kind, key in (("right", right[n_keys]), ("wrong", wrong)):
                results.setdefault((n_keys, kind), []).append(
                    _per_call_us(partial(store.lookup, key), n_calls, repeats=1)
                )
    by = {cfg: statistics.median(values) for cfg, values in results.items()}
    rows = [{"keys": n, "presented": kind, "us_per_lookup": us} for (n, kind), us in by.items()]
    ratio = max(by[(10_000, k)] / by[(1, k)] for k in ("right", "wrong"))
    return {"rows": rows, "ratio_10000_over_1": ratio, "meets_target": ratio <= TARGET_KEYS_RATIO}


def bench_power_state(n_calls: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_power_state import build_jetson_tree

    from joulecap.runtime.energy.power_readers import JetsonPowerReader
    from joulecap.runtime.energy.power_state import PowerStateCache

    with tempfile.TemporaryDirectory() as tmp:
        root = build_jetson_tree(Path(tmp), "agx_orin", mode=2)
        reader = JetsonPowerReader(str(root))
        uncached = _per_call_us(reader.read, max(1, n_calls // 50))
        cache = PowerStateCache(reader, ttl_s=1.0)
        cache.start()
        try:
            cached = _per_call_us(cache.current, n_calls)
        finally:
            cache.close()
    return {
        "uncached_read_us": uncached,
        "cached_us": cached,
        "origin": "AGX Orin layout in a temp folder (file cost, not a sensor)",
        "meets_target": cached <= TARGET_CACHED_US,
    }


def bench_ledger(rows: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_ledger import make_result

    from joulecap.runtime.energy.power_state import PowerState
    from joulecap.runtime.energy.quality import measurement_quality
    from joulecap.runtime.ledger import Ledger

    state = PowerState(
        kind="jetson", power_mode="30W", power_mode_id=2, jetson_clocks=False, gpu_clock_mhz=1300.5
    )
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(os.path.join(tmp, "bench.sqlite3"))
        plain: list[float] = []
        extra: list[float] = []
        block = 25
        for b in range(max(2, rows // block)):
            with_extras = b % 2 == 1
            t0 = time.perf_counter()
            for i in range(block):
                result = make_result(f"b{b}-{i}", created_s=time.time())
                if with_extras:
                    q = measurement_quality(result.energy, meter_kind="power", sample_period_s=0.1)
                    ledger.record_result(result, power_state=state, quality=q, key_name="robot-7")
                else:
                    ledger.record_result(result)
            (extra if with_extras else plain).append((time.perf_counter() - t0) / block * 1e6)
        ledger.close()
    p, e = statistics.median(plain), statistics.median(extra)
    pct = 100.0 * (e - p) / p
    return {
        "rows": rows,
        "us_per_row_plain": p,
        "us_per_row_with_extras": e,
        "extra_pct": pct,
        "meets_target": pct <= TARGET_LEDGER_EXTRA_PCT,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000, help="Lookups / cached reads per measurement.")
    parser.add_argument("--rows", type=int, default=300, help="Ledger rows written (half with extras).")
    parser.add_argument(
        "--machine", default=None, help="Machine label stored with the result (default: the detected one)."
    )
    parser.add_argument(
        "--out", default=None, help="JSON output (default benchmarks/results/operations_cpu.json)."
    )
    args = parser.parse_args(argv)
    record = common.RunRecord.start("benchmarks/operations.py", argv)

    keys = bench_keys(args.calls)
    power = bench_power_state(args.calls)
    ledger = bench_ledger(args.rows)
    machine = common.machine_info(args.machine)
    result = {
        "benchmark": "operations",
        **record.fields(machine),
        "key_lookup": keys,
        "power_state": power,
        "ledger": ledger,
    }
    print(f"API-key lookup (us per lookup; target: 10,000 keys <= {TARGET_KEYS_RATIO}x 1 key)")
    print(f"{'keys':>8} {'presented':>10} {'us':>8}")
    for r in keys["rows"]:
        print(f"{r['keys']:>8} {r['presented']:>10} {r['us_per_lookup']:>8.2f}")
    print(f"ratio 10,000 / 1 keys: {keys['ratio_10000_over_1']:.2f} (met: {keys['meets_target']})\n")
    print(
        f"power state: uncached read {power['uncached_read_us']:.1f} us ({power['origin']}), "
        f"cached {power['cached_us']:.2f} us "
        f"(target <= {TARGET_CACHED_US} us, met: {power['meets_target']})\n"
    )
    print(
        f"ledger row: {ledger['us_per_row_plain']:.0f} us plain, {ledger['us_per_row_with_extras']:.0f} us "
        f"with power state, quality and key name ({ledger['extra_pct']:+.1f} %, target <= "
        f"{TARGET_LEDGER_EXTRA_PCT} %, met: {ledger['meets_target']})"
    )
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "operations_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
