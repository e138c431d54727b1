"""The digit-scene VQA set, the small VLM's tokenizer/prompt encoding and the VLM benchmark (fast: tiny
random-weight model, a handful of questions)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from tokenreduce.data.digits import split_indices
from tokenreduce.data.vqa import (
    POSITION_NAMES,
    QUESTION_TYPES,
    VOCAB,
    SceneConfig,
    cell_of_patch,
    generate_scenes,
    make_vqa_set,
)


@pytest.fixture(scope="module")
def vqa():
    return make_vqa_set("test", 60, seed=1, per_type=10)


def test_shapes_types_and_balance(vqa):
    assert vqa.images.shape[1:] == (3, 96, 96) and vqa.images.dtype == torch.float32
    assert {k: len(v) for k, v in vqa.by_type().items()} == {t: 10 for t in QUESTION_TYPES}
    assert all(0 <= qa.scene < vqa.images.shape[0] for qa in vqa.qas)
    words = set(VOCAB)
    assert all(set(qa.question.split()) <= words and qa.answer in words for qa in vqa.qas)


def test_deterministic_and_split_dependent():
    a = make_vqa_set("val", 5, seed=3)
    b = make_vqa_set("val", 5, seed=3)
    c = make_vqa_set("test", 5, seed=3)
    assert torch.equal(a.images, b.images) and a.qas == b.qas
    assert not torch.equal(a.images, c.images)


def test_answers_follow_the_scene(vqa):
    for qa in vqa.qas:
        s = vqa.scenes[qa.scene]
        if qa.qtype == "identity":
            pos = qa.question.split("the ", 1)[1].rsplit(" ?", 1)[0]
            assert s.digits[POSITION_NAMES.index(pos)] == int(qa.answer)
        elif qa.qtype == "counting":
            assert int(qa.answer) == s.count and 2 <= s.count <= 5
        elif qa.qtype == "detail":
            assert s.small_cell >= 0 and s.digits[s.small_cell] == int(qa.answer)
        elif qa.qtype == "comparison":
            assert int(qa.answer) in s.digits
    spatial = [qa.answer for qa in vqa.qas if qa.qtype == "spatial"]
    assert set(spatial) == {"yes", "no"}


def test_spatial_rationale_names_where_each_digit_is(vqa):
    """A spatial question's rationale puts each named digit in its cell, and the answer follows from the
    two cells; the other types have none."""
    from tokenreduce.data.vqa import _rel_holds
    from tokenreduce.models.vlm import parse_answer, training_target

    n = 0
    for qa in vqa.qas:
        if qa.qtype != "spatial":
            assert qa.rationale == "" and training_target(qa, True) == qa.answer
            continue
        s = vqa.scenes[qa.scene]
        words = qa.question.split()  # is the A <relation> the B ?
        a, b, rel = int(words[2]), int(words[-2]), " ".join(words[3:-3])
        cells = []
        for part, digit in zip(qa.rationale.split(" , "), (a, b)):
            value, pos = part.split(" ", 1)
            assert int(value) == digit and s.digits[POSITION_NAMES.index(pos)] == digit
            cells.append(POSITION_NAMES.index(pos))
        assert _rel_holds(rel, *cells) == (qa.answer == "yes")
        target = training_target(qa, True)
        assert target == f"{qa.rationale} , {qa.answer}" and training_target(qa, False) == qa.answer
        assert parse_answer(target.split() + ["</s>", "<pad>"]) == qa.answer
        assert all(w in VOCAB for w in target.split())
        n += 1
    assert n == 10


def test_spatial_choice_form():
    """GQA's choice form draws the same scenes and digit pairs as yes/no, names the relation that holds
    (the one the yes/no question asks or its opposite), is balanced over its four answers, keeps the
    rationale, and the axis rationale decides it; bad forms are refused."""
    from tokenreduce.data.vqa import _rel_holds
    from tokenreduce.models.vlm import VLMTrainConfig, axis_rationale, eval_set, parse_answer, training_target

    yn = make_vqa_set("test", 400, seed=5, types=("spatial",))
    ch = make_vqa_set("test", 400, seed=5, types=("spatial",), spatial="choice")
    assert len(yn.qas) == len(ch.qas) > 300 and torch.equal(yn.images, ch.images)
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for y, c in zip(yn.qas, ch.qas):
        w = y.question.split()
        rel = " ".join(w[3:-3])
        true = rel if y.answer == "yes" else opposite[rel]
        assert c.rationale == y.rationale and c.answer == true.split()[0]
        axis = "left or right of" if true in ("left of", "right of") else "above or below"
        assert c.question == f"is the {w[2]} {axis} the {w[-2]} ?"
        cells = [POSITION_NAMES.index(part.split(" ", 1)[1]) for part in c.rationale.split(" , ")]
        assert _rel_holds(true, *cells)
        col = [x % 3 for x in cells] if axis.startswith("left") else [x // 3 for x in cells]
        words = axis_rationale(c).split()  # 3 left , 7 center: the compared axis decides the answer
        assert (col[0] < col[1]) == (c.answer in ("left", "above")) and len(words) == 5
        target = training_target(c, True, True)
        assert parse_answer(target.split() + ["</s>"]) == c.answer and all(t in VOCAB for t in target.split())
    counts = {a: sum(q.answer == a for q in ch.qas) for a in ("left", "right", "above", "below")}
    assert min(counts.values()) > 0.15 * len(ch.qas), counts
    held = eval_set("test", VLMTrainConfig(spatial_choice=True), per_type=20).by_type()["spatial"]
    assert {q.answer for q in held} <= set(counts) and len(held) == 20
    assert VLMTrainConfig(spatial_choice=True).config_hash() != VLMTrainConfig(spatial_choice=False).config_hash()
    with pytest.raises(ValueError, match="spatial"):
        make_vqa_set("test", 4, spatial="which")
    with pytest.raises(ValueError, match="spatial_choice"):
        VLMTrainConfig(spatial_choice=True, text_relation=4)


def test_parse_answer():
    from tokenreduce.models.vlm import parse_answer

    assert parse_answer(["7", "</s>"]) == "7"
    assert parse_answer(["7", "3"]) == "7"  # no eos within the budget: the first word, as before
    assert parse_answer(["3", "top", "left", ",", "7", "center", ",", "no", "</s>", "</s>"]) == "no"
    assert parse_answer(["3", "top", ",", "7"]) == "7"
    assert parse_answer(["</s>"]) == "" and parse_answer(["3", ","]) == ""


def test_digits_are_drawn_where_annotated():
    _, scenes, ink = generate_scenes("train", 8, seed=0)
    for i, s in enumerate(scenes):
        for cell, v in enumerate(s.digits):
            t, l, size = s.boxes[cell]
            inside = ink[i, t:t + size, l:l + size].sum() if v >= 0 else 0
            assert (v >= 0) == (inside > 0)
        assert len({v for v in s.digits if v >= 0}) == s.count  # distinct values


def test_digits_snap_to_the_patch_grid():
    c = SceneConfig()
    _, scenes, ink = generate_scenes("train", 16, seed=2)
    for i, s in enumerate(scenes):
        for cell, v in enumerate(s.digits):
            if v < 0:
                continue
            t, l, size = s.boxes[cell]
            assert t % c.align == 0 and l % c.align == 0 and size == (8 if cell == s.small_cell else 16)
            assert divmod(t, 32)[0] * 3 + divmod(l, 32)[0] == cell  # inside its cell
            assert ink[i, t:t + size, l:l + size].sum() == ink[i].reshape(3, 32, 3, 32)[cell // 3, :, cell % 3].sum()
    with pytest.raises(ValueError, match="align"):
        SceneConfig(align=40)
    free = generate_scenes("train", 2, seed=2, config=SceneConfig(align=0))[0]
    assert free.shape == (2, 3, 96, 96)


def test_held_out_digits_are_disjoint():
    assert not set(split_indices("train")) & set(split_indices("test"))


def test_cell_of_patch_layout():
    cells = cell_of_patch(12, 96).reshape(12, 12)
    assert cells[0, 0] == 0 and cells[0, 11] == 2 and cells[11, 0] == 6 and cells[5, 5] == 4


def test_bad_config_and_args():
    with pytest.raises(ValueError, match="image_size"):
        SceneConfig(image_size=100)
    with pytest.raises(ValueError, match="split"):
        generate_scenes("dev", 3)
    with pytest.raises(ValueError, match="unknown question types"):
        make_vqa_set("test", 3, types=("colour",))


# ---------------------------------------------------------------------------- tokenizer / model building
def test_tokenizer_and_prompts():
    from tokenreduce.models.vlm import build_tokenizer, encode_prompts

    tok = build_tokenizer()
    ids = tok("what digit is at the top left ? answer : 3", add_special_tokens=False)["input_ids"]
    assert len(ids) == 11 and tok.unk_token_id not in ids
    assert tok.convert_tokens_to_ids("<image>") == VOCAB.index("<image>")
    b = encode_prompts(tok, ["how many digits are there ?", "what is the small digit ?"], torch.zeros(2, 3, 96, 96))
    assert (b["input_ids"] == VOCAB.index("<image>")).sum(1).tolist() == [144, 144]
    assert b["attention_mask"][:, -1].all()  # left padding for generation


def test_small_vlm_is_a_real_llava_and_config_hash():
    from transformers import LlavaForConditionalGeneration

    from tokenreduce.models.vlm import VLMTrainConfig, build_small_vlm

    c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=2, route_layers=(0,), text_heads=2, text_kv_heads=1)
    m = build_small_vlm(c)
    assert isinstance(m, LlavaForConditionalGeneration) and m.config.image_seq_length == 144
    assert c.config_hash() == VLMTrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))).config_hash()
    assert c.config_hash() != VLMTrainConfig(steps=3).config_hash()
    assert c.config_hash() == VLMTrainConfig(**{**c.__dict__, "num_threads": 2}).config_hash()
    with pytest.raises(ValueError, match="patch_size"):
        VLMTrainConfig(patch_size=7)


def test_grid_position_projector():
    """The optional 2-D position embedding after LLaVA's projector: MAE's sine-cosine code at the asked RMS,
    one row per patch (the row code depends on the row only, the column code on the column only), absent
    from the cache hash when off, and a real parameter of the saved model."""
    from tokenreduce.models.vlm import GridPositionProjector, VLMTrainConfig, build_small_vlm, grid_sincos

    code = grid_sincos(12, 128)
    assert code.shape == (144, 128)
    torch.testing.assert_close(code.pow(2).mean(), torch.tensor(0.5))
    grid = code.view(12, 12, 128)
    assert torch.equal(grid[:, :1, :64].expand(-1, 12, -1), grid[..., :64])  # rows: first half
    assert torch.equal(grid[:1, :, 64:].expand(12, -1, -1), grid[..., 64:])  # columns: second half
    assert len({tuple(r) for r in code.round(decimals=4).tolist()}) == 144
    with pytest.raises(ValueError, match="multiple of 4"):
        grid_sincos(4, 30)
    small = {"vision_dim": 32, "vision_layers": 1, "text_dim": 32, "text_layers": 2, "route_layers": (0,),
             "text_heads": 2, "text_kv_heads": 1}
    # off, the new options are absent from the hash: the previous default model keeps its cache folder
    assert VLMTrainConfig(visual_position=0.0, spatial_choice=False, ground_weight=0.0).config_hash() == "6f64beb21b"
    assert VLMTrainConfig(ground_weight=0.0).config_hash() == "d705f465f1"  # the default before grounding
    assert VLMTrainConfig().config_hash() == "0e4ba3681b"
    assert VLMTrainConfig(**small).config_hash() != VLMTrainConfig(**small, visual_position=0.0).config_hash()
    with pytest.raises(ValueError, match="visual_position"):
        VLMTrainConfig(visual_position=-1.0)
    m = build_small_vlm(VLMTrainConfig(**small, visual_position=2.0))
    proj = m.model.multi_modal_projector
    assert isinstance(proj, GridPositionProjector) and "model.multi_modal_projector.position" in m.state_dict()
    torch.testing.assert_close(proj.position.detach().pow(2).mean().sqrt(), torch.tensor(2.0))
    x = torch.randn(2, 144, 32)
    with torch.no_grad():
        y = proj(x)
        plain = proj.linear_2(proj.act(proj.linear_1(x)))
        torch.testing.assert_close(y - plain, proj.position.expand(2, -1, -1))
        src = torch.tensor([[5, 17, -1], [0, 1, 143]])
        part = proj(x[:, :3], source_patches=src)
        torch.testing.assert_close(part[0, 1] - plain[0, 1], proj.position[17])
        torch.testing.assert_close(part[0, 2], plain[0, 2])  # -1: no position (a CLS token)
        with pytest.raises(ValueError, match="source_patches has shape"):
            proj(x[:, :3], source_patches=src[:, :2])


def test_conv_stem_and_patch_labels():
    from tokenreduce.models.vlm import VLMTrainConfig, build_small_vlm
    from tokenreduce.models.vlm.model import ConvStemPatchEmbed
    from tokenreduce.models.vlm.targets import patch_class as _patch_class
    from tokenreduce.models.vlm.targets import patch_labels as _patch_labels

    c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=2, route_layers=(0,), text_heads=2, text_kv_heads=1)
    m = build_small_vlm(c)
    stem = m.model.vision_tower.embeddings.patch_embedding
    assert isinstance(stem, ConvStemPatchEmbed) and stem(torch.zeros(1, 3, 96, 96)).shape == (1, 32, 12, 12)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        stem(torch.zeros(1, 3, 96, 96))
    assert stem.flops(96) == pytest.approx(fc.get_total_flops())
    images, scenes, ink = generate_scenes("train", 4, seed=0)
    assert m.model.vision_tower(images).last_hidden_state.shape == (4, 145, 32)
    lab = _patch_labels(scenes, ink, c)
    assert lab.shape == (4, 144)
    for i, s in enumerate(scenes):  # every digit owns at least one patch, with its own class
        for cell, v in enumerate(s.digits):
            if v >= 0:
                assert (lab[i] == _patch_class(cell, v, cell == s.small_cell)).any()
        assert set(lab[i].tolist()) <= {0} | {_patch_class(k, v, k == s.small_cell)
                                           for k, v in enumerate(s.digits) if v >= 0}
    with pytest.raises(ValueError, match="patch_size"):
        ConvStemPatchEmbed(6, 32)
    plain = build_small_vlm(VLMTrainConfig(stem_channels=0, vision_dim=32, vision_layers=1, text_dim=32,
                                           text_layers=1, route_layers=(0,), text_heads=2, text_kv_heads=1))
    assert isinstance(plain.model.vision_tower.embeddings.patch_embedding, torch.nn.Conv2d)


def test_aux_targets_and_per_type_loss():
    from tokenreduce.models.vlm import VLMTrainConfig, build_tokenizer
    from tokenreduce.models.vlm.batches import training_batch as _training_batch
    from tokenreduce.models.vlm.losses import aux_loss as _aux_loss
    from tokenreduce.models.vlm.losses import lm_loss as _lm_loss
    from tokenreduce.models.vlm.targets import (
        LOSS_TYPES as _LOSS_TYPES,
    )
    from tokenreduce.models.vlm.targets import (
        N_AUX as _N_AUX,
    )
    from tokenreduce.models.vlm.targets import (
        N_WHAT as _N_WHAT,
    )
    from tokenreduce.models.vlm.targets import (
        patch_labels as _patch_labels,
    )

    c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=2, route_layers=(0,), text_heads=2, text_kv_heads=1,
                       batch_size=4)
    _, scenes, ink = generate_scenes("train", 16, seed=1)
    lab = _patch_labels(scenes, ink, c)
    torch.manual_seed(0)
    feats = torch.randn(16, 144, 32)
    head = torch.nn.Linear(32, _N_AUX)
    loss, what = _aux_loss(head, feats, lab, c)
    assert what.shape == (16, 144, _N_WHAT) and torch.isfinite(loss)
    # v3 adds two targets: the digit's value alone (shared by regular and small digits) and its size
    base = torch.nn.Linear(32, _N_WHAT + 9)
    with torch.no_grad():
        base.weight.copy_(head.weight[: _N_WHAT + 9])
        base.bias.copy_(head.bias[: _N_WHAT + 9])
    old, _ = _aux_loss(base, feats, lab, dataclasses.replace(c, aux_value=False))
    value = torch.tensor([[0 if k == 0 else (k - 90 if k >= 91 else (k - 1) % 10 + 1) for k in row] for row in lab.tolist()])
    size = torch.tensor([[0 if k == 0 else (2 if k >= 91 else 1) for k in row] for row in lab.tolist()])
    out = head(feats)
    extra = torch.nn.functional.cross_entropy(out[..., _N_WHAT + 9:_N_WHAT + 20].flatten(0, 1), value.flatten()) + \
        torch.nn.functional.cross_entropy(out[..., _N_WHAT + 20:].flatten(0, 1), size.flatten())
    assert loss.item() == pytest.approx((old + extra).item(), rel=1e-5)
    assert (size == 2).any() and (value[size == 2] >= 1).all()  # this batch has a small digit
    # per-type loss: the mean of each type's mean; per-token mean otherwise
    b = _training_batch(c, 0, build_tokenizer())
    assert b["answer_types"].shape == b["labels"].shape
    assert ((b["answer_types"] >= 0) == (b["labels"] != -100)).all()
    logits = torch.randn(*b["labels"].shape, 50)
    flat, per = _lm_loss(logits, b["labels"], b["answer_types"], per_type=False)
    bal, per2 = _lm_loss(logits, b["labels"], b["answer_types"], per_type=True)
    assert per == per2 and set(per) <= set(_LOSS_TYPES)
    # the yes/no after a spatial rationale is tagged "relation": logged apart, a term of its own only
    # with relation_term (else one of its spatial turn's tokens)
    rel = b["answer_types"] == _LOSS_TYPES.index("relation")
    assert rel.any() and "relation" in per
    assert {VOCAB[int(t)] for t in b["labels"][rel]} <= {"left", "right", "above", "below"}  # choice form
    # the rationale's place words are tagged "lookup" (a term of their own only with lookup_term)
    look = b["answer_types"] == _LOSS_TYPES.index("lookup")
    assert look.any() and "lookup" in per
    assert {VOCAB[int(t)] for t in b["labels"][look]} <= {"top", "bottom", "left", "right", "center"}
    assert look.sum() == 2 * rel.sum()  # two named digits per rationale (axis rationale: one word each)
    spatial = _LOSS_TYPES.index("spatial")
    merged = b["answer_types"].clone()
    merged[rel | look] = spatial
    _, per_merged = _lm_loss(logits, b["labels"], merged, per_type=True)
    assert bal.item() == pytest.approx(sum(per_merged.values()) / len(per_merged), rel=1e-5)
    sep, _ = _lm_loss(logits, b["labels"], b["answer_types"], per_type=True, relation_term=True, lookup_term=True)
    assert sep.item() == pytest.approx(sum(per.values()) / len(per), rel=1e-5)
    only_rel = b["answer_types"].clone()
    only_rel[look] = spatial
    _, per_rel = _lm_loss(logits, b["labels"], only_rel, per_type=True)
    sep_rel, _ = _lm_loss(logits, b["labels"], b["answer_types"], per_type=True, relation_term=True)
    assert sep_rel.item() == pytest.approx(sum(per_rel.values()) / len(per_rel), rel=1e-5)
    y = b["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1][y != -100], y[y != -100])
    assert flat.item() == pytest.approx(ref.item(), rel=1e-5)


def test_reduction_augmentation_equals_masking():
    """Warm-restart augmentation (restart_drop): a reduced image with its original position ids is the
    full sequence with the dropped visual tokens masked out; same questions and scenes as unreduced."""
    from tokenreduce.models.vlm import VLMTrainConfig, build_small_vlm, build_tokenizer
    from tokenreduce.models.vlm.batches import train_forward as _train_forward
    from tokenreduce.models.vlm.batches import training_batch as _training_batch

    c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=2, route_layers=(0,), text_heads=2, text_kv_heads=1,
                       batch_size=3, restart_drop=1.0, drop_merge=0.0, drop_keep_positions=1.0)
    tok = build_tokenizer()
    torch.manual_seed(0)
    m = build_small_vlm(c, attn_implementation="eager").eval()
    b = _training_batch(c, 3, tok, reduce=True)
    b0 = _training_batch(c, 3, tok)
    image = VOCAB.index("<image>")
    drop = torch.zeros_like(b0["attention_mask"], dtype=torch.bool)
    for i, (kind, idx) in enumerate(b["reduce"]):
        assert kind == "subset" and 1 <= len(idx) < 144 and int((b["input_ids"][i] == image).sum()) == len(idx)
        assert idx == sorted(set(idx))
        slots = (b0["input_ids"][i] == image).nonzero()[:, 0]
        drop[i, slots[[j for j in range(144) if j not in set(idx)]]] = True
        n = int(b["attention_mask"][i].sum())
        assert b["position_ids"][i, n - 1] == int(b0["attention_mask"][i].sum()) - 1  # text keeps its ids
    for k in ("patch_labels", "labels", "answer_types"):
        b.pop(k), b0.pop(k)
    with torch.no_grad():
        red = _train_forward(m, dict(b)).logits
        b0["attention_mask"] = b0["attention_mask"] * ~drop
        full = m(**b0).logits
    for i in range(3):
        keep = b0["attention_mask"][i].bool()
        n = int(keep.sum())
        torch.testing.assert_close(red[i, :n], full[i, keep], rtol=1e-4, atol=1e-4)
    # pool plans: a grid of merged tokens; compact positions: contiguous ids
    c2 = dataclasses.replace(c, drop_merge=1.0, drop_keep_positions=0.0)
    b2 = _training_batch(c2, 4, tok, reduce=True)
    for i, (kind, (gh, gw)) in enumerate(b2["reduce"]):
        n = int(b2["attention_mask"][i].sum())
        assert kind == "pool" and int((b2["input_ids"][i] == image).sum()) == gh * gw
        assert torch.equal(b2["position_ids"][i, :n], torch.arange(n))
    with torch.no_grad():
        assert _train_forward(m, {k: v for k, v in b2.items() if k not in ("patch_labels", "labels",
                                                                            "answer_types")}).logits.isfinite().all()


def test_v3_model_stays_addressable():
    """The augmentation fields are absent from the hash when off: ``restart_drop=0, restart_steps=600`` is the
    cached v3 model, and the default's parent is v3's parent (the 1100-step model)."""
    from tokenreduce.models.vlm import VLMTrainConfig

    old = {"prompt": "question_first", "route_weight": 0.0, "rationale_axis": False,  # models up to f5ac68a128
           "visual_position": 0.0, "spatial_choice": False, "ground_weight": 0.0}
    assert VLMTrainConfig(**old).config_hash() == "f5ac68a128"
    c = VLMTrainConfig(rationale=False, freeze_vision=True, **old)
    assert c.without_drop().parent().config_hash() == c.parent().config_hash() == "892f7ded99"
    assert VLMTrainConfig(restart_steps=600, restart_drop=0.0, rationale=False,
                          freeze_vision=True, **old).config_hash() == "42c6df0141"
    assert c.config_hash() not in ("42c6df0141", "892f7ded99")
    assert VLMTrainConfig().config_hash() not in (c.config_hash(), "42c6df0141")  # rationale: a new model
    with pytest.raises(ValueError, match="restart_drop"):
        VLMTrainConfig(restart_drop=1.5)


def test_missing_checkpoint_error(tmp_path, monkeypatch):
    from tokenreduce.models.vlm import VLMTrainConfig, load_small_vlm

    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenreduce train vlm"):
        load_small_vlm(config=VLMTrainConfig(steps=1))


# ---------------------------------------------------------------------------- benchmark (smoke)
def test_vlm_bench_smoke(tmp_path):
    from tokenreduce.bench.results import read_results
    from tokenreduce.bench.vlm import run_vlm_bench
    from tokenreduce.models.vlm import VLMTrainConfig, build_small_vlm, build_tokenizer, eval_set

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # linear patches: at this toy width a conv stem would dominate the (unreduced) vision FLOPs
        c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=4, route_layers=(0,), text_heads=2, text_kv_heads=1,
                           stem_channels=0)
        torch.manual_seed(0)
        m, tok = build_small_vlm(c), build_tokenizer()
        data = eval_set("test", c, per_type=2)
        kw = {"methods": ["fastv", "visionzip"], "keeps": [1.0, 0.25, 0.003], "out": str(tmp_path), "per_type": 2,
              "repeats": 1, "warmup": 0, "time_batch": 2, "gen_tokens": 2, "model": m, "tokenizer": tok, "data": data,
              "eval_batch": 10, "progress": False}
        with pytest.raises(FileNotFoundError, match="accuracy"):
            run_vlm_bench(**kw, parts="timing")
        acc_rows = run_vlm_bench(**kw, parts="accuracy")  # no wall-clock ...
        assert not any("prefill_ms" in r for r in acc_rows)
        with pytest.raises(ValueError, match="threads=1"):
            run_vlm_bench(**{**kw, "threads": 2}, parts="timing", clock="cpu")
        # ... then only timing (CPU clock), for the same rows
        rows = run_vlm_bench(**kw, parts="timing", clock="cpu", malloc="default")
        # a second timing run re-measures the unreduced row too (not the previous run's value)
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        stale = [json.loads(x) for x in lines]
        for r in stale:
            if r.get("method") == "none":
                r["prefill_ms"] = r["gen_ms"] = -1.0
        (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
        again = run_vlm_bench(**kw, parts="timing", clock="cpu", malloc="default")
        base = next(r for r in again if r["method"] == "none")
        assert base["prefill_ms"] > 0 and base["gen_ms"] > 0
    finally:
        torch.set_num_threads(n)
    meta, written = read_results(tmp_path / "results.jsonl")
    assert meta["bench"] == "vlm" and meta["parts"] == "timing" and len(written) == len(rows) == 1 + 2 * 3
    assert meta["config"]["clock"] == "cpu" and meta["allocator"] == "default"
    strip = ("prefill_ms", "base_prefill_ms", "prefill_speedup", "prefill_speedup_low", "prefill_speedup_high",
             "gen_ms", "base_gen_ms", "gen_speedup", "gen_speedup_low", "gen_speedup_high", "overhead_ms")
    def key(r):
        return r["method"], r["keep"]

    assert sorted(({k: v for k, v in r.items() if k not in strip} for r in rows), key=key) == \
        sorted(acc_rows, key=key)  # the accuracy columns are carried over unchanged
    ok = {(r["method"], r["keep"]): r for r in rows if "error" not in r}
    assert ok[("fastv", 1.0)]["agreement"] == 1.0 and ok[("fastv", 1.0)]["flops_ratio"] == pytest.approx(1.0)
    assert ok[("visionzip", 0.25)]["flops_ratio"] > 1.5 and ok[("visionzip", 0.25)]["kv_ratio"] < 0.5
    assert all(k in ok[("fastv", 0.25)] for k in ("prefill_speedup", "gen_speedup", "peak_mem_mb", "acc_detail"))
    assert any("leaves zero" in r.get("error", "") for r in rows)  # keep=0.003 of 144 tokens: a clear error
    for f in ("report.html", "accuracy_vs_keep.png", "pareto_prefill.png", "kept_patches.png"):
        assert (tmp_path / f).stat().st_size > 1000


def test_routing_targets_name_the_cells_each_answer_word_needs():
    """Routing supervision targets (route_weight > 0): the query position of each lookup and the scene cells
    it must attend to, for every question type, with and without rationales."""
    from tokenreduce.data.vqa import POSITION_NAMES, make_vqa_set
    from tokenreduce.models.vlm import training_target
    from tokenreduce.models.vlm.targets import routing_targets as _routing_targets

    data = make_vqa_set("train", 40, seed=5, types=QUESTION_TYPES + ("describe",))
    seen = set()
    for qa in data.qas:
        s = data.scenes[qa.scene]
        for rationale in (False, True):
            words = training_target(qa, rationale).split()
            targets = _routing_targets(qa, s, rationale)
            seen.add(qa.qtype)
            for i, cells in targets:
                assert -1 <= i < len(words) - 1 and cells and all(s.digits[c] >= 0 for c in cells)
            if qa.qtype == "identity":
                assert targets == [(-1, (POSITION_NAMES.index(qa.question.split("at the ")[1][:-2]),))]
                assert str(s.digits[targets[0][1][0]]) == qa.answer
            elif qa.qtype == "comparison":
                (i, cells), = targets
                assert str(max(s.digits[c] for c in cells)) == qa.answer and len(set(cells)) == 2
            elif qa.qtype == "detail":
                assert targets == [(-1, (s.small_cell,))]
            elif qa.qtype == "counting":
                assert targets == []
            elif qa.qtype == "spatial" and rationale:
                # each digit word is followed by the name of the cell it is routed to
                for i, (c,) in targets:
                    assert words[i] == str(s.digits[c])
                    assert " ".join(words[i + 1:]).startswith(POSITION_NAMES[c] + " ,")
            elif qa.qtype == "describe":
                for i, (c,) in targets:
                    nxt = words[i + 1]  # the word after the query: the digit itself or its cell name / value
                    assert nxt in (str(s.digits[c]), "small") or \
                        " ".join(words[i + 1:]).startswith(POSITION_NAMES[c]) or (c == s.small_cell and nxt.isdigit())
    assert seen == set(QUESTION_TYPES) | {"describe"}


def test_routing_loss_equals_eager_attention_share():
    """_routing_loss recomputes one head's attention from the captured layer inputs; it must equal -log of
    the share that the eager attention weights put on the target cells' visual tokens."""
    from tokenreduce.models.vlm import VLMTrainConfig, build_small_vlm, build_tokenizer
    from tokenreduce.models.vlm.batches import training_batch as _training_batch
    from tokenreduce.models.vlm.losses import RouteProbe as _RouteProbe
    from tokenreduce.models.vlm.losses import routing_loss as _routing_loss

    c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=3, text_heads=4, text_kv_heads=2,
                       batch_size=3, route_weight=0.5, route_layers=(0, 2), route_head=3)
    assert c.config_hash() != dataclasses.replace(c, route_weight=0.0).config_hash()
    off = VLMTrainConfig(route_weight=0.0)
    assert off.config_hash() == dataclasses.replace(off, route_layers=(1,)).config_hash()  # off: not hashed
    with pytest.raises(ValueError, match="route_layers"):
        VLMTrainConfig(route_weight=1.0, route_layers=(6,))
    torch.manual_seed(0)
    m = build_small_vlm(c, attn_implementation="eager").eval()
    b = _training_batch(c, 1, build_tokenizer())
    route = b.pop("route")
    for k in ("patch_labels", "labels", "answer_types"):
        b.pop(k)
    bi, start, qpos, target = route
    assert len(bi) > 0 and (target.sum(1) % 16 == 0).all()
    probe = _RouteProbe(m, c.route_layers)
    with torch.no_grad():
        out = m(**b, output_attentions=True)
    probe.remove()
    got = _routing_loss(probe, route, b["attention_mask"], c.route_head)
    cols = start[:, None] + torch.arange(144)[None]
    ref = torch.stack([-((out.attentions[k][bi, c.route_head, qpos].gather(1, cols) * target).sum(1).log()).mean()
                       for k in c.route_layers]).mean()
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)


