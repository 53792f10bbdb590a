"""Tiny builders of the measured families: offline, deterministic, the family's tokens and template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants
from safetensors.torch import load_file

from joulecap.runtime.cli import main as cli_main
from joulecap.runtime.engines.processors import load_processor
from joulecap.runtime.tiny_models import build_tiny_model, tiny_archs

QWEN_USER_TURN = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
EXPECTED = {
    # arch: (chat text of one image + "Colour?", patch size, merge size, min pixels)
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        + QWEN_USER_TURN
        + "<|im_start|>assistant\n",
        14,
        2,
        56 * 56,
    ),
    "qwen2_5_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        + QWEN_USER_TURN
        + "<|im_start|>assistant\n",
        14,
        2,
        56 * 56,
    ),
    "qwen3_vl": (QWEN_USER_TURN + "<|im_start|>assistant\n", 16, 2, 256 * 256),
}


def test_every_family_is_a_make_tiny_model_choice() -> None:
    assert set(EXPECTED) <= set(tiny_archs())


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_builds_offline_with_the_family_tokens_and_template(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli_main(["make-tiny-model", "--arch", arch, str(tmp_path / "a")]) == 0
    assert "random weights" in capsys.readouterr().out
    path = tmp_path / "a"
    assert json.loads((path / "joulecap.json").read_text())["arch"] == arch
    assert sum(f.stat().st_size for f in path.iterdir()) < 5 * 1024 * 1024
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    saved = json.loads((path / "processor_config.json").read_text())
    assert "video_processor" not in saved  # images only: loads without torchvision

    text, patch, merge, min_pixels = EXPECTED[arch]
    processor = load_processor(str(path))
    image_processor = processor.image_processor
    assert (image_processor.patch_size, image_processor.merge_size) == (patch, merge)
    assert image_processor.size["shortest_edge"] == min_pixels
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    tok = processor.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    assert tok.eos_token == "<|im_end|>"

    model: Any = AutoModelForImageTextToText.from_pretrained(path)
    inputs = processor(text=[text], images=[Image.new("RGB", (200, 100), (10, 200, 10))], return_tensors="pt")
    (t, h, w) = inputs["image_grid_thw"][0].tolist()
    assert (t, h % merge, w % merge) == (1, 0, 0)
    n_visual = int((inputs["input_ids"] == config["image_token_id"]).sum())
    assert n_visual == h * w // merge**2
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_weights_are_deterministic_per_seed(arch: str, tmp_path: Path) -> None:
    a = load_file(str(build_tiny_model(arch, tmp_path / "a", seed=0) / "model.safetensors"))
    b = load_file(str(build_tiny_model(arch, tmp_path / "b", seed=0) / "model.safetensors"))
    c = load_file(str(build_tiny_model(arch, tmp_path / "c", seed=1) / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert any(not a[k].equal(c[k]) for k in a)
