"""Side by side with NVIDIA kvpress 0.5.5 on the same Gemma 3 270M and the same passcode prompts.

Runs in kvpress's OWN virtualenv (kvpress 0.5.5 needs transformers>=4.56,<5.3; tokenreduce needs 5.23), with
tokenreduce installed there without its dependencies (for the shared kvpress hook helper and KV byte count), and
is never imported by tokenreduce (``make peers`` builds this venv)::

    make peers                                                              # builds .venv-kvpress
    tokenreduce bench kv --parts export,agreement --out results/kv          # prompts + our kept positions
    .venv-kvpress/bin/python scripts/kvpress_compare.py --prompts results/kv/kvpress_prompts.json \
        --out results/kv/kvpress.jsonl
    tokenreduce bench kv --report-only --out results/kv                     # side-by-side tables

What it measures, with kvpress's own code paths:

* ``kvpress_passcode``: its ``KVPressTextGenerationPipeline._forward`` (context compressed under the press,
  question and answer decoded after it, logical position ids), on our tokenisation of each prompt split at the
  context boundary; presses x compression ratios, in two modes: ``all`` (what kvpress does on
  ``Gemma3ForCausalLM``: every layer hooked) and ``global`` (its ``Gemma3ForConditionalGeneration`` default:
  sliding-window layers skipped). Accuracy, real KV fraction (cache tensor bytes after the context / the same
  pipeline without a press), prefill seconds and decode tokens/s against no press in this process.
* ``kvpress_kept``: for the configurations shared with tokenreduce (``AGREEMENT`` in the prompts file), the
  positions each press keeps on the context alone, with transformers' default ``DynamicCache(config=...)``
  (sliding layers hold their last window-1 entries) — captured from the press's own ``score`` + ``topk``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

try:
    import kvpress
    import torch
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from tokenreduce.accounting.kv import kv_bytes
    from tokenreduce.bench.kv.kvpress import kvpress_global_only  # stdlib + torch only: imports in kvpress's venv
except ModuleNotFoundError as e:  # not kvpress's venv (or an incomplete one)
    sys.exit(f"{Path(__file__).name}: {sys.executable} has no module {e.name!r}: run this script with kvpress's "
             f"venv python (`make peers` builds .venv-kvpress from scripts/peers/requirements-kvpress*.txt)")

PRESSES = {  # label -> (press class, kwargs, our comparable bench variant)
    "SnapKVPress": ("SnapKVPress", {}, "snapkv"),
    "TOVAPress": ("TOVAPress", {}, "tova"),
    "KnormPress": ("KnormPress", {}, "knorm"),
    "StreamingLLMPress": ("StreamingLLMPress", {}, "streaming-llm"),
    "PyramidKVPress": ("PyramidKVPress", {}, "pyramidkv-q"),
    "RandomPress": ("RandomPress", {"seed": 0}, "random"),
}


class _Press:
    """Wraps a press so ``press(model)`` hooks all layers or only global ones."""

    def __init__(self, press, mode):
        self.press, self.mode = press, mode  # mode: "all" | "global"

    def __call__(self, model):
        return kvpress_global_only(self.press, model) if self.mode == "global" else self.press(model)


def answer_stepwise(model, tok, question_ids, cache, context_length, max_new_tokens) -> str:
    """kvpress's generate_answer, but the question enters one token per forward (same logical positions)."""
    pos = context_length
    logits = None
    for i in range(question_ids.shape[1]):
        logits = model(input_ids=question_ids[:, i: i + 1], past_key_values=cache,
                       position_ids=torch.tensor([[pos]])).logits
        pos += 1
    out = [logits[0, -1].argmax()]
    for _ in range(max_new_tokens - 1):
        logits = model(input_ids=out[-1].view(1, 1), past_key_values=cache, position_ids=torch.tensor([[pos]])).logits
        pos += 1
        out.append(logits[0, -1].argmax())
    return str(tok.decode(torch.stack(out), skip_special_tokens=True))


