"""How the merging overhead of the diffusion methods scales with the denoiser's size and the batch: the
efficiency (per round, limit time / method time: about speedup / zero-overhead limit) of ``tomesd`` and
``tofu`` at one keep, on DiTs of the field's widths, timing only.

Why: on the DiT trained here (6 blocks x 96 wide, 16x16 tokens) ToMe for SD's matching, merge and unmerge cost
about 1 ms per block call inside the sampling loop, mostly per-call fixed cost, while the attention they
shorten costs a few ms; docs/diffusion.md ("Third round"). This script times the same sampling loop
(:func:`~tokenreduce.models.diffusion.sample`, DDIM, guidance 2: the batch is doubled) on

* ``trained``: the cached DiT (``tokenreduce train dit``), and
* ``<depth>x<width>/<heads>``: a random-weight DiT of the same 16x16 token grid (``DenoiserConfig``), e.g.
  ``12x384/6`` (DiT-S/2's blocks at 256 px: 16x16 tokens) and ``12x768/12`` (DiT-B/2).

Random weights are fine for timing (token counts and the matching's work do not depend on the values); no
quality is measured here. Each configuration is one interleaved group (unreduced, each method, each method's
zero-overhead limit with its achieved token counts), process CPU time, one thread, the malloc thresholds fixed
as in ``tokenreduce bench``::

    python scripts/diffusion_overhead.py --models trained,12x384/6 --batches 4,16 --steps 5 --out overhead.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from typing import Any

import torch

import tokenreduce as tr
from tokenreduce.adapters import find_adapter
from tokenreduce.bench.diffusion_cells import zero_overhead_limit
from tokenreduce.bench.timing import fixed_threads, interleaved, retain_freed_memory, speedup
from tokenreduce.models.diffusion import ClassConditional, DenoiserConfig, ddim_scheduler, load_denoiser, sample

SIZE = re.compile(r"^(\d+)x(\d+)/(\d+)$")


def build(name: str) -> ClassConditional:
    """The trained DiT, or a random-weight DiT ``<depth>x<width>/<heads>`` (seed 0)."""
    if name == "trained":
        return load_denoiser("dit", train_if_missing=False)[0]
    m = SIZE.match(name)
    if not m:
        raise ValueError(f"model {name!r}: accepted 'trained' or '<depth>x<width>/<heads>', e.g. 12x384/6")
    depth, width, heads = map(int, m.groups())
    torch.manual_seed(0)
    return ClassConditional(DenoiserConfig(kind="dit", depth=depth, width=width, heads=heads)).eval()


def group(model: ClassConditional, methods: list[str], keep: float, batch: int, steps: int, repeats: int,
          ) -> list[dict[str, Any]]:
    """One interleaved group on ``model``: the unreduced loop, each method at ``keep`` and its limit."""
    sched = ddim_scheduler(model.config, steps)
    labels = torch.arange(batch) % 10

    def loop(m: ClassConditional) -> Any:
        return lambda: sample(m, labels, steps=steps, guidance=2.0, seed=0, scheduler=sched, batch_size=batch)

    fns, handles, kept = {"none": loop(model)}, [], {}
    for method in methods:
        red = copy.deepcopy(model)
        h = tr.apply(red.net, method, keep=keep)
        with torch.no_grad():
            sample(red, labels[:1], steps=1, guidance=2.0, seed=0)  # one forward: the achieved counts
        st = h.stats
        kept[method] = sorted({int(k) for k in st.tokens_attn})
        limit = zero_overhead_limit(method, keep, {}, {"tokens_attn": st.tokens_attn, "tokens_kv": st.tokens_kv,
                                                       "tokens_mlp": st.tokens_mlp})
        lim = copy.deepcopy(model)
        handles += [h, find_adapter(lim.net).attach(lim.net, limit, "limit")]
        fns[method], fns[f"limit:{method}"] = loop(red), loop(lim)
    with torch.no_grad():
        t = interleaved(fns, warmup=1, repeats=repeats, rotate=True, clock="cpu")
    for h in handles:
        h.remove()
    rows = []
    for method in methods:
        s = speedup(t["none"], t[method], paired=True)
        lim = speedup(t["none"], t[f"limit:{method}"], paired=True)
        eff = speedup(t[f"limit:{method}"], t[method], paired=True)  # per round: limit time / method time
        rows.append({"method": method, "keep": keep, "batch": batch, "steps": steps,
                     "ms_per_image_none": t["none"].median / batch * 1e3,
                     "speedup": s.ratio, "speedup_iqr": [s.low, s.high], "limit": lim.ratio,
                     "limit_iqr": [lim.low, lim.high], "efficiency": eff.ratio, "efficiency_iqr": [eff.low, eff.high],
                     "kept_tokens": kept[method]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="trained,12x384/6", help="comma-separated: trained, <depth>x<width>/<heads>")
    ap.add_argument("--methods", default="tomesd,tofu")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--batches", default="4,16", help="images per timed loop (guidance doubles the batch)")
    ap.add_argument("--steps", type=int, default=5, help="DDIM steps per timed loop (the per-step cost is what counts)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="diffusion_overhead.jsonl")
    a = ap.parse_args()
    allocator = retain_freed_memory()
    with fixed_threads(1), open(a.out, "a") as f:
        for name in a.models.split(","):
            model = build(name)
            params = sum(p.numel() for p in model.parameters())
            for batch in map(int, a.batches.split(",")):
                t0 = time.perf_counter()
                for row in group(model, a.methods.split(","), a.keep, batch, a.steps, a.repeats):
                    row |= {"model": name, "params": params, "allocator": allocator,
                            "group_seconds": round(time.perf_counter() - t0, 1)}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"{name:>10} batch {batch:>2} {row['method']:>6} @ {a.keep}: speedup {row['speedup']:.3f} "
                          f"limit {row['limit']:.3f} efficiency {row['efficiency']:.3f} "
                          f"({row['ms_per_image_none']:.0f} ms/image unreduced)", flush=True)


if __name__ == "__main__":
    main()
