"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EngineConfig:
    """Which model runs, where, and how."""

    engine: Literal["transformers", "vllm"] = "transformers"
    """Engine backend: `transformers` (embedded, CPU/CUDA) or `vllm` (servers, batching)."""
    model: str | None = None
    """Local model directory or hub id; None serves the built-in demo model."""
    served_model_name: str | None = None
    """Name clients use in `model`; defaults to the model directory's name."""
    device: str = "auto"
    """Torch device (`cpu`, `cuda`, `cuda:1`); `auto` picks CUDA when present."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights dtype; `auto` is bfloat16 on CUDA and float32 on CPU."""
    cache_dir: str | None = None
    """Where the demo model is built; default `$JOULECAP_CACHE` or `~/.cache/joulecap`."""
