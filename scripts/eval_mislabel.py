"""Mislabel detection: self-influence AUC and recall against the injected label flips.

The demo's data and recipe: 10% of training labels flipped plus the patch shortcut (the demo's ``inject``
defaults), digits CNN trained with the demo recipe, store with tracin, gradcos and trak
(``influence.evaluation.digits.demo_store``); scores from ``Influence.self_influence``, the ranking that
``influence flag --kind mislabel`` uses. Self-influence under gradcos is 1 for every example (unit vectors), so it
is not a detector and is skipped. The final checkpoint's training loss is reported as a baseline.

    python scripts/eval_mislabel.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from influence.evaluation.digits import demo_store, inject, load_digits_split
from influence.evaluation.mislabel import mislabel_metrics

METHODS = ("tracin", "trak")


def run(seed: int, work: Path) -> dict:
    train, test = load_digits_split(seed=0)
    noisy, _, truth = inject(train, test, seed=seed)
    sess = demo_store(noisy, seed, work)
    mask = np.zeros(len(noisy), dtype=bool)
    mask[truth.flipped] = True
    scores = {m: sess.self_influence(m) for m in METHODS}
    scores["loss (final checkpoint, baseline)"] = sess.store.column("loss", sess.store.checkpoint_ids[-1], 0, sess.store.n)
    return {"seed": seed, "flipped": int(mask.sum()), "n": len(noisy),
            "metrics": {m: mislabel_metrics(s, mask) for m, s in scores.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", default=None, help="keep trained runs here and reuse them (default: a temp dir)")
    p.add_argument("--out", default="runs/eval_mislabel.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(run(seed, Path(args.work or tmp) / f"bottom-right-{seed}"))
            print(f"[{time.perf_counter() - t0:.0f}s] seed {seed}: {runs[-1]['metrics']}", file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    lines = ["| self-influence | AUC mean | AUC min | recall top 10% | recall top 20% | seeds |", "|---|---|---|---|---|---|"]
    for m in runs[0]["metrics"]:
        v = {k: [r["metrics"][m][k] for r in runs] for k in ("auc", "recall@10%", "recall@20%")}
        lines.append(f"| {m} | {np.mean(v['auc']):.3f} | {np.min(v['auc']):.3f} | {np.mean(v['recall@10%']):.3f} | "
                     f"{np.mean(v['recall@20%']):.3f} | {len(runs)} |")
    lines.append("| gradcos | - (self-influence is 1 for every example) | | | | |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
