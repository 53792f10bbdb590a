"""The budget contract, end to end on a real server: one feasibility rule, every joule accounted."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from _factories import make_config

from joulecap.runtime.errors import BudgetTooSmall, EnvelopeExhausted
from joulecap.runtime.runtime import Runtime

QUESTION = "What colour is the square?"


def _image_body(url: str, **extra: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return {"model": "default", "messages": [{"role": "user", "content": content}], **extra}


def _post(
    server: Any, body: dict[str, Any], budget_j: float | None = None, path: str = "/v1/chat/completions"
) -> httpx.Response:
    headers = {} if budget_j is None else {"X-Energy-Budget-J": repr(budget_j)}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=120)


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_stated_minimum_is_the_one_admission_uses(live_server_factory: Any, png: Any) -> None:
    server, _ = live_server_factory()
    body = _image_body(png(), max_tokens=8, policy="output_budget")
    refused = _post(server, body, budget_j=1e-4)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "energy_budget_too_small"
    stated = float(refused.headers["X-Energy-Min-J"])
    # The message states the same number as the header, to the microjoule.
    assert f"{stated:.6f}" in error["message"]
    # The estimate states the minimum admission would use now: never above what was stated
    # (the server holds its statements; this attempt's encode may come out cheaper).
    estimate = _post(server, body, budget_j=1e-4, path="/v1/energy/estimate").json()
    assert estimate["feasible"] is False and estimate["min_j"] <= stated + 1e-9
    stated = estimate["min_j"]
    # One part in a million under the stated minimum: refused, unless this attempt's own
    # minimum came out lower (then the answer says so); never refused above its statement.
    under = stated * (1 - 1e-6)
    again = _post(server, body, budget_j=under)
    if again.status_code == 422:
        now = float(again.headers["X-Energy-Min-J"])
        assert under < now <= stated + 1e-9
        stated = now
    else:
        assert again.status_code == 200 and again.json()["usage"]["energy"]["min_j"] <= under
    # Exactly at the stated minimum: accepted, and the answer says whether its budget held.
    ok = _post(server, body, budget_j=stated)
    assert ok.status_code == 200, ok.text
    energy = ok.json()["usage"]["energy"]
    assert energy["budget_j"] == stated and energy["min_j"] <= stated + 1e-9
    assert energy["budget_exceeded"] == (energy["measured_j"] > stated)


def test_every_joule_is_in_the_ledger_and_the_metrics(live_server_factory: Any, png: Any) -> None:
    server, runtime = live_server_factory(envelope={"power_envelope_w": 1e-6, "power_envelope_j": 1e3})
    body = _image_body(png(), max_tokens=6)
    statuses = []
    statuses.append(_post(server, body).status_code)  # answered
    statuses.append(_post(server, body, budget_j=1e-5).status_code)  # refused after its encode (422)
    statuses.append(_post(server, {**body, "max_tokens": 0}).status_code)  # 400: nothing spent
    statuses.append(_post(server, body, path="/v1/energy/estimate").status_code)  # encode spent, not run
    runtime.envelope._level_j = 0.0  # drained: the next request is refused after its encode (429)
    statuses.append(_post(server, body).status_code)
    assert statuses == [200, 422, 400, 200, 429]
    rows = httpx.get(server.base_url + "/v1/energy/ledger", params={"limit": 100}).json()["data"]
    by_status = sorted(r["status"] for r in rows)
    assert by_status == ["estimate", "ok", "refused", "refused"]
    assert all(r["measured_j"] > 0 for r in rows)
    refused = [r for r in rows if r["status"] == "refused"]
    assert all(r["encode_j"] == r["measured_j"] and r["prefill_j"] == 0.0 for r in refused)
    metrics = httpx.get(server.base_url + "/metrics").text
    assert _metric_sum(metrics, "joulecap_energy_joules_total") == pytest.approx(
        sum(r["measured_j"] for r in rows)
    )
    assert re.search(r'joulecap_energy_joules_total\{.*status="refused".*\} [0-9.e-]+', metrics)
    assert re.search(r"joulecap_feasibility_margin\{", metrics)


def test_an_aborted_stream_is_recorded_with_its_energy(live_server_factory: Any) -> None:
    server, runtime = live_server_factory()
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 200,
        "stream": True,
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content"' in line and '""' not in line:
                break  # hang up after the first token
    for _ in range(100):
        rows = runtime.ledger.query(None, 10)
        if rows:
            break
        threading.Event().wait(0.1)
    assert [r["status"] for r in rows] == ["aborted"]
    assert rows[0]["measured_j"] > 0 and rows[0]["completion_tokens"] < 200


def test_budget_ignoring_policies_say_the_budget_was_not_held(live_server_factory: Any) -> None:
    server, _ = live_server_factory()
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 12,
        "policy": "baseline",
    }
    resp = _post(server, body, budget_j=1e-6)
    assert resp.status_code == 200
    energy = resp.json()["usage"]["energy"]
    assert energy["budget_exceeded"] is True
    assert "does not hold budgets" in energy["note"]
    # Streams say it in their final usage chunk.
    body["stream"] = True
    chunks = [
        json.loads(line[6:])
        for line in httpx.post(
            server.base_url + "/v1/chat/completions",
            json=body,
            headers={"X-Energy-Budget-J": "1e-6"},
            timeout=60,
        ).text.splitlines()
        if line.startswith("data: {")
    ]
    assert chunks[-1]["usage"]["energy"]["budget_exceeded"] is True


def test_the_envelope_reserves_the_prediction_with_its_margin(tmp_path: Path, tiny_idefics3: Path) -> None:
    cfg = make_config(tiny_idefics3, tmp_path, envelope={"power_envelope_w": 1e-9, "power_envelope_j": 1e3})
    with Runtime(cfg) as rt:
        request = rt.build_request("hi", energy_budget_j=500.0, max_tokens=4)
        prepared, plan = rt.plan(request)
        reserve = plan.predicted_j * (1 + plan.margin)
        assert reserve < 500.0  # what it will cost, not the whole budget
        rt.envelope._level_j = reserve * 0.999
        with pytest.raises(EnvelopeExhausted):
            rt.run_planned(prepared, plan)
        prepared, plan = rt.plan(rt.build_request("hi", energy_budget_j=500.0, max_tokens=4))
        reserve = plan.predicted_j * (1 + plan.margin)
        rt.envelope._level_j = reserve * 1.001
        result = rt.run_planned(prepared, plan)
        # Settled to the measured energy: what is left is the level before, less what it cost.
        assert rt.envelope.level_j() == pytest.approx(
            reserve * 1.001 - result.energy.total_j, rel=1e-3, abs=1e-6
        )


def test_uncalibrated_servers_say_so(live_server_factory: Any) -> None:
    server, _runtime = live_server_factory()  # tests serve with --no-auto-calibrate and no profile
    profile = httpx.get(server.base_url + "/v1/energy/profile").json()
    assert profile["calibrated"] is False and profile["profile"]["how"] == "default"
    resp = _post(
        server, {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert "uncalibrated default profile" in resp.json()["usage"]["energy"]["note"]


@pytest.mark.slow
def test_a_fresh_cache_calibrates_once_and_the_next_start_loads_it(
    tmp_path: Path, tiny_idefics3: Path
) -> None:
    cfg = make_config(tiny_idefics3, tmp_path, calibration={"auto_calibrate": True})
    with Runtime(cfg) as rt:
        assert rt.profile.how == "calibrated at start-up" and rt.predictor.calibrated
        path = Path(rt.profile.detail)
    assert path.is_file() and json.loads(path.read_text())["encode"]["j_per_visual_token"] > 0
    with Runtime(cfg) as rt:
        assert rt.profile.how == "loaded" and rt.profile.note == "" and rt.predictor.calibrated


def test_a_profile_of_another_device_is_not_used(tmp_path: Path, tiny_idefics3: Path) -> None:
    cfg = make_config(tiny_idefics3, tmp_path)
    with Runtime(cfg) as rt:
        name = f"{rt.info.model}__{rt.info.device}__{rt.info.dtype}.json"
    profile = tmp_path / "profiles" / name
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text(
        json.dumps(
            {
                "format": "joulecap-profile",
                "version": 1,
                "model": "tiny-idefics3",
                "device": "cuda:0",
                "dtype": "float32",
                "coefficients": {"b_j": 1, "in_j": 1, "out_j": 1},
            }
        )
    )
    with Runtime(cfg) as rt:
        assert rt.profile.how == "default" and "ignored" in rt.profile.detail and not rt.predictor.calibrated


def test_refusal_in_process_states_the_minimum(tmp_path: Path, tiny_idefics3: Path) -> None:
    with Runtime(make_config(tiny_idefics3, tmp_path)) as rt:
        with pytest.raises(BudgetTooSmall) as refused:
            rt.chat("hi", energy_budget_j=1e-6, max_tokens=3, policy="output_budget")
        result = rt.chat("hi", energy_budget_j=refused.value.min_j, max_tokens=3, policy="output_budget")
        # Accepted at the stated minimum even if this attempt's encode came out dearer.
        assert result.plan.min_j is not None and result.plan.min_j <= refused.value.min_j
        rows = rt.ledger.query(None, 10)
        assert [r["status"] for r in rows] == ["refused", "ok"]


def test_a_burst_after_a_minute_idle_is_served_accounted_and_does_not_ratchet(
    live_server_factory: Any, png: Any
) -> None:
    import time
    from concurrent.futures import ThreadPoolExecutor

    server, runtime = live_server_factory()
    body = _image_body(png(), max_tokens=4, policy="joint")
    before = _post(server, body, budget_j=1e-5, path="/v1/energy/estimate").json()["min_j"]
    learned_before = runtime.learner.margin.stats()["samples"]
    # A minute without a request: the next run is cold (it must not teach the margins).
    runtime.learner.mark_active(time.monotonic() - 2 * runtime.learner.config.cold_idle_s)
    budgets = [before * s for s in (0.5, 1.0, 1.5, 3.0, 10.0)] * 10  # 50: refused to generous
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: _post(server, body, budget_j=b), budgets))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 422}, codes  # every request answered or refused, none failed
    answered = [r.json()["usage"]["energy"] for r in responses if r.status_code == 200]
    assert answered and all("budget_exceeded" in e for e in answered)
    # Every one of the 50 is in the ledger, and the ledger's joules are the metrics' joules.
    rows = httpx.get(server.base_url + "/v1/energy/ledger", params={"limit": 500}).json()["data"]
    burst = [r for r in rows if r["status"] in ("ok", "refused")]
    assert len(burst) == 50
    metrics = httpx.get(server.base_url + "/metrics").text
    assert _metric_sum(metrics, "joulecap_energy_joules_total") == pytest.approx(
        sum(r["measured_j"] for r in rows)
    )
    # The cold first run taught nothing, and the same question's minimum moves with the learned
    # error only. How far the margin moves is the meter's noise, not checked here: a tiny model's
    # prefill lasts a few milliseconds, and under a burst on two shared cores its estimated energy
    # varied from -70% to +200% of the prediction, so one burst can legitimately reach the cap.
    # That the margin never ratchets (it follows the window's median and comes back down) is
    # test_margin's, on fixed errors.
    learned = runtime.learner.margin.stats()
    assert learned["samples"] - learned_before <= len(answered) - 1
    after = _post(server, body, budget_j=10 * before, path="/v1/energy/estimate").json()
    assert after["feasible"] and after["margin"] == pytest.approx(learned["value"], abs=1e-6)