def test_routing_targets_follow_the_kept_patches_of_reduced_images():
    """With the warm restart's reduction augmentation a route's target columns are the kept tokens whose
    patches lie in its cells; routes whose digits were all dropped, and pooled images, have none."""
    from tokenreduce.models.vlm import VLMTrainConfig, build_tokenizer
    from tokenreduce.models.vlm.batches import training_batch as _training_batch

    c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=3, text_heads=4, text_kv_heads=2,
                       batch_size=6, route_weight=0.5, route_layers=(1,), restart_drop=1.0, drop_merge=0.0)
    cell = torch.from_numpy(cell_of_patch(12, 96))
    b = _training_batch(c, 2, build_tokenizer(), reduce=True)
    bi, start, qpos, target = b["route"]
    assert len(bi) > 0 and target.any(1).all()
    image = VOCAB.index("<image>")
    for r in range(len(bi)):
        kind, idx = b["reduce"][int(bi[r])]
        assert kind == "subset" and not target[r, len(idx):].any()
        assert int(start[r]) == int((b["input_ids"][bi[r]] == image).nonzero()[0])
        cells = set(cell[torch.tensor(idx)][target[r, : len(idx)]].tolist())
        assert len(cells) in (1, 2) and all(int(b["input_ids"][bi[r], qpos[r]]) != image for _ in cells)
    pooled = _training_batch(dataclasses.replace(c, drop_merge=1.0), 2, build_tokenizer(), reduce=True)
    assert len(pooled["route"][0]) == 0


