"""What the small VLM has learned of the steps its questions need: measurements on a cached model.

1. Rationales (models trained with ``rationale=True``): for held-out spatial questions, generate the
   rationale (``3 top left , 7 center , no``) and score each named digit's cell against the scene, the share
   of named cells that hold a regular digit, and what naming a random occupied cell would score; and the
   yes/no the model writes after the *true* rationale (the relation step alone).
2. Routing: the share of the answer position's attention to visual tokens (heads averaged, and the best
   head, per LLM layer) that falls on the patches of the cell the question needs (identity: the asked cell;
   detail: the small digit's cell). A cell holds 1/9 of the patches.
3. Oracle selection (identity): accuracy when the LLM gets all 144 visual tokens, only the asked cell's 16
   (original position ids), the asked cell's and one other occupied cell's, or 16 random tokens. It tells
   reading (a digit seen alone) from finding (a cell among 144 tokens) apart.
4. Existence rationales (models trained with ``existence_rationale=True``): for held-out existence
   questions, the generated description (exactly the scene's?) and whether the final yes/no agrees with it
   (the asked digit named in it <-> ``yes``): which of the two steps the errors come from.
5. Look-up probes (``--probe``): a one-head attention probe trained on the model's fixed projected visual
   tokens (the LLM's input), its query a learned vector per digit value (value -> cell: which cell holds
   the 3?) or per cell (cell -> value: which digit is at the top left?); held-out accuracy. It tells whether
   the tokens let one attention step find a digit by its content *and* read back where it is.

    python scripts/vlm_diagnostics.py [--n 200] [--probe] [--model ~/.cache/tokenreduce/small_vlm/<v3-hash>]

The numbers quoted in ``docs/experiments/small_vlm.md`` come from this script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tokenreduce.data.vqa import POSITION_NAMES, SPECIAL_TOKENS, VOCAB, cell_of_patch
from tokenreduce.models.vlm import (
    RATIONALE_NEW_TOKENS,
    VLMTrainConfig,
    axis_rationale,
    encode_prompts,
    eval_set,
    load_small_vlm,
    parse_answer,
    prompt_format,
)


def _batch(model, tok, data, qs):
    return encode_prompts(tok, [q.question for q in qs], data.images[[q.scene for q in qs]],
                          model.config.image_seq_length, prompt=prompt_format(model))


@torch.no_grad()
def rationale_scores(model, tok, data, n: int, batch: int = 50) -> dict[str, float]:
    """Generated spatial rationales against the true ones; ``answer_given_true_rationale``: the yes/no the
    model writes after the true rationale (teacher-forced), i.e. the relation step alone. With axis
    rationales (``rationale_axis``) a part names a row or column, so the cell statistics are left out."""
    qs = data.by_type()["spatial"][:n]
    eos = SPECIAL_TOKENS["eos"]
    axis = bool(getattr(model.config, "vqa_rationale_axis", False))
    right = np.zeros(2)
    both = answer = named = occupied = forced = 0
    for i in range(0, len(qs), batch):
        chunk = qs[i : i + batch]
        b = _batch(model, tok, data, chunk)
        gen = model.generate(**b, max_new_tokens=RATIONALE_NEW_TOKENS, do_sample=False)
        true = [axis_rationale(q) if axis else q.rationale for q in chunk]
        for q, reference, row in zip(chunk, true, gen[:, b["input_ids"].shape[1]:].tolist()):
            words = [VOCAB[t] for t in row]
            words = words[: words.index(eos)] if eos in words else words
            parts, ref = " ".join(words).split(" , "), reference.split(" , ")
            ok = [len(parts) > k and parts[k] == ref[k] for k in range(2)]
            right += ok
            both += all(ok)
            answer += parse_answer(words) == q.answer
            scene = data.scenes[q.scene]
            for part in ([] if axis else parts[:2]):
                bits = part.split(" ", 1)
                if len(bits) == 2 and bits[1] in POSITION_NAMES:
                    named += 1
                    occupied += POSITION_NAMES.index(bits[1]) in scene.regular_cells
        tf = encode_prompts(tok, [q.question for q in chunk], data.images[[q.scene for q in chunk]],
                            model.config.image_seq_length, prompt=prompt_format(model),
                            answers=[t + " ," for t in true])
        last = model(**tf, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
        forced += sum(VOCAB[t] == q.answer for q, t in zip(chunk, last))
    k = len(qs)
    out = {"n": k, "first_part_right": float(right[0]) / k, "second_part_right": float(right[1]) / k,
           "both_right": both / k, "answer_right": answer / k, "answer_given_true_rationale": forced / k}
    if not axis:
        out.update(named_cells_occupied=occupied / max(1, named),
                   random_occupied_cell=float(np.mean([1 / len(data.scenes[q.scene].regular_cells) for q in qs])))
    return out


@torch.no_grad()
def existence_scores(model, tok, config, n: int, batch: int = 50) -> dict[str, float]:
    """Held-out existence questions answered after a generated description: accuracy, yes-rate, the share of
    exact descriptions (the scene's, in the trained order), the share of answers that agree with the model's
    own description, and the accuracy on the questions whose description was exact / not exact."""
    from tokenreduce.models.vlm.targets import EXISTENCE_NEW_TOKENS, ordered_description

    data = eval_set("test", config, per_type=n, types=("existence",))
    qs = data.qas
    eos = SPECIAL_TOKENS["eos"]
    right, yes, exact, agree, right_exact = [], [], [], [], []
    for i in range(0, len(qs), batch):
        chunk = qs[i: i + batch]
        b = _batch(model, tok, data, chunk)
        gen = model.generate(**b, max_new_tokens=EXISTENCE_NEW_TOKENS, do_sample=False)
        for q, row in zip(chunk, gen[:, b["input_ids"].shape[1]:].tolist()):
            words = [VOCAB[t] for t in row]
            words = words[: words.index(eos)] if eos in words else words
            answer = parse_answer(words)
            desc = " ".join(words[: len(words) - 2]) if len(words) >= 2 and words[-2] == "," else None
            s = data.scenes[q.scene]
            true = ordered_description(q, s, config.describe_order).rationale  # q.rationale: the scene's
            named = desc is not None and q.question.split()[-2] in desc.split()
            right.append(answer == q.answer)
            yes.append(answer == "yes")
            exact.append(desc == true)
            agree.append(answer == ("yes" if named else "no"))
            if desc == true:
                right_exact.append(answer == q.answer)
    wrong_desc = [r for r, e in zip(right, exact) if not e]
    return {"n": len(qs), "accuracy": float(np.mean(right)), "yes_rate": float(np.mean(yes)),
            "description_exact": float(np.mean(exact)), "answer_agrees_with_description": float(np.mean(agree)),
            "accuracy_exact_description": float(np.mean(right_exact)) if right_exact else float("nan"),
            "accuracy_other_description": float(np.mean(wrong_desc)) if wrong_desc else float("nan")}


def _asked_cell(q) -> int:
    return POSITION_NAMES.index(q.question.split("the ", 1)[1].rsplit(" ?", 1)[0])


@torch.no_grad()
def routing_shares(model, tok, data, qtype: str, n: int) -> dict[str, list[float]]:
    """Per LLM layer: the heads' mean share and the best head's share."""
    qs = data.by_type()[qtype][:n]
    grid = int(model.config.image_seq_length ** 0.5)
    cells = torch.as_tensor(cell_of_patch(grid, data.config.image_size))
    b = _batch(model, tok, data, qs)
    att = model(**b, output_attentions=True).attentions
    share = np.zeros((len(att), att[0].shape[1]))
    for i, q in enumerate(qs):
        target = _asked_cell(q) if qtype == "identity" else data.scenes[q.scene].small_cell
        vis = (b["input_ids"][i] == model.config.image_token_id).nonzero()[:, 0]
        last = int(b["attention_mask"][i].nonzero()[-1])
        for layer, a in enumerate(att):
            w = a[i, :, last, vis]  # (heads, visual)
            share[layer] += (w[:, cells == target].sum(1) / w.sum(1).clamp(min=1e-9)).numpy()
    share /= len(qs)
    return {"mean": share.mean(1).round(3).tolist(), "best_head": share.max(1).round(3).tolist()}


@torch.no_grad()
def oracle_selection(model, tok, data, n: int, seed: int = 0) -> dict[str, float]:
    """Identity accuracy (first answer token, greedy) when only the selected visual tokens reach the LLM,
    at their original position ids."""
    qs = data.by_type()["identity"][:n]
    N = model.config.image_seq_length
    cells = torch.as_tensor(cell_of_patch(int(N ** 0.5), data.config.image_size))
    img = model.config.image_token_id
    rng = np.random.default_rng(seed)
    allk = torch.arange(N)
    selectors = {
        "all": lambda c, s: allk,
        "asked_cell": lambda c, s: allk[cells == c],
        "asked_plus_one_occupied": lambda c, s: allk[(cells == c) | (cells == next(x for x in s.regular_cells if x != c))],
        "random_16": lambda c, s: torch.from_numpy(np.sort(rng.choice(N, 16, replace=False))),
    }
    batches = [_batch(model, tok, data, [q]) for q in qs]
    feats = [model.model.get_image_features(pixel_values=b["pixel_values"], return_dict=True).pooler_output[0]
             for b in batches]  # once per question, shared by the selectors
    out = {}
    for name, select in selectors.items():
        ok = 0
        for q, b, feat in zip(qs, batches, feats):
            ids = b["input_ids"][0]
            keep = select(_asked_cell(q), data.scenes[q.scene])
            f = feat[keep]
            start = int((ids == img).nonzero()[0])
            new = torch.cat([ids[:start], torch.full((len(keep),), img), ids[start + N:]])
            pos = torch.cat([torch.arange(start), start + keep, torch.arange(start + N, len(ids))])
            emb = model.get_input_embeddings()(new[None]).masked_scatter((new[None] == img)[..., None], f)
            logits = model(inputs_embeds=emb, position_ids=pos[None]).logits[0, -1]
            ok += VOCAB[int(logits.argmax())] == q.answer
        out[name] = ok / len(qs)
    return out


@torch.no_grad()
def _projected(model, split: str, n: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N, D) projected visual tokens of ``n`` fresh scenes and their (scene, value, cell) look-ups: every
    regular digit whose value is unique in its scene."""
    from tokenreduce.data.vqa import generate_scenes

    images, scenes, _ = generate_scenes(split, n, seed=7, config=config.scene)
    feats = torch.cat([torch.stack(model.model.get_image_features(pixel_values=images[i:i + 100],
                                                                 return_dict=True).pooler_output)
                       for i in range(0, n, 100)])
    pairs = [(i, s.digits[c], c) for i, s in enumerate(scenes) for c in s.regular_cells if s.digits.count(s.digits[c]) == 1]
    return feats, torch.tensor(pairs)


class _LookupProbe(torch.nn.Module):
    """One attention head over fixed visual tokens: a learned query per key class, linear keys and values."""

    def __init__(self, dim: int, n_query: int, n_out: int, hid: int = 32) -> None:
        super().__init__()
        self.query, self.key = torch.nn.Embedding(n_query, hid), torch.nn.Linear(dim, hid)
        self.value, self.head = torch.nn.Linear(dim, 64), torch.nn.Linear(64, n_out)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        a = torch.softmax((self.key(x) @ self.query(q)[:, :, None]).squeeze(-1) / self.key.out_features ** 0.5, -1)
        return self.head((a[:, :, None] * self.value(x)).sum(1))


def lookup_probes(model, config, steps: int = 600, n_train: int = 2000, n_test: int = 500, seed: int = 0
                  ) -> dict[str, list[float]]:
    """Held-out accuracy every 100 steps of a one-head attention probe (:class:`_LookupProbe`, Adam 3e-3,
    batch 128) on the model's fixed projected visual tokens, for value -> cell (query = digit value, 9
    classes, chance 1/9) and cell -> value (query = cell, 10 classes)."""
    xtr, ptr = _projected(model, "train", n_train, config)
    xte, pte = _projected(model, "test", n_test, config)
    out = {}
    for name, (qi, yi, nq, ny) in {"value_to_cell": (1, 2, 10, 9), "cell_to_value": (2, 1, 9, 10)}.items():
        torch.manual_seed(seed)
        probe = _LookupProbe(xtr.shape[-1], nq, ny)
        opt = torch.optim.Adam(probe.parameters(), 3e-3)
        curve = []
        for step in range(1, steps + 1):
            b = ptr[torch.randint(len(ptr), (128,))]
            loss = torch.nn.functional.cross_entropy(probe(xtr[b[:, 0]], b[:, qi]), b[:, yi])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0:
                with torch.no_grad():
                    acc = (probe(xte[pte[:, 0]], pte[:, qi]).argmax(-1) == pte[:, yi]).float().mean()
                curve.append(round(float(acc), 3))
        out[name] = curve
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="questions per measurement")
    ap.add_argument("--model", type=Path, default=None,
                    help="a cached checkpoint folder (default: the default config's)")
    ap.add_argument("--probe", action="store_true", help="also train the look-up probes (about 2 min)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = VLMTrainConfig.from_dict(json.loads((args.model / "config.json").read_text())) if args.model else None
    model, tok, info = load_small_vlm(config=config)
    data = eval_set("test", info["config"], per_type=max(200, args.n))
    print("model:", info["path"].parent.name)
    if args.probe:
        print("look-up probes (held-out accuracy every 100 steps):", lookup_probes(model, info["config"]))
    print("oracle selection (identity accuracy):", oracle_selection(model, tok, data, args.n))
    if getattr(model.config, "vqa_rationale", False):
        print("rationales:", rationale_scores(model, tok, data, args.n))
    if getattr(model.config, "vqa_existence", "answer") == "description":
        print("existence rationales:", existence_scores(model, tok, info["config"], args.n))
    model.set_attn_implementation("eager")
    for qtype in ("identity", "detail"):
        print(f"routing ({qtype}): share of visual attention on the needed cell per layer:",
              routing_shares(model, tok, data, qtype, min(args.n, 100)))


if __name__ == "__main__":
    main()
