"""Every VLM method (integration point ``vlm-visual``) on tiny random-weight ``LlavaForConditionalGeneration``
models against docs/design.md's invariants: identity at keep=1 (generate() unchanged, exact restore), batch
consistency with different prompts and ragged kept counts, a KV cache that is really smaller, exactness of
the mechanism against a masked reference computation, eager == SDPA, beam search, and clear errors; keep's
one meaning (the fraction of the visual-token work in the LLM kept) for every method, counts, presets."""

from __future__ import annotations

import functools
import io

import pytest
import torch

import tokenreduce as tr
from tests.tiny import llava, llava_next

METHODS = [r["name"] for r in tr.methods("vlm-visual")]
INSIDE = ["fastv", "sparsevlm", "pdrop"]
BEFORE = ["visionzip", "divprune", "hiprune", "pool", "random", "trim"]
IMG, PATCH, DEPTH = 32, 8, 6
NTOK = (IMG // PATCH) ** 2  # 16 visual tokens per image
IMAGE_ID, PAD = 3, 0
GEN = 4
_model = functools.partial(llava, patch=PATCH, depth=DEPTH, image_id=IMAGE_ID, pad=PAD)
_next_model = functools.partial(llava_next, patch=PATCH, depth=DEPTH, image_id=IMAGE_ID, pad=PAD)


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompt(n_images: int, pre: int, post: int, seed: int, ntok: int = NTOK) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (pre + post,), generator=g).tolist()
    return ids[:pre] + [IMAGE_ID] * (ntok * n_images) + ids[pre:]


def _batch(prompts: list[list[int]], n_images: list[int], seed: int = 0, img: int = IMG):
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD)
    am = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, L - len(p):] = torch.tensor(p)
        am[i, L - len(p):] = 1
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(sum(n_images), 3, img, img, generator=g)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": px}


def _gen(m, batch, **kw):
    with torch.no_grad():
        return m.generate(**batch, max_new_tokens=GEN, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kw)


SINGLE = ([_prompt(1, 3, 6, 1), _prompt(1, 5, 2, 2)], [1, 1])
RAGGED = ([_prompt(1, 2, 5, 3), _prompt(2, 4, 3, 4), _prompt(1, 1, 1, 5)], [1, 2, 1])


def _hooks(m) -> dict:
    return {name: (list(mod._forward_pre_hooks), list(mod._forward_hooks)) for name, mod in m.named_modules()}


def _kw(name: str) -> dict:
    return {"seed": 3} if name == "random" else {}


