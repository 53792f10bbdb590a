"""Training-only dense supervision of the visual tokens (the head is discarded after training).

Question answering alone teaches the vision tower slowly: a batch of 16 images carries 64 answers, and
shape recognition got little signal (without this loss, shape-dependent questions stayed at 46-58%).
The generator knows which object covers every pixel, so each visual token gets its own targets: the
shape and colour of the object covering most of its patch (or background), whether the patch holds
that object's centre (so instances can be counted), and where that centre lies (so positions can be
compared). A linear head reads them from the projected tokens the LM sees; its loss is added to the
answer loss. Nothing of it ships: the saved model is the plain LLaVA.

The centre target was never learned from CLIP's default position embeddings (its MSE stayed at the
0.2 of a constant guess for an hour); from `model.sincos_positions` it falls to 0.01 within 250
steps (`aux_xy_mse` in the training log).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.tinyvqa.generate import COLORS, IMAGE_SIZE, SHAPES, Obj, object_map

_COLORS = tuple(COLORS)
# Head outputs: shape classes (background first), colour classes, centre logit, centre (x, y).
N_OUT = (len(SHAPES) + 1) + (len(_COLORS) + 1) + 1 + 2
MIN_COVER = 0.15  # share of a patch an object must cover for the patch to be labelled with it


def patch_targets(objects: tuple[Obj, ...], patch: int) -> dict[str, torch.Tensor]:
    """Per-patch targets in raster order (the vision tower's token order).

    Returns:
        `shape` and `color` class ids (0: background), `centre` (1.0 where the patch holds an
        object's centre) and `xy` (that object's centre in [-1, 1], zeros on background patches).

    """
    grid = IMAGE_SIZE // patch
    m = object_map(objects)[: grid * patch, : grid * patch]
    blocks = m.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    shape = np.zeros(grid * grid, dtype=np.int64)
    color = np.zeros(grid * grid, dtype=np.int64)
    centre = np.zeros(grid * grid, dtype=np.float32)
    xy = np.zeros((grid * grid, 2), dtype=np.float32)
    if objects:
        cover = np.stack([(blocks == i + 1).sum(1) for i in range(len(objects))], 1)
        best, share = cover.argmax(1), cover.max(1) / (patch * patch)
        for p in np.flatnonzero(share >= MIN_COVER):
            o = objects[int(best[p])]
            shape[p] = SHAPES.index(o.shape) + 1
            color[p] = _COLORS.index(o.color) + 1
            xy[p] = (2 * o.x / IMAGE_SIZE - 1, 2 * o.y / IMAGE_SIZE - 1)
        for o in objects:
            row, col = min(grid - 1, int(o.y) // patch), min(grid - 1, int(o.x) // patch)
            centre[row * grid + col] = 1.0
    return {
        "shape": torch.from_numpy(shape),
        "color": torch.from_numpy(color),
        "centre": torch.from_numpy(centre),
        "xy": torch.from_numpy(xy),
    }


def make_head(text_hidden: int) -> torch.nn.Linear:
    """The linear probe on the projected visual tokens."""
    return torch.nn.Linear(text_hidden, N_OUT)


def aux_loss(
    head: torch.nn.Module, feats: torch.Tensor, objects: list[tuple[Obj, ...]], patch: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The dense loss over a batch of projected visual tokens, and shape accuracy on object patches."""
    t = [patch_targets(o, patch) for o in objects]
    tgt: dict[str, Any] = {k: torch.stack([d[k] for d in t]).flatten(0, 1) for k in t[0]}
    out = head(feats).flatten(0, 1)
    ns, nc = len(SHAPES) + 1, len(_COLORS) + 1
    shape_logits, color_logits = out[:, :ns], out[:, ns : ns + nc]
    centre_logit, xy = out[:, ns + nc], out[:, ns + nc + 1 :]
    on = tgt["shape"] > 0
    loss = (
        F.cross_entropy(shape_logits, tgt["shape"])
        + F.cross_entropy(color_logits, tgt["color"])
        + F.binary_cross_entropy_with_logits(centre_logit, tgt["centre"], pos_weight=torch.tensor(10.0))
        + (F.mse_loss(xy[on], tgt["xy"][on]) if bool(on.any()) else out.sum() * 0.0)
    )
    with torch.no_grad():
        hits = shape_logits[on].argmax(1) == tgt["shape"][on]
        acc = float(hits.float().mean()) if bool(on.any()) else 0.0
        xy_mse = float(F.mse_loss(xy[on], tgt["xy"][on])) if bool(on.any()) else 0.0
    return loss, {"aux_shape_acc": acc, "aux_xy_mse": xy_mse}
