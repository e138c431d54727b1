"""Train (once, cached) the small LLaVA-style VLM on digit-scene VQA; same as `tokenreduce train vlm`.

    python scripts/train_vlm.py [--steps N] [--threads 1] [--force]
"""

from __future__ import annotations

import argparse
import json

from tokenreduce.models.small_vlm import VLMTrainConfig, checkpoint_dir, train_small_vlm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=VLMTrainConfig.steps)
    ap.add_argument("--threads", type=int, default=VLMTrainConfig.num_threads)
    ap.add_argument("--force", action="store_true", help="retrain even if cached")
    a = ap.parse_args()
    c = VLMTrainConfig(steps=a.steps, num_threads=a.threads)
    done = checkpoint_dir(c) / "metrics.json"
    m = json.loads(done.read_text()) if done.is_file() and not a.force else train_small_vlm(c)
    print(json.dumps({k: m[k] for k in ("test_acc", "test_acc_by_type", "chance_by_type", "train_time_s",
                                        "checkpoint")}, indent=2))


if __name__ == "__main__":
    main()
