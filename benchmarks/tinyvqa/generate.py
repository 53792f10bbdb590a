"""Deterministic TinyVQA data: coloured shapes on plain or textured backgrounds, with questions.

Every example is a pure function of `(split, index)`: the same pair always gives the same image,
question and answer, so the splits need not be stored (the test split can be regenerated anywhere).

Question types (`qtype`): `color` (colour of a uniquely named shape), `count` (of a shape or of a
colour), `position` (left of / right of / above / below, yes/no), `presence` (yes/no) and
`describe` (every object, left to right: a long answer, so truncation costs quality).

Run `python -m benchmarks.tinyvqa.generate --split test --n 50 --out DIR` to write PNGs and a JSONL.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 120
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 45, 175),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
NUMBERS = ("0", "1", "2", "3", "4", "5")
MAX_OBJECTS = 5
SHORT_QTYPES = ("color", "count", "position", "presence")
QTYPES = (*SHORT_QTYPES, "describe")
# Sampling weights of the question types; colour (shape-colour binding) is the hardest, so it gets most.
QTYPE_WEIGHTS = (0.3, 0.2, 0.2, 0.15, 0.15)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_BACKGROUNDS = ((238, 238, 238), (250, 250, 250), (236, 226, 206), (214, 222, 230), (226, 232, 214))
_TEXTURES = ("plain", "stripes", "checker", "noise")

# Every word the questions, answers and chat template use: the tokenizer's vocabulary.
VOCAB_WORDS = sorted(
    {
        *COLORS,
        *SHAPES,
        *PLURAL.values(),
        *NUMBERS,
        *["what", "color", "is", "the", "how", "many", "are", "there", "objects", "shapes"],
        *["left", "of", "right", "above", "below", "to", "a", "an"],
        *["yes", "no", "describe", "image", "and", "in", "this", "user", "assistant", "object"],
        *["?", ".", ",", ":"],
    }
)


@dataclass(frozen=True)
class Obj:
    """One shape in a scene: centre (x, y) and radius in pixels."""

    shape: str
    color: str
    x: float
    y: float
    r: float

    @property
    def name(self) -> str:
        """`red circle`."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Example:
    """One question about one generated image."""

    split: str
    index: int
    question: str
    answer: str
    qtype: str
    objects: tuple[Obj, ...]
    background: str

    def to_json(self) -> dict[str, object]:
        """JSON-serialisable form (the image is stored separately as a PNG)."""
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_IDS[split], seed, index])


def _scene(rng: np.random.Generator) -> tuple[tuple[Obj, ...], str]:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    objs: list[Obj] = []
    tries = 0
    while len(objs) < n and tries < 200:
        tries += 1
        r = float(rng.uniform(7.0, 15.0))
        x = float(rng.uniform(r + 2, IMAGE_SIZE - r - 2))
        y = float(rng.uniform(r + 2, IMAGE_SIZE - r - 2))
        if any((x - o.x) ** 2 + (y - o.y) ** 2 < (r + o.r + 3) ** 2 for o in objs):
            continue
        objs.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), x, y, r))
    return tuple(objs), str(rng.choice(_TEXTURES))


def render(objects: tuple[Obj, ...], background: str, rng: np.random.Generator) -> Image.Image:
    """Draw the scene: background texture, then each shape with a slightly jittered colour."""
    base = np.array(_BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))], dtype=np.float32)
    canvas = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if background == "stripes":
        period = int(rng.integers(6, 14))
        canvas[((xx + yy) // (period // 2)) % 2 == 0] -= 18
    elif background == "checker":
        cell = int(rng.integers(6, 16))
        canvas[((xx // cell) + (yy // cell)) % 2 == 0] -= 16
    elif background == "noise":
        canvas += rng.normal(0.0, 8.0, size=canvas.shape).astype(np.float32)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in objects:
        fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[o.color])
        _draw_shape(draw, o, fill)
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill: tuple[int, ...] | int) -> None:
    x, y, r = o.x, o.y, o.r
    if o.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif o.shape == "square":
        s = r * 0.85
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)], fill=fill)


def object_map(objects: tuple[Obj, ...]) -> np.ndarray:
    """Which object covers each pixel: 0 for background, `i + 1` for `objects[i]`.

    Drawn with `render`'s geometry, so the labels are exactly the painted pixels.
    """
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(objects):
        _draw_shape(draw, o, i + 1)
    return np.asarray(img)


def _unique_refs(objs: tuple[Obj, ...]) -> list[tuple[str, Obj]]:
    """Objects with an unambiguous short reference: the shape alone when unique, else colour + shape."""
    refs = []
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            refs.append((o.shape, o))
        elif sum(p.name == o.name for p in objs) == 1:
            refs.append((o.name, o))
    return refs


def describe(objs: tuple[Obj, ...]) -> str:
    """`a red circle, a blue square and a green triangle.` (left to right)."""
    names = [f"a {o.name}" for o in sorted(objs, key=lambda o: o.x)]
    if len(names) == 1:
        return names[0] + "."
    return ", ".join(names[:-1]) + " and " + names[-1] + "."


