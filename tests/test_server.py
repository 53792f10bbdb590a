"""The HTTP server for real: uvicorn on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from PIL import Image


@pytest.fixture
def served(live_server_factory: Any) -> Any:
    server, runtime = live_server_factory()
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    return server, runtime, client


def _image_message(url: str, text: str = "What colour is the square?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def test_plain_completion_has_energy_usage_and_validates(served: Any, openai_schemas: dict[str, Any]) -> None:
    _server, _runtime, client = served
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "Hello there"}], max_tokens=5
    )
    completion = raw.parse()
    body = json.loads(raw.text)
    jsonschema.validate(body, openai_schemas["response"])
    assert completion.object == "chat.completion"
    # The answer the client got is the one the ledger recorded (same id, same token count).
    (row,) = [r for r in _runtime.ledger.query(None, 100) if r["id"] == completion.id]
    assert row["status"] == "ok" and row["completion_tokens"] == body["usage"]["completion_tokens"]
    energy = body["usage"]["energy"]
    assert energy["source"] == "estimated"
    assert energy["meter"].startswith("estimate")
    assert energy["measured_j"] > 0 and energy["budget_exceeded"] is False
    parts = energy["encode_j"] + energy["prefill_j"] + energy["decode_j"]
    assert parts == pytest.approx(energy["measured_j"], rel=1e-3, abs=1e-6)
    assert energy["run_j"] == pytest.approx(energy["prefill_j"] + energy["decode_j"], abs=1e-5)
    assert energy["max_new_tokens_planned"] <= 5
    assert body["usage"]["completion_tokens"] <= 5
    assert float(raw.headers["X-Energy-Used-J"]) == pytest.approx(energy["measured_j"], rel=1e-4)
    assert raw.headers["X-Energy-Source"].startswith("estimated")
    assert float(raw.headers["X-Energy-Predicted-J"]) > 0


def test_image_with_budget_header_reports_visual_tokens(served: Any, png: Any) -> None:
    _server, _runtime, client = served
    raw = client.chat.completions.with_raw_response.create(
        model="default",
        messages=_image_message(png()),
        max_tokens=8,
        extra_headers={"X-Energy-Budget-J": "500"},
    )
    energy = json.loads(raw.text)["usage"]["energy"]
    assert energy["budget_j"] == 500.0
    assert energy["visual_tokens_in"] > 0
    assert 0 < energy["visual_tokens_kept"] <= energy["visual_tokens_in"]
    assert energy["predicted_j"] <= 500.0 and energy["budget_exceeded"] is False
    assert energy["stop_reason"] in ("stop", "length", "energy_budget")


def test_budget_in_body_for_clients_without_headers(served: Any) -> None:
    _, _, client = served
    raw = client.chat.completions.with_raw_response.create(
        model="default",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_body={"energy_budget_j": 750.0},
    )
    assert json.loads(raw.text)["usage"]["energy"]["budget_j"] == 750.0


def test_header_budget_wins_over_body(served: Any) -> None:
    _, _, client = served
    raw = client.chat.completions.with_raw_response.create(
        model="default",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_body={"energy_budget_j": 750.0},
        extra_headers={"X-Energy-Budget-J": "600"},
    )
    assert json.loads(raw.text)["usage"]["energy"]["budget_j"] == 600.0


def test_streaming_chunks_validate_and_end_with_usage(
    served: Any, png: Any, openai_schemas: dict[str, Any]
) -> None:
    _server, _, client = served
    stream = client.chat.completions.create(
        model="default", messages=_image_message(png()), max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    for chunk in chunks:
        jsonschema.validate(chunk.model_dump(exclude_unset=True), openai_schemas["chunk"])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    energy = usage.model_extra["energy"]  # type: ignore[index]
    assert energy["measured_j"] > 0 and energy["source"] == "estimated"
    assert 1 <= usage.completion_tokens <= 6
    # One text delta per generated token at most (a stop token adds none).
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) <= usage.completion_tokens and len(text) >= len(deltas)


def test_streaming_equals_non_streaming_greedy(served: Any, png: Any) -> None:
    _, _, client = served
    url = png(color=(10, 120, 200))
    full = client.chat.completions.create(model="default", messages=_image_message(url), max_tokens=6)
    stream = client.chat.completions.create(
        model="default", messages=_image_message(url), max_tokens=6, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == full.choices[0].message.content


def test_models_health_warn_about_random_weights(served: Any) -> None:
    server, runtime, client = served
    models = client.models.list()
    entry = models.data[0]
    assert entry.id == runtime.info.model
    assert entry.model_extra["joulecap"]["random_weights"] is True  # type: ignore[index]
    assert "RANDOM" in entry.model_extra["joulecap"]["warning"]  # type: ignore[index]
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok"


def test_unknown_model_is_404_in_openai_format(served: Any, openai_schemas: dict[str, Any]) -> None:
    _, _, client = served
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    jsonschema.validate(info.value.response.json(), openai_schemas["error"])


def _post(server: Any, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        server.base_url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
    )


def _png_bytes_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = "image/tiff" if fmt == "TIFF" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


GOOD = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("body", "headers", "status", "param_part"),
    [
        (b"{not json", None, 400, None),
        ({"model": "default", "messages": "hello"}, None, 400, "messages"),
        ({"model": "default", "messages": []}, None, 400, "messages"),
        ({"model": "default"}, None, 400, "messages"),
        ({**GOOD, "max_tokens": "many"}, None, 400, "max_tokens"),
        ({**GOOD, "temperature": -1}, None, 400, "temperature"),
        (GOOD, {"X-Energy-Budget-J": "abc"}, 400, "X-Energy-Budget-J"),
        (GOOD, {"X-Energy-Budget-J": "-3"}, 400, "X-Energy-Budget-J"),
        (GOOD, {"X-Energy-Budget-J": "0"}, 400, "X-Energy-Budget-J"),
        (GOOD, {"X-Energy-Budget-J": "nan"}, 400, "X-Energy-Budget-J"),
        (GOOD, {"X-Energy-Budget-J": "inf"}, 400, "X-Energy-Budget-J"),
        ({**GOOD, "energy_budget_j": "lots"}, None, 400, "energy_budget_j"),
        ({**GOOD, "n": 3}, None, 400, "n"),
    ],
)
def test_bad_input_gets_openai_error_and_server_keeps_serving(
    served: Any,
    openai_schemas: dict[str, Any],
    body: Any,
    headers: dict[str, str] | None,
    status: int,
    param_part: str | None,
) -> None:
    server, runtime, _ = served
    before = runtime.ledger.count()
    resp = _post(server, body, headers)
    assert resp.status_code == status, resp.text
    payload = resp.json()
    jsonschema.validate(payload, openai_schemas["error"])
    assert payload["error"]["message"]
    if param_part:
        assert param_part in (payload["error"]["param"] or "")
    assert runtime.ledger.count() == before
    ok = _post(server, GOOD)
    assert ok.status_code == 200, ok.text
    assert runtime.ledger.count() == before + 1


def _image_body(url: str) -> dict[str, Any]:
    return {"model": "default", "messages": _image_message(url), "max_tokens": 2}


def test_corrupt_unsupported_and_huge_images(served: Any, openai_schemas: dict[str, Any], png: Any) -> None:
    server, _runtime, _ = served
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()
    not_base64 = "data:image/png;base64,@@@@"
    tiff = _png_bytes_url(Image.new("RGB", (32, 32)), "TIFF")
    huge = _png_bytes_url(Image.new("RGB", (5000, 4000)))
    for url, status in [(corrupt, 400), (not_base64, 400), (tiff, 400), (huge, 413)]:
        resp = _post(server, _image_body(url))
        assert resp.status_code == status, (status, resp.text)
        jsonschema.validate(resp.json(), openai_schemas["error"])
    remote = _post(server, _image_body("http://127.0.0.1:9/x.png"))
    assert remote.status_code == 400 and "Remote image" in remote.json()["error"]["message"]
    local = _post(server, _image_body("/etc/passwd"))
    assert local.status_code == 400 and "disabled" in local.json()["error"]["message"]
    assert _post(server, _image_body(png())).status_code == 200


def test_prompt_longer_than_context_is_400(served: Any) -> None:
    server, runtime, _ = served
    words = " ".join(["hello"] * (runtime.info.context_length + 50))
    resp = _post(server, {"model": "default", "messages": [{"role": "user", "content": words}]})
    assert resp.status_code == 400, resp.text
    assert "context" in resp.json()["error"]["message"].lower()


def test_budget_too_small_is_422_naming_the_minimum(served: Any) -> None:
    server, _, _ = served
    resp = _post(server, GOOD, {"X-Energy-Budget-J": "0.000001"})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    min_j = float(resp.headers["X-Energy-Min-J"])
    assert min_j > 0.000001
    assert f"{min_j:.6f}" in error["message"]
    # A retry at exactly the stated minimum is accepted (the server holds what it stated).
    ok = _post(server, GOOD, {"X-Energy-Budget-J": repr(min_j)})
    assert ok.status_code == 200, ok.text


def test_estimate_endpoint_plans_without_running(served: Any, png: Any) -> None:
    server, runtime, _ = served
    before = runtime.ledger.count()
    resp = httpx.post(
        server.base_url + "/v1/energy/estimate",
        json=_image_body(png()),
        headers={"X-Energy-Budget-J": "500"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["feasible"] is True and body["predicted_j"] <= 500
    assert body["plan"]["max_new_tokens"] >= 1
    assert len(body["plan"]["visual_keep"]) == 1
    # Nothing ran, but the encode was spent: one row, its energy all encode.
    assert runtime.ledger.count() == before + 1
    row = runtime.ledger.query(None, 1)[0]
    assert row["status"] == "estimate" and row["measured_j"] == pytest.approx(body["encode_j"], abs=1e-6)


def test_every_served_request_is_in_ledger_and_metrics(served: Any) -> None:
    server, runtime, client = served
    ids = []
    for i in range(3):
        c = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3
        )
        ids.append(c.id)
    rows = httpx.get(server.base_url + "/v1/energy/ledger", params={"limit": 50}).json()["data"]
    ledger_ids = {r["id"] for r in rows}
    assert set(ids) <= ledger_ids
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "joulecap" in metrics and runtime.info.model in metrics
    # The predictor learnt from those requests; its speed factor is published as measured.
    profile = httpx.get(server.base_url + "/v1/energy/profile").json()
    assert profile["speed_alpha"] == runtime.config.learning.speed_alpha > 0
    assert profile["margin"]["value"] == pytest.approx(runtime.learner.margin.value())
    line = next(x for x in metrics.splitlines() if x.startswith("joulecap_feasibility_margin{"))
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(profile["margin"]["value"])
    line = next(x for x in metrics.splitlines() if x.startswith("joulecap_predictor_speed_factor{"))
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(profile["speed_factor"])


def test_chat_alias_route(served: Any) -> None:
    server, _, _ = served
    resp = httpx.post(server.base_url + "/chat", json=GOOD, timeout=60)
    assert resp.status_code == 200 and resp.json()["object"] == "chat.completion"