def test_axis_rationale_decides_the_answer():
    """rationale_axis: the spatial rationale names each digit's column (left/right questions) or row
    (above/below), and the yes/no follows from those two words alone; off, it is not in the hash."""
    from tokenreduce.data.vqa import make_vqa_set
    from tokenreduce.models.vlm import VLMTrainConfig, axis_rationale, training_target
    from tokenreduce.models.vlm.targets import routing_targets as _routing_targets

    assert VLMTrainConfig().config_hash() != VLMTrainConfig(rationale_axis=False).config_hash()
    order = {"left": 0, "center": 1, "right": 2, "top": 0, "bottom": 2}
    data = make_vqa_set("train", 150, seed=3)
    spatial = [q for q in data.qas if q.qtype == "spatial"]
    assert len(spatial) > 50
    for q in spatial:
        words = training_target(q, True, axis=True).split()
        assert " ".join(words[:-2]) == axis_rationale(q) and len(words) == 7
        rel = " ".join(q.question.split()[3:-3])
        a, b = order[words[1]], order[words[4]]
        assert words[-1] == ("yes" if (a < b if rel in ("left of", "above") else a > b) else "no")
        horizontal = rel in ("left of", "right of")
        for i, (cell,) in _routing_targets(q, data.scenes[q.scene], True, axis=True):
            r, c = divmod(cell, 3)
            assert words[i] == str(data.scenes[q.scene].digits[cell])
            assert order[words[i + 1]] == (c if horizontal else r)


