"""Operations wired over a real runtime: a served request's ledger row with power state and quality."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from test_power_state import build_jetson_tree

from joulecap.runtime.energy.power_readers import JetsonPowerReader
from joulecap.runtime.energy.power_state import PowerStateCache
from joulecap.runtime.ledger_config import LedgerConfig
from joulecap.runtime.operations import RuntimeOperations, guard_options
from joulecap.runtime.server_config import ServerConfig


def test_served_request_row_carries_power_state_and_quality(config_factory: Any, tmp_path: Path) -> None:
    from joulecap.runtime.runtime import Runtime

    root = build_jetson_tree(tmp_path / "sysfs", "agx_orin", mode=2)
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-robot-9999 robot 1000\n")
    previous = signal.getsignal(signal.SIGHUP)  # guard_options installs the keys file's reload
    with Runtime(config_factory(energy={"idle_baseline_s": 0.0})) as rt:
        ops = RuntimeOperations(
            rt.config.energy,
            LedgerConfig(ledger_max_rows=100),
            rt.ledger,
            rt.monitor,
            rt.metrics,
            power=PowerStateCache(JetsonPowerReader(str(root))),
        )
        options = guard_options(
            ServerConfig(api_keys=str(keys)), rt.metrics, ledger_path=rt.ledger.path, operations=ops
        )
        assert options["charge_from_headers"] is False and ops.quotas is options["quotas"]
        try:
            result = rt.chat("what color is the square?", energy_budget_j=30.0)
            # What Runtime.run_planned does once wired: record the row with the extras.
            rt.ledger.record_result(result, **ops.account(result.energy, key_name="robot"))
            row = rt.ledger.query()[-1]
            assert row["id"] == result.request_id
            assert (row["power_mode"], row["power_mode_id"], row["jetson_clocks"]) == ("30W", 2, False)
            assert row["gpu_clock_mhz"] == pytest.approx(1300.5) and row["emc_clock_mhz"] is not None
            # The estimate meter: an estimate, sampled at the configured rate, never a false 0 J.
            assert row["meter_kind"] == "estimate" and row["meter"] == "estimate:cpu"
            assert row["sample_period_s"] == pytest.approx(1.0 / rt.config.energy.sample_hz)
            assert row["measured_j"] > 0 and 0.0 <= row["idle_share"] <= 1.0
            assert row["key_name"] == "robot" and "sk-" not in str(row)
            assert ops.quotas.spent_j("robot") == pytest.approx(row["measured_j"])
            status = ops.profile_status("tiny|cpu|float32", ["tiny|cpu|float32"])
            assert status["power_mode_key"] == "nvp2-30W" and status["profile_matches_power_mode"] is False
            assert "nvp2-30W" in status["power_mode_flag"]
            metrics = rt.metrics.render()[0].decode()
            assert 'joulecap_meter_power_watts{meter="estimate:cpu"}' in metrics
            assert (
                'joulecap_power_state_info{jetson_clocks="false",kind="jetson",power_mode="30W"} 1.0'
                in metrics
            )
            assert 'joulecap_key_quota_remaining_joules{key="robot"}' in metrics
            assert "joulecap_prediction_error_ratio_count" in metrics
        finally:
            ops.close()
            signal.signal(signal.SIGHUP, previous)
