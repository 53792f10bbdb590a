"""Training batches for TinyVQA: the processor's inputs rebuilt as tensors, and packed rows.

`Batcher` turns generated examples into what inference sees (chat template, CLIP pixels, image
features spliced at the `<image>` placeholders); `pack` puts several questions about one image in
one row behind a shared prefix, with the training-only targets of `ref_aux.py` at their columns.
`check_splice` and `check_packed` assert, at the start of every training run, that both compute
exactly the loss of the model's own forward on processor outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.tinyvqa import ref_aux
from benchmarks.tinyvqa.generate import make_example, make_scene_examples
from benchmarks.tinyvqa.model import messages


class Batcher:
    """Turns generated examples into training tensors, caching the tokenised prompts."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(3, 1, 1)
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self._prompts: dict[str, tuple[list[int], list[int]]] = {}

    def prompt(self, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image placeholders."""
        if question not in self._prompts:
            text = self.processor.apply_chat_template(
                messages(question), add_generation_prompt=True, tokenize=False
            )
            before, after = text.split("<image>")
            self._prompts[question] = (self.tok(before)["input_ids"], self.tok(after)["input_ids"])
        return self._prompts[question]

    def pixels(self, img: Any) -> torch.Tensor:
        """CLIP preprocessing of a 112x112 image (resize/crop are identities at this size)."""
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (arr - self.mean) / self.std

    def check(self, img: Any, question: str) -> None:
        """Assert that this batcher reproduces the processor's own outputs."""
        text = self.processor.apply_chat_template(
            messages(question), add_generation_prompt=True, tokenize=False
        )
        ref = self.processor(text=text, images=img, return_tensors="pt")
        before, after = self.prompt(question)
        n_img = int((ref["input_ids"][0] == self.image_id).sum())
        assert ref["input_ids"][0].tolist() == before + [self.image_id] * n_img + after
        assert torch.allclose(ref["pixel_values"][0], self.pixels(img), atol=1e-5)


def forward_loss(
    model: Any,
    batcher: Batcher,
    batch: list[tuple[Any, str, str]],
    keep_frac: list[float],
    gen: torch.Generator,
) -> torch.Tensor:
    """Cross-entropy on the answer tokens, with visual tokens spliced like the engine does."""
    feats = image_features(model, batcher, [img for img, _, _ in batch])
    embed = model.get_input_embeddings()
    eos = batcher.tok.eos_token_id
    seqs, labels = [], []
    for b, (_, question, answer) in enumerate(batch):
        before, after = batcher.prompt(question)
        ans = batcher.tok(answer)["input_ids"] + [eos]
        n = feats.shape[1]
        k = max(1, round(n * keep_frac[b]))
        idx = torch.arange(n) if k >= n else torch.randperm(n, generator=gen)[:k].sort().values
        text_after = torch.tensor(after + ans)
        seqs.append(torch.cat([embed(torch.tensor(before)), feats[b, idx], embed(text_after)]))
        lab = torch.full((seqs[-1].shape[0],), -100)
        lab[-len(ans) :] = torch.tensor(ans)
        labels.append(lab)
    length = max(s.shape[0] for s in seqs)
    dim = seqs[0].shape[1]
    inputs = torch.zeros(len(seqs), length, dim)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    lab_t = torch.full((len(seqs), length), -100)
    for b, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        inputs[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = 1
        lab_t[b, : s.shape[0]] = lab
    hidden = model.model.language_model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab_t[:, 1:].reshape(-1), ignore_index=-100)


def image_features(model: Any, batcher: Batcher, images: list[Any]) -> torch.Tensor:
    """Projected visual tokens `(batch, n_tokens, text_hidden)`, as the LM receives them."""
    pixel_values = torch.stack([batcher.pixels(img) for img in images])
    return torch.stack(
        model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    )


@dataclasses.dataclass(frozen=True)
class Packed:
    """A batch of packed rows (see `pack`), ready for the LM."""

    inputs: torch.Tensor  # (batch, length, hidden) input embeddings
    allowed: torch.Tensor  # (batch, length, length) bool: which keys each query may attend to
    positions: torch.Tensor  # (batch, length) position ids
    labels: torch.Tensor  # (batch, length) answer token ids, -100 elsewhere
    weights: torch.Tensor  # (batch, length) 1/len(answer) on answer tokens (per-question weighting)
    ref: ref_aux.Targets  # at each grounded shape word: the centre of the object it names
    rel: ref_aux.Targets  # at each position question's answer step: first minus second centre


def pack(
    model: Any,
    batcher: Batcher,
    batch: list[tuple[Any, list[tuple[str, str]]]],
    keep_frac: list[float],
    gen: torch.Generator,
    feats: torch.Tensor,
    refs: list[list[list[tuple[float, float]]]] | None = None,
    rels: list[list[tuple[float, float] | None]] | None = None,
) -> Packed:
    """Several questions share one image prefix in one row.

    Row layout: `[before][visual tokens][q1 ... a1 EOS][q2 ... a2 EOS]...`. A 4-D attention mask lets
    each question segment see the shared prefix and itself only, and its position ids restart right
    after the prefix, so every segment is computed exactly as a separate single-question prompt
    (checked by `check_packed`): the vision tower and the prefix are paid once per image.
    `refs[b][j]`, when given, are the centres of the objects question j of row b names, one per
    shape word (`ref_aux.referents`); their columns in the packed rows are recorded. `rels[b][j]`,
    when given and not None, is the offset target (`ref_aux.relation_target`) at the column of
    question j's last prompt token, whose next-token prediction is the answer.
    """
    embed = model.get_input_embeddings()
    eos = batcher.tok.eos_token_id
    shape_ids = ref_aux.shape_token_ids(batcher.tok) if refs is not None else set()
    rows = []
    ref_cells: list[tuple[int, int, tuple[float, float]]] = []  # (row, col, target) of each
    rel_cells: list[tuple[int, int, tuple[float, float]]] = []
    for b, (_, qas) in enumerate(batch):
        before = batcher.prompt(qas[0][0])[0]
        n = feats.shape[1]
        k = max(1, round(n * keep_frac[b]))
        idx = torch.arange(n) if k >= n else torch.randperm(n, generator=gen)[:k].sort().values
        prefix_len = len(before) + k
        parts = [embed(torch.tensor(before)), feats[b, idx]]
        labels = [torch.full((prefix_len,), -100)]
        weights = [torch.zeros(prefix_len)]
        positions = [torch.arange(prefix_len)]
        segment = [torch.zeros(prefix_len, dtype=torch.long)]
        offset = prefix_len
        for j, (question, answer) in enumerate(qas, start=1):
            after = batcher.prompt(question)[1]
            if refs is not None and refs[b][j - 1]:
                shape_cols = [offset + t for t, tok in enumerate(after) if tok in shape_ids]
                if len(shape_cols) != len(refs[b][j - 1]):
                    raise ValueError(
                        f"{question!r}: {len(shape_cols)} shape tokens, {len(refs[b][j - 1])} refs"
                    )
                ref_cells += [(b, c, xy) for c, xy in zip(shape_cols, refs[b][j - 1], strict=True)]
            if rels is not None and (rel := rels[b][j - 1]) is not None:
                rel_cells.append((b, offset + len(after) - 1, rel))
            ans = batcher.tok(answer)["input_ids"] + [eos]
            ids = torch.tensor(after + ans)
            offset += len(ids)
            parts.append(embed(ids))
            lab = torch.full((len(ids),), -100)
            lab[-len(ans) :] = torch.tensor(ans)
            labels.append(lab)
            w = torch.zeros(len(ids))
            w[-len(ans) :] = 1.0 / len(ans)
            weights.append(w)
            positions.append(torch.arange(prefix_len, prefix_len + len(ids)))
            segment.append(torch.full((len(ids),), j))
        cols = (parts, labels, positions, segment, weights)
        rows.append(tuple(torch.cat(c) for c in cols))
    length = max(r[0].shape[0] for r in rows)
    bsz, dim = len(rows), rows[0][0].shape[1]
    inputs = torch.zeros(bsz, length, dim)
    lab_t = torch.full((bsz, length), -100)
    pos_t = torch.zeros(bsz, length, dtype=torch.long)
    seg_t = torch.full((bsz, length), -1)  # -1: padding
    w_t = torch.zeros(bsz, length)
    for b, (x, lab, pos, seg, w) in enumerate(rows):
        inputs[b, : x.shape[0]] = x
        w_t[b, : x.shape[0]] = w
        lab_t[b, : x.shape[0]] = lab
        pos_t[b, : x.shape[0]] = pos
        seg_t[b, : x.shape[0]] = seg
    q_seg, k_seg = seg_t[:, :, None], seg_t[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    # Padding rows attend to themselves only, so no row of the mask is empty (NaN-free softmax).
    allowed |= torch.eye(length, dtype=torch.bool) & (q_seg < 0)
    targets = (ref_aux.Targets.collect(ref_cells), ref_aux.Targets.collect(rel_cells))
    return Packed(inputs, allowed, pos_t, lab_t, w_t, *targets)


def run_lm(model: Any, packed: Packed, hidden_states: bool = False) -> Any:
    """The language model's forward over packed rows."""
    return model.model.language_model(
        inputs_embeds=packed.inputs,
        attention_mask=packed.allowed[:, None],
        position_ids=packed.positions,
        output_hidden_states=hidden_states,
    )


def answer_loss(model: Any, packed: Packed, hidden: torch.Tensor, per_question: bool) -> torch.Tensor:
    """Cross-entropy on the answer tokens of packed rows, given the LM's last hidden state.

    With `per_question`, every question weighs the same whatever its answer's length (a one-word
    yes/no counts as much as a listing of five objects); by default every answer token does.
    """
    # Within a segment the next token is at t+1; labels at segment starts are -100 (prompt tokens).
    logits = model.lm_head(hidden[:, :-1])
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), packed.labels[:, 1:].reshape(-1)
    if not per_question:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none")
    w = packed.weights[:, 1:].reshape(-1)
    return (ce * w).sum() / w.sum()


def packed_loss(
    model: Any,
    batcher: Batcher,
    batch: list[tuple[Any, list[tuple[str, str]]]],
    keep_frac: list[float],
    gen: torch.Generator,
    feats: torch.Tensor | None = None,
    per_question: bool = False,
) -> torch.Tensor:
    """Like `forward_loss`, but with the questions of each image packed in one row (`pack`).

    `feats` are the batch's projected image features when the caller has computed them already.
    """
    if feats is None:
        feats = image_features(model, batcher, [img for img, _ in batch])
    packed = pack(model, batcher, batch, keep_frac, gen, feats)
    return answer_loss(model, packed, run_lm(model, packed).last_hidden_state, per_question)


@torch.no_grad()
def check_packed(model: Any, batcher: Batcher) -> None:
    """Assert packed rows give the same loss as the questions one by one.

    Per token (the default): the token-weighted mean of the single-question losses; per question:
    their plain mean.
    """
    exs, img = make_scene_examples("val", 0, 3)
    qas = [(e.question, e.answer) for e in exs]
    packed = packed_loss(model, batcher, [(img, qas)], [1.0], torch.Generator())
    by_question = packed_loss(model, batcher, [(img, qas)], [1.0], torch.Generator(), per_question=True)
    losses, n_tok = [], []
    for q, a in qas:
        n_tok.append(len(batcher.tok(a)["input_ids"]) + 1)
        losses.append(float(forward_loss(model, batcher, [(img, q, a)], [1.0], torch.Generator())))
    per_token = sum(loss * n for loss, n in zip(losses, n_tok, strict=True)) / sum(n_tok)
    assert abs(float(packed) - per_token) < 1e-4, (float(packed), per_token)
    assert abs(float(by_question) - sum(losses) / len(losses)) < 1e-4, (float(by_question), losses)


@torch.no_grad()
def check_splice(model: Any, batcher: Batcher) -> None:
    """Assert that `forward_loss` computes the same loss as the model's own forward on processor outputs."""
    ex, img = make_example("val", 0)
    proc = batcher.processor
    text = proc.apply_chat_template(messages(ex.question), add_generation_prompt=True, tokenize=False)
    ids = proc(text=text + " " + ex.answer + proc.tokenizer.eos_token, images=img, return_tensors="pt")
    n_ans = len(batcher.tok(ex.answer)["input_ids"]) + 1
    labels = torch.full_like(ids["input_ids"], -100)
    labels[0, -n_ans:] = ids["input_ids"][0, -n_ans:]
    ref = model(**ids, labels=labels).loss
    mine = forward_loss(model, batcher, [(img, ex.question, ex.answer)], [1.0], torch.Generator())
    assert torch.allclose(ref, mine, atol=1e-4), (ref, mine)