def test_text_relation_sequences():
    """text_relation: text-only spatial turns appended to the batch, no image tokens, trained only on the
    words text determines (copied digits, commas, yes/no, </s>), one tagged yes/no per turn, consistent
    with the rationale's positions."""
    from tokenreduce.models.vlm import VLMTrainConfig, build_tokenizer
    from tokenreduce.models.vlm.batches import training_batch as _training_batch
    from tokenreduce.models.vlm.targets import LOSS_TYPES as _LOSS_TYPES

    c = VLMTrainConfig(batch_size=2, text_relation=3, spatial_choice=False)
    b = _training_batch(c, 7, build_tokenizer())
    assert b["input_ids"].shape[0] == 5 and b["pixel_values"].shape[0] == 2
    text = b["input_ids"][2:]
    assert not (text == VOCAB.index("<image>")).any()
    rel, txt = _LOSS_TYPES.index("relation"), _LOSS_TYPES.index("text")
    cols = {"left": 0, "center": 1, "right": 2}
    rows = {"top": 0, "center": 1, "bottom": 2}
    for ids, lab, ty in zip(text.tolist(), b["labels"][2:].tolist(), b["answer_types"][2:].tolist()):
        assert ty.count(rel) == c.qa_per_image
        trained = {VOCAB[t] for t, k in zip(lab, ty) if k == txt}
        assert trained <= set("0123456789") | {",", "</s>"}
        assert {VOCAB[t] for t, k in zip(lab, ty) if k == rel} <= {"yes", "no"}
        assert all((t == -100) == (k == -1) for t, k in zip(lab, ty))
        words = [VOCAB[t] for t in ids if VOCAB[t] != "<pad>"]
        for turn in " ".join(words).split(" </s>")[:-1]:
            question, target = turn.strip().split(" answer : ")
            a_pos, b_pos, answer = (p.split()[-1] for p in target.split(" , "))
            if " left of " in question or " right of " in question:
                holds = (cols[a_pos] < cols[b_pos]) == (" left of " in question)
            else:
                holds = (rows[a_pos] < rows[b_pos]) == (" above " in question)
            assert answer == ("yes" if holds else "no")


