"""`load_processor`: video-carrying processors load images-only without torchvision; clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from joulecap.runtime.engines.processors import ProcessorConfigError, load_processor
from joulecap.runtime.tiny_models import _build_tokenizer

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}"
)


def _qwen2_vl_checkpoint(path: Path) -> Path:
    """Processor files laid out as a released Qwen2-VL checkpoint's are.

    The image processor config sits in `preprocessor_config.json` and a video processor config in
    `video_preprocessor_config.json`, both naming `Qwen2VLProcessor`.
    """
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = _build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    tokenizer.save_pretrained(path)
    image = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16).to_dict()
    image.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(image))
    video = {**image, "video_processor_type": "Qwen2VLVideoProcessor"}
    del video["image_processor_type"]
    (path / "video_preprocessor_config.json").write_text(json.dumps(video))
    (path / "chat_template.jinja").write_text(TEMPLATE)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _tokenise(processor: Any, size: tuple[int, int]) -> Any:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", size, (200, 30, 30))], return_tensors="pt")


def test_qwen2_vl_processor_loads_images_only(tmp_path: Path) -> None:
    path = _qwen2_vl_checkpoint(tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        from transformers import AutoProcessor

        # The failure this loader exists for.
        with pytest.raises((ImportError, OSError, ValueError, AttributeError)):
            AutoProcessor.from_pretrained(path)
    processor = load_processor(str(path))
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert not hasattr(processor, "video_processor")
    assert processor.chat_template == TEMPLATE
    inputs = _tokenise(processor, (100, 60))
    # 100x60 px resize to 112x56 (multiples of 28): a 4x8 patch grid, 2x2 merge -> 8 tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_id).sum()) == 8


def test_images_only_processor_saves_as_the_real_class(tmp_path: Path) -> None:
    processor = load_processor(str(_qwen2_vl_checkpoint(tmp_path / "src")))
    processor.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"
    assert "video_processor" not in saved
    again = load_processor(str(tmp_path / "out"))
    assert (
        _tokenise(again, (100, 60))["input_ids"].tolist()
        == _tokenise(processor, (100, 60))["input_ids"].tolist()
    )


def test_missing_image_processor_is_a_clear_error(tmp_path: Path) -> None:
    path = _qwen2_vl_checkpoint(tmp_path)
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(ProcessorConfigError, match="needs an image processor"):
        load_processor(str(path))


def test_processors_without_video_load_through_auto(tiny_idefics3: Path) -> None:
    from transformers import AutoProcessor

    processor = load_processor(str(tiny_idefics3))
    reference = AutoProcessor.from_pretrained(tiny_idefics3)
    assert type(processor) is type(reference)
    assert type(processor.image_processor) is type(reference.image_processor)


def test_engine_names_the_missing_image_processor(tmp_path: Path) -> None:
    from joulecap.runtime.engines.config import EngineConfig
    from joulecap.runtime.engines.factory import ModelLoadError
    from joulecap.runtime.engines.transformers_engine import TransformersEngine
    from joulecap.runtime.tiny_models import build_tiny_model

    path = build_tiny_model("qwen2_vl", tmp_path / "m")
    config = json.loads((path / "processor_config.json").read_text())
    del config["image_processor"]
    (path / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="needs an image processor"):
        TransformersEngine(EngineConfig(model=str(path), device="cpu"))
