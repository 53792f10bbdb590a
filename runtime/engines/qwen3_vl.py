"""Qwen3-VL adapter: Qwen2-VL's M-RoPE handling plus deepstack visual features.

Qwen3-VL's vision tower also emits "deepstack" features from a few intermediate blocks, one row
per visual token; the LM adds them to the hidden states of its first layers at the visual
positions. A pruned prompt must add exactly the kept tokens' rows, in prompt order: they are
indexed with the same kept mask as the embeddings and positions. The model's top-level forward
only builds deepstack inputs from pixels (or placeholders it finds itself), so this adapter runs
the prefill through its language model and LM head with `visual_pos_masks` and
`deepstack_visual_embeds` given; decode steps (text only) use the model's own forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from joulecap.runtime.engines.adapters import EncodedImages, LMInputs, output_cache
from joulecap.runtime.engines.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3VLForConditionalGeneration (dense)."""

    family = "qwen3_vl"

    def encode(self, inputs: Mapping[str, Any], positions: Sequence[torch.Tensor]) -> EncodedImages:
        """Per-image features plus the deepstack features of every visual token (prompt order)."""
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
            )
            flat = torch.cat(list(out.pooler_output), dim=0)
            deepstack = tuple(torch.cat(list(layer), dim=0) for layer in out.deepstack_features)
        counts = [int(p.numel()) for p in positions]
        if flat.shape[0] != sum(counts) or any(d.shape[0] != flat.shape[0] for d in deepstack):
            raise ValueError(f"{flat.shape[0]} visual features for {sum(counts)} image placeholders.")
        features = tuple(f.contiguous() for f in torch.split(flat, counts, dim=0))
        return EncodedImages(features, extras=deepstack)

    def lm_inputs(
        self,
        input_ids: torch.Tensor,
        kept: torch.Tensor,
        image_inputs: Mapping[str, Any],
        extras: Any,
    ) -> LMInputs:
        """M-RoPE positions as Qwen2-VL, plus the kept visual tokens' deepstack rows at prefill."""
        base = super().lm_inputs(input_ids, kept, image_inputs, extras)
        if not extras:
            return base
        visual = input_ids == self.image_token_id
        # Deepstack rows follow the placeholders in prompt order; keep those whose token stays.
        kept_rows = kept[visual]
        prefill = {
            **base.prefill,
            "visual_pos_masks": visual[kept].unsqueeze(0),
            "deepstack_visual_embeds": [layer[kept_rows.to(layer.device)] for layer in extras],
        }
        return LMInputs(prefill=prefill, decode=base.decode)

    def forward(self, **kwargs: Any) -> Any:
        """The model's forward, or language model + LM head when deepstack inputs are given."""
        visual_pos_masks = kwargs.pop("visual_pos_masks", None)
        deepstack = kwargs.pop("deepstack_visual_embeds", None)
        if deepstack is None:
            return self.model(**kwargs)
        logits_to_keep = int(kwargs.pop("logits_to_keep", 0))
        out = self.model.model.language_model(
            **kwargs, visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.model.lm_head(hidden), cache=output_cache(out))
