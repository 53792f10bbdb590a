"""The vLLM native path's token-count rules against the processor they stand in for (no vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from joulecap.runtime.engines.idefics3 import Idefics3Adapter
from joulecap.runtime.engines.vllm_native import idefics3_counts, rule_counts

SIZES = [(96, 80), (1, 500), (500, 1), (300, 200), (128, 128), (640, 90), (33, 257)]


def _processor(model_dir: Path, splitting: bool) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    if splitting:  # tiles of 64 px under a 128 px longest edge: up to 2 x 2 tiles plus the global image
        processor.image_processor.do_image_splitting = True
        processor.image_processor.max_image_size = {"longest_edge": 64}
    return processor


def _text(processor: Any, n_images: int) -> str:
    content = [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": "What is it?"}]
    return str(
        processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    )


@pytest.mark.parametrize("splitting", [False, True])
def test_idefics3_rule_matches_the_processor(tiny_idefics3: Path, splitting: bool) -> None:
    processor = _processor(tiny_idefics3, splitting)
    adapter: Any = object.__new__(Idefics3Adapter)
    adapter.tokenizer = processor.tokenizer
    adapter.model = type("M", (), {"config": type("C", (), {"image_token_id": processor.image_token_id})()})()
    tiles_seen = set()
    for n_images in (1, 2):
        for i in range(len(SIZES)):
            images = [
                Image.new("RGB", SIZES[(i + k) % len(SIZES)], (10 * k, 90, 200)) for k in range(n_images)
            ]
            text = _text(processor, n_images)
            inputs = processor(text=[text], images=[images], return_tensors="pt")
            ids = inputs["input_ids"][0].tolist()
            visual = tuple(len(p) for p in adapter.visual_positions(ids, n_images))
            tiles_seen.add(int(inputs["pixel_values"].shape[1]))
            assert idefics3_counts(processor, text, images) == (len(ids), visual), (SIZES[i], n_images)
    if splitting:
        assert max(tiles_seen) > 1, "no image was split: the splitting case tested nothing"


def test_rule_defers_to_the_processor_when_it_cannot_size(tiny_idefics3: Path) -> None:
    processor = _processor(tiny_idefics3, False)
    text = _text(processor, 1)
    assert rule_counts("idefics3", processor, text, [Image.new("RGB", (0, 0))]) is None
    assert rule_counts("idefics3", processor, text, []) is None  # placeholder without its image
    assert rule_counts("llava", processor, text, [Image.new("RGB", (8, 8))]) is None  # no rule
