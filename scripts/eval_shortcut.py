"""Shortcut evaluation (METHODS.md §5): sample-level AUPRC, pixel-level TFA localisation, and the detector.

For each seed and patch placement: inject 10% label flips and a bright patch on half of the shortcut class's
training images, train the demo's digits CNN with the demo recipe (DEMO_EPOCHS, 3 checkpoints), build a store with
tracin, gradcos and trak, and query with the patched test images that the model predicts as the shortcut class.

- sample level: average precision of "patched" over all training examples ranked by each method's score, per
  query, averaged over queries;
- pixel level: for the patched training images among the top-k TracIn proponents of a few such queries, each TFA
  method / variant's share of positive map mass inside the patch and whether the map's peak lies inside it;
- detector: ``detect_shortcuts`` on maps of the top proponents of test queries grouped by predicted class; found =
  right class and IoU >= 0.5; plus clean runs (patch_fraction=0) where any report is a false alarm.

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
from sklearn.metrics import average_precision_score

import influence
from influence.data import ArrayDataset, inject, load_digits_split
from influence.demo import DEMO_CHECKPOINTS, DEMO_EPOCHS
from influence.features import per_example_grads
from influence.models import DigitsCNN
from influence.shortcut import box_iou, detect_shortcuts
from influence.tfa import DEFAULT_TFA, get_tfa
from influence.training import predict, train_classifier

PLACEMENTS = {"bottom-right": (12, 12, 15, 15), "top-left": (1, 1, 4, 4)}
TDA_METHODS = ("tracin", "gradcos", "trak")
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


def train_and_build(train, seed: int, work: Path) -> tuple[DigitsCNN, influence.Influence]:
    torch.manual_seed(seed)
    model = DigitsCNN()
    if (work / "store" / "zarr.json").is_file():  # --work cache from an earlier run with the same seed
        sess = influence.Influence.open(work / "store")
        model.load_state_dict(sess.use_checkpoint(-1).state_dict())
        return model.eval(), sess
    saved = train_classifier(model, train, epochs=DEMO_EPOCHS, seed=seed, checkpoint_dir=work / "ckpt", checkpoints=DEMO_CHECKPOINTS)
    influence.build("digits-cnn", train, [str(p) for p, _ in saved], work / "store", lr_weights=[lr for _, lr in saved],
                    methods=TDA_METHODS, progress=False)
    return model.eval(), influence.Influence.open(work / "store")


def pixel_metrics(m: torch.Tensor, box: list[int]) -> tuple[float, float]:
    s = m.sum(0) if m.dim() == 3 else m
    x0, y0, x1, y1 = box
    pos = s.clamp(min=0)
    total = float(pos.sum())
    mass = float(pos[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0
    r, c = divmod(int(s.flatten().argmax()), s.shape[1])
    return mass, float(y0 <= r < y1 and x0 <= c < x1)


def tfa_maps(model, method: str, opts: dict, x, y, gt, gen: torch.Generator) -> torch.Tensor:
    if method == "random":
        return torch.rand(x.shape, generator=gen)
    return get_tfa(method)(model).attribute(x, target=y, query=gt, **opts)


def detector_maps(model, sess, x_q: torch.Tensor, tfa: str, per_class: int, k: int, train, rank: str) -> tuple:
    """Maps of the top-k proponents (by ``rank``) of up to ``per_class`` queries per predicted class."""
    pred = predict(model, ArrayDataset(x_q, torch.zeros(len(x_q), dtype=torch.long)))
    chosen = []
    for c in range(10):
        chosen += torch.nonzero(pred == c).flatten()[:per_class].tolist()
    results = sess.query(x_q[chosen], k=k, method=rank)
    maps, imgs, ids, labs = [], [], [], []
    method = get_tfa(tfa)(model)
    for q, r in zip(chosen, results):
        tid = [p.train_id for p in r.proponents]
        xi, yi = train.x[tid], train.y[tid]
        maps.append(method.attribute(xi, target=yi, query=(x_q[q], r.target)))
        imgs.append(xi)
        ids += tid
        labs += yi.tolist()
    return torch.cat(maps), torch.cat(imgs), ids, labs


def run_patched(seed: int, placement: str, args, work: Path) -> dict:
    box = list(PLACEMENTS[placement])
    train, test = load_digits_split(seed=0)
    noisy, test_patched, truth = inject(train, test, patch_box=tuple(box), seed=seed)
    t0 = time.perf_counter()
    model, sess = train_and_build(noisy, seed, work)
    t1 = time.perf_counter()
    pred = predict(model, test_patched)
    hit = torch.nonzero(pred == truth.patch_class).flatten()
    out: dict = {"seed": seed, "placement": placement, "box": box, "patched_test": len(test_patched),
                 "predicted_shortcut_class": len(hit), "clean_acc": float((predict(model, test) == test.y).float().mean()),
                 "train_build_s": round(t1 - t0, 1)}
    patched_mask = np.zeros(len(noisy), dtype=bool)
    patched_mask[truth.patched] = True
    q_ids = hit[: args.sample_queries].tolist()
    out["auprc"], out["precision_at_k"] = {}, {}
    for m in TDA_METHODS:
        if not q_ids:
            out["auprc"][m] = out["precision_at_k"][m] = float("nan")
            continue
        s = sess.scores(test_patched.x[q_ids], method=m)
        out["auprc"][m] = float(np.mean([average_precision_score(patched_mask, s[:, j]) for j in range(s.shape[1])]))
        top = np.argsort(-s, axis=0)[: args.k]
        out["precision_at_k"][m] = float(patched_mask[top].mean())
        out.setdefault("flipped_at_k", {})[m] = float(np.isin(top, truth.flipped).mean())
    # pixel level
    final = sess.use_checkpoint(-1)
    gen = torch.Generator().manual_seed(seed)
    stats = {v: [] for v in VARIANTS}
    n_maps = 0
    for q in q_ids[: args.pixel_queries] if args.pixel_queries else []:
        r = sess.query(test_patched.x[q], k=args.k, method=args.rank_method)[0]
        tid = [p.train_id for p in r.proponents if patched_mask[p.train_id]]
        if not tid:
            continue
        x, y = noisy.x[tid], noisy.y[tid]
        gt = per_example_grads(final, influence.ClassificationTask(), [n for n, _ in final.named_parameters()],
                               test_patched.x[q][None], torch.tensor([r.target]), of="loss")[0]
        n_maps += len(tid)
        for v, (method, opts) in VARIANTS.items():
            maps = tfa_maps(final, method, opts, x, y, gt, gen)
            stats[v] += [pixel_metrics(mm, box) for mm in maps]
    out["pixel_maps"] = n_maps
    out["pixel"] = {v: ([float(np.mean([a for a, _ in s])), float(np.mean([b for _, b in s]))] if s else None) for v, s in stats.items()}
    # detector on the default TFA (or --detector-tfa)
    maps, imgs, ids, labs = detector_maps(final, sess, test_patched.x, args.detector_tfa, args.per_class, args.k, noisy, args.rank_method)
    found = detect_shortcuts(maps, imgs, ids, labs)
    out["detector"] = {
        "tfa": args.detector_tfa, "maps": len(ids),
        "reports": [s.as_dict() | {"train_ids": len(s.train_ids)} for s in found],
        "found": any(s.cls == truth.patch_class and box_iou(s.box, box) >= 0.5 for s in found),
        "false_alarms": sum(not (s.cls == truth.patch_class and box_iou(s.box, box) >= 0.5) for s in found),
        "best_iou": max([box_iou(s.box, box) for s in found if s.cls == truth.patch_class], default=0.0),
    }
    out["tfa_detector_s"] = round(time.perf_counter() - t1, 1)
    return out


def run_clean(seed: int, args, work: Path) -> dict:
    train, test = load_digits_split(seed=0)
    noisy, test_patched, _ = inject(train, test, patch_fraction=0.0, seed=seed)
    model, sess = train_and_build(noisy, seed, work)
    final = sess.use_checkpoint(-1)
    out: dict = {"seed": seed, "clean_acc": float((predict(model, test) == test.y).float().mean())}
    for name, xq in (("clean test queries", test.x), ("patch-pasted test queries", test_patched.x)):
        maps, imgs, ids, labs = detector_maps(final, sess, xq, args.detector_tfa, args.per_class, args.k, noisy, args.rank_method)
        found = detect_shortcuts(maps, imgs, ids, labs)
        out[name] = {"maps": len(ids), "alarms": [s.as_dict() | {"train_ids": len(s.train_ids)} for s in found]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    p.add_argument("--clean-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--sample-queries", type=int, default=40)
    p.add_argument("--pixel-queries", type=int, default=3)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--detector-tfa", default=DEFAULT_TFA)
    p.add_argument("--rank-method", default="gradcos", choices=TDA_METHODS, help="TDA method whose top-k get TFA maps")
    p.add_argument("--work", default=None, help="keep trained runs here and reuse them (default: a temp dir)")
    p.add_argument("--variants", nargs="*", default=None, help="subset of variant names (default: all)")
    p.add_argument("--out", default="runs/eval_shortcut.json")
    args = p.parse_args(argv)
    if args.variants is not None:
        for v in [v for v in VARIANTS if v not in args.variants and v != "random map"]:
            VARIANTS.pop(v)
    torch.set_num_threads(2)
    results = {"patched": [], "clean": [], "args": vars(args)}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work or tmp
        for placement in args.placements:
            for seed in args.seeds:
                r = run_patched(seed, placement, args, Path(tmp) / f"{placement}-{seed}")
                results["patched"].append(r)
                log(f"[{time.perf_counter() - t0:.0f}s] {placement} seed {seed}: auprc {r['auprc']} detector found={r['detector']['found']} "
                    f"reports={r['detector']['reports']}")
        for seed in args.clean_seeds:
            r = run_clean(seed, args, Path(tmp) / f"clean-{seed}")
            results["clean"].append(r)
            log(f"[{time.perf_counter() - t0:.0f}s] clean seed {seed}: {[(k, v['alarms']) for k, v in r.items() if isinstance(v, dict)]}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


def render(res: dict) -> str:
    pat = res["patched"]
    k = res["args"]["k"]
    lines = [f"| TDA method | AUPRC mean | AUPRC min | patched share of top-{k} | flipped share of top-{k} | runs |",
             "|---|---|---|---|---|---|"]
    for m in TDA_METHODS:
        v = [r["auprc"][m] for r in pat]
        pk = [r["precision_at_k"][m] for r in pat]
        fk = [r.get("flipped_at_k", {}).get(m, float("nan")) for r in pat]
        lines.append(f"| {m} | {np.nanmean(v):.3f} | {np.nanmin(v):.3f} | {np.nanmean(pk):.3f} | {np.nanmean(fk):.3f} | {len(v)} |")
    lines += ["", "| TFA method / variant | mass in patch | peak in patch | maps |", "|---|---|---|---|"]
    for v in pat[0]["pixel"]:
        ok = [r for r in pat if r["pixel"].get(v) is not None]
        if not ok:
            lines.append(f"| {v} | - | - | 0 |")
            continue
        w = np.array([r["pixel_maps"] for r in ok], dtype=float)
        mass = np.array([r["pixel"][v][0] for r in ok])
        peak = np.array([r["pixel"][v][1] for r in ok])
        lines.append(f"| {v} | {np.average(mass, weights=w):.3f} | {np.average(peak, weights=w):.3f} | {int(w.sum())} |")
    lines += ["", "| run | shortcut-class queries | detector (TFA) | found | IoU | support | dispersion | other reports |",
              "|---|---|---|---|---|---|---|---|"]
    for r in pat:
        d = r["detector"]
        top = next((s for s in d["reports"] if s["cls"] == 7), None)
        lines.append(f"| {r['placement']} seed {r['seed']} | {r['predicted_shortcut_class']}/{r['patched_test']} | {d['tfa']} | "
                     f"{'yes' if d['found'] else 'no'} | {d['best_iou']:.2f} | {top['support'] if top else '-'} | "
                     f"{top['dispersion'] if top else '-'} | {d['false_alarms']} |")
    for r in res["clean"]:
        for k in ("clean test queries", "patch-pasted test queries"):
            lines.append(f"| clean seed {r['seed']}, {k} | - | {res['args']['detector_tfa']} | alarms: {len(r[k]['alarms'])} | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
