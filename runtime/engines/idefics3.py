"""Idefics3 / SmolVLM adapter.

The processor expands each image into `<fake_token_around_image>` `<global-img>` `<image>` x
`image_seq_len` `<fake_token_around_image>`, preceded, when image splitting is on, by one
`<row_r_col_c>` block of `<image>` tokens per tile. Every tile's tokens belong to the image whose
`<global-img>` block follows them, which is how placeholders are assigned to images here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from joulecap.runtime.engines.adapters import FamilyAdapter


class Idefics3Adapter(FamilyAdapter):
    """Idefics3ForConditionalGeneration (SmolVLM-256M/500M/2.2B) and SmolVLM."""

    family = "idefics3"
    extra_stop_tokens = ("<end_of_utterance>",)

    @property
    def reserved_strings(self) -> tuple[str, ...]:
        """Image placeholder, image boundary and global-image tags."""
        tags = ("<image>", "<fake_token_around_image>", "<global-img>")
        return tuple(dict.fromkeys((*super().reserved_strings, *tags)))

    def visual_positions(self, input_ids: Sequence[int], n_images: int) -> list[torch.Tensor]:
        """Assign `<image>` placeholders to images: tiles first, then the image's global block."""
        image_id = self.image_token_id
        global_id = self.tokenizer.convert_tokens_to_ids("<global-img>")
        per_image: list[list[int]] = [[]]
        in_global = False
        for pos, tok in enumerate(input_ids):
            if tok == image_id:
                per_image[-1].append(pos)
            elif tok == global_id:
                in_global = True
            elif in_global and per_image[-1]:
                # The global block of this image just ended: the next placeholders are the next image's.
                per_image.append([])
                in_global = False
        if not per_image[-1]:
            per_image.pop()
        if len(per_image) != n_images:
            raise ValueError(
                f"Found visual tokens for {len(per_image)} images in the prompt, expected {n_images}."
            )
        return [torch.tensor(p, dtype=torch.long) for p in per_image]

    def image_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """SigLIP tower, pixel shuffle and projector, exactly as the model's own forward runs them."""
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            return_dict=True,
        )
        return list(out.pooler_output)
