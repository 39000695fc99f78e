"""Mislabel detection on digits: every mislabel ranking of ``influence flag`` against the injected label flips.

The demo's data and recipe: 10% of training labels flipped plus the patch shortcut (the demo's ``inject``
defaults), digits CNN trained with the demo recipe, store with tracin, gradcos and trak
(``influence.evaluation.digits.demo_store``). ``--noise uniform`` flips each chosen label to a uniformly random
other class (the demo's noise); ``--noise confusable`` flips 10% of all labels along fixed confusable pairs instead
(2 → 7, 3 → 8, 5 ↔ 6, 7 → 1; ``influence.evaluation.label_noise``), drawn from the rows the patch left alone.
Rankings: ``influence.evaluation.mislabel.candidate_rankings`` (the ``--method`` choices of ``influence flag --kind
mislabel``, plus final-checkpoint self-influence and TRAK leverage × loss) and, outside the tool, the 4-fold
cross-validated confidence (1 − out-of-fold p(label); four more trainings with the demo recipe, seeds 100-103).
Self-influence under gradcos is 1 for every example (unit vectors), so it is not a detector and is skipped.

    python scripts/eval_mislabel.py --seeds 0 1 2 --noise uniform
    python scripts/eval_mislabel.py --seeds 0 1 2 --noise confusable
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from influence.evaluation.digits import ArrayDataset, demo_store, index_subset, inject, load_digits_split, train_classifier
from influence.evaluation.label_noise import DIGITS_CONFUSABLE, flip_confusable
from influence.evaluation.mislabel import candidate_rankings, mislabel_metrics
from influence.models import DigitsCNN

FOLDS = 4


def noisy_data(seed: int, noise: str) -> tuple[ArrayDataset, np.ndarray]:
    """The demo's training set with the patch and ``noise`` flips; and the flipped ids."""
    train, test = load_digits_split(seed=0)
    if noise == "uniform":
        noisy, _, truth = inject(train, test, seed=seed)
        return noisy, np.asarray(truth.flipped)
    patched, _, truth = inject(train, test, seed=seed, flip_fraction=0.0)
    y, flipped = flip_confusable(patched.y.numpy(), 0.1, DIGITS_CONFUSABLE, seed=seed, exclude=np.asarray(truth.patched))
    return ArrayDataset(patched.x, torch.as_tensor(y), patched.name), flipped


def cv_confidence(data: ArrayDataset, seed: int) -> np.ndarray:
    """1 − the out-of-fold probability of each row's given label, 4 folds, demo recipe."""
    fold = np.random.default_rng(seed).permutation(len(data)) % FOLDS
    out = np.zeros(len(data))
    for f in range(FOLDS):
        train_ids, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        model = DigitsCNN()
        torch.manual_seed(100 + f)
        train_classifier(model, index_subset(data, train_ids.tolist()), seed=100 + f)
        with torch.no_grad():
            p = model.eval()(data.x[held]).softmax(-1)
        out[held] = 1.0 - p[torch.arange(len(held)), data.y[held]].numpy()
    return out


def run(seed: int, noise: str, work: Path, cv: bool) -> dict:
    noisy, flipped = noisy_data(seed, noise)
    sess = demo_store(noisy, seed, work)
    mask = np.zeros(len(noisy), dtype=bool)
    mask[flipped] = True
    scores = candidate_rankings(sess)
    if cv:
        scores["4-fold CV confidence (baseline, 4 more trainings)"] = cv_confidence(noisy, seed)
    np.savez(work / "mislabel_scores.npz", flipped=mask, **scores)
    return {"seed": seed, "noise": noise, "flipped": int(mask.sum()), "n": len(noisy),
            "metrics": {m: mislabel_metrics(s, mask) for m, s in scores.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", choices=("uniform", "confusable"), default="uniform")
    p.add_argument("--no-cv", action="store_true", help="skip the cross-validated confidence baseline")
    p.add_argument("--work", default=None, help="keep trained runs here and reuse them (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON results (default runs/eval_mislabel_NOISE.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    runs = []
    prefix = "bottom-right" if args.noise == "uniform" else "confusable"  # uniform: the shortcut runs' stores
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs.append(run(seed, args.noise, Path(args.work or tmp) / f"{prefix}-{seed}", not args.no_cv))
            print(f"[{time.perf_counter() - t0:.0f}s] seed {seed}: {json.dumps(runs[-1]['metrics'])}", file=sys.stderr, flush=True)
    out = Path(args.out or f"runs/eval_mislabel_{args.noise}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    lines = [f"noise: {args.noise}", "| ranking | AUC mean | AUC min | recall top 10% | recall top 20% | seeds |",
             "|---|---|---|---|---|---|"]
    for m in runs[0]["metrics"]:
        v = {k: [r["metrics"][m][k] for r in runs] for k in ("auc", "recall@10%", "recall@20%")}
        lines.append(f"| {m} | {np.mean(v['auc']):.3f} | {np.min(v['auc']):.3f} | {np.mean(v['recall@10%']):.3f} | "
                     f"{np.mean(v['recall@20%']):.3f} | {len(runs)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
