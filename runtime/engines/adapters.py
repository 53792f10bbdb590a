"""Per-family model adapters: where visual tokens sit, how images become LM features, splicing.

A VLM family (Idefics3/SmolVLM, LLaVA, ...) differs in three places only: how its prompt marks
each image's visual tokens, how pixels become the post-projector features that replace them, and
which extra tokens end a turn. An adapter captures exactly that; everything else (templating,
pruning, decoding) is shared by the engine. Adapters are registered by the Hugging Face
`model_type` and imported lazily, so adding a family is one new module plus one registry line.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

ADAPTERS: dict[str, str] = {
    "idefics3": "joulecap.runtime.engines.idefics3:Idefics3Adapter",
    "smolvlm": "joulecap.runtime.engines.idefics3:Idefics3Adapter",
    "llava": "joulecap.runtime.engines.llava:LlavaAdapter",
    "qwen2_vl": "joulecap.runtime.engines.qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "joulecap.runtime.engines.qwen2_vl:Qwen2VLAdapter",
    "qwen3_vl": "joulecap.runtime.engines.qwen3_vl:Qwen3VLAdapter",
    "gemma3": "joulecap.runtime.engines.gemma3:Gemma3Adapter",
    "internvl": "joulecap.runtime.engines.internvl:InternVLAdapter",
}
"""Hugging Face `model_type` -> `module:Class` of its adapter (imported on first use)."""


@dataclass(frozen=True)
class EncodedImages:
    """What the vision tower produced for a prompt's images.

    Attributes:
        features: Per image, `[N_i, D]` post-projector features (what pruning selects among).
        extras: Anything else a family's LM needs per visual token (e.g. Qwen3-VL's deepstack
            features), handed back unchanged to `FamilyAdapter.lm_inputs`; None for most families.

    """

    features: tuple[torch.Tensor, ...]
    extras: Any = None


@dataclass(frozen=True)
class LMInputs:
    """Forward inputs beyond the embeddings that must follow the kept tokens.

    Attributes:
        prefill: Extra keyword arguments of the prefill forward (e.g. `position_ids` gathered at
            the kept tokens, `token_type_ids`), each already cut to the kept prompt.
        decode: Called before each decode step with the number of tokens already in the KV
            cache; returns that step's extra keyword arguments. None: the step needs none.

    """

    prefill: dict[str, Any] = field(default_factory=dict)
    decode: Callable[[int], dict[str, Any]] | None = None

    def step(self, past_length: int) -> dict[str, Any]:
        """Extra keyword arguments of the decode step after `past_length` cached tokens."""
        return {} if self.decode is None else self.decode(past_length)


def keep_mask(length: int, positions: Sequence[torch.Tensor], keep: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[length]` bool mask of the prompt tokens that stay: all text, the kept visual tokens.

    Args:
        length: Prompt length with every visual placeholder present.
        positions: Per image, the placeholder positions in the prompt.
        keep: Per image, sorted indices (into that image's placeholders) of the tokens kept.

    """
    device = positions[0].device if positions else None
    mask = torch.ones(length, dtype=torch.bool, device=device)
    for pos, kept in zip(positions, keep, strict=True):
        if pos.numel() == 0:
            continue
        dropped = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
        dropped[kept.to(pos.device)] = False
        mask[pos[dropped]] = False
    return mask


