"""The shortcut study on the digits demo: sample-level AUPRC, pixel-level TFA localisation, `flag`'s detector.

For each seed and patch placement: inject 10% label flips and a bright patch on half of the shortcut class's
training images, train the demo's digits CNN with the demo recipe and build a store (``digits.demo_store``), then

- sample level: ``Influence.scores`` of patched test images predicted as the shortcut class; average precision of
  "patched" per query, averaged over queries (``shortcut.sample_auprc``);
- pixel level: for the patched training images among the top-k proponents of a few such queries, each TFA
  method / variant's share of positive map mass inside the patch and whether the map's peak lies inside it;
- detector: ``influence.flag.flag_shortcuts(session, x_patched, y_true)``, exactly as
  ``influence flag STORE --kind shortcut --test test_patched.npz`` runs it (``shortcut.match_shortcuts``);
  clean runs (patch_fraction=0) count its reports as false alarms.
"""

from __future__ import annotations

import os
import time
from typing import Any, TypedDict

import numpy as np
import torch

from influence.evaluation.digits import TDA_METHODS, ArrayDataset, accuracy, demo_store, inject, load_digits_split, predict
from influence.evaluation.pixel import mass_in_box, peak_in_box
from influence.evaluation.shortcut import match_shortcuts, sample_auprc, top_k_share
from influence.flag import flag_shortcuts
from influence.query import Influence
from influence.tfa import get_tfa

PLACEMENTS: dict[str, tuple[int, int, int, int]] = {"bottom-right": (12, 12, 15, 15), "top-left": (1, 1, 4, 4)}
# A TFA variant: (TFA method, its options); "random" is a uniform random map.
Variant = tuple[str, dict[str, Any]]
# One run's JSON record (seed, accuracies, per-method scores, pixel level, detector), as render reads it back.
Record = dict[str, Any]
VARIANTS: dict[str, Variant] = {
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


class PixelLevel(TypedDict):
    """Pixel-level results: maps scored, and per variant [mean mass in patch, share of peaks in patch] (None: no maps)."""

    pixel_maps: int
    pixel: dict[str, list[float] | None]


def detector(sess: Influence, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """The shortcut reports of ``influence flag --kind shortcut`` for test images (x, y), as its JSON writes them."""
    return [s.to_json() for s in flag_shortcuts(sess, x, y)]


def pixel_level(sess: Influence, test_patched: ArrayDataset, noisy: ArrayDataset, patched_mask: np.ndarray, q_ids: list[int],
                box: list[int], variants: dict[str, Variant], *, k: int, rank_method: str, seed: int) -> PixelLevel:
    """Mass and peak of each TFA variant's map inside the patch, over the patched top-k proponents of ``q_ids``."""
    final = sess.model_at(-1)
    gen = torch.Generator().manual_seed(seed)
    stats: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    n_maps = 0
    for q in q_ids:
        r = sess.query(test_patched.x[q], k=k, method=rank_method)[0]
        tid = [p.train_id for p in r.proponents if patched_mask[p.train_id]]
        if not tid:
            continue
        x, y = noisy.x[tid], noisy.y[tid]
        n_maps += len(tid)
        for v, (method, opts) in variants.items():
            if method == "random":
                maps = torch.rand(x.shape, generator=gen)
            else:
                maps = get_tfa(method)(final).attribute(x, target=y, query=(test_patched.x[q], r.target), **opts)
            stats[v] += [(mass_in_box(m, box), float(peak_in_box(m, box))) for m in maps]
    return {"pixel_maps": n_maps,
            "pixel": {v: ([float(np.mean([a for a, _ in s])), float(np.mean([b for _, b in s]))] if s else None) for v, s in stats.items()}}


def run_patched(seed: int, placement: str, work: str | os.PathLike[str], *, sample_queries: int = 40, pixel_queries: int = 3, k: int = 5,
                rank_method: str = "gradcos", variants: dict[str, Variant] | None = None) -> Record:
    """One patched run: train and build (cached in ``work``), sample-level AUPRC, pixel level, and `flag`'s detector."""
    patch_box = PLACEMENTS[placement]
    box = list(patch_box)
    train, test = load_digits_split(seed=0)
    noisy, test_patched, truth = inject(train, test, patch_box=patch_box, seed=seed)
    t0 = time.perf_counter()
    sess = demo_store(noisy, seed, work)
    t1 = time.perf_counter()
    pred = predict(sess.model_at(-1), test_patched)
    hit = torch.nonzero(pred == truth.patch_class).flatten()
    out: Record = {"seed": seed, "placement": placement, "box": box, "patched_test": len(test_patched),
                 "predicted_shortcut_class": len(hit), "clean_acc": accuracy(sess, test), "train_build_s": round(t1 - t0, 1)}
    patched_mask = np.zeros(len(noisy), dtype=bool)
    patched_mask[truth.patched] = True
    flipped_mask = np.zeros(len(noisy), dtype=bool)
    flipped_mask[truth.flipped] = True
    q_ids = hit[:sample_queries].tolist()
    out["auprc"], out["precision_at_k"], out["flipped_at_k"] = {}, {}, {}
    for m in TDA_METHODS:
        if not q_ids:
            out["auprc"][m] = out["precision_at_k"][m] = out["flipped_at_k"][m] = float("nan")
            continue
        s = sess.scores(test_patched.x[q_ids], method=m)
        out["auprc"][m] = sample_auprc(s, patched_mask)
        out["precision_at_k"][m] = top_k_share(s, patched_mask, k)
        out["flipped_at_k"][m] = top_k_share(s, flipped_mask, k)
    out |= pixel_level(sess, test_patched, noisy, patched_mask, q_ids[:pixel_queries], box, VARIANTS if variants is None else variants,
                       k=k, rank_method=rank_method, seed=seed)
    reports = detector(sess, test_patched.x, test_patched.y)
    match = match_shortcuts(reports, truth.patch_class, box)
    out["detector"] = {"queries": "patched test images with their true labels (flag uses the misclassified ones)",
                       "reports": [r | {"train_ids": len(r["train_ids"])} for r in reports],
                       **{k: v for k, v in match.items() if k != "hit"},
                       "hit": None if match["hit"] is None else match["hit"] | {"train_ids": len(match["hit"]["train_ids"])}}
    out["detector_s"] = round(time.perf_counter() - t1, 1)
    return out


def run_clean(seed: int, work: str | os.PathLike[str]) -> Record:
    """One clean run (no patch, flips kept): `flag`'s shortcut reports for clean and patch-pasted test queries, all false alarms."""
    train, test = load_digits_split(seed=0)
    noisy, test_patched, _ = inject(train, test, patch_fraction=0.0, seed=seed)
    sess = demo_store(noisy, seed, work)
    out: Record = {"seed": seed, "clean_acc": accuracy(sess, test)}
    for name, data in (("clean test queries", test), ("patch-pasted test queries", test_patched)):
        reports = detector(sess, data.x, data.y)
        out[name] = {"alarms": [r | {"train_ids": len(r["train_ids"])} for r in reports]}
    return out


def render(res: dict[str, Any]) -> str:
    """Markdown tables of a results document {"patched": [...], "clean": [...], "args": {"k": ...}}."""
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
