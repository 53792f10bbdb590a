"""Qwen2-VL and Qwen2.5-VL adapter: visual tokens with multimodal rotary positions (M-RoPE).

The processor writes each image as `<|vision_start|>` + `<|image_pad|>` x (t * h * w / merge^2) +
`<|vision_end|>`, so every image is one contiguous run of placeholders, in prompt order. The LM
rotates each token by a 3-D position (time, height, width): text tokens advance all three
together; an image's tokens take their row and column in the merged patch grid, offset by the
text before them; text after an image resumes at the largest position so far + 1.

Pruning keeps that geometry. The whole prompt's positions come from the model's own
`get_rope_index` on the unpruned prompt; the kept tokens keep their columns (gathered, never a
recomputed grid), and decoding continues from `rope_deltas` = largest kept position + 1 - kept
length, which is how the model itself continues after a prompt. Positions are always passed
explicitly: given embeddings alone the model falls back to 1-D positions (or to `rope_deltas`
left over from an earlier `generate` call on the same model) without a word.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from joulecap.runtime.engines.adapters import FamilyAdapter, LMInputs

_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration."""

    family = "qwen2_vl"
    extra_stop_tokens = ("<|im_end|>", "<|endoftext|>")

    @property
    def reserved_strings(self) -> tuple[str, ...]:
        """Image/video placeholders and vision delimiters."""
        return tuple(dict.fromkeys((*super().reserved_strings, *_VISION_TOKENS)))

    def visual_positions(self, input_ids: Sequence[int], n_images: int) -> list[torch.Tensor]:
        """One contiguous run of `<|image_pad|>` per image, in prompt order."""
        image_id = self.image_token_id
        runs: list[list[int]] = []
        previous = -2
        for pos, tok in enumerate(input_ids):
            if tok != image_id:
                continue
            if pos != previous + 1:
                runs.append([])
            runs[-1].append(pos)
            previous = pos
        if len(runs) != n_images:
            raise ValueError(
                f"Found visual tokens for {len(runs)} images in the prompt, expected {n_images}."
            )
        return [torch.tensor(r, dtype=torch.long) for r in runs]

    def image_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Vision transformer and patch merger, as the model's own forward runs them."""
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=True
        )
        return list(out.pooler_output)

    def rope_positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """`[3, L]` M-RoPE positions of the whole (unpruned) prompt, by the model's `get_rope_index`.

        The token types are derived from the ids (image placeholder -> 1), so a prompt
        re-tokenised after `prepare` (a brevity hint in front) gets its own.
        """
        if image_grid_thw is None:  # text only: every axis is the 1-D position
            return torch.arange(input_ids.shape[0], device=input_ids.device).expand(3, -1)
        token_types = (input_ids == self.image_token_id).to(torch.int)
        positions, _ = self.model.model.get_rope_index(
            input_ids.unsqueeze(0),
            mm_token_type_ids=token_types.unsqueeze(0),
            image_grid_thw=image_grid_thw,
        )
        return positions[:, 0]

    def lm_inputs(
        self,
        input_ids: torch.Tensor,
        kept: torch.Tensor,
        image_inputs: Mapping[str, Any],
        extras: Any,
    ) -> LMInputs:
        """Kept tokens' M-RoPE positions at prefill; `past + rope_deltas` on every axis after."""
        positions = self.rope_positions(input_ids, image_inputs.get("image_grid_thw"))
        kept_positions = positions[:, kept.to(positions.device)]
        rope_delta = int(kept_positions.max()) + 1 - int(kept_positions.shape[1])
        device = input_ids.device

        def decode(past_length: int) -> dict[str, Any]:
            step = torch.full((3, 1, 1), past_length + rope_delta, dtype=torch.long, device=device)
            return {"position_ids": step}

        return LMInputs(prefill={"position_ids": kept_positions.unsqueeze(1)}, decode=decode)
