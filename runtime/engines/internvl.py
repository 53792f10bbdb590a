"""InternVL3 adapter (transformers' native `internvl` port, e.g. `OpenGVLab/InternVL3-1B-hf`).

The processor cuts each image into dynamic tiles (1-12 crops by aspect ratio, plus a thumbnail
when there are several) and expands the image's `<IMG_CONTEXT>` into `<img>` + tiles x 256 x
`<IMG_CONTEXT>` + `</img>`: every tile's tokens sit between their image's `<img>` and `</img>`,
which is how placeholders are assigned to images here. The LM (Qwen2/Qwen2.5) uses 1-D positions,
so a pruned prompt is simply shorter and positions are renumbered contiguously, as for LLaVA;
no extra LM inputs are needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from joulecap.runtime.engines.adapters import FamilyAdapter


class InternVLAdapter(FamilyAdapter):
    """InternVLForConditionalGeneration (InternVL3 1B-78B, InternViT tower + MLP projector)."""

    family = "internvl"
    extra_stop_tokens = ("<|im_end|>",)

    @property
    def reserved_strings(self) -> tuple[str, ...]:
        """The context token, the image boundary tokens and the video placeholder."""
        tok = self.tokenizer
        tags = (tok.start_image_token, tok.end_image_token, getattr(tok, "video_token", None))
        return tuple(dict.fromkeys((*super().reserved_strings, *(str(t) for t in tags if t))))

    def visual_positions(self, input_ids: Sequence[int], n_images: int) -> list[torch.Tensor]:
        """One image per `<img>` ... `</img>` span: all its tiles' context tokens, in order."""
        image_id = self.image_token_id
        start_id = int(self.tokenizer.start_image_token_id)
        end_id = int(self.tokenizer.end_image_token_id)
        per_image: list[list[int]] = []
        inside = False
        for pos, tok in enumerate(input_ids):
            if tok == start_id:
                if inside:
                    raise ValueError("An image span opens inside another one.")
                per_image.append([])
                inside = True
            elif tok == end_id:
                inside = False
            elif tok == image_id:
                if not inside:
                    raise ValueError("An image context token stands outside any <img> span.")
                per_image[-1].append(pos)
        if len(per_image) != n_images:
            raise ValueError(f"Found {len(per_image)} image spans in the prompt, expected {n_images}.")
        return [torch.tensor(p, dtype=torch.long) for p in per_image]

    def image_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """InternViT, pixel shuffle and projector over every tile, as the model's forward runs them."""
        config = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
        # [tiles, tokens per tile, D] in prompt order: tiles of image 1, then image 2, ...
        return [out.pooler_output.reshape(-1, out.pooler_output.shape[-1])]