def test_describe_order_by_value():
    """describe_order="value": a describe turn lists its regular digits by ascending value (the small digit
    last), with each digit's own place; the default keeps the generator's cell order and the hash."""
    from tokenreduce.models.vlm import VLMTrainConfig
    from tokenreduce.models.vlm.targets import ordered_description as _ordered_description

    data = make_vqa_set("train", 30, seed=2, types=("describe",))
    for qa in data.qas:
        s = data.scenes[qa.scene]
        assert _ordered_description(qa, s, "cell") == qa
        out = _ordered_description(qa, s, "value")
        parts = out.answer.split(" , ")
        regular = [p for p in parts if not p.startswith("small ")]
        assert sorted(parts) == sorted(qa.answer.split(" , "))  # the same items
        assert [int(p.split()[0]) for p in regular] == sorted(s.digits[c] for c in s.regular_cells)
        assert all(POSITION_NAMES[s.digits.index(int(p.split()[0]))] == p.split(" ", 1)[1] for p in regular)
        assert not any(p.startswith("small ") for p in parts[: len(regular)])
    with pytest.raises(ValueError, match="describe_order='row'"):
        VLMTrainConfig(describe_order="row")
    base = VLMTrainConfig()
    assert VLMTrainConfig(describe_order="cell").config_hash() == base.config_hash()
    assert VLMTrainConfig(describe_order="value").config_hash() != base.config_hash()


