r"""The TinyVQA model: a small LLaVA (CLIP vision tower + MLP projector + Llama) and its processor.

The tokenizer is word-level over the TinyVQA vocabulary (lower-cased; unknown words map to `[UNK]`)
and uses joulecap's SmolVLM-style chat template, so the engine renders prompts exactly as in training:
`<|im_start|>User:<image>QUESTION<end_of_utterance>\nAssistant:` then the answer and `<|endoftext|>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.tinyvqa.generate import IMAGE_SIZE, VOCAB_WORDS
from joulecap.runtime.tiny_models import EOS, EOU, IM_START, IMAGE, llava_processor

UNK = "[UNK]"


@dataclass(frozen=True)
class ModelSize:
    """Patch size, widths and depths of the two towers."""

    patch: int = 10
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 160
    text_layers: int = 4
    text_heads: int = 5
    text_kv_heads: int = 5


def build_tokenizer() -> Any:
    """Word-level tokenizer: specials, then the TinyVQA words (deterministic ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [EOS, IM_START, IMAGE, EOU, UNK, *VOCAB_WORDS]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins words with spaces and drops the space before punctuation.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[IMAGE, EOU],
        model_max_length=512,
    )
    fast.padding_side = "left"
    return fast


def build_model(size: ModelSize, seed: int) -> tuple[Any, Any]:
    """A freshly initialised LLaVA model and its processor (slow PIL CLIP image processor)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    n_tokens = (IMAGE_SIZE // size.patch) ** 2
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": size.vision_hidden,
            "intermediate_size": 4 * size.vision_hidden,
            "num_hidden_layers": size.vision_layers,
            "num_attention_heads": size.vision_heads,
            "image_size": IMAGE_SIZE,
            "patch_size": size.patch,
            "projection_dim": size.vision_hidden,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": size.text_hidden,
            "intermediate_size": int(size.text_hidden * 8 // 3),
            "num_hidden_layers": size.text_layers,
            "num_attention_heads": size.text_heads,
            "num_key_value_heads": size.text_kv_heads,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.convert_tokens_to_ids(IM_START),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    processor = llava_processor(tokenizer, IMAGE_SIZE, size.patch)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOU)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.convert_tokens_to_ids(IM_START)
    return model, processor


def sincos_positions(model: Any, norm: float) -> None:
    """Re-initialise the vision tower's patch position embeddings as 2-D sin/cos waves of `norm`.

    A training choice, not an architecture change (the weights stay CLIP's learned position
    embeddings). With CLIP's default init (std 0.02) the patch content drowns the position: in a
    model trained from it no linear probe could tell where a visual token lies (R2 below 0 after
    the encoder, 0.75 before it), so "is the circle left of the square?" stayed at chance.
    Half the channels follow x and half y, each as sines and cosines of geometrically spaced
    frequencies (the slow ones are nearly linear in the coordinate); row 0 (CLS) is left alone.
    """
    import torch

    emb = model.model.vision_tower.embeddings.position_embedding.weight
    n_patches, dim = emb.shape[0] - 1, emb.shape[1]
    grid = round(n_patches**0.5)
    if grid * grid != n_patches or dim % 4:
        raise ValueError(f"need a square patch grid and dim % 4 == 0, got {n_patches} patches, dim {dim}")
    quarter = dim // 4
    omega = 1.0 / (grid ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (xs.flatten().float(), ys.flatten().float()):
        angle = coord[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    table = torch.cat(parts, dim=1)
    table = table / table.norm(dim=1, keepdim=True) * norm
    with torch.no_grad():
        emb[1:] = table


def messages(question: str) -> list[dict[str, Any]]:
    """The chat the engine renders for one image and one question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
