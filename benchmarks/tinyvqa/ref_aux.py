"""Training-only grounding of the question's objects and of their offset (the heads are discarded).

Trained on answers alone, the model answered position questions ("is the circle left of the red
square?") at 51%, a constant "no". The LM has to carry each named object's coordinates from its
visual tokens to the question, then compare two of them. Two losses ask for the two halves directly:

* `--ref-weight` (`referents`): at every shape word of a colour or position question ("circle" in
  "the red circle"), a linear head reads the LM's hidden state after layer `--ref-layer` and must
  predict the named object's centre (x, y in [-1, 1]). Presence and count questions name no single
  object and get no target. It cannot work unless the visual tokens say where they are: with
  CLIP's default position embeddings they did not (see `model.sincos_positions`), and this loss
  alone moved from 0.21 to 0.13 in 30 minutes while position answers stayed at chance.
* `--rel-weight` (`relation_target`): with the first loss alone, the shape words held
  their object's centre (probe R^2 0.88 / 0.78) but the step that emits the answer held nothing of
  the two objects' offset (R^2 below 0 at every layer). So at that step of a position question a
  head on layer `--rel-layer` must predict the first named centre minus the second; the last layer
  then only has to read the sign the relation word picks. With it, position went from chance to
  98.6% (`python -m benchmarks.tinyvqa.probe` measures both R^2).

Nothing of it ships.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.tinyvqa.generate import COLORS, IMAGE_SIZE, SHAPES, Example

# The question types whose shape words each name exactly one object of the scene.
GROUNDED_QTYPES = ("color", "position")


def referents(example: Example) -> list[tuple[float, float]]:
    """Centres (x, y in [-1, 1]) of the objects the question names, in the order it names them.

    One entry per shape word of the question; empty for question types that name no single object.
    A shape word preceded by a colour word names the object of that colour and shape, else the
    scene's only object of that shape (the generator asks only about unambiguous references).

    Raises:
        ValueError: A name does not match exactly one object (the generator's contract broken).

    """
    if example.qtype not in GROUNDED_QTYPES:
        return []
    words = example.question.rstrip("?").split()
    out = []
    for i, w in enumerate(words):
        if w not in SHAPES:
            continue
        color = words[i - 1] if i > 0 and words[i - 1] in COLORS else None
        hits = [o for o in example.objects if o.shape == w and color in (None, o.color)]
        if len(hits) != 1:
            raise ValueError(f"{example.question!r}: {len(hits)} objects match {w!r}")
        out.append((2 * hits[0].x / IMAGE_SIZE - 1, 2 * hits[0].y / IMAGE_SIZE - 1))
    return out


def relation_target(example: Example) -> tuple[float, float] | None:
    """First minus second named centre of a position question (None for other question types)."""
    if example.qtype != "position":
        return None
    (xa, ya), (xb, yb) = referents(example)
    return (xa - xb, ya - yb)


def shape_token_ids(tokenizer: object) -> set[int]:
    """Token ids of the shape words (the tokenizer is word-level: one id per word)."""
    ids = {int(tokenizer.convert_tokens_to_ids(s)) for s in SHAPES}  # type: ignore[attr-defined]
    if len(ids) != len(SHAPES):
        raise ValueError("shape words do not map to distinct single tokens")
    return ids


@dataclass(frozen=True)
class Targets:
    """Training-only (x, y) targets at chosen cells of packed rows (see `batching.pack`)."""

    rows: list[int]
    cols: list[int]
    xy: torch.Tensor  # (n, 2)

    @classmethod
    def collect(cls, cells: list[tuple[int, int, tuple[float, float]]]) -> Targets:
        """From `(row, col, (x, y))` triples."""
        return cls(
            [r for r, _, _ in cells],
            [c for _, c, _ in cells],
            torch.tensor([xy for _, _, xy in cells], dtype=torch.float32).reshape(-1, 2),
        )


def make_head(text_hidden: int) -> torch.nn.Module:
    """The linear probe from an LM hidden state to an (x, y) pair (a centre, or an offset).

    Mid-stack hidden states are unnormalised (norms in the tens), so the probe normalises first, and
    starts at zero: its first gradients then do not swamp the answer loss under gradient clipping.
    """
    linear = torch.nn.Linear(text_hidden, 2)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    return torch.nn.Sequential(torch.nn.LayerNorm(text_hidden, elementwise_affine=False), linear)


def ref_loss(
    head: torch.nn.Module, hidden: torch.Tensor, targets: Targets, name: str = "ref"
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE between the head's reading of `hidden` at the targets' cells and their (x, y).

    Serves both losses: shape words with the named objects' centres, and answer steps with the
    named objects' offset.
    """
    if not targets.rows:
        return hidden.sum() * 0.0, {}
    pred = head(hidden[torch.tensor(targets.rows), torch.tensor(targets.cols)])
    loss = F.mse_loss(pred, targets.xy)
    return loss, {f"{name}_mae": float((pred - targets.xy).detach().abs().mean())}
