"""Gemma-3 adapter.

The processor expands each image into `<start_of_image>` + 256 x `<image_soft_token>` +
`<end_of_image>`: a fixed 256 soft tokens per image (SigLIP patches average-pooled to 16x16 and
projected). In the LM, the soft tokens of one image attend to each other bidirectionally: the model
builds that mask from `token_type_ids` (1 on image tokens), one bidirectional block per contiguous
run of image tokens. Pruning removes dropped tokens' placeholders, so the token types are taken
from the kept prompt: the kept tokens of an image are still one contiguous run, hence still one
bidirectional block, and a fully dropped image leaves no block. Decode steps add text tokens
only, which need no token types (the model's own `generate` passes none after the prefill).

Pan-and-scan (extra crops per image, off in the released processor config) is not supported:
an image would then own several blocks, and the prompt is refused as not splitting into images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from joulecap.runtime.engines.adapters import FamilyAdapter, LMInputs


class Gemma3Adapter(FamilyAdapter):
    """Gemma3ForConditionalGeneration (Gemma-3 4B/12B/27B with the SigLIP tower)."""

    family = "gemma3"
    extra_stop_tokens = ("<end_of_turn>",)

    @property
    def reserved_strings(self) -> tuple[str, ...]:
        """Image soft token and the image boundary tokens."""
        tags = (self.tokenizer.boi_token, self.tokenizer.eoi_token)
        return tuple(dict.fromkeys((*super().reserved_strings, *(str(t) for t in tags if t))))

    def visual_positions(self, input_ids: Sequence[int], n_images: int) -> list[torch.Tensor]:
        """Each contiguous run of soft tokens is one image (pan-and-scan off)."""
        image_id = self.image_token_id
        runs: list[list[int]] = []
        previous = False
        for pos, tok in enumerate(input_ids):
            is_image = tok == image_id
            if is_image:
                if not previous:
                    runs.append([])
                runs[-1].append(pos)
            previous = is_image
        if len(runs) != n_images:
            raise ValueError(
                f"Found {len(runs)} blocks of image tokens in the prompt for {n_images} images "
                "(Gemma-3's pan-and-scan crops are not supported: turn do_pan_and_scan off)."
            )
        return [torch.tensor(r, dtype=torch.long) for r in runs]

    def image_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """SigLIP tower, 4x4 average pooling and projection, as the model's own forward runs them."""
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype), return_dict=True
        )
        return list(out.pooler_output)

    def lm_inputs(
        self,
        input_ids: torch.Tensor,
        kept: torch.Tensor,
        image_inputs: Mapping[str, Any],
        extras: Any,
    ) -> LMInputs:
        """`token_type_ids` of the kept prompt: 1 on the kept image tokens, 0 elsewhere."""
        kept_ids = input_ids[kept.to(input_ids.device)]
        token_types = (kept_ids == self.image_token_id).long().unsqueeze(0)
        return LMInputs(prefill={"token_type_ids": token_types})
