"""Run one benchmark sweep in process and on a local two-node Ray cluster, then compare the rows cell by cell.

This is how docs/sweeps.md "Measured" was produced::

    python scripts/sweep_local_vs_ray.py --out /tmp/sweep_cmp -- bench vit --parts accuracy --threads 1
    python scripts/sweep_local_vs_ray.py --out /tmp/sweep_cmp_smoke -- bench vit --smoke

The Ray side is a ``ray.cluster_utils.Cluster`` of two raylets with ``--cpus-per-node`` CPUs each (default 1)
and one ``timing_slot`` each, reached by the benchmark through ``--address`` exactly as a real cluster would be.
Printed: wall seconds of both commands (process start to exit), the number of cells and rows, and every field
(other than provenance and timing columns) that differs between the two runs' rows of the same cell id.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Provenance and wall-clock fields: expected to differ between any two runs.
SKIP = {"origin", "cell_id", "speedup", "speedup_low", "speedup_high", "limit_speedup", "efficiency", "time_ms",
        "base_time_ms", "overhead_ms", "limit_time_ms", "time_spread", "seconds"}


def _run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def _results(out: Path) -> Path:
    found = [p for p in (out / "results.jsonl", out / "kv.jsonl") if p.exists()]
    if not found:
        raise SystemExit(f"no results.jsonl / kv.jsonl in {out}")
    return found[0]


def compare(local: Path, ray: Path) -> tuple[int, int, set[str]]:
    from tokenreduce.bench.sweep import finished_cells
    a, b = finished_cells(local), finished_cells(ray)
    if a.keys() != b.keys():
        raise SystemExit(f"different cells: {sorted(a.keys() ^ b.keys())}")
    diff: set[str] = set()
    rows = 0
    for cid in a:
        if len(a[cid]) != len(b[cid]):
            diff.add(f"<row count of cell {cid}>")
        for x, y in zip(a[cid], b[cid]):
            rows += 1
            diff |= {k for k in x.keys() | y.keys() if k not in SKIP and x.get(k) != y.get(k)}
    return len(a), rows, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for local/ and ray/ results")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the tokenreduce arguments")
    args = ap.parse_args()
    cmd = [a for a in args.command if a != "--"]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    exe = [sys.executable, "-m", "tokenreduce.cli"]
    t_local = _run([*exe, *cmd, "--executor", "local", "--out", str(out / "local")])

    from ray.cluster_utils import Cluster
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node,
                                                            "resources": {"timing_slot": 1}})
    cluster.add_node(num_cpus=args.cpus_per_node, resources={"timing_slot": 1})
    cluster.wait_for_nodes()
    t_start = time.perf_counter() - t0
    try:
        t_ray = _run([*exe, *cmd, "--executor", "ray", "--address", cluster.address, "--out", str(out / "ray")])
    finally:
        cluster.shutdown()
    cells, rows, diff = compare(_results(out / "local"), _results(out / "ray"))
    summary = {"command": " ".join(cmd), "local_s": round(t_local, 1), "ray_s": round(t_ray, 1),
               "ray_cluster_start_s": round(t_start, 1), "cells": cells, "rows": rows,
               "fields_that_differ": sorted(diff)}
    print(json.dumps(summary, indent=1))
    (out / "comparison.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
