"""Hostile input: fuzzed images (in-process and over HTTP) and every configured limit.

The oracle for images: the decoder either returns an RGB image within the pixel limit or raises
`InvalidRequest` (400) / `PayloadTooLarge` (413) - nothing else, ever. Over HTTP the server must
agree with the in-process decoder: 200 for bytes it decodes, the same 4xx for bytes it refuses.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from _factories import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from joulecap.runtime.api.app import create_app
from joulecap.runtime.api.server import BackgroundServer
from joulecap.runtime.errors import InvalidRequest, PayloadTooLarge
from joulecap.runtime.images import ImagePolicy, decode_image_bytes, load_image
from joulecap.runtime.runtime import Runtime

MAX_PIXELS = 64 * 64
POLICY = ImagePolicy(max_pixels=MAX_PIXELS)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO", "PPM")


def _encode(fmt: str, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    img = Image.new(mode, size)
    # Some structure so compressors produce non-trivial streams.
    for i in range(0, size[0] * size[1], 7):
        img.putpixel(
            (i % size[0], i // size[0]),
            (seed * 31 + i) % 256 if mode in ("L", "P") else (i % 256, seed % 256, 128),
        )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose valid header claims width x height (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _gif_claiming(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x3b"


def _bmp_claiming(width: int, height: int) -> bytes:
    header = b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info


VALID = {
    (fmt, mode): _encode(fmt, (24, 16), mode)
    for fmt in FORMATS
    for mode in ("RGB", "L")
    if not (fmt == "ICO" and mode == "L")
}


def _check(data: bytes) -> int:
    """Decode and return the HTTP status the server should answer: 200, 400 or 413."""
    try:
        img = decode_image_bytes(data, POLICY, "image")
    except PayloadTooLarge:
        return 413
    except InvalidRequest:
        return 400
    assert img.mode == "RGB"
    assert img.width * img.height <= MAX_PIXELS
    return 200


# ---------------------------------------------------------------------------------------- strategies
garbage = st.binary(min_size=0, max_size=2048)
truncated = st.tuples(st.sampled_from(sorted(VALID)), st.floats(0.0, 0.999)).map(
    lambda t: VALID[t[0]][: int(len(VALID[t[0]]) * t[1])]
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    return bytes(data)


oversized = st.one_of(
    st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda wh: _png_claiming(*wh)),
    st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(lambda wh: _gif_claiming(*wh)),
    st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)).map(
        lambda wh: _bmp_claiming(*wh)
    ),
)
hostile = st.one_of(garbage, truncated, mutated(), oversized)


# ---------------------------------------------------------------------------------------- in-process
@settings(max_examples=400, deadline=None)
@given(hostile)
def test_decoder_only_accepts_or_refuses_with_4xx(data: bytes) -> None:
    _check(data)


@settings(max_examples=60, deadline=None)
@given(st.integers(MAX_PIXELS + 1, 10**12))
def test_declared_size_over_limit_is_413_before_decoding(pixels: int) -> None:
    width = min(pixels, 2**31 - 1)
    height = max(1, -(-pixels // width))
    assert _check(_png_claiming(width, height)) == 413


def test_valid_images_of_every_supported_format_decode() -> None:
    for (fmt, _mode), data in VALID.items():
        status = _check(data)
        assert status == (200 if fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP") else 400), fmt


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_image_url_string_is_accepted_or_4xx(url: str) -> None:
    for policy in (POLICY, replace(POLICY, allow_local_dir=str(Path(__file__).parent / "fixtures"))):
        with contextlib.suppress(InvalidRequest):
            load_image(url, policy, param="image")


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=512), st.sampled_from(["data:image/png;base64,", "data:;base64,", "data:image/png,"])
)
def test_data_urls_of_any_payload_are_accepted_or_4xx(payload: bytes, prefix: str) -> None:
    for text in (base64.b64encode(payload).decode(), payload.decode("latin-1")):
        with contextlib.suppress(InvalidRequest):
            load_image(prefix + text, POLICY, param="image")


# ---------------------------------------------------------------------------------------- over HTTP
LIMITS = {
    "max_body_bytes": 300_000,
    "max_image_pixels": MAX_PIXELS,
    "max_images": 2,
    "max_tokens_limit": 16,
}


@pytest.fixture(scope="module")
def limited(tiny_idefics3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Runtime]]:
    """One server for the module, with small limits so tests reach them cheaply."""
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = make_config(tiny_idefics3, tmp, server=LIMITS, energy={"idle_baseline_s": 0.0})
    runtime = Runtime(cfg)
    server = BackgroundServer(create_app(runtime)).start()
    yield server.base_url, runtime
    server.stop()
    runtime.close()


def _image_body(*urls: str, max_tokens: int = 1) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": "what is it?"})
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile)
def test_http_endpoint_agrees_with_decoder_and_never_5xx(limited: tuple[str, Runtime], data: bytes) -> None:
    base_url, _ = limited
    resp = httpx.post(base_url + "/v1/chat/completions", json=_image_body(_data_url(data)), timeout=60)
    assert resp.status_code < 500, resp.text
    assert resp.status_code == _check(data), resp.text
    if resp.status_code != 200:
        assert resp.json()["error"]["param"].startswith("messages.0.content.0")


def _post(base_url: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=60, **kw)


def test_limit_body_size_413_with_and_without_content_length(limited: tuple[str, Runtime]) -> None:
    base_url, runtime = limited
    before = runtime.ledger.count()
    body = json.dumps({**_image_body("data:image/png;base64," + "A" * 400_000)}).encode()
    declared = httpx.post(
        base_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for i in range(0, len(body), 16_384):
            yield body[i : i + 16_384]

    chunked = httpx.post(
        base_url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "body_too_large"
    assert runtime.ledger.count() == before
    # A body just under the limit is read fully (chunked too) and served.
    small = json.dumps(_image_body(_data_url(VALID[("PNG", "RGB")]))).encode()
    ok = httpx.post(
        base_url + "/v1/chat/completions",
        content=iter([small[:10], small[10:]]),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text


def test_limit_image_pixels_413(limited: tuple[str, Runtime]) -> None:
    base_url, _ = limited
    at_limit = _encode("PNG", (64, 64))
    over = _encode("PNG", (65, 64))
    assert _post(base_url, _image_body(_data_url(at_limit))).status_code == 200
    resp = _post(base_url, _image_body(_data_url(over)))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "image_too_large"
    assert "--max-image-pixels" in resp.json()["error"]["message"]
    bomb = _post(base_url, _image_body(_data_url(_png_claiming(100_000, 100_000))))
    assert bomb.status_code == 413


def test_limit_images_per_request_400(limited: tuple[str, Runtime]) -> None:
    base_url, _ = limited
    url = _data_url(VALID[("PNG", "RGB")])
    assert _post(base_url, _image_body(url, url)).status_code == 200
    resp = _post(base_url, _image_body(url, url, url))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "too_many_images"
    assert "--max-images" in resp.json()["error"]["message"]


def test_limit_max_tokens_400(limited: tuple[str, Runtime]) -> None:
    base_url, _ = limited
    text = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    assert _post(base_url, {**text, "max_tokens": 16}).status_code == 200
    for field in ("max_tokens", "max_completion_tokens"):
        resp = _post(base_url, {**text, field: 17})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "max_tokens"
    for bad in (0, -1, 10**30, "many", 1.5):
        assert _post(base_url, {**text, "max_tokens": bad}).status_code == 400, bad


def test_limit_prompt_tokens_over_context_400(limited: tuple[str, Runtime]) -> None:
    base_url, runtime = limited
    words = " ".join(["hello"] * (runtime.info.context_length + 10))
    resp = _post(base_url, {"model": "default", "messages": [{"role": "user", "content": words}]})
    assert resp.status_code == 400, resp.text
    assert "context" in resp.json()["error"]["message"].lower()
    many = [{"role": "user", "content": "hello " * 100}] * (runtime.info.context_length // 100 + 5)
    assert _post(base_url, {"model": "default", "messages": many}).status_code == 400


def test_hostile_json_shapes_get_4xx(limited: tuple[str, Runtime]) -> None:
    base_url, _ = limited
    cases: list[Any] = [
        [],
        "a string",
        None,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": {}}]}]},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "assistant", "content": "only me"}]},
        {"messages": [{"role": "user", "content": "hi"}], "seed": 2**80},
        {"messages": [{"role": "user", "content": "hi"}], "tau": 5},
        {"messages": [{"role": "user", "content": "hi"}], "tau": 0},
        {"messages": [{"role": "user", "content": "hi"}], "policy": "no-such-policy"},
    ]
    for case in cases:
        resp = _post(base_url, case)
        assert 400 <= resp.status_code < 500, (case, resp.text)
    # NUL and a lone surrogate in the prompt: odd but harmless text, served or refused, never a 500.
    odd = '{"messages": [{"role": "user", "content": "a\\u0000b\\ud800c"}], "max_tokens": 1}'
    resp = httpx.post(
        base_url + "/v1/chat/completions", content=odd, headers={"content-type": "application/json"}
    )
    assert resp.status_code in (200, 400), resp.text
    for raw in (
        '{"messages": [{"role": "user", "content": "hi"}], "energy_budget_j": 1e999}',
        '{"messages": [{"role": "user", "content": "hi"}], "energy_budget_j": NaN}',
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
    ):
        resp = httpx.post(
            base_url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert resp.status_code == 400, (raw, resp.text)
    nested = "[" * 100_000 + "]" * 100_000
    resp = httpx.post(
        base_url + "/v1/chat/completions", content=nested, headers={"content-type": "application/json"}
    )
    assert resp.status_code in (400, 413), resp.text


def test_wrong_method_and_unknown_path_get_openai_errors(limited: tuple[str, Runtime]) -> None:
    base_url, _ = limited
    wrong = httpx.get(base_url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(base_url + "/v1/nothing-here", json={})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_extreme_but_valid_sampling_values_are_served(limited: tuple[str, Runtime]) -> None:
    # Found by schemathesis: a tiny temperature or top_p made the sampler divide to inf/nan (500).
    base_url, _ = limited
    text = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for extra in (
        {"temperature": 1e-300},
        {"temperature": 5.97e-05, "seed": 1},
        {"temperature": 0.5, "top_p": 1e-300},
        {"temperature": 2.0, "top_p": 1e-9, "seed": -(2**63)},
    ):
        resp = _post(base_url, {**text, **extra})
        assert resp.status_code == 200, (extra, resp.text)