def test_grounding_loss_reads_tokens_through_the_word_embeddings():
    """ground_weight: the projected visual tokens, read through the input embedding matrix, name their
    digit's value (inked patches) and their cell's column and row words; tokens built from those words'
    embeddings score a low loss, shuffled ones a high one."""
    from tokenreduce.models.vlm import VLMTrainConfig
    from tokenreduce.models.vlm.losses import grounding_loss as _grounding_loss
    from tokenreduce.models.vlm.targets import patch_labels as _patch_labels

    c = VLMTrainConfig(ground_weight=0.1)
    _, scenes, ink = generate_scenes("train", 6, seed=3)
    lab = _patch_labels(scenes, ink, c)
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(len(VOCAB), 64), dim=-1) * 8
    cell = torch.from_numpy(cell_of_patch(12))
    cols, rows = ("left", "center", "right"), ("top", "center", "bottom")
    value = torch.where(lab >= 91, lab - 91, (lab - 1) % 10)
    tokens = torch.stack([torch.stack([
        emb[VOCAB.index(cols[int(cell[p]) % 3])] + emb[VOCAB.index(rows[int(cell[p]) // 3])]
        + (emb[VOCAB.index(str(int(value[b, p])))] if lab[b, p] else 0) for p in range(144)]) for b in range(6)])
    good = _grounding_loss(tokens, emb, lab, c)
    bad = _grounding_loss(tokens.flip(1), emb, lab, c)
    assert torch.isfinite(good) and good.item() < 0.2 and bad.item() > 1.0
    # gradients reach both the tokens and the embedding matrix
    t, e = tokens.clone().requires_grad_(), emb.clone().requires_grad_()
    _grounding_loss(t, e, lab, c).backward()
    assert t.grad.abs().sum() > 0 and e.grad.abs().sum() > 0
    # background-only labels: only the place terms
    assert torch.isfinite(_grounding_loss(tokens, emb, torch.zeros_like(lab), c))
    with pytest.raises(ValueError, match="ground_weight=-1"):
        VLMTrainConfig(ground_weight=-1)


def test_training_loop_end_to_end(tmp_path, monkeypatch):
    """train_small_vlm on a tiny config (2 vision + 2 joint steps, then a 2-step warm restart with
    token-reduction augmentation), every optional loss on: the checkpoint and metrics are written under the
    config's hash, each loss term is logged, and the saved model loads and answers."""
    from tokenreduce.models.vlm import (
        VLMTrainConfig,
        checkpoint_dir,
        eval_set,
        evaluate_vqa,
        load_small_vlm,
        train_small_vlm,
    )

    monkeypatch.setenv("TOKENREDUCE_CACHE", str(tmp_path))
    c = VLMTrainConfig(vision_dim=32, vision_layers=1, vision_heads=2, text_dim=32, text_layers=2, text_heads=2,
                       text_kv_heads=1, route_layers=(0, 1), vision_steps=2, vision_batch_size=4, steps=2,
                       restart_steps=2, batch_size=3, val_per_type=2, test_per_type=2, ground_weight=0.1,
                       lookup_loss=True, relation_loss=True, describe_order="value", describe_prob=1.0)
    m = train_small_vlm(c, progress=False)
    assert m["config_hash"] == c.config_hash() and m["parent"] == c.parent().config_hash()
    assert (checkpoint_dir(c) / "model.pt").is_file() and (checkpoint_dir(c.parent()) / "model.pt").is_file()
    logged = m["history"][-1]["train_loss_by_type"]
    assert {"ground", "route", "describe"} <= set(logged) and all(map(math.isfinite, logged.values()))
    assert set(m["test_acc_by_type"]) == set(QUESTION_TYPES)
    model, tok, info = load_small_vlm(config=c)
    assert info["config"] == c and model.config.text_config.hidden_size == 32
    r = evaluate_vqa(model, tok, eval_set("test", c))
    assert r["acc_by_type"] == m["test_acc_by_type"]  # the recorded test accuracy is the saved model's


def test_existence_questions_train_in_the_warm_restart_only():
    """POPE-style existence turns (``is there the digit 7 ?``): yes only for a digit in the scene, no only for
    one that is not, both answers drawn; the config trains them in the warm restart (the parent is the default
    model's parent) and is absent from the hash when off, so the default model keeps its cache folder."""
    import numpy as np

    from tokenreduce.data.existence import existence_question as reexported
    from tokenreduce.data.vqa import existence_question, generate_scenes, questions_for
    from tokenreduce.models.vlm import VLMTrainConfig
    from tokenreduce.models.vlm.batches import training_batch
    from tokenreduce.models.vlm.model import build_tokenizer
    from tokenreduce.models.vlm.targets import LOSS_TYPES

    assert reexported is existence_question and existence_question(7) == "is there the digit 7 ?"
    _, scenes, _ = generate_scenes("train", 60, seed=3)
    rng = np.random.default_rng(0)
    answers = []
    for i, s in enumerate(scenes):
        (qa,) = questions_for(s, i, rng, ("existence",))
        digit = int(qa.question.split()[-2])
        assert qa.qtype == "existence" and qa.answer == ("yes" if digit in s.present else "no")
        assert all(w in VOCAB for w in qa.question.split())
        answers.append(qa.answer)
    assert 15 < answers.count("yes") < 45
    e = VLMTrainConfig(existence=True)
    assert VLMTrainConfig().config_hash() == "0e4ba3681b" and e.config_hash() != "0e4ba3681b"
    assert e.parent() == VLMTrainConfig().parent() and VLMTrainConfig(existence=True, restart_steps=0).parent() is None
    small = {"vision_dim": 32, "vision_layers": 1, "text_dim": 32, "text_layers": 2, "route_layers": (0,),
             "text_heads": 2, "text_kv_heads": 1, "batch_size": 8}
    tok = build_tokenizer()
    ex = LOSS_TYPES.index("existence")
    with_ex = training_batch(VLMTrainConfig(**small, existence=True), 0, tok)
    without = training_batch(VLMTrainConfig(**small), 0, tok)
    assert (with_ex["answer_types"] == ex).any() and not (without["answer_types"] == ex).any()
