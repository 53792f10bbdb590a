"""LLaVA adapter: each image is one contiguous run of `<image>` placeholders of equal length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from joulecap.runtime.engines.adapters import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    """LlavaForConditionalGeneration (CLIP tower + MLP projector + a decoder LM)."""

    family = "llava"

    def visual_positions(self, input_ids: Sequence[int], n_images: int) -> list[torch.Tensor]:
        """Split the `<image>` placeholders evenly: LLaVA gives every image the same token count."""
        positions = [pos for pos, tok in enumerate(input_ids) if tok == self.image_token_id]
        if n_images == 0:
            if positions:
                raise ValueError("The prompt has image placeholders but no images.")
            return []
        if len(positions) % n_images:
            raise ValueError(f"{len(positions)} image placeholders do not split into {n_images} images.")
        n = len(positions) // n_images
        return [torch.tensor(positions[i * n : (i + 1) * n], dtype=torch.long) for i in range(n_images)]

    def image_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """CLIP tower at the configured feature layer, then the multimodal projector."""
        kwargs = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype), return_dict=True, **kwargs
        )
        return list(out.pooler_output)
