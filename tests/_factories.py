"""Small builders shared by test modules (importable because pytest's `pythonpath` holds tests/)."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.types import ChatMessage, PreparedRequest, Request, TextPart


def low_rank_features(n: int, rank: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """`[n, dim]` features of the given rank plus a little noise (spectral budget ~ rank)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank, generator=g)
    b = torch.randn(rank, dim, generator=g)
    return a @ b + 1e-4 * torch.randn(n, dim, generator=g)


def prepared(
    *,
    text_tokens: int = 20,
    visual: tuple[int, ...] = (64,),
    rank: int = 8,
    context_length: int = 2048,
    hint_tokens: int = 0,
    **request_fields: object,
) -> PreparedRequest:
    """A `PreparedRequest` with random low-rank visual features, one per image."""
    request = Request(
        request_id="chatcmpl-test",
        messages=(ChatMessage("user", (TextPart("hi"),)),),
        **request_fields,
    )
    feats = tuple(low_rank_features(n, min(rank, n), seed=i) for i, n in enumerate(visual))
    return PreparedRequest(request, text_tokens, visual, feats, context_length, hint_tokens=hint_tokens)


def marked_image(color: tuple[int, int, int], size: tuple[int, int] = (100, 80)) -> Image.Image:
    """A light-grey image with one coloured rectangle (distinct images for engine parity tests)."""
    img = Image.new("RGB", size, (240, 240, 240))
    for x in range(size[0] // 4, size[0] // 2):
        for y in range(size[1] // 5, size[1] // 2):
            img.putpixel((x, y), color)
    return img


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REPO = Path(__file__).resolve().parents[1]


def serve_cmd(model: Path, work: Path, port: int, *, log_level: str | None = None) -> list[str]:
    """`joulecap serve` from the repo's venv on the tiny model: estimate meter, all state under `work`."""
    head = [str(REPO / ".venv" / "bin" / "joulecap")]
    if log_level is not None:
        head += ["--log-level", log_level]
    return [
        *head,
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--meter",
        "estimate",
        "--idle-baseline-s",
        "0",
        "--ledger-path",
        str(work / "ledger.sqlite3"),
        "--profile-dir",
        str(work / "profiles"),
        "--cache-dir",
        str(work / "cache"),
        "--no-auto-calibrate",
    ]


def make_config(model_dir: Path | None, tmp_path: Path, **sections: dict[str, Any]) -> JoulecapConfig:
    """A config serving `model_dir` (None: the demo model) with the estimate meter, all state under
    `tmp_path`.

    `sections` maps a component name (`server`, `engine`, ...) to field overrides.
    """
    base = JoulecapConfig()
    model = None if model_dir is None else str(model_dir)
    cfg = replace(
        base,
        engine=replace(base.engine, model=model),
        energy=replace(base.energy, meter="estimate"),
        paths=replace(
            base.paths,
            cache_dir=str(tmp_path / "cache"),
            ledger_path=str(tmp_path / "ledger.sqlite3"),
            profile_dir=str(tmp_path / "profiles"),
        ),
        # Tests that need a profile calibrate on purpose; the others plan on the default.
        calibration=replace(base.calibration, auto_calibrate=False),
    )
    for name, overrides in sections.items():
        cfg = replace(cfg, **{name: replace(getattr(cfg, name), **overrides)})
    return cfg
