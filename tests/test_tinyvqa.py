"""TinyVQA: the generator is deterministic and the shipped trained model really answers questions.

The model tests load `joulecap/runtime/data/tinyvqa` offline through the ordinary `from_pretrained`
path and score a fixed set of held-out test questions (never seen in training); the threshold sits a
little under the accuracy measured by `benchmarks/tinyvqa/eval.py` so that a broken model, processor,
tokenizer or chat template fails the test, while CPU-dependent rounding cannot.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from _factories import REPO, make_config

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of scripts, not an installed package

from benchmarks.tinyvqa.generate import (
    COLORS,
    IMAGE_SIZE,
    QTYPES,
    SHORT_QTYPES,
    VOCAB_WORDS,
    describe,
    make_example,
    parse_objects,
    write_split,
)
from joulecap.runtime.tiny_models import PACKAGED_DEMO, demo_model_path

N_SHORT = 40
TARGET = 0.90
"""The issue's goal: exact match on held-out short questions with every visual token kept."""
MARGIN = 0.15
"""The fixed 40-question sample may score this much under the accuracy that eval.py measured on 240
held-out questions and recorded in the model's joulecap.json (about 2 standard errors at 40)."""


def _recorded() -> dict[str, Any]:
    import json

    return json.loads((PACKAGED_DEMO / "joulecap.json").read_text())


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_generator_is_deterministic_and_varied() -> None:
    a, img_a = make_example("test", 3)
    b, img_b = make_example("test", 3)
    assert a == b and _png(img_a) == _png(img_b)
    assert img_a.size == (IMAGE_SIZE, IMAGE_SIZE) and IMAGE_SIZE >= 112
    other = [make_example("train", 3)[0], make_example("test", 4)[0], make_example("test", 3, seed=1)[0]]
    assert all(o.objects != a.objects for o in other)
    kinds = {make_example("val", i)[0].qtype for i in range(200)}
    assert kinds == set(QTYPES)


def test_answers_are_consistent_with_the_scene() -> None:
    for i in range(300):
        ex, _ = make_example("train", i)
        objs = ex.objects
        if ex.qtype == "color":
            shape = ex.question.removeprefix("what color is the ").removesuffix("?")
            assert [o.color for o in objs if o.shape == shape] == [ex.answer]
        elif ex.qtype == "describe":
            assert sorted(parse_objects(ex.answer)) == sorted((o.color, o.shape) for o in objs)
            assert ex.answer == describe(objs)
        elif ex.qtype == "count":
            assert 0 <= int(ex.answer) <= len(objs)
        else:
            assert ex.answer in ("yes", "no")


def test_subtypes_split_what_the_model_must_recognise() -> None:
    from benchmarks.tinyvqa.eval import score, subtype

    seen = set()
    for i in range(300):
        ex, _ = make_example("train", i)
        st = subtype(ex)
        seen.add(st)
        if st == "count_of_shape":
            assert not any(c in ex.question for c in COLORS)
        if st == "color_lone_object":
            assert len(ex.objects) == 1
        if ex.qtype in ("presence", "position"):
            assert st.endswith(ex.answer)
    assert {"count_of_colour", "count_of_shape", "color_among_several", "presence_yes", "position_no"} <= seen
    rows = [
        {"qtype": "presence", "subtype": "presence_yes", "answer": "yes", "pred": "yes"},
        {"qtype": "presence", "subtype": "presence_no", "answer": "no", "pred": "yes"},
    ]
    assert score(rows)["exact_by_subtype"] == {"presence_no": 0.0, "presence_yes": 1.0}


def test_tokenizer_covers_every_generated_text() -> None:
    from benchmarks.tinyvqa.model import UNK, build_tokenizer

    tok = build_tokenizer()
    unk = tok.convert_tokens_to_ids(UNK)
    for i in range(300):
        ex, _ = make_example("train", i)
        for text in (ex.question, ex.answer):
            ids = tok(text)["input_ids"]
            assert unk not in ids, text
            assert tok.decode(ids) == text
    assert len(VOCAB_WORDS) < 100


