"""The official `openai` client against a live joulecap server: sync, async, streaming, budgets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from _factories import make_config

from joulecap.runtime.api.app import create_app
from joulecap.runtime.api.server import BackgroundServer
from joulecap.runtime.runtime import Runtime


@pytest.fixture(scope="module")
def base_url(tiny_idefics3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("compat")
    runtime = Runtime(make_config(tiny_idefics3, tmp, energy={"idle_baseline_s": 0.0}))
    server = BackgroundServer(create_app(runtime)).start()
    yield server.base_url + "/v1"
    server.stop()
    runtime.close()


def _messages(png: Any, text: str = "What colour is the square?") -> Any:
    content = [{"type": "image_url", "image_url": {"url": png()}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _energy(usage: Any) -> dict[str, Any]:
    energy = usage.model_extra["energy"]
    assert energy["source"] in ("measured", "estimated", "replayed")
    assert energy["measured_j"] > 0 and energy["meter"]
    return dict(energy)


def test_sync_client_with_image(base_url: str, png: Any) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model="default", messages=_messages(png), max_tokens=4)
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens <= 4
    assert _energy(completion.usage)["visual_tokens_in"] > 0
    models = client.models.list()
    assert completion.model == models.data[0].id


def test_budget_via_extra_headers_and_via_extra_body(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    msgs: Any = [{"role": "user", "content": "hello"}]
    by_header = client.chat.completions.create(
        model="default", messages=msgs, max_tokens=3, extra_headers={"X-Energy-Budget-J": "455.5"}
    )
    assert _energy(by_header.usage)["budget_j"] == 455.5
    by_body = client.chat.completions.create(
        model="default", messages=msgs, max_tokens=3, extra_body={"energy_budget_j": 30.25}
    )
    assert _energy(by_body.usage)["budget_j"] == 30.25
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=msgs, max_tokens=3, extra_body={"energy_budget_j": 30.25}
    )
    assert float(raw.headers["X-Energy-Used-J"]) > 0
    assert raw.headers["X-Energy-Source"]


def test_sync_streaming_ends_with_usage(base_url: str, png: Any) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    stream: Any = client.chat.completions.create(
        model="default",
        messages=_messages(png),
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Energy-Budget-J": "800"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert chunks[-1].usage is not None
    assert _energy(chunks[-1].usage)["budget_j"] == 800.0
    assert len({c.id for c in chunks}) == 1


def test_async_client_plain_and_streaming_concurrently(base_url: str, png: Any) -> None:
    msgs: Any = [{"role": "user", "content": "hi"}]

    async def main() -> tuple[Any, list[Any], Any]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        try:

            async def streamed() -> list[Any]:
                stream: Any = await client.chat.completions.create(
                    model="default", messages=_messages(png), max_tokens=4, stream=True
                )
                return [c async for c in stream]

            plain, chunks, budgeted = await asyncio.gather(
                client.chat.completions.create(model="default", messages=msgs, max_tokens=3),
                streamed(),
                client.chat.completions.create(
                    model="default",
                    messages=msgs,
                    max_tokens=3,
                    extra_body={"energy_budget_j": 600},
                ),
            )
            return plain, chunks, budgeted
        finally:
            await client.close()

    plain, chunks, budgeted = asyncio.run(main())
    assert plain.usage is not None and plain.usage.completion_tokens >= 1
    _energy(plain.usage)
    assert chunks[-1].usage is not None
    _energy(chunks[-1].usage)
    assert _energy(budgeted.usage)["budget_j"] == 600.0
    assert len({plain.id, chunks[0].id, budgeted.id}) == 3


def test_errors_map_to_openai_exception_types(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    msgs: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="default", messages=msgs, extra_headers={"X-Energy-Budget-J": "-1"}
        )
    assert bad.value.code == "invalid_budget"
    with pytest.raises(openai.UnprocessableEntityError) as small:
        client.chat.completions.create(
            model="default", messages=msgs, extra_headers={"X-Energy-Budget-J": "0.0000001"}
        )
    assert small.value.code == "energy_budget_too_small"
    assert float(small.value.response.headers["X-Energy-Min-J"]) > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-served", messages=msgs)
    body = json.loads(small.value.response.text)
    assert set(body["error"]) == {"message", "type", "param", "code"}
