"""Shortcut evaluation: sample-level AUPRC, pixel-level TFA localisation, and `influence flag`'s detector.

For each seed and patch placement: inject 10% label flips and a bright patch on half of the shortcut class's
training images, train the demo's digits CNN with the demo recipe, build a store with tracin, gradcos and trak
(``influence.evaluation.digits.demo_store``), then

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

import numpy as np
import torch

from influence.evaluation.digits import TDA_METHODS, accuracy, demo_store, inject, load_digits_split, predict
from influence.evaluation.pixel import mass_in_box, peak_in_box
from influence.evaluation.shortcut import match_shortcuts, sample_auprc, top_k_share
from influence.flag import flag_shortcuts
from influence.tfa import get_tfa

PLACEMENTS = {"bottom-right": (12, 12, 15, 15), "top-left": (1, 1, 4, 4)}
# name -> (TFA method, options); "random" is a uniform random map
VARIANTS: dict[str, tuple[str, dict]] = {
    "two_step (input×grad of logit)": ("two_step", {"method": "input_x_gradient"}),
    "two_step (IG of logit, 16 steps; default)": ("two_step", {}),
    "gradcos (plain gradient)": ("gradcos", {}),
    "gradcos input×grad (= positive part)": ("gradcos", {"input_x_gradient": True}),
    "gradcos SmoothGrad×input (n=4)": ("gradcos", {"smooth": 4, "input_x_gradient": True}),
    "gradcos path-integrated (4 steps)": ("gradcos", {"steps": 4}),
    "gradcos_two_step (gradcos input×grad × two_step)": ("gradcos_two_step", {}),
    "occlusion zero, dot": ("occlusion", {"baseline": "zero"}),
    "occlusion blur, dot": ("occlusion", {"baseline": "blur"}),
    "occlusion mean, cos": ("occlusion", {"baseline": "mean", "score": "cos"}),
    "occlusion blur, cos": ("occlusion", {"baseline": "blur", "score": "cos"}),
    "occlusion blur, cos × two_step": ("occlusion", {"baseline": "blur", "score": "cos", "combine": True}),
    "random map": ("random", {}),
}


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def detector(sess, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """The shortcut reports of ``influence flag --kind shortcut`` for test images (x, y)."""
    return flag_shortcuts(sess, x, y)


def pixel_level(sess, test_patched, noisy, patched_mask: np.ndarray, q_ids: list[int], box: list[int], args, seed: int) -> dict:
    final = sess.use_checkpoint(-1)
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    n_maps = 0
    for q in q_ids:
        r = sess.query(test_patched.x[q], k=args.k, method=args.rank_method)[0]
        tid = [p.train_id for p in r.proponents if patched_mask[p.train_id]]
        if not tid:
            continue
        x, y = noisy.x[tid], noisy.y[tid]
        n_maps += len(tid)
        for v, (method, opts) in VARIANTS.items():
            if method == "random":
                maps = torch.rand(x.shape, generator=gen)
            else:
                maps = get_tfa(method)(final).attribute(x, target=y, query=(test_patched.x[q], r.target), **opts)
            stats[v] += [(mass_in_box(m, box), float(peak_in_box(m, box))) for m in maps]
    return {"pixel_maps": n_maps,
            "pixel": {v: ([float(np.mean([a for a, _ in s])), float(np.mean([b for _, b in s]))] if s else None) for v, s in stats.items()}}


def run_patched(seed: int, placement: str, args, work: Path) -> dict:
    box = list(PLACEMENTS[placement])
    train, test = load_digits_split(seed=0)
    noisy, test_patched, truth = inject(train, test, patch_box=tuple(box), seed=seed)
    t0 = time.perf_counter()
    sess = demo_store(noisy, seed, work)
    t1 = time.perf_counter()
    pred = predict(sess.use_checkpoint(-1), test_patched)
    hit = torch.nonzero(pred == truth.patch_class).flatten()
    out: dict = {"seed": seed, "placement": placement, "box": box, "patched_test": len(test_patched),
                 "predicted_shortcut_class": len(hit), "clean_acc": accuracy(sess, test), "train_build_s": round(t1 - t0, 1)}
    patched_mask = np.zeros(len(noisy), dtype=bool)
    patched_mask[truth.patched] = True
    flipped_mask = np.zeros(len(noisy), dtype=bool)
    flipped_mask[truth.flipped] = True
    q_ids = hit[: args.sample_queries].tolist()
    out["auprc"], out["precision_at_k"], out["flipped_at_k"] = {}, {}, {}
    for m in TDA_METHODS:
        if not q_ids:
            out["auprc"][m] = out["precision_at_k"][m] = out["flipped_at_k"][m] = float("nan")
            continue
        s = sess.scores(test_patched.x[q_ids], method=m)
        out["auprc"][m] = sample_auprc(s, patched_mask)
        out["precision_at_k"][m] = top_k_share(s, patched_mask, args.k)
        out["flipped_at_k"][m] = top_k_share(s, flipped_mask, args.k)
    out |= pixel_level(sess, test_patched, noisy, patched_mask, q_ids[: args.pixel_queries], box, args, seed)
    reports = detector(sess, test_patched.x, test_patched.y)
    match = match_shortcuts(reports, truth.patch_class, box)
    out["detector"] = {"queries": "patched test images with their true labels (flag uses the misclassified ones)",
                       "reports": [r | {"train_ids": len(r["train_ids"])} for r in reports],
                       **{k: v for k, v in match.items() if k != "hit"},
                       "hit": None if match["hit"] is None else match["hit"] | {"train_ids": len(match["hit"]["train_ids"])}}
    out["detector_s"] = round(time.perf_counter() - t1, 1)
    return out


def run_clean(seed: int, work: Path) -> dict:
    train, test = load_digits_split(seed=0)
    noisy, test_patched, _ = inject(train, test, patch_fraction=0.0, seed=seed)
    sess = demo_store(noisy, seed, work)
    out: dict = {"seed": seed, "clean_acc": accuracy(sess, test)}
    for name, data in (("clean test queries", test), ("patch-pasted test queries", test_patched)):
        reports = detector(sess, data.x, data.y)
        out[name] = {"alarms": [r | {"train_ids": len(r["train_ids"])} for r in reports]}
    return out


def render(res: dict) -> str:
    pat = res["patched"]
    k = res["args"]["k"]
    lines = [f"| TDA method | AUPRC mean | AUPRC min | patched share of top-{k} | flipped share of top-{k} | runs |",
             "|---|---|---|---|---|---|"]
    for m in TDA_METHODS:
        v = [r["auprc"][m] for r in pat]
        pk = [r["precision_at_k"][m] for r in pat]
        fk = [r["flipped_at_k"][m] for r in pat]
        lines.append(f"| {m} | {np.nanmean(v):.3f} | {np.nanmin(v):.3f} | {np.nanmean(pk):.3f} | {np.nanmean(fk):.3f} | {len(v)} |")
    if pat and any(r["pixel_maps"] for r in pat):
        lines += ["", "| TFA method / variant | mass in patch | peak in patch | maps |", "|---|---|---|---|"]
        for v in pat[0]["pixel"]:
            ok = [r for r in pat if r["pixel"].get(v) is not None]
            w = np.array([r["pixel_maps"] for r in ok], dtype=float)
            mass = np.array([r["pixel"][v][0] for r in ok])
            peak = np.array([r["pixel"][v][1] for r in ok])
            lines.append(f"| {v} | {np.average(mass, weights=w):.3f} | {np.average(peak, weights=w):.3f} | {int(w.sum())} |" if ok
                         else f"| {v} | - | - | 0 |")
    lines += ["", "| run | queries predicted as the shortcut class | found (IoU ≥ 0.5) | box | IoU | supporting images | score | other reports |",
              "|---|---|---|---|---|---|---|---|"]
    for r in pat:
        d, h = r["detector"], r["detector"]["hit"]
        lines.append(f"| {r['placement']} seed {r['seed']} | {r['predicted_shortcut_class']}/{r['patched_test']} | "
                     f"{'yes' if d['found'] else 'no'} | {h['box'] if h else '-'} | {d['best_iou']:.2f} | "
                     f"{h['train_ids'] if h else '-'} | {h['score'] if h else '-'} | {d['false_alarms']} |")
    for r in res["clean"]:
        for key in ("clean test queries", "patch-pasted test queries"):
            alarms = r[key]["alarms"]
            lines.append(f"| clean seed {r['seed']}, {key} | - | alarms: {len(alarms)} | "
                         f"{', '.join(str(a['box']) + ' class ' + str(a['class']) for a in alarms) or '-'} | | | | |")
    return "\n".join(lines)


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
    if args.variants is not None:
        for v in [v for v in VARIANTS if v not in args.variants and v != "random map"]:
            VARIANTS.pop(v)
    torch.set_num_threads(args.threads)
    results: dict = {"patched": [], "clean": [], "args": vars(args)}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        for placement in args.placements:
            for seed in args.seeds:
                r = run_patched(seed, placement, args, root / f"{placement}-{seed}")
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