def test_write_split_round_trips(tmp_path: Path) -> None:
    import json

    path = write_split("test", 3, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question"] for r in rows] == [make_example("test", i)[0].question for i in range(3)]
    assert all((tmp_path / r["image"]).is_file() for r in rows)


def test_patch_targets_label_the_patches_each_object_covers() -> None:
    import numpy as np
    import torch

    from benchmarks.tinyvqa.generate import SHAPES, Obj, object_map, render
    from benchmarks.tinyvqa.patch_aux import aux_loss, make_head, patch_targets

    # A square of half-side 0.85 * 12 ~ 10 px centred at (35, 35): patches (row, col) 2..3 x 2..3 of 10 px.
    sq = Obj("square", "blue", 35.0, 35.0, 12.0)
    tri = Obj("triangle", "red", 95.0, 85.0, 10.0)
    t = patch_targets((sq, tri), patch=10)
    grid = IMAGE_SIZE // 10
    shape = t["shape"].view(grid, grid)
    assert set(shape[2:4, 2:4].flatten().tolist()) == {SHAPES.index("square") + 1}
    assert shape[0, 0] == 0 and shape[6, 6] == 0  # background
    assert int(shape[8, 9]) == SHAPES.index("triangle") + 1
    centre = t["centre"].view(grid, grid)
    assert centre.sum() == 2 and centre[3, 3] == 1 and centre[8, 9] == 1
    assert torch.allclose(t["xy"].view(grid, grid, 2)[3, 3], torch.tensor([2 * 35 / IMAGE_SIZE - 1] * 2))
    assert (t["xy"][t["shape"] == 0] == 0).all()
    # The map is the renderer's geometry: on a plain background, the labelled pixels are the drawn ones.
    img = np.asarray(render((sq, tri), "plain", np.random.default_rng(0))).astype(int)
    drawn = np.abs(img - img[0, 0]).sum(-1) > 60
    assert (drawn == (object_map((sq, tri)) > 0)).all()
    # The loss trains a head toward these targets and reports shape accuracy on object patches.
    head = make_head(8)
    feats = torch.randn(1, grid * grid, 8, requires_grad=True)
    loss, stats = aux_loss(head, feats, [(sq, tri)], patch=10)
    loss.backward()
    assert loss.item() > 0 and feats.grad is not None and 0.0 <= stats["aux_shape_acc"] <= 1.0


def test_sincos_positions_make_a_patch_position_linear_in_its_embedding() -> None:
    import torch

    from benchmarks.tinyvqa.model import ModelSize, build_model, sincos_positions

    model, _ = build_model(ModelSize(vision_layers=1, text_layers=1), seed=0)
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    cls_before = emb[0].detach().clone()
    sincos_positions(model, 8.0)
    table = emb[1:].detach()
    grid = int(table.shape[0] ** 0.5)
    assert torch.allclose(table.norm(dim=1), torch.full((grid * grid,), 8.0), atol=1e-4)
    assert torch.equal(emb[0].detach(), cls_before)
    # x and y of every patch (raster order) are a linear read-out of its row, nearly exactly,
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    xy = torch.stack([cols.flatten(), rows.flatten()], 1).float()
    design = torch.cat([table, torch.ones(len(table), 1)], 1)
    fit = torch.linalg.lstsq(design.double(), xy.double(), driver="gelsd").solution.float()
    assert (design @ fit - xy).abs().max() < 0.05
    # which they are not at CLIP's default init (144 random rows, 129 unknowns).
    default, _ = build_model(ModelSize(vision_layers=1, text_layers=1), seed=0)
    table0 = default.model.vision_tower.embeddings.position_embedding.weight[1:].detach()
    design0 = torch.cat([table0, torch.ones(len(table0), 1)], 1)
    fit0 = torch.linalg.lstsq(design0.double(), xy.double(), driver="gelsd").solution.float()
    assert (design0 @ fit0 - xy).abs().max() > 0.5


def test_grounding_targets_name_the_asked_objects_at_their_shape_words_and_answer_steps() -> None:
    import dataclasses

    import torch

    from benchmarks.tinyvqa import batching, ref_aux
    from benchmarks.tinyvqa.generate import Example, Obj, make_scene_examples
    from benchmarks.tinyvqa.model import ModelSize, build_model

    circles = (Obj("circle", "red", 20.0, 30.0, 8.0), Obj("circle", "blue", 80.0, 40.0, 8.0))
    objs = (*circles, Obj("square", "green", 60.0, 100.0, 9.0))
    ex = Example("val", 0, "is the red circle left of the square?", "yes", "position", objs, "plain")
    xy = [(2 * 20 / IMAGE_SIZE - 1, 2 * 30 / IMAGE_SIZE - 1), (0.0, 2 * 100 / IMAGE_SIZE - 1)]
    colour_q = dataclasses.replace(ex, question="what color is the square?", qtype="color")
    assert torch.allclose(torch.tensor(ref_aux.referents(ex)), torch.tensor(xy))
    assert torch.allclose(torch.tensor(ref_aux.referents(colour_q)), torch.tensor(xy[1:]))
    presence_q = dataclasses.replace(ex, question="is there a red circle?", qtype="presence")
    assert ref_aux.referents(presence_q) == []
    with pytest.raises(ValueError, match="2 objects match 'circle'"):
        ref_aux.referents(dataclasses.replace(ex, question="is the circle left of the square?"))
    # Packed rows carry one target per shape word of a grounded question, at that word's column:
    # the token there is the shape of the object whose centre is the target.
    model, processor = build_model(ModelSize(vision_layers=1, text_layers=1), seed=0)
    batcher = batching.Batcher(processor)
    exs, img = make_scene_examples("train", 0, 6, weights=(0.5, 0.0, 0.5, 0.0, 0.0))
    refs = [[ref_aux.referents(e) for e in exs]]
    feats = batching.image_features(model, batcher, [img])
    qas = [(e.question, e.answer) for e in exs]
    packed = batching.pack(model, batcher, [(img, qas)], [1.0], torch.Generator(), feats, refs)
    n_refs = sum(len(r) for r in refs[0])
    assert n_refs >= 6 and packed.ref.xy.shape == (n_refs, 2) and set(packed.ref.rows) == {0}
    embed = model.get_input_embeddings().weight
    centres = {(2 * o.x / IMAGE_SIZE - 1, 2 * o.y / IMAGE_SIZE - 1): o.shape for o in exs[0].objects}
    for col, target in zip(packed.ref.cols, packed.ref.xy.tolist(), strict=True):
        shape = next(s for c, s in centres.items() if torch.allclose(torch.tensor(c), torch.tensor(target)))
        assert torch.equal(packed.inputs[0, col], embed[batcher.tok.convert_tokens_to_ids(shape)])
    head = ref_aux.make_head(embed.shape[1])
    loss, stats = ref_aux.ref_loss(head, packed.inputs, packed.ref)
    assert loss.item() > 0 and stats["ref_mae"] > 0
    # Position questions also carry the offset of their two named objects, at the step whose
    # next-token prediction is the answer; other question types carry none.
    assert ref_aux.relation_target(ex) == pytest.approx((xy[0][0] - xy[1][0], xy[0][1] - xy[1][1]))
    assert ref_aux.relation_target(colour_q) is None
    rels = [[ref_aux.relation_target(e) for e in exs]]
    packed = batching.pack(model, batcher, [(img, qas)], [1.0], torch.Generator(), feats, refs, rels)
    asked = [(e, r) for e, r in zip(exs, rels[0], strict=True) if r is not None]
    assert asked and len(packed.rel.cols) == len(asked) and set(packed.rel.rows) == {0}
    assert torch.allclose(packed.rel.xy, torch.tensor([r for _, r in asked]))
    for col, (e, _) in zip(packed.rel.cols, asked, strict=True):
        assert packed.labels[0, col] == -100
        assert packed.labels[0, col + 1] == batcher.tok(e.answer)["input_ids"][0]


def test_a_scene_that_cannot_be_asked_the_weighted_types_is_refused_not_looped() -> None:
    from benchmarks.tinyvqa.generate import SceneError, make_scene_examples

    # Training scene 1 has fewer than two nameable objects: no position question fits it.
    with pytest.raises(SceneError, match="train scene 1"):
        make_scene_examples("train", 1, 3, weights=(0.0, 0.0, 1.0, 0.0, 0.0))
    exs, _ = make_scene_examples("train", 0, 3, weights=(0.0, 0.0, 1.0, 0.0, 0.0))
    assert [e.qtype for e in exs] == ["position"] * 3


def test_training_runs_every_loss_on_a_tiny_model(tmp_path: Path) -> None:
    # Two steps of the real training script with every training-only loss on and a question mix
    # that skips unaskable scenes; its start-up checks assert that the batches reproduce the
    # processor's inputs and the packed loss the per-question one.
    import subprocess

    cmd = [sys.executable, "-m", "benchmarks.tinyvqa.train", "--bench", "2", "--batch", "3"]
    cmd += ["--questions", "2", "--vision-layers", "1", "--aux-weight", "1", "--ref-weight", "1"]
    cmd += ["--rel-weight", "1", "--qtype-weights", "0.5", "0", "0.5", "0", "0", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    first = next(line for line in out.stdout.splitlines() if line.startswith('{"step": 0'))
    assert all(f'"{k}"' in first for k in ("aux_loss", "ref_loss", "rel_loss", "rel_mae")), first
    assert "s/step" in out.stdout


def test_packaging_records_every_training_stage(tmp_path: Path) -> None:
    import json

    from benchmarks.tinyvqa.package import train_stages

    one, two, three = (tmp_path / n for n in ("one", "two", "three"))
    for d, init in ((one, None), (two, one), (three, two)):
        d.mkdir()
        (d / "train_meta.json").write_text(json.dumps({"init_from": init and str(init), "name": d.name}))
    assert [m["name"] for m in train_stages(three)] == ["one", "two", "three"]
    # A start whose record is gone ends the chain there.
    (one / "train_meta.json").unlink()
    assert [m["name"] for m in train_stages(three)] == ["two", "three"]
    assert train_stages(tmp_path) == []


# ------------------------------------------------------------------------------- the shipped model
# The packaged model meets the 90% target (97.8% on 500 held-out questions; README and
# tinyvqa_accuracy.json); these tests hold it to the target and to the accuracy it was measured at,
# so a broken model, processor, tokenizer or chat template fails them. Without a packaged model
# they are skipped, visibly, with the reason.
pytestmark_model = pytest.mark.skipif(
    not (PACKAGED_DEMO / "config.json").is_file(), reason="trained TinyVQA model not packaged yet"
)


@pytest.fixture(scope="module")
def shipped(monkeypatch_module: Any) -> tuple[Any, Any]:
    """The packaged model and processor, loaded with the hub switched off."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert (PACKAGED_DEMO / "config.json").is_file(), "the trained TinyVQA model is not packaged"
    processor = AutoProcessor.from_pretrained(PACKAGED_DEMO)
    model = AutoModelForImageTextToText.from_pretrained(PACKAGED_DEMO).eval()
    return model, processor


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield mp
    mp.undo()


def _short_examples(n: int) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    i = 0
    while len(out) < n:
        ex, img = make_example("test", i)
        if ex.qtype in SHORT_QTYPES:
            out.append((ex, img))
        i += 1
    return out


@pytestmark_model
def test_shipped_model_is_marked_trained_and_small() -> None:
    import json

    marker = json.loads((PACKAGED_DEMO / "joulecap.json").read_text())
    assert marker["random_weights"] is False and marker["arch"] == "llava" and marker["task"] == "tinyvqa"
    # The recorded figure is the one eval.py wrote into the results file for the same weights.
    results = json.loads((REPO / "benchmarks/results/tinyvqa_accuracy.json").read_text())
    full = next(r for r in results["results"] if r["condition"] == "full")
    assert marker["accuracy"] == pytest.approx(full["exact_short"], abs=1e-4)
    # Both training stages are recorded, the last one as `train`, with the whole training time.
    assert len(marker["stages"]) == 2 and marker["stages"][-1] == marker["train"]
    assert marker["total_train_s"] == pytest.approx(sum(m["train_s"] for m in marker["stages"]))
    weights = sum(p.stat().st_size for p in PACKAGED_DEMO.glob("*.safetensors"))
    assert 0 < weights <= 20 * 1024 * 1024
    assert demo_model_path(Path(os.devnull).parent / "unused-cache") == PACKAGED_DEMO


@pytestmark_model
def test_shipped_model_answers_held_out_questions(shipped: tuple[Any, Any]) -> None:
    import torch

    from benchmarks.tinyvqa.model import messages

    model, processor = shipped
    hits = 0
    for ex, img in _short_examples(N_SHORT):
        text = processor.apply_chat_template(
            messages(ex.question), add_generation_prompt=True, tokenize=False
        )
        inputs = processor(text=text, images=img, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        pred = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += pred.strip() == ex.answer
    assert _recorded()["accuracy"] >= TARGET
    floor = max(TARGET, _recorded()["accuracy"] - MARGIN)
    assert hits / N_SHORT >= floor, f"{hits}/{N_SHORT} < {floor:.2f}"


@pytestmark_model
def test_shipped_model_describes_images(shipped: tuple[Any, Any]) -> None:
    import torch

    from benchmarks.tinyvqa.eval import describe_counts
    from benchmarks.tinyvqa.model import messages

    model, processor = shipped
    matched = predicted = true = 0
    for i in range(6):
        ex, img = make_example("test", i, qtype="describe")
        text = processor.apply_chat_template(
            messages(ex.question), add_generation_prompt=True, tokenize=False
        )
        inputs = processor(text=text, images=img, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        pred = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        m, p, t = describe_counts(pred, ex.answer)
        matched, predicted, true = matched + m, predicted + p, true + t
    rec = _recorded()
    recall_floor = rec["describe_recall"] - MARGIN
    precision_floor = rec["describe_precision"] - MARGIN
    assert matched / true >= recall_floor, (matched, predicted, true)
    assert matched / max(1, predicted) >= precision_floor, (matched, predicted, true)
    assert matched > 0  # a random-weight or broken model names no object right


@pytestmark_model
def test_runtime_serves_the_trained_model(tmp_path: Path, monkeypatch_module: Any) -> None:
    """The whole runtime (engine, scheduler, the default policy) answers with the demo model."""
    from joulecap.runtime.runtime import Runtime

    rt = Runtime(make_config(None, tmp_path))
    try:
        assert rt.engine.info.random_weights is False
        hits = 0
        examples = _short_examples(12)
        kept = set()
        for ex, img in examples:
            res = rt.chat(ex.question, images=[img], max_tokens=8)
            hits += res.text.strip() == ex.answer
            kept.add(res.plan.visual_keep)
        # Without a budget the default `answers_first` keeps all 144 visual tokens (97.8% over 500
        # test questions; `joint`'s 16 tokens: 89.8%); the floor leaves room for one miss.
        assert kept == {(144,)}
        assert hits / len(examples) >= 0.9, f"{hits}/{len(examples)}"
    finally:
        rt.close()


@pytestmark_model
def test_shipped_model_carries_the_named_objects_offset_to_the_answer_step(monkeypatch_module: Any) -> None:
    # What made position answerable: the step that emits a position answer holds the
    # offset between the two named objects, which a linear probe reads back; with the offset loss
    # left out of training it held nothing (R^2 below 0 at every layer, the earlier model).
    from benchmarks.tinyvqa.probe import probe

    layers = probe(PACKAGED_DEMO, 90)["layers"]
    assert max(layers[0]["answer_step_offset_r2"]) < 0.2  # the input embedding cannot know it
    assert min(layers[3]["answer_step_offset_r2"]) > 0.6, layers[3]
    assert min(layers[3]["shape_word_centre_r2"]) > 0.6, layers[3]
