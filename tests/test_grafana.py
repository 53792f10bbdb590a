"""The Grafana dashboard and Prometheus config in examples/grafana name only what the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_ledger import make_result

from joulecap.runtime.energy.power_state import PowerState
from joulecap.runtime.learning import Learner, LearningConfig
from joulecap.runtime.metrics import Metrics
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.server_config import ServerConfig

GRAFANA = Path(__file__).resolve().parents[1] / "examples" / "grafana"

PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "ignoring", "group_left", "le",
    "label_values", "on", "without",
}  # fmt: skip


def _exported() -> dict[str, set[str]]:
    """Every series a scrape of a real `Metrics` shows, with its labels (after one of each event)."""
    m = Metrics()
    m.observe_result(make_result("r1", total_j=12.0, budget_j=10.0))
    m.observe_error(429)
    m.ops.observe_key_energy("robot", 1.0)
    m.ops.observe_quota_refusal("robot")
    state = PowerState(
        kind="jetson", power_mode="15W", jetson_clocks=True, gpu_clock_mhz=624.0, gpu_temp_c=50
    )
    m.ops.attach(
        meter_power=lambda: ("jetson:VDD_IN", 5.7),
        power_state=lambda: state,
        quota_remaining=lambda: {"robot": 10.0},
    )
    m.set_predictor_mape("tiny", 0.1)
    m.set_predictor_speed_factor("tiny", 1.0)
    m.set_envelope_level_j(3.0)
    pred = Predictor(1.0, 0.01, 0.1)
    m.set_learning("tiny", pred, Learner(pred, LearningConfig()))
    body = m.render()[0].decode()
    series: dict[str, set[str]] = {}
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            series.setdefault(line.split()[2], set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split()[0]
            labels = set(re.findall(r'(\w+)="', rest)) if rest else set()
            series.setdefault(name, set()).update(labels)
    return series


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))  # panels nested in collapsed rows
        out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
    return out


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bjoulecap_\w+", expr))


def _labels_used(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"(?:by|ignoring|on|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return labels - {"le"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "joulecap.json").read_text(encoding="utf-8"))


def test_every_panel_query_names_an_exported_metric(dashboard: dict[str, Any]) -> None:
    known = _exported()
    targets = _targets(dashboard)
    assert len(targets) >= 12
    for title, expr in targets:
        names = _metric_names(expr)
        assert names, f"panel {title!r}: query names no joulecap metric: {expr}"
        unknown = names - set(known)
        assert not unknown, f"panel {title!r}: {sorted(unknown)} not exported by the server"
        labels = set().union(*(known[n] for n in names))
        missing = _labels_used(expr) - labels
        assert not missing, f"panel {title!r}: labels {sorted(missing)} not on {sorted(names)}"


def test_dashboard_covers_what_operators_watch(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(e for _, e in _targets(dashboard))
    for series in (
        "joulecap_request_energy_joules_bucket",  # energy per request
        "joulecap_phase_energy_joules_total",  # per output token, prefill vs decode
        "joulecap_budget_violations_total",  # budgets exceeded
        "joulecap_budgeted_requests_total",  # budgets held
        "joulecap_errors_total",  # refusals
        "joulecap_prediction_error_ratio_bucket",  # predictor error
        "joulecap_feasibility_margin",
        "joulecap_planning_margin",
        "joulecap_envelope_level_joules",
        "joulecap_meter_power_watts",  # power by meter
        "joulecap_key_quota_refusals_total",
    ):
        assert series in exprs, f"the dashboard has no panel on {series}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0]["type"] == "datasource"


def test_a_metric_the_server_does_not_export_is_caught() -> None:
    exported = _exported()
    assert "joulecap_made_up_total" not in exported
    assert _metric_names("sum(rate(joulecap_made_up_total[5m]))") == {"joulecap_made_up_total"}
    assert _labels_used('sum by (phase) (rate(x{kind="completion"}[5m]))') == {"phase", "kind"}


def test_prometheus_scrapes_the_default_port() -> None:
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text(encoding="utf-8"))
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"127.0.0.1:{ServerConfig().port}"]
