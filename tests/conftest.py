"""Shared fixtures: tiny real models built locally, runtimes, and live uvicorn servers."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from _factories import free_port
from PIL import Image

from joulecap.runtime.config import JoulecapConfig

OPENAI_SCHEMAS = Path(__file__).resolve().parent / "fixtures" / "openai"
"""OpenAI's published JSON schemas (extracted from openai/openai-openapi, MIT; see the LICENSE there)."""


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Idefics3 (SmolVLM architecture) saved with save_pretrained."""
    from joulecap.runtime.tiny_models import build_tiny_model

    return build_tiny_model("idefics3", tmp_path_factory.mktemp("models") / "tiny-idefics3", seed=0)


def make_config(model_dir: Path, tmp_path: Path, **sections: dict[str, Any]) -> JoulecapConfig:
    """A config serving `model_dir` with the estimate meter and a ledger under `tmp_path`.

    `sections` maps a component name (`server`, `engine`, ...) to field overrides.
    """
    base = JoulecapConfig()
    cfg = replace(
        base,
        engine=replace(base.engine, model=str(model_dir), cache_dir=str(tmp_path / "cache")),
        energy=replace(base.energy, meter="estimate"),
        ledger=replace(base.ledger, ledger_path=str(tmp_path / "ledger.sqlite3")),
        scheduler=replace(base.scheduler, profile_dir=str(tmp_path / "profiles")),
    )
    for name, overrides in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **overrides)})
    return cfg


class LiveServer:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live_server_factory(tmp_path: Path, tiny_idefics3: Path) -> Iterator[Any]:
    """Start servers over fresh runtimes; everything is closed at teardown."""
    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.runtime import Runtime

    opened: list[tuple[LiveServer, Runtime]] = []

    def start(**sections: dict[str, Any]) -> tuple[LiveServer, Runtime]:
        runtime = Runtime(make_config(tiny_idefics3, tmp_path, **sections))
        server = LiveServer(create_app(runtime)).__enter__()
        opened.append((server, runtime))
        return server, runtime

    yield start
    for server, runtime in opened:
        server.__exit__(None, None, None)
        runtime.close()


def png_data_url(size: tuple[int, int] = (96, 96), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    """A base64 PNG data URL of a simple image with a shape on it."""
    img = Image.new("RGB", size, (240, 240, 240))
    for x in range(size[0] // 4, size[0] // 2):
        for y in range(size[1] // 4, size[1] // 2):
            img.putpixel((x, y), color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def png() -> Any:
    """Factory of base64 PNG data URLs: `png(size=(w, h), color=(r, g, b))`."""
    return png_data_url


@pytest.fixture
def config_factory(tmp_path: Path, tiny_idefics3: Path) -> Any:
    """Factory of configs over the tiny Idefics3 model: `config_factory(server={...}, ...)`."""
    return lambda **sections: make_config(tiny_idefics3, tmp_path, **sections)


@pytest.fixture(scope="session")
def openai_schemas() -> dict[str, Any]:
    """OpenAI's published JSON schemas from tests/fixtures/openai, keyed by short name."""
    import json

    names = {
        "response": "chat_completion_response.schema.json",
        "chunk": "chat_completion_chunk.schema.json",
        "error": "error_response.schema.json",
    }
    return {
        k: _nullable_to_json_schema(json.loads((OPENAI_SCHEMAS / v).read_text())) for k, v in names.items()
    }


def _nullable_to_json_schema(node: Any) -> Any:
    """Apply OpenAPI 3.0's `nullable: true` (kept in the extracted schemas) as JSON Schema does.

    `jsonschema` ignores the unknown keyword, so a null that OpenAI's spec allows (for example
    `choices[].logprobs`) would be rejected; this rewrites it to `anyOf: [schema, null]`.
    """
    if isinstance(node, list):
        return [_nullable_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight LLaVA (CLIP tower + projector + Llama) saved with save_pretrained."""
    from joulecap.runtime.tiny_models import build_tiny_model

    return build_tiny_model("llava", tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)
