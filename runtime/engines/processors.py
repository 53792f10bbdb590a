"""One processor loader for every engine: images only, no torchvision needed.

joulecap serves images, never video. Several families' processors (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, InternVL, ...) also carry a video processor, and in transformers 5 every video
processor needs torchvision: without it `AutoProcessor.from_pretrained` raises
`ImportError: Qwen2VLVideoProcessor requires the Torchvision library`, and building the processor
class by hand fails its check that the video processor is a `BaseVideoProcessor`. Jetson images
and this project's CPU environment often have no matching torchvision.

`load_processor` therefore loads such a processor as an images-only subclass of the checkpoint's
own processor class: the same tokenizer, chat template, image processor (the PIL backend when
torchvision is absent) and processor kwargs, with the video processor left out of its
attributes. Everything else goes through `AutoProcessor` unchanged. It behaves the same with or
without torchvision installed, so a checkpoint tokenises identically on every machine.
"""

from __future__ import annotations

import inspect
import json
from functools import cache
from typing import Any

_VIDEO = "video_processor"
_NO_RAISE = {
    "_raise_exceptions_for_gated_repo": False,
    "_raise_exceptions_for_missing_entries": False,
    "_raise_exceptions_for_connection_errors": False,
}


class ProcessorConfigError(ValueError):
    """The checkpoint's processor files are incomplete; the message names what is missing."""


def _config_file(path: str, name: str, local_files_only: bool) -> dict[str, Any] | None:
    """A JSON file of the checkpoint (local dir, hub cache or hub), or None when absent."""
    from transformers.utils import cached_file

    found = cached_file(path, name, local_files_only=local_files_only, **_NO_RAISE)
    if found is None:
        return None
    with open(found, encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else None


def processor_class_name(path: str, *, local_files_only: bool = True) -> str | None:
    """The processor class a checkpoint names, looked up where `AutoProcessor` looks.

    `processor_config.json`, `preprocessor_config.json` and `tokenizer_config.json` may each name
    it (`processor_class`); else the model type in `config.json` maps to its default processor.
    """
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        data = _config_file(path, name, local_files_only)
        if data and isinstance(data.get("processor_class"), str):
            return str(data["processor_class"])
    config = _config_file(path, "config.json", local_files_only)
    if config and isinstance(config.get("model_type"), str):
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        mapped = PROCESSOR_MAPPING_NAMES.get(config["model_type"])
        return str(mapped) if isinstance(mapped, str) else None
    return None


@cache
def images_only(cls: Any) -> Any:
    """`cls` without its video processor, for classes whose video processor is the last attribute.

    Transformers lists a processor's sub-processors with `get_attributes()` when it loads, checks,
    and saves them; this subclass leaves the video processor out of that list, so only the
    tokenizer and image processor (and any other attribute) are loaded and saved. The real
    `__init__` still runs, with its default `video_processor=None`, which `ProcessorMixin` drops
    because it pairs positional sub-processors with the shortened list. The class keeps its name:
    saved configs still name the real class.
    """
    attributes = [a for a in cls.get_attributes() if a != _VIDEO]

    def get_attributes(_: type) -> list[str]:
        return list(attributes)

    namespace = {
        "get_attributes": classmethod(get_attributes),
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)


def _video_defaults_to_none(cls: Any) -> bool:
    """Whether `cls.__init__` can run without a video processor (its parameter defaults to None)."""
    param = inspect.signature(cls.__init__).parameters.get(_VIDEO)
    return param is not None and param.default is None


def _has_image_processor(path: str, local_files_only: bool) -> bool:
    """Whether the checkpoint stores an image processor config (standalone or in the processor's)."""
    if _config_file(path, "preprocessor_config.json", local_files_only) is not None:
        return True
    processor = _config_file(path, "processor_config.json", local_files_only) or {}
    return isinstance(processor.get("image_processor"), dict)


def load_processor(path: str, *, local_files_only: bool = True) -> Any:
    """The processor of a checkpoint (local directory or hub id), images only where it has video.

    Args:
        path: Model directory or hub id.
        local_files_only: Do not try the network (local directory or hub cache only).

    Raises:
        ProcessorConfigError: The processor class needs an image processor and the checkpoint
            stores none (no `preprocessor_config.json`, no `image_processor` in
            `processor_config.json`).
        OSError, ValueError: Transformers cannot load the checkpoint's processor files.

    """
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import processor_class_from_name

    name = processor_class_name(path, local_files_only=local_files_only)
    cls: Any = processor_class_from_name(name) if name else None
    if cls is None:
        return AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
    attributes = list(cls.get_attributes())
    if "image_processor" in attributes and not _has_image_processor(path, local_files_only):
        raise ProcessorConfigError(
            f"The processor of {path!r} ({name}) needs an image processor, but the checkpoint has "
            "none: add `preprocessor_config.json` (or an `image_processor` entry in "
            "`processor_config.json`) from the original model."
        )
    # Only a trailing video processor can be left out: `ProcessorMixin.__init__` pairs the
    # positional sub-processors with the attribute list, so a middle one would shift the rest.
    if attributes and attributes[-1] == _VIDEO and _video_defaults_to_none(cls):
        cls = images_only(cls)
    return cls.from_pretrained(path, local_files_only=local_files_only)
