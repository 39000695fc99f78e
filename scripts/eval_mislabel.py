"""Mislabel detection (METHODS.md §4-5): self-influence AUC against the injected label flips.

The demo's data and recipe: 10% of training labels flipped plus the patch shortcut (``influence.data.inject``
defaults), digits CNN trained with ``DEMO_EPOCHS`` and 3 checkpoints, store with tracin and trak. Self-influence
under gradcos is 1 for every example (unit vectors), so it is not a detector and is skipped. The final
checkpoint's training loss is reported as a baseline.

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
from sklearn.metrics import roc_auc_score

import influence
from influence.data import inject, load_digits_split
from influence.demo import DEMO_CHECKPOINTS, DEMO_EPOCHS
from influence.models import DigitsCNN
from influence.training import train_classifier

METHODS = ("tracin", "trak")


def recall_at(scores: np.ndarray, mask: np.ndarray, fraction: float) -> float:
    top = np.argsort(-scores)[: int(round(fraction * len(scores)))]
    return float(mask[top].sum() / mask.sum())


def run(seed: int, work: Path) -> dict:
    train, test = load_digits_split(seed=0)
    noisy, _, truth = inject(train, test, seed=seed)
    if not (work / "store" / "zarr.json").is_file():
        torch.manual_seed(seed)
        saved = train_classifier(DigitsCNN(), noisy, epochs=DEMO_EPOCHS, seed=seed, checkpoint_dir=work / "ckpt",
                                 checkpoints=DEMO_CHECKPOINTS)
        influence.build("digits-cnn", noisy, [str(p) for p, _ in saved], work / "store", lr_weights=[lr for _, lr in saved],
                        methods=("tracin", "gradcos", "trak"), progress=False)
    sess = influence.Influence.open(work / "store")
    mask = np.zeros(len(noisy), dtype=bool)
    mask[truth.flipped] = True
    scores = {m: sess.self_influence(m) for m in METHODS}
    last = sess.store.checkpoint_ids[-1]
    scores["loss (final checkpoint, baseline)"] = sess.store.column("loss", last, 0, sess.store.n)
    return {"seed": seed, "flipped": int(mask.sum()), "n": len(noisy), "metrics": {
        m: {"auc": float(roc_auc_score(mask, s)), "recall@10%": recall_at(s, mask, 0.10), "recall@20%": recall_at(s, mask, 0.20)}
        for m, s in scores.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
