"""Every VLM method (integration point ``vlm-visual``) on tiny random-weight ``LlavaForConditionalGeneration``
models against DESIGN.md's invariants: identity at keep=1 (generate() unchanged, exact restore), batch
consistency with different prompts and ragged kept counts, a KV cache that is really smaller, exactness of
the mechanism against a masked reference computation, eager == SDPA, and clear errors."""

from __future__ import annotations

import io

import pytest
import torch

import tokenreduce as tr

METHODS = [r["name"] for r in tr.methods("vlm-visual")]
INSIDE = ["fastv", "sparsevlm", "pdrop"]
BEFORE = ["visionzip", "divprune", "hiprune", "pool", "random"]
IMG, PATCH, DEPTH = 32, 8, 6
NTOK = (IMG // PATCH) ** 2  # 16 visual tokens per image
IMAGE_ID, PAD = 3, 0
GEN = 4


def _model(attn: str = "sdpa", strategy: str = "default", feature_layer: int = -1, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    v = CLIPVisionConfig(image_size=IMG, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2)
    t = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=2, bos_token_id=1)
    n = NTOK + (1 if strategy == "full" else 0)
    c = LlavaConfig(vision_config=v, text_config=t, image_token_id=IMAGE_ID, vision_feature_layer=feature_layer,
                    vision_feature_select_strategy=strategy, image_seq_length=n)
    m = LlavaForConditionalGeneration._from_config(c, attn_implementation=attn).eval()
    m.generation_config.pad_token_id = PAD
    m.generation_config.eos_token_id = None  # always generate GEN tokens
    return m


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and the CI box is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    with tr.apply(model, name, keep=0.25, **_kw(name)) as h:
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


@pytest.mark.parametrize("name", BEFORE + ["todre"])
def test_before_llm_equals_shorter_prompt(model, name):
    """Before-the-LLM reduction == the unpatched model given the reduced features and a prompt with that
    many placeholders (what LLaVA itself would build)."""
    prompts, n_img = RAGGED
    batch = _batch(prompts, n_img)
    # todre: an attention threshold no sample falls below keeps its stage 2 from acting -> stage 1 alone
    kw = {"relevance": 1e-12} if name == "todre" else _kw(name)
    with tr.apply(model, name, keep=0.5, **kw):
        out = _gen(model, batch)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    k = feats.pooler_output[0].shape[0]
    assert k < NTOK
    short = [[t for j, t in enumerate(p) if t != IMAGE_ID or (sum(1 for x in p[:j] if x == IMAGE_ID) % NTOK) < k]
             for p in prompts]
    sb = _batch(short, n_img)
    ref = _gen(model, {"input_ids": sb["input_ids"], "attention_mask": sb["attention_mask"],
                       "mm_encoder_outputs": {"image": feats}})
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
    with tr.apply(model, "fastv", keep=0.25, layer=2) as h:
        _gen(model, batch)
    st = h.stats
    assert st.visual_tokens[:2] == [NTOK, NTOK] and all(v == 4 for v in st.visual_tokens[2:])
    assert st.kv_tokens[:2] > st.kv_tokens[2:] and len(st.stage_patches[0][0]) == 4
    assert st.reduce_seconds > 0


# ---------------------------------------------------------------------------- errors
def test_error_no_image_token(model):
    batch = _batch(*SINGLE)
    batch["input_ids"] = torch.where(batch["input_ids"] == IMAGE_ID, 7, batch["input_ids"])
    with tr.apply(model, "fastv"), pytest.raises(ValueError, match="no <image> token"):
        _gen(model, batch)


def test_error_image_count_mismatch(model):
    batch = _batch(*SINGLE)
    batch["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    with tr.apply(model, "divprune", keep=0.5), pytest.raises(ValueError, match="image count does not match"):
        _gen(model, batch)


def test_error_keep_leaves_zero_tokens(model):
    batch = _batch(*SINGLE)
    with tr.apply(model, "random", keep=0.01), pytest.raises(ValueError, match="leaves zero"):
        _gen(model, batch)


@pytest.mark.parametrize("name,kw", [("fastv", {"layer": DEPTH}), ("fastv", {"layer": 0}),
                                     ("pdrop", {"layers": [2, 99]}), ("todre", {"layer": 40})])
def test_error_layer_out_of_range(model, name, kw):
    with pytest.raises(ValueError, match="out of range"):
        tr.apply(model, name, **kw)
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
        tr.apply(model, "fastv", bogus=1)
    with pytest.raises(ValueError, match="did you mean"):
        tr.apply(model, "fastvv")


# ---------------------------------------------------------------------------- LLaVA-NeXT (anyres): same code path
def _next_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    v = CLIPVisionConfig(image_size=IMG, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2)
    t = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)
    c = LlavaNextConfig(vision_config=v, text_config=t, image_token_id=IMAGE_ID, vision_feature_layer=-1,
                        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    m = LlavaNextForConditionalGeneration._from_config(c, attn_implementation="sdpa").eval()
    m.generation_config.pad_token_id = PAD
    m.generation_config.eos_token_id = None
    return m


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
        tr.apply(m, "divprune")


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
    with tr.apply(model, name, keep=0.5, positions="keep", **kw) as h:
        out = _gen(model, batch)
        kept = h.stats.kept_patches
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
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
    with tr.apply(model, name, keep=0.5, **kw):
        comp = _gen(model, batch)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(comp.logits, out.logits))


def test_keep_positions_bad_value_and_precomputed_features(model):
    with pytest.raises(ValueError, match="positions='sideways' is invalid"):
        tr.apply(model, "random", positions="sideways")
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
