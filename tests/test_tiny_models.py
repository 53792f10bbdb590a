"""Tiny random-weight VLMs: deterministic, offline, loadable through from_pretrained; the demo cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import joulecap.runtime.tiny_models as tiny
from joulecap.runtime.cli import main as cli_main
from joulecap.runtime.tiny_models import build_tiny_model, demo_model_path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_build_is_deterministic_per_seed(tmp_path: Path, tiny_idefics3: Path) -> None:
    again = build_tiny_model("idefics3", tmp_path / "again", seed=0)
    other = build_tiny_model("idefics3", tmp_path / "other", seed=1)
    assert _same_weights(tiny_idefics3, again)
    assert not _same_weights(tiny_idefics3, other)
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (tiny_idefics3 / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.parametrize("arch", ["idefics3", "llava"])
def test_loads_offline_through_from_pretrained(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = build_tiny_model(arch, tmp_path / arch, seed=3)
    marker = json.loads((path / "joulecap.json").read_text())
    assert marker == {"random_weights": True, "arch": arch, "seed": 3}
    assert sum(f.stat().st_size for f in path.iterdir()) < 5 * 1024 * 1024

    processor = AutoProcessor.from_pretrained(path)
    model: Any = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.model_type == arch
    assert "Pil" in type(processor.image_processor).__name__  # no torchvision needed
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>User:<image>Colour?<end_of_utterance>\nAssistant:"
    inputs = processor(text=[text], images=[Image.new("RGB", (90, 70), (10, 200, 10))], return_tensors="pt")
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_visual == 64
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4


def test_tokenizer_round_trips_any_text(tiny_idefics3: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_idefics3)
    text = "Grüße, 世界! <end_of_utterance> tabs\tand\nnewlines"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<end_of_utterance>") in ids  # specials stay single tokens
    for special in ("<image>", "<fake_token_around_image>", "<global-img>", "<|im_start|>", "<row_2_col_3>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special


def test_unknown_arch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="idefics3"):
        build_tiny_model("qwen", tmp_path / "x")


def test_cli_make_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["make-tiny-model", "--arch", "llava", "--seed", "2", str(tmp_path / "m")]) == 0
    assert "random weights" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "joulecap.json").read_text())["arch"] == "llava"


def test_demo_model_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny, "PACKAGED_DEMO", tmp_path / "no-packaged-model")
    cache = tmp_path / "cache"
    paths: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def build() -> None:
        try:
            barrier.wait()
            paths.append(demo_model_path(cache))
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert paths == [cache / "demo-idefics3"] * 3
    # Only the finished model is left: no temporary build directories.
    assert [p.name for p in cache.iterdir()] == ["demo-idefics3"]
    weights = cache / "demo-idefics3" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert demo_model_path(cache) == cache / "demo-idefics3"
    assert weights.stat().st_mtime_ns == mtime  # second call reuses the build


def test_packaged_trained_demo_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = tmp_path / "tinyvqa"
    packaged.mkdir()
    (packaged / "config.json").write_text("{}")
    monkeypatch.setattr(tiny, "PACKAGED_DEMO", packaged)
    assert demo_model_path(tmp_path / "cache") == packaged
    assert not (tmp_path / "cache").exists()