class FamilyAdapter(ABC):
    """What the engine needs to know about one architecture family.

    Args:
        model: The loaded `...ForConditionalGeneration` model.
        processor: Its processor (tokenizer + image processor + chat template).

    """

    family: ClassVar[str]
    """Family name reported in `EngineInfo.family`."""
    extra_stop_tokens: ClassVar[tuple[str, ...]] = ()
    """Tokens that end an assistant turn besides the tokenizer's EOS (if in the vocabulary)."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer

    # ------------------------------------------------------------------ family specifics
    @property
    def image_token_id(self) -> int:
        """Id of the placeholder token that one visual feature replaces."""
        return int(self.model.config.image_token_id)

    @property
    def reserved_strings(self) -> tuple[str, ...]:
        """Strings user text may not contain (they would be read as image placeholders)."""
        return (str(self.tokenizer.convert_ids_to_tokens(self.image_token_id)),)

    @abstractmethod
    def visual_positions(self, input_ids: Sequence[int], n_images: int) -> list[torch.Tensor]:
        """Positions of each image's visual-token placeholders in `input_ids`, in prompt order.

        Raises:
            ValueError: The placeholders do not split into `n_images` images.

        """

    @abstractmethod
    def image_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Run the vision tower and projector on the processor's image inputs.

        Returns:
            The post-projector features of the prompt's visual tokens, in prompt order, as one or
            more `[n, D]` tensors whose concatenation has one row per placeholder.

        """

    # ------------------------------------------------------------------ shared logic
    def stop_token_ids(self) -> frozenset[int]:
        """Token ids that end generation: generation config EOS, tokenizer EOS, family extras."""
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in self.extra_stop_tokens if t in vocab)
        return frozenset(int(i) for i in ids)

    def encode(self, inputs: Mapping[str, Any], positions: Sequence[torch.Tensor]) -> EncodedImages:
        """Run the vision tower once: per-image features, plus any family extras.

        Families whose LM needs more than the features (Qwen3-VL's deepstack) override this.
        """
        return EncodedImages(self.encode_images(inputs, positions))

    def lm_inputs(
        self,
        input_ids: torch.Tensor,
        kept: torch.Tensor,
        image_inputs: Mapping[str, Any],
        extras: Any,
    ) -> LMInputs:
        """Extra forward inputs for the kept prompt and each decode step (default: none).

        The hook for families whose LM takes more than embeddings: multimodal rotary positions
        (Qwen: computed on the whole prompt, gathered at the kept tokens), token types (Gemma-3),
        per-token visual extras. Family code stays in the family's module.

        Args:
            input_ids: `[L]` prompt ids with every visual placeholder present (the ids spliced).
            kept: `[L]` bool mask of the prompt tokens that stay (`keep_mask`).
            image_inputs: The processor's outputs for the prompt besides `input_ids` and
                `attention_mask` (pixel values, grids, ...), on the model's device.
            extras: `EncodedImages.extras` of the prompt's images.

        """
        return LMInputs()

    def forward(self, **kwargs: Any) -> Any:
        """One LM forward (prefill or decode step): the model's own, unless a family needs more.

        Args:
            kwargs: The model's inputs; the KV cache under `cache_kwarg(self.model)`.

        Returns:
            An output with `.logits` and the KV cache (read it with `output_cache`).

        """
        return self.model(**kwargs)

    def encode_images(
        self, inputs: Mapping[str, Any], positions: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Per-image post-projector features `[N_i, D]`, `N_i == len(positions[i])`.

        Raises:
            ValueError: The vision tower produced a different number of features than placeholders.

        """
        with torch.inference_mode():
            flat = torch.cat(self.image_features(inputs), dim=0)
        counts = [int(p.numel()) for p in positions]
        if flat.shape[0] != sum(counts):
            raise ValueError(f"{flat.shape[0]} visual features for {sum(counts)} image placeholders.")
        return tuple(f.contiguous() for f in torch.split(flat, counts, dim=0))

    def splice(
        self,
        input_ids: torch.Tensor,
        positions: Sequence[torch.Tensor],
        features: Sequence[torch.Tensor],
        keep: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """LM input embeddings with the kept visual tokens in place and the dropped ones removed.

        Args:
            input_ids: `[L]` prompt ids with every visual placeholder present.
            positions: Per image, the placeholder positions in `input_ids`.
            features: Per image, `[N_i, D]` features.
            keep: Per image, indices (into `features[i]`) of the tokens to keep, sorted.

        Returns:
            `[1, L - dropped, D]` embeddings: placeholders of dropped tokens are removed, so the LM
            input really gets shorter (positions are renumbered contiguously).

        """
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(input_ids.unsqueeze(0))[0]
            for pos, feats in zip(positions, features, strict=True):
                if pos.numel():
                    embeds[pos] = feats.to(embeds.dtype)
            mask = keep_mask(input_ids.shape[0], positions, keep).to(embeds.device)
            return embeds[mask].unsqueeze(0)


def get_adapter(model: Any, processor: Any) -> FamilyAdapter:
    """The adapter for `model`'s family.

    Raises:
        ValueError: No adapter is registered for the model type.

    """
    model_type = str(model.config.model_type)
    target = ADAPTERS.get(model_type)
    if target is None:
        raise ValueError(
            f"No joulecap adapter for model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}."
        )
    module_name, class_name = target.split(":")
    cls: type[FamilyAdapter] = getattr(importlib.import_module(module_name), class_name)
    return cls(model, processor)


def cache_kwarg(model: Any) -> str:
    """The name a model's forward takes its KV cache under: `cache`, or `past_key_values`.

    transformers renamed `past_key_values` to `cache` within 5.x (the old name warns, and goes in
    5.40); joulecap supports both ends of `transformers>=5,<6`, so it asks the signature once.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a forward's output, under its new name (`cache`) or its old one."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