def _question(qtype: str, objs: tuple[Obj, ...], rng: np.random.Generator) -> tuple[str, str] | None:
    """A (question, answer) of the given type, or None when the scene cannot support it."""
    if qtype == "color":
        single = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not single:
            return None
        o = single[int(rng.integers(len(single)))]
        return f"what color is the {o.shape}?", o.color
    if qtype == "count":
        if rng.random() < 0.5:
            shape = str(rng.choice(SHAPES))
            return f"how many {PLURAL[shape]} are there?", str(sum(o.shape == shape for o in objs))
        color = str(rng.choice(list(COLORS)))
        noun = "objects" if rng.random() < 0.5 else "shapes"
        return f"how many {color} {noun} are there?", str(sum(o.color == color for o in objs))
    if qtype == "position":
        refs = _unique_refs(objs)
        if len(refs) < 2:
            return None
        i, j = rng.choice(len(refs), size=2, replace=False)
        (na, a), (nb, b) = refs[int(i)], refs[int(j)]
        rel = str(rng.choice(["left of", "right of", "above", "below"]))
        d = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
        if abs(d) < 6:  # too close to call: do not ask
            return None
        return f"is the {na} {rel} the {nb}?", "yes" if d > 0 else "no"
    if qtype == "presence":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = sorted(present)[int(rng.integers(len(present)))]
        else:
            absent = sorted({(c, s) for c in COLORS for s in SHAPES} - present)
            c, s = absent[int(rng.integers(len(absent)))]
        return f"is there a {c} {s}?", "yes" if (c, s) in present else "no"
    phrasing = ("describe the image.", "what is in the image?")[int(rng.integers(2))]
    return phrasing, describe(objs)


def make_example(
    split: str, index: int, *, seed: int = 0, qtype: str | None = None
) -> tuple[Example, Image.Image]:
    """The example `index` of `split` (deterministic in `(split, index, seed, qtype)`).

    Args:
        split: `train`, `val` or `test`.
        index: Example number (any non-negative int).
        seed: Dataset seed.
        qtype: Force a question type; by default drawn with `QTYPE_WEIGHTS`.

    Returns:
        The example and its RGB image (IMAGE_SIZE x IMAGE_SIZE).

    """
    rng = _rng(split, index, seed)
    while True:
        objs, background = _scene(rng)
        kind = qtype or str(rng.choice(QTYPES, p=QTYPE_WEIGHTS))
        qa = _question(kind, objs, rng)
        if qa is not None:
            break
    img = render(objs, background, rng)
    return Example(split, index, qa[0], qa[1], kind, objs, background), img


MAX_DRAWS_PER_QUESTION = 50
"""`make_scene_examples` gives up on a scene after this many draws per question asked."""


class SceneError(ValueError):
    """A scene cannot be asked any question of the requested types."""


def make_scene_examples(
    split: str, index: int, k: int, *, seed: int = 0, weights: tuple[float, ...] = QTYPE_WEIGHTS
) -> tuple[list[Example], Image.Image]:
    """`k` questions about one scene (for training with a shared image prefix); deterministic.

    Uses a separate stream of seeds from `make_example` (the index is offset by 2**40), so its scenes
    never coincide with the single-question examples. `weights` are the question types' sampling
    weights (in `QTYPES` order; training may ask some types more often than the test splits do).

    Raises:
        SceneError: Only types this scene cannot be asked about have weight (e.g. position alone
            about a scene with fewer than two nameable objects); callers skip the scene.

    """
    rng = _rng(split, index + 2**40, seed)
    objs, background = _scene(rng)
    examples: list[Example] = []
    draws = 0
    while len(examples) < k:
        if draws >= MAX_DRAWS_PER_QUESTION * k:
            raise SceneError(f"{split} scene {index}: no question of the weighted types fits it")
        draws += 1
        kind = str(rng.choice(QTYPES, p=np.asarray(weights) / sum(weights)))
        qa = _question(kind, objs, rng)
        if qa is not None:
            examples.append(Example(split, index, qa[0], qa[1], kind, objs, background))
    return examples, render(objs, background, rng)


def parse_objects(text: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs named in a describe answer, for recall/precision."""
    pattern = rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b"
    return [(m.group(1), m.group(2)) for m in re.finditer(pattern, text.lower())]


def write_split(split: str, n: int, out: Path, *, seed: int = 0, start: int = 0) -> Path:
    """Write `n` examples of `split` as PNGs plus `examples.jsonl` into `out`; returns the JSONL path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        ex, img = make_example(split, i, seed=seed)
        name = f"{split}_{i:05d}.png"
        img.save(out / name, optimize=True)
        lines.append(json.dumps({**ex.to_json(), "image": name}))
    path = out / "examples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    """CLI: write a split to disk."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=sorted(SPLIT_IDS))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(write_split(args.split, args.n, args.out, seed=args.seed, start=args.start))


if __name__ == "__main__":
    main()
