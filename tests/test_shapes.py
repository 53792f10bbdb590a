"""Realistic-shape models: transcribed dimensions against published sizes, processors, the CLI.

The parameter counts are taken on the meta device (nothing allocated), so even the 3B/4B shapes
are checked here without building their weights; building one (slow) is tested on SmolVLM-256M.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from joulecap.runtime.cli import build_parser
from joulecap.runtime.shapes import SHAPE_NAMES, build_shape_model, count_parameters, get_shape


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_parameter_count_matches_the_published_size(name: str) -> None:
    shape = get_shape(name)
    params_b = count_parameters(name) / 1e9
    # Model cards round to 3 significant digits (0.256B, 0.938B, 3.75B, 4.3B).
    assert params_b == pytest.approx(shape.published_params_b, rel=0.005)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_processor_gives_the_real_tokens_per_image(name: str) -> None:
    shape = get_shape(name)
    tokenizer = shape.tokenizer()
    config = shape.config(tokenizer)
    processor = shape.processor(tokenizer)
    vision = config.vision_config
    # The config's image token is the tokenizer's, as in a real checkpoint.
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    assert image_token in tokenizer.get_vocab()
    if shape.arch == "idefics3":
        per_tile = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        assert per_tile == processor.image_seq_len == shape.tokens_per_image == 64
        assert processor.image_processor.do_image_splitting
        assert processor.image_processor.size.longest_edge == 2048
    elif shape.arch == "internvl":
        side = vision.image_size[0] // vision.patch_size[0]
        per_tile = int(side * side * config.downsample_ratio**2)
        assert per_tile == processor.image_seq_length == shape.tokens_per_image == 256
        assert processor.image_processor.max_patches == 12
    elif shape.arch == "gemma3":
        assert config.mm_tokens_per_image == processor.image_seq_length == shape.tokens_per_image == 256
        assert vision.image_size // vision.patch_size == 64  # 64x64 patches pooled 4x4 to 16x16
    else:  # qwen2_5_vl: one token per merged 2x2 group of 14 px patches
        image_processor = processor.image_processor
        assert vision.patch_size * vision.spatial_merge_size == 28
        assert (image_processor.patch_size, image_processor.merge_size) == (14, 2)
        assert (image_processor.size.shortest_edge, image_processor.size.longest_edge) == (3136, 12845056)


def test_cli_offers_every_shape_and_refuses_others() -> None:
    parser = build_parser()
    args = parser.parse_args(["make-tiny-model", "--shape", "gemma-3-4b", "out"])
    assert args.shape == "gemma-3-4b"
    with pytest.raises(SystemExit):
        parser.parse_args(["make-tiny-model", "--shape", "gemma-3-27b", "out"])
    with pytest.raises(ValueError, match="smolvlm-256m"):
        get_shape("gemma-3-27b")


@pytest.mark.slow
def test_smolvlm_256m_shape_builds_and_loads(tmp_path: Path) -> None:
    """~1 GB of float32 weights written and loaded through the serving engine."""
    from joulecap.runtime.engines.config import EngineConfig
    from joulecap.runtime.engines.transformers_engine import TransformersEngine

    path = build_shape_model("smolvlm-256m", tmp_path / "smol", seed=0)
    engine = TransformersEngine(EngineConfig(model=str(path), device="cpu"))
    try:
        assert engine.info.family == "idefics3"
        assert engine.info.random_weights
        assert engine.info.params_b == pytest.approx(0.256, rel=0.005)
        assert engine.info.context_length == 8192
        text = engine.model.config.text_config
        assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (30, 576, 49280)
    finally:
        engine.close()
