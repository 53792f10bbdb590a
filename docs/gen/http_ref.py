"""Render the HTTP API reference from the OpenAPI schema of the app `joulecap serve` runs.

The schema comes from `create_app(runtime).openapi()` on a real `Runtime` serving the demo
model (no warm-up, no calibration, estimate meter, ledger in memory, files in a temporary
directory): the same routes and request models as a live server, built in seconds, offline.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from cli_ref import clean_environment

# FastAPI adds a 422 "Validation Error" response to every route with a body or parameters;
# joulecap answers validation errors with 400 and an OpenAI error body instead (see the page's
# "Errors" section), so that generated entry would be wrong.
FASTAPI_VALIDATION = "#/components/schemas/HTTPValidationError"


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of the app, built around a real demo-model `Runtime`."""
    with clean_environment(), tempfile.TemporaryDirectory() as tmp:
        from joulecap.runtime.api.app import create_app
        from joulecap.runtime.config import JoulecapConfig
        from joulecap.runtime.runtime import Runtime

        base = JoulecapConfig()
        config = replace(
            base,
            engine=replace(base.engine, model=None, warmup=False),
            energy=replace(base.energy, meter="estimate", idle_baseline_s=0.0),
            calibration=replace(base.calibration, auto_calibrate=False),
            paths=replace(
                base.paths,
                cache_dir=str(Path(tmp) / "cache"),
                profile_dir=str(Path(tmp) / "profiles"),
                ledger_path=":memory:",
            ),
        )
        quiet = logging.getLogger("joulecap")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the uncalibrated-profile warning is expected here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            with Runtime(config) as runtime:
                schema: dict[str, Any] = create_app(runtime).openapi()
        finally:
            quiet.setLevel(level)
    return schema


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        kinds = [_type(s) for s in schema["anyOf"]]
        return " or ".join(k for k in kinds if k != "null") + (" or null" if "null" in kinds else "")
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    return str(kind)


def _bounds(schema: dict[str, Any]) -> str:
    parts = []
    for key, sign in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("minItems", "items >="),
    ):
        if key in schema:
            parts.append(
                f"{sign} {schema[key]:g}" if isinstance(schema[key], float) else f"{sign} {schema[key]}"
            )
    for sub in schema.get("anyOf", []):
        bound = _bounds(sub)
        if bound:
            parts.append(bound)
    return ", ".join(parts)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(schema: dict[str, Any]) -> str:
    return f"`{json.dumps(schema['default'])}`" if "default" in schema else ""


def _operation(lines: list[str], method: str, path: str, op: dict[str, Any]) -> None:
    lines += [f"### `{method.upper()} {path}`", ""]
    if op.get("summary"):
        lines += [op["summary"] + ".", ""]
    if op.get("description"):
        lines += [op["description"].strip(), ""]
    params = op.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | default | description |", "|---|---|---|---|---|"]
        for p in params:
            schema = p.get("schema", {})
            kind = _type(schema) + (f" ({_bounds(schema)})" if _bounds(schema) else "")
            desc = p.get("description") or schema.get("description", "")
            lines.append(f"| `{p['name']}` | {p['in']} | {kind} | {_default(schema)} | {_cell(desc)} |")
        lines.append("")
    body = op.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        lines += [f"Request body (`{media}`): {_type(content.get('schema', {}))}.", ""]
    answers = []
    for status, response in op.get("responses", {}).items():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        if schema.get("$ref") == FASTAPI_VALIDATION:
            continue
        media = ", ".join(f"`{m}`" for m in response.get("content", {})) or "no body"
        answers.append(f"`{status}` {response.get('description', '')} ({media})")
    if answers:
        lines += ["Responses in the schema: " + "; ".join(answers) + ".", ""]


def _component(lines: list[str], name: str, schema: dict[str, Any]) -> None:
    lines += [f"### {name}", ""]
    if schema.get("description"):
        lines += [schema["description"].strip(), ""]
    props = schema.get("properties", {})
    if props:
        required = set(schema.get("required", []))
        lines += ["| field | type | required | default | description |", "|---|---|---|---|---|"]
        for field, sub in props.items():
            kind = _type(sub) + (f" ({_bounds(sub)})" if _bounds(sub) else "")
            req = "yes" if field in required else ""
            lines.append(
                f"| `{field}` | {kind} | {req} | {_default(sub)} | {_cell(sub.get('description', ''))} |"
            )
        lines.append("")
    if schema.get("additionalProperties") is True:
        lines += ["Other fields are accepted and ignored.", ""]


def render_http(schema: dict[str, Any] | None = None) -> str:
    """The routes and request models of the OpenAPI document, as Markdown."""
    schema = schema if schema is not None else openapi_schema()
    info = schema.get("info", {})
    lines = [
        f"Generated from the OpenAPI {schema.get('openapi', '')} document of `{info.get('title', '')}` "
        f"{info.get('version', '')} (`create_app(runtime).openapi()`); a running server also serves "
        "it at `/openapi.json` and as a browsable page at `/docs`.",
        "",
        "## Routes",
        "",
    ]
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            _operation(lines, method, path, op)
    lines += ["## Request models", ""]
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        _component(lines, name, component)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_http())