def split_ids(tok, prompt: dict) -> tuple[torch.Tensor, torch.Tensor]:
    full = tok(prompt["prompt"], return_tensors="pt").input_ids
    n_ctx = len(tok(prompt["context"]).input_ids)
    return full[:, :n_ctx], full[:, n_ctx:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "tokenreduce" / "gemma3-270m"))
    ap.add_argument("--keeps", default="0.75,0.5,0.25,0.1")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--modes", default="all,global")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-passcode", action="store_true")
    ap.add_argument("--skip-kept", action="store_true")
    ap.add_argument("--question-stepwise", action="store_true",
                    help="feed the question one token per forward (diagnostic: no multi-token forward on a "
                         "compressed cache, whose causal mask transformers 5.2 builds from the logical "
                         "cache_position of layer 0 against physical key indices)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = json.loads(Path(args.prompts).read_text())
    prompts = data["prompts"]
    max_new = data.get("max_new_tokens", 7)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model.generation_config.eos_token_id = []  # fixed-length answers, as on our side
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok)
    layer_types = {str(i): t for i, t in enumerate(model.config.layer_types)}
    run_id = uuid.uuid4().hex[:12]
    out = open(args.out, "a")  # noqa: SIM115 (closed at the end of main; rows flushed one by one)
    meta = {"type": "meta", "run_id": run_id, "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__")
            else "0.5.5", "transformers": __import__("transformers").__version__, "torch": torch.__version__,
            "threads": args.threads, "model": args.model}
    out.write(json.dumps(meta) + "\n")

    def write(**row):
        out.write(json.dumps({"type": "row", "run_id": run_id, **row}) + "\n")
        out.flush()

    keeps = [float(k) for k in args.keeps.split(",")]
    if not args.skip_passcode:
        # unreduced reference in this process: accuracy, KV bytes, prefill/decode time
        def run(press, p, mode):
            ctx, q = split_ids(tok, p)
            # "all": the cache KVPressTextGenerationPipeline._forward creates (no config: every layer a plain
            # DynamicLayer). "global": kvpress's Gemma 3 default (sliding layers skipped) only runs with the
            # config-aware cache generate() uses — with the pipeline's cache the masks of the uncompressed
            # sliding layers and the compressed global ones disagree in length and the forward fails.
            cache = DynamicCache(config=model.config) if mode == "global" else DynamicCache()
            t0 = time.perf_counter()
            with torch.inference_mode():
                with (press(model) if press is not None else contextlib.nullcontext()):
                    model.model(input_ids=ctx, past_key_values=cache)
                t1 = time.perf_counter()
                by = kv_bytes(cache)["tensor"]
                if args.question_stepwise:
                    answer = answer_stepwise(model, tok, q, cache, ctx.shape[1], max_new)
                else:
                    answer = pipe.generate_answer(q, cache, ctx.shape[1], max_new)
            t2 = time.perf_counter()
            return answer, by, t1 - t0, t2 - t1

        modes = args.modes.split(",")
        base = {}  # unreduced reference per cache type, in this process: accuracy, KV bytes, prefill/decode time
        for mode in modes:
            for p in prompts:
                base[(mode, p["id"])] = run(None, p, mode)
                print("none", mode, p["id"], repr(base[(mode, p["id"])][0]), flush=True)
            bm = [base[(mode, p["id"])] for p in prompts]
            n_ok = sum(p["answer"] in b[0] for p, b in zip(prompts, bm))
            write(part="kvpress_passcode", press="none",
                  layers=mode + (" (question stepwise)" if args.question_stepwise else ""), keep=1.0,
                  accuracy=n_ok / len(prompts),
                  correct=n_ok, n=len(prompts), kv_fraction=1.0, kv_bytes=sum(b[1] for b in bm) / len(bm),
                  prefill_s=sum(b[2] for b in bm) / len(bm), decode_tok_s=len(bm) * max_new / sum(b[3] for b in bm),
                  ours_variant="none")
        for label in args.presses.split(","):
            cls_name, kw, ours = PRESSES[label]
            for mode in modes:
                for keep in keeps:
                    press = _Press(getattr(kvpress, cls_name)(compression_ratio=1 - keep, **kw), mode)
                    recs, err = [], None
                    for p in prompts:
                        try:
                            ans, by, tp, td = run(press, p, mode)
                        except Exception as e:  # noqa: BLE001 (report what kvpress does, do not hide it)
                            err = f"{type(e).__name__}: {e}"
                            break
                        recs.append((p, ans, by / base[(mode, p["id"])][1], tp, td))
                    n_ok = sum(p["answer"] in a for p, a, *_ in recs)
                    row = {"part": "kvpress_passcode", "press": label,
                           "layers": mode + (" (question stepwise)" if args.question_stepwise else ""),
                           "keep": keep, "n": len(recs),
                           "correct": n_ok, "accuracy": n_ok / len(recs) if recs else None,
                           "kv_fraction": sum(r[2] for r in recs) / len(recs) if recs else None,
                           "prefill_s": sum(r[3] for r in recs) / len(recs) if recs else None,
                           "decode_tok_s": len(recs) * max_new / sum(r[4] for r in recs) if recs else None,
                           "outputs": [r[1] for r in recs], "error": err, "ours_variant": ours}
                    write(**row)
                    print(label, mode, keep, f"{n_ok}/{len(recs)}", "kv %.3f" % (row["kv_fraction"] or -1),
                          err or "", flush=True)

    if not args.skip_kept:
        keeps_a = data.get("agreement_keeps", [0.5, 0.25])
        for label, (cls_name, kw) in data["agreement"].items():
            for keep in keeps_a:
                for p in prompts:
                    press = getattr(kvpress, cls_name)(compression_ratio=1 - keep, **kw)
                    kept: dict[str, list[int]] = {}
                    orig = press.score

                    def score(module, hidden_states, keys, values, attentions, kwargs, _o=orig, press=press,
                              kept=kept):
                        s = _o(module, hidden_states, keys, values, attentions, kwargs)
                        n_keys = keys.shape[2]
                        n_kept = kvpress.utils.compute_n_kept(n_keys, press.compression_ratio)
                        idx = s.topk(n_kept, dim=-1).indices[0, 0]
                        seen = hidden_states.shape[1]  # keys are the last n_keys of the context
                        kept[str(module.layer_idx)] = sorted((idx + seen - n_keys).tolist())
                        return s

                    press.score = score
                    ctx, _ = split_ids(tok, p)
                    cache = DynamicCache(config=model.config)
                    with torch.inference_mode(), press(model):
                        model.model(input_ids=ctx, past_key_values=cache)
                    write(part="kvpress_kept", config=label, keep=keep, prompt=p["id"], kept=kept,
                          layer_types=layer_types)
            print("kept positions", label, flush=True)
    out.close()


if __name__ == "__main__":
    main()
