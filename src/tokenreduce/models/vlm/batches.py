"""Training batches of the small VLM: LLaVA-style instruction-tuning sequences over fresh digit scenes
(several question turns per image, sometimes the ``describe`` task), optionally token-reduced images (the
warm restart's augmentation) and text-only relation turns, and the forward that feeds a reduced batch."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tokenreduce.data.vqa import (
    POSITION_NAMES,
    QUESTION_TYPES,
    SPECIAL_TOKENS,
    VOCAB,
    Scene,
    cell_of_patch,
    generate_scenes,
    questions_for,
)

from .config import VLMTrainConfig
from .targets import LOOKUP, LOSS_TYPES, RELATION, ordered_description, patch_labels, routing_targets, training_target

__all__ = ["train_forward", "training_batch"]

#: the words a spatial rationale names a place with (tagged ``lookup``)
_PLACE_WORDS = frozenset(w for name in POSITION_NAMES for w in name.split())
_DESCRIBE = LOSS_TYPES.index("describe")


def _reduce_plan(c: VLMTrainConfig, rng) -> tuple[str | None, Any, list[int], bool]:
    """Token-reduction augmentation of one training image (warm restart, ``restart_drop`` > 0): with
    probability ``restart_drop`` the LLM gets only K = ``keep`` x N of the image's visual tokens, keep
    log-uniform in [``drop_min``, 1): a random subset of the patches (``"subset"``) or, with probability
    ``drop_merge``, the patch grid average-pooled to about K cells (``"pool"``, merged tokens); their position
    ids are the original ones (``drop_keep_positions``) or contiguous (the text after the image moves up).
    Returns (kind or None, indices / pooled grid, source patch of each kept token, original positions)."""
    N = c.num_image_tokens
    g = c.scene.image_size // c.patch_size
    if rng.random() >= c.restart_drop:
        return None, None, list(range(N)), True
    r = math.exp(rng.uniform(math.log(c.drop_min), 0.0))
    k = max(1, min(N - 1, round(r * N)))
    keep_pos = bool(rng.random() < c.drop_keep_positions)
    if rng.random() < c.drop_merge:
        gh = max(1, min(g, round(math.sqrt(k))))
        gw = max(1, min(g, round(k / gh)))
        src = [(i * g // gh) * g + j * g // gw for i in range(gh) for j in range(gw)]
        return "pool", (gh, gw), src, keep_pos
    idx = sorted(rng.choice(N, size=k, replace=False).tolist())
    return "subset", idx, idx, keep_pos


def training_batch(c: VLMTrainConfig, step: int, tok, reduce: bool = False) -> dict[str, Any]:
    """One instruction-tuning batch; with ``reduce`` (the warm restart with ``restart_drop`` > 0) each
    image may reach the LLM reduced (:func:`_reduce_plan`): ``reduce`` holds the plans and the batch has
    fewer ``<image>`` placeholders for those and explicit ``position_ids``."""
    import numpy as np

    images, scenes, ink = generate_scenes("train", c.batch_size, seed=c.seed * 1_000_003 + step, config=c.scene)
    rng = np.random.default_rng([c.seed, step, 99])
    drng = np.random.default_rng([c.seed, step, 7])
    image_id = VOCAB.index(SPECIAL_TOKENS["image"])
    eos = VOCAB.index(SPECIAL_TOKENS["eos"])
    types = QUESTION_TYPES + (("existence",) if c.existence else ())
    seqs, labs, tys, poss, plans = [], [], [], [], []
    #: (sample, first visual position, query position, cells, patch of each visual token)
    routes: list[tuple[int, int, int, tuple[int, ...], list[int]]] = []
    for i, s in enumerate(scenes):
        kind, arg, src, keep_pos = _reduce_plan(c, drng) if reduce else (None, None, list(range(c.num_image_tokens)), True)
        plans.append((kind, arg))
        ids_img = [image_id] * len(src)
        qas, seen = [], set()
        for _ in range(-(-c.qa_per_image // 3)):  # several draws: other cells / pairs / relations each time
            for qa in questions_for(s, i, rng, types, c.spatial_form):
                if qa.question not in seen:
                    seen.add(qa.question)
                    qas.append(qa)
        rng.shuffle(qas)
        qas = qas[: c.qa_per_image]
        if rng.random() < c.describe_prob:
            qas = qas[: c.qa_per_image - 1] + [ordered_description(qa, s, c.describe_order)
                                               for qa in questions_for(s, i, rng, ("describe",))]
        ids, lab, ty = [], [], []
        route: list[tuple[int, tuple[int, ...]]] = []  # (sequence position, cells) of this image
        for j, qa in enumerate(qas):
            if j == 0 and c.prompt == "question_first":
                q = tok(qa.question, add_special_tokens=False)["input_ids"] + ids_img + \
                    tok("answer :", add_special_tokens=False)["input_ids"]
            else:
                q = (ids_img if j == 0 else []) + tok(f"{qa.question} answer :", add_special_tokens=False)["input_ids"]
            if qa.qtype == "existence":  # its rationale is the description: in the describe task's order
                qa = ordered_description(qa, s, c.describe_order)
            target = training_target(qa, c.rationale, c.rationale_axis, c.existence_form)
            a = tok(target, add_special_tokens=False)["input_ids"] + [eos]
            if c.route_weight and kind != "pool":  # a pooled token has no single cell
                first = len(ids) + len(q)  # position of the first answer token
                route += [(first + k, cells) for k, cells in
                          routing_targets(qa, s, c.rationale, c.rationale_axis, c.existence_form)]
            ids += q + a
            lab += [-100] * len(q) + a
            ty += [-1] * len(q) + [LOSS_TYPES.index(qa.qtype)] * len(a)
            if qa.qtype == "existence":
                if c.existence_form == "description":
                    # the rationale is a description, trained as one; the type's own term is the yes/no + </s>
                    ty[len(ty) - len(a): len(ty) - 2] = [_DESCRIBE] * (len(a) - 2)
                # a look-up (``7 center , yes``) is the type's own term: its decision is the word after the digit
            elif target != qa.answer:
                ty[-2] = RELATION  # the scored answer after a rationale (the relation step): own tag
                for k, t in enumerate(a[:-2]):  # the rationale's place words (the look-up): own tag
                    if VOCAB[t] in _PLACE_WORDS:
                        ty[len(ty) - len(a) + k] = LOOKUP
        start = ids.index(image_id)
        if keep_pos:  # the ids the tokens have in the unreduced sequence
            removed = c.num_image_tokens - len(src)
            pos = list(range(start)) + [start + p for p in src] + \
                list(range(start + c.num_image_tokens, len(ids) + removed))
        else:
            pos = list(range(len(ids)))
        routes += [(i, start, p, cells, src) for p, cells in route]
        seqs.append(ids)
        labs.append(lab)
        tys.append(ty)
        poss.append(pos)
    trng = np.random.default_rng([c.seed, step, 13])
    erng = np.random.default_rng([c.seed, step, 17])
    for qtype, n, r in (("spatial", c.text_relation, trng), ("existence", c.existence_text, erng)):
        for _ in range(n):
            ids, lab, ty = _text_sequence(c, r, tok, qtype)
            seqs.append(ids)
            labs.append(lab)
            tys.append(ty)
            poss.append(list(range(len(ids))))
    L = max(map(len, seqs))
    pad = VOCAB.index(SPECIAL_TOKENS["pad"])
    input_ids = torch.full((len(seqs), L), pad)
    labels = torch.full((len(seqs), L), -100)
    types = torch.full((len(seqs), L), -1)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    position_ids = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, lb, ty, ps) in enumerate(zip(seqs, labs, tys, poss)):  # right padding for training
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lb)] = torch.tensor(lb)
        types[i, : len(ty)] = torch.tensor(ty)
        mask[i, : len(s)] = 1
        position_ids[i, : len(ps)] = torch.tensor(ps)
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": images,
           "patch_labels": patch_labels(scenes, ink, c), "answer_types": types}
    if reduce:
        out["position_ids"] = position_ids
        out["reduce"] = plans
    if c.route_weight:
        g = c.scene.image_size // c.patch_size
        cell = torch.from_numpy(cell_of_patch(g, c.scene.image_size))
        target = torch.zeros(len(routes), c.num_image_tokens, dtype=torch.bool)
        for r, (_, _, _, cells, src) in enumerate(routes):  # a reduced image: its kept patches' cells
            target[r, : len(src)] = torch.isin(cell[torch.tensor(src)], torch.tensor(cells))
        keep = target.any(1)  # the digits a reduced image lost cannot be found
        routes = [x for x, k in zip(routes, keep.tolist()) if k]
        target = target[keep]
        out["route"] = (torch.tensor([r[0] for r in routes], dtype=torch.long),
                        torch.tensor([r[1] for r in routes], dtype=torch.long),
                        torch.tensor([r[2] for r in routes], dtype=torch.long), target)
    return out


#: target words a text-only relation turn is trained on (the positions need the image)
_TEXT_ONLY_WORDS = frozenset([str(i) for i in range(10)] + [",", "yes", "no", SPECIAL_TOKENS["eos"]])


def _text_sequence(c: VLMTrainConfig, rng, tok, qtype: str) -> tuple[list[int], list[int], list[int]]:
    """One text-only training sequence: ``qa_per_image`` turns of ``qtype``, each about a fresh random
    arrangement of 2-4 digits (no image), labels on the words text alone determines; ``(input ids, labels,
    answer types)``. ``spatial`` (``text_relation``): the digits the rationale copies from the question, its
    commas and the yes/no after it (:data:`_TEXT_ONLY_WORDS`; the yes/no tagged ``relation``); ``existence``
    (``existence_text``): the teacher-forced description is given, only the yes/no and ``</s>`` after it are
    trained (tagged ``text``): the match of the question's digit against the description alone."""
    ids: list[int] = []
    lab: list[int] = []
    ty: list[int] = []
    text, eos = LOSS_TYPES.index("text"), VOCAB.index(SPECIAL_TOKENS["eos"])
    turns = 0
    while turns < c.qa_per_image:
        k = int(rng.integers(2, 5))
        digits = [-1] * 9
        for cell, v in zip(rng.permutation(9)[:k].tolist(), rng.permutation(10)[:k].tolist()):
            digits[cell] = v
        qas = questions_for(Scene(tuple(digits), -1, ((0, 0, 0),) * 9), 0, rng, (qtype,))
        if not qas:
            continue
        qa = qas[0]
        q = tok(f"{qa.question} answer :", add_special_tokens=False)["input_ids"]
        target = training_target(qa, c.rationale, c.rationale_axis, c.existence_form)
        a = tok(target, add_special_tokens=False)["input_ids"] + [eos]
        if qtype == "spatial":
            trained = [VOCAB[t] in _TEXT_ONLY_WORDS for t in a]
        else:
            trained = [k >= len(a) - 2 for k in range(len(a))]
        ids += q + a
        lab += [-100] * len(q) + [t if ok else -100 for t, ok in zip(a, trained)]
        ty += [-1] * len(q) + [text if ok else -1 for ok in trained]
        if qtype == "spatial":
            ty[-2] = RELATION
        turns += 1
    return ids, lab, ty


def train_forward(model, b: dict[str, Any]):
    """The training forward; a batch with ``reduce`` plans (:func:`training_batch`) builds the LLM input
    itself: per image, its projected visual tokens reduced by the plan (subset or average pooling of the
    patch grid), scattered into the (fewer) ``<image>`` placeholders, with the batch's position ids."""
    plans = b.pop("reduce", None)
    if plans is None:
        return model(**b)
    feats = model.model.get_image_features(pixel_values=b.pop("pixel_values"), return_dict=True).pooler_output
    parts = []
    for f, (kind, arg) in zip(feats, plans):
        if kind == "subset":
            f = f[torch.as_tensor(arg)]
        elif kind == "pool":
            n, d = f.shape
            g = math.isqrt(n)
            f = F.adaptive_avg_pool2d(f.T.reshape(d, g, g), arg).reshape(d, -1).T
        parts.append(f)
    ids = b.pop("input_ids")
    emb = model.get_input_embeddings()(ids)
    vis = (ids == model.config.image_token_id)[..., None]
    emb = emb.masked_scatter(vis, torch.cat(parts).to(emb.dtype))
    return model(inputs_embeds=emb, **b)