def _features_under(model, name: str, batch: dict, keep: float, kw: dict):
    """The image features the LLM gets under a before-the-LLM method (call with its handle active): the
    projector's output, which the method reduced; for ``trim``, which reads the prompt and so reduces after the
    projector, its own ``reduce_image`` on those (unreduced) features with each image's prompt text."""
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        if name != "trim":
            return feats
        from tokenreduce.methods.vlm import Trim

        ids, am = batch["input_ids"], batch["attention_mask"]
        vis = ids == IMAGE_ID
        owner = torch.repeat_interleave(torch.arange(ids.shape[0]), vis.sum(1) // NTOK)
        text = am.bool() & ~vis & (ids != PAD)
        emb = model.get_input_embeddings()(ids)
        pooled = feats.pooler_output
        y = pooled if isinstance(pooled, torch.Tensor) else torch.stack(list(pooled))
        out, _, _ = Trim(keep=keep, **kw).reduce_image(y, {"question": (emb[owner], text[owner])})
    feats.pooler_output = out if isinstance(pooled, torch.Tensor) else type(pooled)(out)
    return feats


# ---------------------------------------------------------------------------- registry
def test_all_methods_registered():
    assert set(METHODS) >= {"visionzip", "divprune", "hiprune", "pool", "random", "fastv", "sparsevlm", "pdrop", "todre"}
    for r in tr.methods("vlm-visual"):
        assert r["modality"] == "multimodal" and r["paper"] and r["equation"]


# ---------------------------------------------------------------------------- identity + exact restore
@pytest.mark.parametrize("name", METHODS)
def test_identity_and_restore(model, name):
    batch = _batch(*RAGGED)
    ref = _gen(model, batch)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    with tr.apply(model, name, keep=1.0, **_kw(name)) as h:
        out = _gen(model, batch)
        assert h.stats.visual_tokens[0] == pytest.approx(float(sum(RAGGED[1]) * NTOK) / 3)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # removed: no hooks, no instance attributes, same weights and serialisation
    assert _hooks(model) == hooks
    assert not any("forward" in mod.__dict__ for mod in model.modules())
    after = model.state_dict()
    assert sd.keys() == after.keys() and all(torch.equal(sd[k], after[k]) for k in sd)
    torch.save(model.state_dict(), io.BytesIO())
    assert torch.equal(_gen(model, batch).sequences, ref.sequences)


# ---------------------------------------------------------------------------- batch consistency (ragged)
@pytest.mark.parametrize("name", METHODS)
def test_batch_consistency_ragged(model, name):
    prompts, n_img = RAGGED
    batch = _batch(prompts, n_img)
    with tr.apply(model, name, keep=0.5, **_kw(name)) as h:
        out = _gen(model, batch)
        kept_batch = h.stats.stage_patches
        starts = [0, 1, 3]
        for i, p in enumerate(prompts):
            single = _batch([p], [n_img[i]])
            single["pixel_values"] = batch["pixel_values"][starts[i]: starts[i] + n_img[i]]
            o = _gen(model, single)
            assert o.sequences[0, -GEN:].tolist() == out.sequences[i, -GEN:].tolist(), (name, i)
            for a, b in zip(o.logits, out.logits):
                torch.testing.assert_close(a[0], b[i], rtol=1e-4, atol=1e-4)
            for s, stage in enumerate(h.stats.stage_patches):
                assert stage[0] == kept_batch[s][i]


# ---------------------------------------------------------------------------- the cache really shrinks
@pytest.mark.parametrize("name", METHODS)
def test_cache_is_smaller(model, name):
    batch = _batch(*SINGLE)
    full = _gen(model, batch).past_key_values
    with tr.apply(model, name, keep=0.4, **_kw(name)) as h:  # a keep every method reaches on 6 layers
        red = _gen(model, batch).past_key_values
        stats = h.stats
    lens_full = [l.keys.shape[-2] for l in full.layers]
    lens_red = [l.keys.shape[-2] for l in red.layers]
    first = 0 if name in BEFORE + ["todre"] else stats.stage_layers[0]
    assert all(r == f for r, f in zip(lens_red[:first], lens_full[:first]))
    assert all(r < f for r, f in zip(lens_red[first:], lens_full[first:])), (lens_red, lens_full)
    assert stats.kv_bytes < sum(l.keys.numel() * 8 for l in full.layers)  # keys + values, fp32
    # the visual tokens the LLM saw really dropped
    assert stats.visual_tokens[-1] < NTOK


# ---------------------------------------------------------------------------- exactness vs a masked reference
def _reference_logits(m, batch, seq, stats):
    """Re-run the whole generated sequence without tokenreduce: every layer sees all tokens, but a layer in
    stage s only attends to the keys kept at stage s (+ generated ones), with the stage's position ids.
    Pruned tokens' own outputs are irrelevant (masked as keys), so kept tokens must match exactly."""
    lm = m.model.language_model
    ids = seq
    B, T = ids.shape
    L0 = batch["input_ids"].shape[1]
    real = torch.cat([batch["attention_mask"].bool(), torch.ones(B, T - L0, dtype=torch.bool)], 1)
    with torch.no_grad():
        emb = m.model.get_input_embeddings()(ids)
        feats = torch.cat(m.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
        mask = (ids == IMAGE_ID)[..., None]
        emb = emb.masked_scatter(mask, feats)
        pos0 = (real.long().cumsum(1) - 1).clamp(min=0)
        groups = [(0, real.clone(), pos0.clone())]
        for s, layer in enumerate(stats.stage_layers):
            keys = torch.zeros(B, T, dtype=torch.bool)
            pos = torch.zeros(B, T, dtype=torch.long)
            for b in range(B):
                idx = torch.tensor(stats.stage_index[s][b])
                assert (idx >= 0).all(), "inserted tokens have no reference"
                keys[b, idx] = True
                pos[b, idx] = torch.tensor(stats.stage_positions[s][b])
                shift = pos0[b, L0 - 1] - pos[b, L0 - 1]
                pos[b, L0:] = pos0[b, L0:] - shift
            keys[:, L0:] = True
            groups.append((layer, keys, pos))
        h = emb
        tri = torch.ones(T, T, dtype=torch.bool).tril()
        for l, dec in enumerate(lm.layers):
            _, keys, pos = [g for g in groups if g[0] <= l][-1]
            allowed = tri[None] & keys[:, None, :]
            allowed |= torch.eye(T, dtype=torch.bool)[None]  # keep pruned rows finite
            m4 = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
            h = dec(h, attention_mask=m4, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
        return m.lm_head(lm.norm(h))


@pytest.mark.parametrize("name", INSIDE)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_inside_llm_matches_masked_reference(name, attn):
    m = _model(attn)
    batch = _batch(*RAGGED)
    kw = {"recycle": 0.0} if name == "sparsevlm" else {}
    with tr.apply(m, name, keep=0.5, **kw) as h:
        out = _gen(m, batch)
        stats = h.stats
    ref = _reference_logits(m, batch, out.sequences, stats)
    L0 = batch["input_ids"].shape[1]
    for t, lg in enumerate(out.logits):
        torch.testing.assert_close(lg, ref[:, L0 - 1 + t], rtol=1e-4, atol=1e-4)


def _stage1_keep(name: str) -> float:
    """A keep whose before-the-LLM stage keeps half of each image's tokens: todre's stage 1 keeps
    keep x depth / layer (its stage 2 drops every visual token from the middle layer on)."""
    return 0.25 if name == "todre" else 0.5


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("name", BEFORE + ["todre"])
def test_before_llm_equals_shorter_prompt(model, name, beams):
    """Before-the-LLM reduction == the unpatched model given the reduced features and a prompt with that
    many placeholders (what LLaVA itself would build); also with beam search (generate repeats every prompt
    and its images per beam, and reorders the cache every step)."""
    prompts, n_img = RAGGED
    batch = _batch(prompts, n_img)
    # todre: an attention threshold no sample falls below keeps its stage 2 from acting -> stage 1 alone
    kw = {"relevance": 1e-12} if name == "todre" else _kw(name)
    gkw = {"num_beams": beams, "num_return_sequences": beams} if beams > 1 else {}
    with tr.apply(model, name, keep=_stage1_keep(name), **kw):
        out = _gen(model, batch, **gkw)
        feats = _features_under(model, name, batch, _stage1_keep(name), kw)
    k = feats.pooler_output[0].shape[0]
    assert k < NTOK
    short = [[t for j, t in enumerate(p) if t != IMAGE_ID or (sum(1 for x in p[:j] if x == IMAGE_ID) % NTOK) < k]
             for p in prompts]
    sb = _batch(short, n_img)
    ref = _gen(model, {"input_ids": sb["input_ids"], "attention_mask": sb["attention_mask"],
                       "mm_encoder_outputs": {"image": feats}}, **gkw)
    assert torch.equal(out.sequences[:, -GEN:], ref.sequences[:, -GEN:])
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- attention implementations
@pytest.mark.parametrize("name", METHODS)
def test_eager_equals_sdpa(name):
    batch = _batch(*RAGGED)
    outs = []
    for attn in ("eager", "sdpa"):
        m = _model(attn)
        with tr.apply(m, name, keep=0.5, **_kw(name)):
            outs.append(_gen(m, batch))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy,layer", [("full", -1), ("default", -2)])
@pytest.mark.parametrize("name", ["visionzip", "hiprune", "fastv"])
def test_feature_layer_and_strategy_variants(name, strategy, layer):
    m = _model(strategy=strategy, feature_layer=layer)
    ntok = NTOK + (strategy == "full")
    prompts = [_prompt(1, 3, 4, 1, ntok), _prompt(1, 2, 6, 2, ntok)]
    batch = _batch(prompts, [1, 1])
    ref = _gen(m, batch)
    with tr.apply(m, name, keep=1.0):
        assert torch.equal(_gen(m, batch).sequences, ref.sequences)
    with tr.apply(m, name, keep=0.5) as h:
        _gen(m, batch)
        assert h.stats.visual_tokens[-1] < ntok


# ---------------------------------------------------------------------------- determinism, misc
def test_random_is_seeded(model):
    batch = _batch(*SINGLE)
    runs = []
    for seed in (1, 1, 2):
        with tr.apply(model, "random", keep=0.25, seed=seed) as h:
            _gen(model, batch)
            runs.append(h.stats.kept_patches)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_text_only_prompt_passes_through(model):
    ids = torch.randint(5, 40, (2, 7))
    with torch.no_grad():
        ref = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        with tr.apply(model, "fastv", keep=0.25):
            out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(ref, out)


def test_stats_report_reduction(model):
    batch = _batch(*SINGLE)
    with tr.apply(model, "fastv", keep=tr.Keep([0.25]), layer=2) as h:  # FastV's own 1 - R from layer K=2
        _gen(model, batch)
    st = h.stats
    assert st.visual_tokens[:2] == [NTOK, NTOK] and all(v == 4 for v in st.visual_tokens[2:])
    assert st.keep is None and st.keep_achieved == pytest.approx((2 * NTOK + 4 * 4) / (DEPTH * NTOK))
    assert st.kv_tokens[:2] > st.kv_tokens[2:] and len(st.stage_patches[0][0]) == 4
    assert st.reduce_seconds > 0


# ---------------------------------------------------------------------------- errors
def test_error_no_image_token(model):
    batch = _batch(*SINGLE)
    batch["input_ids"] = torch.where(batch["input_ids"] == IMAGE_ID, 7, batch["input_ids"])
    with tr.apply(model, "fastv", keep=0.5), pytest.raises(ValueError, match="no <image> token"):
        _gen(model, batch)


def test_error_image_count_mismatch(model):
    batch = _batch(*SINGLE)
    batch["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    with tr.apply(model, "divprune", keep=0.5), pytest.raises(ValueError, match="image count does not match"):
        _gen(model, batch)


def test_error_keep_leaves_zero_tokens(model):
    with pytest.raises(ValueError, match="leaves zero of an image's 16 visual tokens; accepted: keep >= 0.0312"):
        tr.apply(model, "random", keep=0.01)  # refused at apply: the model's tokens per image are known
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name,kw", [("fastv", {"layer": DEPTH}), ("fastv", {"layer": 0}),
                                     ("pdrop", {"layers": [2, 99]}), ("todre", {"layer": 40})])
def test_error_layer_out_of_range(model, name, kw):
    with pytest.raises(ValueError, match="out of range"):
        tr.apply(model, name, keep=0.5, **kw)
    assert not any(m._forward_pre_hooks for m in model.modules())  # nothing left patched (HF adds none pre)


def test_error_labels_and_static_cache(model):
    batch = _batch(*SINGLE)
    with tr.apply(model, "fastv", keep=0.5):
        with pytest.raises(ValueError, match="labels"):
            model(**batch, labels=batch["input_ids"])
        with pytest.raises(ValueError, match="StaticCache"):
            model.generate(**batch, max_new_tokens=2, cache_implementation="static")


def test_error_bad_keep_and_kwargs(model):
    with pytest.raises(ValueError, match="out of range"):
        tr.apply(model, "fastv", keep=1.5)
    with pytest.raises(TypeError, match="accepted keywords"):
        tr.apply(model, "fastv", keep=0.5, bogus=1)
    with pytest.raises(ValueError, match="did you mean"):
        tr.apply(model, "fastvv")


# ---------------------------------------------------------------------------- LLaVA-NeXT (anyres): same code path
@pytest.mark.parametrize("name", INSIDE)
def test_llava_next_inside_llm(name):
    m = _next_model()
    px = torch.randn(2, 5, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[64, 64], [32, 64]])
    with torch.no_grad():
        n = [f.shape[0] for f in m.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output]
    prompts = [_prompt(1, 2, 5, 7, n[0]), _prompt(1, 3, 2, 8, n[1])]
    batch = {**_batch(prompts, [1, 1]), "pixel_values": px, "image_sizes": sizes}
    ref = _gen(m, batch)
    with tr.apply(m, name, keep=1.0):
        assert torch.equal(_gen(m, batch).sequences, ref.sequences)
    with tr.apply(m, name, keep=0.5) as h:
        out = _gen(m, batch)
        single = {**_batch(prompts[1:], [1]), "pixel_values": px[1:], "image_sizes": sizes[1:]}
        o1 = _gen(m, single)
    assert o1.sequences[0, -GEN:].tolist() == out.sequences[1, -GEN:].tolist()
    assert h.stats.kv_tokens[-1] < ref.past_key_values.layers[-1].keys.shape[-2]
    with pytest.raises(ValueError, match="one patch grid"):
        tr.apply(m, "divprune", keep=0.5)


# ---------------------------------------------------------------------------- positions="keep" before the LLM
def _greedy_reference(m, ids, am, pos, feats, steps):
    """Greedy decoding without tokenreduce and without a cache: the whole sequence every step, with explicit
    position ids (the prompt's, then +1 per generated token)."""
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            lg = m(input_ids=ids, attention_mask=am, position_ids=pos, mm_encoder_outputs={"image": feats}).logits[:, -1]
            logits.append(lg)
            nxt = lg.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return ids, logits


@pytest.mark.parametrize("name", BEFORE + ["todre"])
def test_before_llm_keep_positions(model, name):
    """positions="keep": each kept token sits in its source patch's placeholder slot with that slot's
    position id, the text after the image keeps its ids, in prefill and decoding (ragged batch) — equal to
    the unpatched model fed the reduced features with those placeholders and position ids."""
    prompts, n_img = RAGGED
    batch = _batch(prompts, n_img)
    kw = {"relevance": 1e-12} if name == "todre" else _kw(name)  # todre: stage 1 alone (see above)
    kw = {"aggregate": False} if name == "trim" else kw  # the aggregate token has no patch to keep
    with tr.apply(model, name, keep=_stage1_keep(name), positions="keep", **kw) as h:
        out = _gen(model, batch)
        kept = h.stats.kept_patches
        feats = _features_under(model, name, batch, _stage1_keep(name), {**kw, "positions": "keep"})
    ids, am = batch["input_ids"], batch["attention_mask"]
    B, L = ids.shape
    pos_full = (am.cumsum(1) - 1).clamp(min=0)
    rows, poss = [], []
    for b in range(B):
        slots = {s for img in kept[b] for s in img}
        keep_b, seen = [], 0
        for j in range(L):
            if ids[b, j] == IMAGE_ID:
                keep_b.append(seen % NTOK in set(kept[b][seen // NTOK]))
                seen += 1
            else:
                keep_b.append(True)
        assert slots and all(0 <= s < NTOK for s in slots)
        sel = torch.tensor(keep_b)
        rows.append((ids[b][sel], am[b][sel]))
        poss.append(pos_full[b][sel])
    L2 = max(len(r[0]) for r in rows)
    ids2 = torch.full((B, L2), PAD)
    am2 = torch.zeros((B, L2), dtype=torch.long)
    pos2 = torch.ones((B, L2), dtype=torch.long)
    for b, ((i, a), p) in enumerate(zip(rows, poss)):
        ids2[b, L2 - len(i):], am2[b, L2 - len(i):], pos2[b, L2 - len(i):] = i, a, p
    seq, logits = _greedy_reference(model, ids2, am2, pos2, feats, GEN)
    assert torch.equal(out.sequences[:, -GEN:], seq[:, -GEN:])
    for a, b in zip(out.logits, logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and differs from the compact layout (the ids really are the unreduced prompt's)
    with tr.apply(model, name, keep=_stage1_keep(name), **kw):
        comp = _gen(model, batch)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(comp.logits, out.logits))


def test_keep_positions_bad_value_and_precomputed_features(model):
    with pytest.raises(ValueError, match="positions='sideways' is invalid"):
        tr.apply(model, "random", keep=0.5, positions="sideways")
    batch = _batch(*SINGLE)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    with tr.apply(model, "random", keep=1.0, positions="keep"):  # identity: nothing to place
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_encoder_outputs={"image": feats})
    with tr.apply(model, "random", keep=0.5, positions="keep"), pytest.raises(ValueError, match="source patches"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_encoder_outputs={"image": feats})


# ---------------------------------------------------------------------------- position-coding projector
@pytest.mark.parametrize("name", ["random", "hiprune", "visionzip"])
def test_pre_projector_reduction_keeps_each_tokens_position_code(name):
    """A projector that adds a per-patch position embedding (the small VLM's GridPositionProjector) gets the
    source patch of every token a before-the-projector method keeps: a kept (unmerged) token's projected
    feature is exactly the full image's projected token of the same patch, position included; without the
    source patches the projector would refuse the shorter input."""
    from tokenreduce.models.vlm import GridPositionProjector

    m = _model(seed=1)
    proj = GridPositionProjector(m.config, IMG // PATCH, scale=1.0)
    m.model.multi_modal_projector = proj
    batch = _batch(*RAGGED)
    with torch.no_grad():
        full = m.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
        with pytest.raises(ValueError, match="source_patches"):
            proj(torch.zeros(1, NTOK - 1, 32))
        with tr.apply(m, name, keep=0.5, **_kw(name)):
            red = m.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
            out = _gen(m, batch)
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + GEN
    exact = 0
    for f, r in zip(full, red):
        assert r.shape[0] < NTOK
        d = torch.cdist(r, f)  # (kept, all): a kept patch matches its own row only
        exact += int((d.min(1).values < 1e-4).sum())
        if name != "visionzip":  # pure selection: every kept token is a full token, in patch order
            idx = d.argmin(1)
            assert (d.min(1).values < 1e-4).all() and (idx.diff() > 0).all()
    assert exact > 0


# ---------------------------------------------------------------------------- beam search, batch operations
@pytest.mark.parametrize("name", METHODS)
def test_beam_search_identity(model, name):
    """keep=1.0 with beam search (and several returned sequences): the unreduced model's beams."""
    batch = _batch(*RAGGED)
    gkw = {"num_beams": 2, "num_return_sequences": 2, "output_scores": True}
    ref = _gen(model, batch, **gkw)
    with tr.apply(model, name, keep=1.0, **_kw(name)):
        out = _gen(model, batch, **gkw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions", ["compact", "keep"])
@pytest.mark.parametrize("name", METHODS)
def test_beam_search_batch_equals_single(model, name, positions):
    """At keep 0.5 (todre: its stage 1 keeps half), beam search on a ragged batch gives every prompt the beams
    it gets alone."""
    if positions == "keep" and name not in BEFORE + ["todre"]:
        pytest.skip("positions is a keyword of the before-the-LLM methods")
    prompts, n_img = RAGGED
    batch = _batch(prompts, n_img)
    gkw = {"num_beams": 2, "num_return_sequences": 2, "output_scores": True}
    kw = {**_kw(name), **({"positions": positions} if name in BEFORE + ["todre"] else {})}
    if name == "trim" and positions == "keep":
        kw["aggregate"] = False  # the aggregate token has no patch to keep
    with tr.apply(model, name, keep=_stage1_keep(name), **kw):
        out = _gen(model, batch, **gkw)
        starts = [0, 1, 3]
        for i, p in enumerate(prompts):
            single = _batch([p], [n_img[i]])
            single["pixel_values"] = batch["pixel_values"][starts[i]: starts[i] + n_img[i]]
            o = _gen(model, single, **gkw)
            assert o.sequences[:, -GEN:].tolist() == out.sequences[2 * i: 2 * i + 2, -GEN:].tolist(), (name, i)
            torch.testing.assert_close(o.sequences_scores, out.sequences_scores[2 * i: 2 * i + 2], rtol=1e-4,
                                       atol=1e-4)


def _decode_step(m, batch, rows=None, op=None):
    """Prefill ``batch``, apply the cache operation ``op`` (to the cache, as a decoder would), then one greedy
    decode step for the batch rows ``rows``: that step's logits."""
    with torch.no_grad():
        out = m(**batch, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        am = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        if op is not None:
            op(cache)
        if rows is not None:
            nxt, am = nxt[rows], am[rows]
        return m(input_ids=nxt, attention_mask=am, past_key_values=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("name", ["random", "fastv", "sparsevlm", "todre"])
def test_decode_plan_follows_the_caches_batch_operations(model, name):
    """The per-row masks and position shifts of the decode plan move with the cache's rows: a reordering
    across samples (beam search reorders within one; any permutation must hold) and a batch expansion."""
    batch = _batch(*RAGGED)
    with tr.apply(model, name, keep=_stage1_keep(name), **_kw(name)):
        ref = _decode_step(model, batch)
        perm = torch.tensor([2, 0, 1])
        got = _decode_step(model, batch, perm, lambda c: c.reorder_cache(perm))
        torch.testing.assert_close(got, ref[perm], rtol=1e-5, atol=1e-5)
        rep = torch.arange(3).repeat_interleave(2)
        got = _decode_step(model, batch, rep, lambda c: c.batch_repeat_interleave(2))
        torch.testing.assert_close(got, ref[rep], rtol=1e-5, atol=1e-5)
        sel = torch.tensor([1, 2])
        got = _decode_step(model, batch, sel, lambda c: c.batch_select_indices(sel))
        torch.testing.assert_close(got, ref[sel], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("name", ["random", "fastv"])
def test_non_finite_inputs_are_refused(model, name, keep):
    """NaN/Inf pixel values or input embeddings are refused, as by the ViT adapter (also at keep=1.0)."""
    batch = _batch(*SINGLE)
    batch["pixel_values"][1, 0, 3, 4] = float("nan")
    emb = model.get_input_embeddings()(batch["input_ids"]).detach()
    emb[0, -1, 0] = float("inf")
    with tr.apply(model, name, keep=keep):
        with pytest.raises(ValueError, match=r"^pixel_values contains 1 NaN/Inf values; token reduction needs finite"):
            model(**batch)
        with pytest.raises(ValueError, match=r"pixel_values contains \d+ NaN/Inf values; token reduction needs"):
            model.generate(**batch, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"^inputs_embeds contains 1 NaN/Inf values; token reduction needs"):
            model(inputs_embeds=emb, attention_mask=batch["attention_mask"])
    model(**_batch(*SINGLE))  # removed: the unpatched model is untouched


# ---------------------------------------------------------------------------- keep: one meaning
BIG = 64  # an 8x8 patch grid: 64 visual tokens per image, fine enough for every schedule to land near keep
NBIG = (BIG // PATCH) ** 2


@pytest.fixture(scope="module")
def big_model():
    return _model(img=BIG)


@pytest.mark.parametrize("keep", [0.5, 0.4])
def test_keep_means_the_same_work_for_every_method(big_model, keep):
    """keep = the fraction of the visual-token work in the LLM kept: every method lands within a few points
    of it (ragged images per sample), keep_achieved is what its own per-layer counts say and what it
    planned, and methods at the same keep land close to each other."""
    n_img = [1, 2, 1]
    prompts = [_prompt(n, 2 + i, 3, i, NBIG) for i, n in enumerate(n_img)]
    batch = _batch(prompts, n_img, img=BIG)
    achieved = {}
    for name in METHODS:
        with tr.apply(big_model, name, keep=keep, **_kw(name)) as h, torch.no_grad():
            big_model(**batch, use_cache=True)
        st = h.stats
        assert st.keep == keep and st.visual_unreduced == pytest.approx(NBIG * 4 / 3)
        assert st.keep_achieved == pytest.approx(sum(st.visual_tokens) / (DEPTH * st.visual_unreduced), abs=1e-9)
        planned = sum(h.method.planned_work(n * NBIG) * n for n in n_img) / sum(n_img)
        assert st.keep_achieved == pytest.approx(planned, abs=1e-6), name
        assert abs(st.keep_achieved - keep) <= 0.035, (name, st.keep_achieved)
        achieved[name] = st.keep_achieved
    assert max(achieved.values()) - min(achieved.values()) <= 0.06, achieved


def test_unreachable_keeps_name_the_range(model):
    """A schedule that cannot reach a keep says so at tr.apply, with the reachable range (6 layers, 16 tokens)."""
    with pytest.raises(ValueError, match=r"^fastv: keep=0.1 is below the least visual-token work it can keep "
                                         r"\(0.219: layer 0 \(of 6\) processes every visual token.*accepted: keep "
                                         r"in \[0.219, 1\]"):
        tr.apply(model, "fastv", keep=0.1)  # K = 2 of 32 scaled to 6 layers: K = 1
    with pytest.raises(ValueError, match=r"layers 0-1 \(of 6\) process every visual token.*an earlier layer= "
                                         r"reaches less\); accepted: keep in \[0.375, 1\]"):
        tr.apply(model, "fastv", keep=0.3, layer=2)
    with pytest.raises(ValueError, match=r"^todre: keep=0.6 is above the most visual-token work it can keep \(0.500: "
                                         r"every visual token is dropped from layer 3 of 6.*accepted: keep in "
                                         r"\(0, 0.500\] or 1.0"):
        tr.apply(model, "todre", keep=0.6)
    with pytest.raises(ValueError, match=r"^pdrop: keep=0.25 is below .*accepted: keep in \[0.375, 1\]"):
        tr.apply(model, "pdrop", keep=0.25)
    with pytest.raises(ValueError, match=r"^todre: keep=0.01 leaves zero of an image's 16 visual tokens in stage 1 "
                                         r"\(it keeps keep x 6/3 of them\); accepted: keep >= 0.0156"):
        tr.apply(model, "todre", keep=0.01)
    assert not any(m._forward_pre_hooks for m in model.modules())  # nothing left patched
    for name, kw in (("fastv", {"keep": 0.3}), ("todre", {"keep": 0.75, "layer": 5}), ("todre", {"keep": 1.0})):
        tr.apply(model, name, **kw).remove()


def test_pdrop_never_leaves_an_image_without_visual_tokens(model):
    """PDrop's old per-stage lambda = keep = 0.25 ended with round(16 x 0.25^3) = 0 visual tokens; now no
    stage leaves fewer than one per image, and the stats say when that floor binds."""
    batch = _batch(*RAGGED)
    with tr.apply(model, "pdrop", keep=0.21, layers=[1, 2, 3]) as h:  # the least it can keep: 0.219
        _gen(model, batch)
    st = h.stats
    for stage in st.stage_patches:
        assert [len(s) for s in stage] == [1, 2, 1]  # one per image
    assert st.keep_achieved == pytest.approx((NTOK + 5) / (DEPTH * NTOK))
    assert any("keeps 0.219" in n for n in st.notes) and any("never fewer than one per image" in n for n in st.notes)
    with tr.apply(model, "pdrop", keep=tr.Keep([0.25, 0.0625, 0.015625])) as h:  # lambda 0.25 in its own terms
        _gen(model, batch)
    assert [len(s) for s in h.stats.stage_patches[-1]] == [1, 2, 1]
    assert any("stage 2 (layer 4) keeps 1 of 16 visual tokens" in n for n in h.stats.notes)


@pytest.mark.parametrize("name", BEFORE + ["todre"])
def test_count_is_visual_tokens_per_image(model, name):
    batch = _batch(*RAGGED)
    with tr.apply(model, name, keep=tr.Keep(count=4), **_kw(name)) as h:
        _gen(model, batch)
    st = h.stats
    assert [len(img) for sample in st.kept_patches for img in sample] == [4, 4, 4, 4]
    assert st.keep is None and st.keep_achieved == pytest.approx(4 / NTOK * (0.5 if name == "todre" else 1.0))
    with pytest.raises(ValueError, match=r"Keep\(count=17\) visual tokens per image is more than the 16 an image "
                                         r"has \(accepted: 1..16\)"):
        tr.apply(model, name, keep=tr.Keep(count=17))


def test_pool_count_not_on_a_grid_says_so(model):
    with tr.apply(model, "pool", keep=tr.Keep(count=8)) as h:
        _gen(model, _batch(*SINGLE))
    assert [len(i) for s in h.stats.kept_patches for i in s] == [9, 9]  # 4x4 -> 3x3 keeps the aspect ratio
    assert h.stats.notes == ["pool: Keep(count=8) pools each image to the nearest grid, 9 cells"]


@pytest.mark.parametrize("name", INSIDE)
def test_count_is_refused_inside_the_llm(model, name):
    with pytest.raises(TypeError, match=rf"^{name}: tr.Keep\(count=4\) has no meaning here \({name} prunes a "
                                        r"sample's visual tokens together.*or tr.Keep\(\[...\]\)"):
        tr.apply(model, name, keep=tr.Keep(count=4))


@pytest.mark.parametrize("name", METHODS)
def test_plain_int_keep_is_refused(model, name):
    with pytest.raises(TypeError, match=r"keep=1: a plain int is ambiguous .*1.0 keeps everything.*"
                                        r"tr.Keep\(count=1\)"):
        tr.apply(model, name, keep=1)
    with pytest.raises(TypeError, match=r"keep=4: a plain int is ambiguous .*tr.Keep\(count=4\)"):
        tr.apply(model, name, keep=4)


def test_keep_is_required_and_other_budgets_refused(model):
    with pytest.raises(TypeError, match=r"visionzip: keep is required: fraction of the visual-token work in the LLM "
                                        r"kept.*or a preset that sets one \(paper\)"):
        tr.apply(model, "visionzip")
    with pytest.raises(TypeError, match="random: keep is required"):
        tr.apply(model, "random")
    with pytest.raises(TypeError, match=r"visionzip: a keep schedule Keep\(\(0.5,\)\) has no meaning here"):
        tr.apply(model, "visionzip", keep=tr.Keep([0.5]))
    with pytest.raises(TypeError, match=r"fastv: Keep\(threshold=0.1, min_keep=1\) is not accepted"):
        tr.apply(model, "fastv", keep=tr.Keep(threshold=0.1))
    with pytest.raises(ValueError, match=r"fastv: the keep schedule Keep\(\(0.5, 0.25\)\) has 2 stages but the "
                                         r"method prunes at 1 layers \[1\]"):
        tr.apply(model, "fastv", keep=tr.Keep([0.5, 0.25]))


#: visual tokens entering each of the 6 layers with preset "paper", one 16-token image per sample
PAPER = {
    "visionzip": [2] * 6,  # 64/576 of 16
    "divprune": [2] * 6,  # 0.098 of 16
    "hiprune": [5] * 6,  # 192/576 of 16
    "fastv": [16] + [8] * 5,  # R = 50% from layer K = 1 (2 of 32 scaled)
    "pdrop": [16, 16, 8, 4, 2, 2],  # lambda = 0.5 at layers 2, 3, 4
    "sparsevlm": [16, 3, 2, 2, 2, 2],  # 2, 1, 1 selected (66, 30, 17 of 576; floor 1) + 1 merged recycled each
    "todre": [2, 2, 2, 0, 0, 0],  # stage 1: 0.1 of 16; stage 2 from the middle layer
}


@pytest.mark.parametrize("name", METHODS)
def test_paper_preset(model, name):
    """The budgets that used to apply when keep was left out are the documented preset "paper"."""
    presets = next(r for r in tr.methods("vlm-visual") if r["name"] == name)["presets"]
    if name not in PAPER:  # baselines have no paper
        assert presets == {}
        with pytest.raises(ValueError, match=rf"{name}: unknown preset 'paper'; presets: none"):
            tr.apply(model, name, preset="paper")
        return
    assert set(presets) == {"paper"} and "keep" in presets["paper"]
    with tr.apply(model, name, preset="paper") as h:
        _gen(model, _batch(*SINGLE))
    st = h.stats
    assert st.visual_tokens == PAPER[name]
    assert st.keep == (presets["paper"]["keep"] if isinstance(presets["paper"]["keep"], float) else None)
    assert st.keep_achieved == pytest.approx(sum(PAPER[name]) / (DEPTH * NTOK))
    with tr.apply(model, name, keep=0.5, preset="paper") as h:  # an explicit keep wins over the preset's
        _gen(model, _batch(*SINGLE))
    assert h.stats.keep == 0.5


# ---------------------------------------------------------------------------- the benchmark checks its plan first
def test_bench_vlm_checks_methods_keeps_and_presets_before_loading_a_model(monkeypatch, tmp_path, capsys):
    """Method names, keeps and presets are checked before a model loads or a file is written; on the command
    line the error is one line and exit code 2."""
    import sys

    import tokenreduce.models.vlm as small_vlm
    from tokenreduce import cli
    from tokenreduce.bench.vlm import run_vlm_bench

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the plan was checked")

    monkeypatch.setattr(small_vlm, "load_small_vlm", no_model)
    names = "divprune, fastv, hiprune, pdrop, pool, random, sparsevlm, todre, trim, visionzip"
    for kw, msg in (
        ({"methods": ["fastvv"]}, (rf"^methods: unknown method 'fastvv' \(did you mean 'fastv'\?\) at vlm-visual; "
                                   rf"accepted: {names}$")),
        ({"methods": []}, r"^methods: give at least one method"),
        ({"keeps": [0.5, 2]}, r"^keeps 2=2.0 is out of range: a fraction must be a float in \(0, 1\]"),
        ({"keeps": ["abc"]}, r"^keeps: 'abc' is not a number"),
        ({"presets": ["papr"]}, r"^presets: unknown preset 'papr' \(did you mean 'paper'\?\) for .*; accepted: paper$"),
        ({"methods": ["pool", "random"], "presets": ["paper"]}, r"accepted: none$"),
        ({"keeps": [], "presets": []}, r"^keeps: give at least one keep"),
        ({"parts": "speed"}, r"^parts: 'speed' is not accepted"),
    ):
        with pytest.raises(ValueError, match=msg):
            run_vlm_bench(out=str(tmp_path / "out"), **kw)
    for args, msg in ((["--keep", "1.0,abc"], "--keep: 'abc' is not a number"),
                      (["--methods", "fastv,tomee"], "unknown method 'tomee'"),
                      (["--keep", "0.5", "--presets", "papr"], "unknown preset 'papr'")):
        old, sys.argv = sys.argv, ["tokenreduce", "bench", "vlm", *args, "--out", str(tmp_path / "out")]
        try:
            with pytest.raises(SystemExit) as e:
                cli.main()
        finally:
            sys.argv = old
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert not (tmp_path / "out").exists()


def test_bench_vlm_rows_record_keep_and_keep_achieved(tmp_path):
    """Every row records the requested keep and what ran (keep_achieved); a keep out of a method's reach is an
    error row saying so; presets are extra rows (with the preset's own keep when it is a fraction)."""
    from tokenreduce.bench.results import read_results
    from tokenreduce.bench.sweep import METADATA_FIELDS
    from tokenreduce.bench.vlm import run_vlm_bench
    from tokenreduce.models.vlm import VLMTrainConfig, build_small_vlm, build_tokenizer, eval_set

    c = VLMTrainConfig(vision_dim=32, vision_layers=2, text_dim=32, text_layers=4, route_layers=(0,), text_heads=2,
                       text_kv_heads=1, stem_channels=0)
    torch.manual_seed(0)
    m, tok = build_small_vlm(c), build_tokenizer()
    rows = run_vlm_bench(methods=["fastv", "pool"], keeps=[0.5, 0.1], presets=["paper"],
                         out=str(tmp_path), per_type=1, model=m, tokenizer=tok, data=eval_set("test", c, per_type=1),
                         eval_batch=10, time_batch=2, gen_tokens=2, progress=False, parts="accuracy")
    assert all("keep" in r and "keep_achieved" in r for r in rows)
    by = {(r["method"], r["keep"], r.get("preset")): r for r in rows}
    assert len(by) == len(rows) == 1 + 2 * 2 + 1  # none; 2 methods x 2 keeps; fastv's "paper" (pool has none)
    for (method, keep, preset), r in by.items():
        if "error" in r:
            assert (method, keep) == ("fastv", 0.1) and r["keep_achieved"] is None
            assert "fastv: keep=0.1 is below the least visual-token work it can keep" in r["error"]
        elif preset is None:
            assert abs(r["keep_achieved"] - keep) <= 0.035, r
    assert by["fastv", None, "paper"]["keep_spec"] == "Keep((0.5,))" and by["fastv", None, "paper"]["keep_achieved"]
    _, written = read_results(tmp_path / "results.jsonl")  # the file adds each row's cell id and origin
    assert sorted(str({k: v for k, v in r.items() if k not in ("run_id", "type", *METADATA_FIELDS)}) for r in written) \
        == sorted(map(str, rows))
