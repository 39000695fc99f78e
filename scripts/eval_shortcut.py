"""Shortcut evaluation: sample-level AUPRC, pixel-level TFA localisation, and `influence flag`'s detector.

For each seed and patch placement: inject 10% label flips and a bright patch on half of the shortcut class's
training images, train the demo's digits CNN with the demo recipe, build a store with tracin, gradcos and trak
(``influence.evaluation.shortcut_study`` does the work), then

- sample level: ``Influence.scores`` of up to ``--sample-queries`` patched test images that the model predicts as
  the shortcut class; average precision of "patched" per query, averaged over queries
  (``influence.evaluation.shortcut.sample_auprc``);
- pixel level: for the patched training images among the top-k proponents of a few such queries, each TFA
  method / variant's share of positive map mass inside the patch and whether the map's peak lies inside it;
- detector: ``influence.flag.flag_shortcuts(session, x_patched, y_true)``, exactly as
  ``influence flag STORE --kind shortcut --test test_patched.npz`` runs it; found = a report of the shortcut class
  with IoU >= 0.5; plus clean runs (patch_fraction=0), where any report is a false alarm.

    python scripts/eval_shortcut.py --seeds 0 1 2 --clean-seeds 0 1 2 --out runs/eval_shortcut.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from influence.evaluation.digits import TDA_METHODS
from influence.evaluation.shortcut_study import PLACEMENTS, VARIANTS, render, run_clean, run_patched


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    p.add_argument("--clean-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--sample-queries", type=int, default=40)
    p.add_argument("--pixel-queries", type=int, default=3, help="queries whose patched proponents get every TFA variant (0: skip)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--rank-method", default="gradcos", choices=TDA_METHODS, help="TDA method whose top-k get TFA maps (pixel level)")
    p.add_argument("--work", default=None, help="keep trained runs here and reuse them (default: a temp dir)")
    p.add_argument("--variants", nargs="*", default=None, help="subset of variant names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/eval_shortcut.json")
    args = p.parse_args(argv)
    variants = {v: spec for v, spec in VARIANTS.items() if args.variants is None or v in args.variants or v == "random map"}
    torch.set_num_threads(args.threads)
    results: dict = {"patched": [], "clean": [], "args": vars(args)}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        for placement in args.placements:
            for seed in args.seeds:
                r = run_patched(seed, placement, root / f"{placement}-{seed}", sample_queries=args.sample_queries,
                                pixel_queries=args.pixel_queries, k=args.k, rank_method=args.rank_method, variants=variants)
                results["patched"].append(r)
                log(f"[{time.perf_counter() - t0:.0f}s] {placement} seed {seed}: auprc {r['auprc']} detector {r['detector']}")
        for seed in args.clean_seeds:
            r = run_clean(seed, root / f"clean-{seed}")
            results["clean"].append(r)
            log(f"[{time.perf_counter() - t0:.0f}s] clean seed {seed}: {[(k, v['alarms']) for k, v in r.items() if isinstance(v, dict)]}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
