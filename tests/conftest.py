"""Shared fixtures: tiny real models built locally, runtimes, and live uvicorn servers."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _factories import make_config
from PIL import Image

OPENAI_SCHEMAS = Path(__file__).resolve().parent / "fixtures" / "openai"
"""OpenAI's published JSON schemas (extracted from openai/openai-openapi, MIT; see the LICENSE there)."""


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Idefics3 (SmolVLM architecture) saved with save_pretrained."""
    from joulecap.runtime.tiny_models import build_tiny_model

    return build_tiny_model("idefics3", tmp_path_factory.mktemp("models") / "tiny-idefics3", seed=0)


@pytest.fixture
def live_server_factory(tmp_path: Path, tiny_idefics3: Path) -> Iterator[Any]:
    """Start servers over fresh runtimes; everything is closed at teardown."""
    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.api.server import BackgroundServer
    from joulecap.runtime.runtime import Runtime

    opened: list[tuple[BackgroundServer, Runtime]] = []

    def start(**sections: dict[str, Any]) -> tuple[BackgroundServer, Runtime]:
        runtime = Runtime(make_config(tiny_idefics3, tmp_path, **sections))
        server = BackgroundServer(create_app(runtime)).start()
        opened.append((server, runtime))
        return server, runtime

    yield start
    for server, runtime in opened:
        server.stop()
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
