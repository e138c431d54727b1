"""Why the small VLM fails spatial/identity questions: two measurements on the cached model.

1. Rationales (models trained with ``rationale=True``): for held-out spatial questions, generate the
   rationale (``3 top left , 7 center , no``) and score each named digit's cell against the scene, the share
   of named cells that hold a regular digit, and what naming a random occupied cell would score.
2. Routing: the share of the answer position's attention to visual tokens (heads averaged, per LLM layer)
   that falls on the patches of the cell the question needs (identity: the asked cell; detail: the small
   digit's cell). A cell holds 1/9 of the patches.

    python scripts/vlm_diagnostics.py [--n 200]

The numbers quoted in ``tokenreduce.models.small_vlm``'s docstring come from this script.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tokenreduce.data.vqa import POSITION_NAMES, SPECIAL_TOKENS, VOCAB, cell_of_patch
from tokenreduce.models.small_vlm import (
    RATIONALE_NEW_TOKENS,
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
    qs = data.by_type()["spatial"][:n]
    eos = SPECIAL_TOKENS["eos"]
    right = np.zeros(2)
    both = answer = named = occupied = 0
    for i in range(0, len(qs), batch):
        chunk = qs[i : i + batch]
        b = _batch(model, tok, data, chunk)
        gen = model.generate(**b, max_new_tokens=RATIONALE_NEW_TOKENS, do_sample=False)
        for q, row in zip(chunk, gen[:, b["input_ids"].shape[1]:].tolist()):
            words = [VOCAB[t] for t in row]
            words = words[: words.index(eos)] if eos in words else words
            parts, ref = " ".join(words).split(" , "), q.rationale.split(" , ")
            ok = [len(parts) > k and parts[k] == ref[k] for k in range(2)]
            right += ok
            both += all(ok)
            answer += parse_answer(words) == q.answer
            scene = data.scenes[q.scene]
            for part in parts[:2]:
                bits = part.split(" ", 1)
                if len(bits) == 2 and bits[1] in POSITION_NAMES:
                    named += 1
                    occupied += POSITION_NAMES.index(bits[1]) in scene.regular_cells
    k = len(qs)
    return {"n": k, "first_cell_right": float(right[0]) / k, "second_cell_right": float(right[1]) / k,
            "both_right": both / k,
            "answer_right": answer / k, "named_cells_occupied": occupied / max(1, named),
            "random_occupied_cell": float(np.mean([1 / len(data.scenes[q.scene].regular_cells) for q in qs]))}


@torch.no_grad()
def routing_shares(model, tok, data, qtype: str, n: int) -> list[float]:
    qs = data.by_type()[qtype][:n]
    grid = int(model.config.image_seq_length ** 0.5)
    cells = torch.as_tensor(cell_of_patch(grid, data.config.image_size))
    b = _batch(model, tok, data, qs)
    att = model(**b, output_attentions=True).attentions
    share = np.zeros(len(att))
    for i, q in enumerate(qs):
        if qtype == "identity":
            target = POSITION_NAMES.index(q.question.split("the ", 1)[1].rsplit(" ?", 1)[0])
        else:
            target = data.scenes[q.scene].small_cell
        vis = (b["input_ids"][i] == model.config.image_token_id).nonzero()[:, 0]
        last = int(b["attention_mask"][i].nonzero()[-1])
        for layer, a in enumerate(att):
            w = a[i, :, last, vis].mean(0)
            share[layer] += (w[cells == target].sum() / w.sum().clamp(min=1e-9)).item()
    return (share / len(qs)).round(3).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="questions per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, info = load_small_vlm()
    data = eval_set("test", info["config"], per_type=max(200, args.n))
    if getattr(model.config, "vqa_rationale", False):
        print("rationales:", rationale_scores(model, tok, data, args.n))
    model.set_attn_implementation("eager")
    for qtype in ("identity", "detail"):
        print(f"routing ({qtype}): share of visual attention on the needed cell per layer:",
              routing_shares(model, tok, data, qtype, min(args.n, 100)))


if __name__ == "__main__":
    main()
