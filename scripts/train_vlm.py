"""Train (once, cached) the small LLaVA-style VLM on digit-scene VQA; same as `tokenreduce train vlm`.

    python scripts/train_vlm.py [--steps N] [--restart-steps N --restart-lr LR] [--threads 1] [--force]

``--restart-steps N`` continues the cached ``--steps`` model (trained first if missing) for N more joint
steps with a warm restart of the learning-rate schedule (peak ``--restart-lr``), cached under its own hash.
"""

from __future__ import annotations

import argparse
import json

from tokenreduce.models.vlm import VLMTrainConfig, checkpoint_dir, train_small_vlm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=VLMTrainConfig.steps)
    ap.add_argument("--threads", type=int, default=VLMTrainConfig.num_threads)
    ap.add_argument("--restart-steps", type=int, default=VLMTrainConfig.restart_steps)
    ap.add_argument("--restart-lr", type=float, default=VLMTrainConfig.restart_lr)
    ap.add_argument("--force", action="store_true", help="retrain even if cached")
    a = ap.parse_args()
    c = VLMTrainConfig(steps=a.steps, num_threads=a.threads, restart_steps=a.restart_steps, restart_lr=a.restart_lr)
    done = checkpoint_dir(c) / "metrics.json"
    m = json.loads(done.read_text()) if done.is_file() and not a.force else train_small_vlm(c)
    print(json.dumps({k: m[k] for k in ("test_acc", "test_acc_by_type", "chance_by_type", "train_time_s",
                                        "checkpoint")}, indent=2))


if __name__ == "__main__":
    main()
