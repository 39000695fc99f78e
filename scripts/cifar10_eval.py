"""CIFAR-10 quality figures of our pipeline on the checkpoints of ``scripts/cifar10_train.py`` (CPU, one thread).

Everything that is "ours" goes through the shipped entry points a user has: ``influence build`` (the CLI, run as a
subprocess with the exact command logged) over an image folder or an .npz, then ``Influence.open(...)`` with
``scores`` / ``self_influence`` and ``influence.flag.flag_mislabels`` / ``flag_shortcuts``. LDS is the
shared ``influence.evaluation.lds.lds``; the other metrics at the end of this file are kept small and local
(scikit-learn AUC / average precision) so that they can move to a shared evaluation package later.

Stages (results appended as JSON lines to ``--results``):

    python scripts/cifar10_eval.py export    # checkpoints out of the trainer's .npz files, as .pt state dicts
    python scripts/cifar10_eval.py lds       # CIFAR-2 LDS against the retrained half-subset margins (--peers: + traker...)
    python scripts/cifar10_eval.py mislabel  # 10% / 20% flips: AUC, found in top 10% / 20%, against baselines
    python scripts/cifar10_eval.py shortcut  # planted patches: detector found / clean alarms, AUPRC, TFA peak-in-patch
    python scripts/cifar10_eval.py harmful-plan   # flag_harmful's top-k for 20 misclassified CIFAR-2 test images
    (retrain without them: scripts/cifar10_train.py --removal runs/cifar10/removal_plan.npz)
    python scripts/cifar10_eval.py harmful-eval   # fixed predictions against removing k random images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from influence.evaluation.cifar10 import FLIP_RATES, PATCHES, SHORTCUT_SEEDS, patch_box

MODEL = "resnet9-narrow"


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    log(json.dumps(row))


def cli_build(data: str, ckpts: list[Path], out: Path, *extra: str) -> tuple[list[str], float]:
    """Run ``influence build`` exactly as a user would; returns the command and its wall time."""
    cmd = ["python", "-m", "influence", "build", "--model", MODEL, "--data", data, "--out", str(out)]
    for c in ckpts:
        cmd += ["--checkpoint", str(c)]
    cmd += list(extra)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    return cmd, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- stage: export
def stage_export(args: argparse.Namespace) -> None:
    src, out = Path(args.models), Path(args.work) / "ckpt"
    out.mkdir(parents=True, exist_ok=True)

    def export(npz: Path, prefix: str, name: str) -> None:
        d = np.load(npz)
        sd = {k[len(prefix) + 1:]: torch.from_numpy(d[k].astype(np.float32) if d[k].dtype == np.float16 else d[k])
              for k in d.files if k.startswith(prefix + "/")}
        torch.save(sd, out / f"{name}.pt")

    # a trainer run limited to some jobs (--only) packs only their files: export what is there
    if (src / "lds.npz").is_file():
        d = np.load(src / "lds.npz")
        for tag in sorted({k.split("/")[0] for k in d.files if k.startswith("seed")}):
            export(src / "lds.npz", tag, f"lds_{tag}")
    if (src / "mislabel.npz").is_file():
        d = np.load(src / "mislabel.npz")
        for tag in sorted({k.rsplit("/", 1)[0] for k in d.files if "/ep" in k and not k.split("/")[1] == "lr"}):
            rate, ep = tag.split("/")[:2]
            export(src / "mislabel.npz", f"{rate}/{ep}", f"{rate}_{ep}")
    for f in sorted(src.glob("shortcut*.npz")):
        d = np.load(f)
        for tag in sorted({k.split("/")[0] for k in d.files}):
            export(f, f"{tag}/final", f"sc_{tag}")
    if (src / "resnet9.npz").is_file():
        export(src / "resnet9.npz", "final", "resnet9_full")
    log(f"checkpoints under {out}")


# --------------------------------------------------------------------------------------------- stage: lds
def stage_lds(args: argparse.Namespace) -> None:
    """LDS of ours (and, with ``--peers``, of peer libraries on the same checkpoints) against ``MODELS/lds.npz``.

    ``lds.npz`` holds the retrains' ``masks`` (M, N) and ``margins`` (M, T); when it also holds ``test_ids`` (indices
    into the CIFAR-2 test folder, as ``scripts/cifar2_lds_cpu.py`` writes) those are the test points, else
    ``--test-points`` random ones. ``--lds-train`` is the training data the masks index (default: the CIFAR-2 train
    folder); the checkpoints are ``WORK/ckpt/lds_seed{s}_ep{--lds-epoch}.pt``.
    """
    from influence.data import ArrayDataset, batch_of
    from influence.evaluation import peers
    from influence.evaluation.lds import lds
    from influence.loading import ImageFolder, load_data
    from influence.models import NarrowResNet9
    from influence.query import Influence

    work = Path(args.work)
    truth = np.load(Path(args.models) / "lds.npz")
    masks, margins = truth["masks"], truth["margins"]  # (M, N), (M, T)
    test = ImageFolder(Path(args.cifar2) / "test")
    if "test_ids" in truth.files:
        tid, actual = truth["test_ids"], margins
    else:
        tid = np.sort(np.random.default_rng(0).choice(len(test), args.test_points, replace=False))
        actual = margins[:, tid]
    xt = torch.stack([test[i][0] for i in tid])
    yt = torch.tensor([test[i][1] for i in tid])
    train_spec = args.lds_train or str(Path(args.cifar2) / "train")
    e = args.lds_epoch
    sets = {"1 model": [f"lds_seed0_ep{e}"], "5 models": [f"lds_seed{s}_ep{e}" for s in range(5)],
            "1 run, 3 checkpoints": [f"lds_seed0_ep{e // 2}", f"lds_seed0_ep{3 * e // 4}", f"lds_seed0_ep{e}"]}
    common = {"stage": "lds", "k": args.k, "n_train": int(masks.shape[1]), "retrains": int(masks.shape[0])}
    for name in args.sets:
        ckpts = [work / "ckpt" / f"{c}.pt" for c in sets[name]]
        # "5 models" extends the "1 model" store (re-running the command with more checkpoints adds them)
        store = work / "stores" / (f"lds_ckpts_k{args.k}" if "checkpoints" in name else f"lds_models_k{args.k}")
        if args.lds_fresh:  # one store per set, built from scratch, so its time compares with a peer's on that set
            store = work / "stores" / f"lds_{name.replace(' ', '_').replace(',', '')}_k{args.k}"
            shutil.rmtree(store, ignore_errors=True)
        cmd, build_s = cli_build(train_spec, ckpts, store, "--proj-dim", str(args.k))
        session = Influence.open(store)
        for method in args.methods:
            t0 = time.perf_counter()
            s = session.scores(xt, yt, method=method)
            score_s = time.perf_counter() - t0
            append(Path(args.results), {**common, "set": name, "tool": "ours", "method": method, "build_s": round(build_s, 1),
                                        "score_s": round(score_s, 1), "seconds": round(build_s + score_s, 1),
                                        "command": " ".join(cmd), **lds(s, masks, actual)})
        if not args.peers:
            continue
        # the peers get the same tensors: the training data as the CLI loads it, the same test images
        data = load_data(train_spec)
        train = ArrayDataset(*batch_of(data, 0, len(data)))
        test_ds = ArrayDataset(xt, yt)
        lrs = [1.0] * len(ckpts)
        for tool in args.peers:
            kw: dict = {"exact": True} if tool == "captum" else {"rels": args.peer_rels}
            if tool == "dattri":
                kw["tracin"] = not args.peer_no_tracin
            for method, res in peers.run(tool, NarrowResNet9, ckpts, lrs, train, test_ds, k=args.k, threads=1, **kw):
                row = {**common, "set": name, "tool": tool, "method": method}
                if res is None:
                    append(Path(args.results), {**row, "failed": True})
                    continue
                s, secs, note = res
                append(Path(args.results), {**row, "projector": note["projector"], "k": note["k"],
                                            "seconds": round(secs, 1), **lds(s, masks, actual)})


# --------------------------------------------------------------------------------------------- stage: mislabel
def stage_mislabel(args: argparse.Namespace) -> None:
    from influence.flag import flag_mislabels
    from influence.query import Influence

    work = Path(args.work)
    mis = np.load(Path(args.models) / "mislabel.npz")
    for rate in FLIP_RATES:
        tag = f"flip{int(rate * 100)}"
        data = np.load(Path(args.data_dir) / f"{tag}.npz")
        flipped = np.zeros(len(data["y"]), dtype=bool)
        flipped[data["flipped"]] = True
        noisy = data["y"]
        ckpts = [work / "ckpt" / f"{tag}_{c}.pt" for c in args.mis_ckpts]
        store = work / "stores" / f"{tag}_{'_'.join(args.mis_ckpts)}"
        cmd, build_s = cli_build(str(Path(args.data_dir) / f"{tag}.npz"), ckpts, store)
        session = Influence.open(store)
        rows = {
            "training loss (final model)": mis[f"{tag}/train_loss"],
            "4-fold CV confidence (1 − out-of-fold p(label))": 1.0 - mis[f"{tag}/oof_probs"][np.arange(len(noisy)), noisy],
        }
        for method in [m for m in args.methods if m != "gradcos"]:  # Grad-Cos self-influence is 1 by definition
            rows[f"ours: {method} self-influence"] = session.self_influence(method)
        # the flag API returns the same ranking as its top rows: check it on the inspected 10%
        top = flag_mislabels(session, method="trak", top=len(noisy) // 10)
        top_ids = np.array([f.train_id for f in top])
        for name, score in rows.items():
            append(Path(args.results), {"stage": "mislabel", "rate": rate, "ranking": name, "build_s": round(build_s, 1),
                                        "command": " ".join(cmd), **detection(score, flipped)})
        append(Path(args.results), {"stage": "mislabel", "rate": rate, "ranking": "ours: flag_mislabels(trak) top 10%",
                                    "found_at_10%": float(flipped[top_ids].sum() / flipped.sum())})


# --------------------------------------------------------------------------------------------- stage: shortcut
def stage_shortcut(args: argparse.Namespace) -> None:
    from influence.flag import flag_shortcuts
    from influence.loading import ImageFolder
    from influence.query import Influence
    from influence.shortcut import box_iou
    from influence.tfa import get_tfa

    from influence.evaluation.cifar10 import apply_patch

    work = Path(args.work)
    test = ImageFolder(Path(args.cifar10) / "test")
    rng = np.random.default_rng(0)
    qid = np.sort(rng.choice(len(test), args.queries, replace=False))
    xq_u8 = np.stack([(test[i][0].numpy() * 255).round().astype(np.uint8) for i in qid])
    yq = np.array([test[i][1] for i in qid])
    runs = [(p, s) for s in args.seeds for p in args.patches]
    for patch, seed in runs:
        tag = f"{patch}_s{seed}"
        ckpt = work / "ckpt" / f"sc_{tag}.pt"
        if patch == "clean":
            data, ids, cls, box = Path(args.data_dir) / "subset10k.npz", np.array([], dtype=int), None, None
        else:
            data = Path(args.data_dir) / f"shortcut_{tag}.npz"
            d = np.load(data)
            ids, cls, box = d["patched"], int(d["cls"]), list(patch_box(patch))
        store = work / "stores" / f"sc_{tag}"
        cmd, build_s = cli_build(str(data), [ckpt], store, "--method", "tracin,gradcos,trak")
        session = Influence.open(store)
        n = session.n_train
        # queries: test images of other classes; with the patch pasted for patched runs (what a user would try)
        keep = yq != (cls if cls is not None else -1)
        xq = apply_patch(xq_u8[keep], patch) if cls is not None else xq_u8[keep]
        xq_t = torch.from_numpy(xq).float() / 255
        row: dict = {"stage": "shortcut", "patch": patch, "seed": seed, "cls": cls, "box": box, "build_s": round(build_s, 1),
                     "command": " ".join(cmd)}
        t0 = time.perf_counter()
        found = flag_shortcuts(session, xq_t, torch.from_numpy(yq[keep]))
        row["detector_s"] = round(time.perf_counter() - t0, 1)
        row["reports"] = [{"cls": s.cls, "box": s.box, "score": round(s.score, 3), "n": len(s.train_ids)} for s in found]
        if cls is None:
            row["alarms"] = len(found)
        else:
            row["found"] = any(s.cls == cls and box_iou(s.box, box) >= 0.5 for s in found)
            row["false_reports"] = sum(not (s.cls == cls and box_iou(s.box, box) >= 0.5) for s in found)
            # sample level: patched training images ranked by each method, for queries predicted as the class
            pred = session.predict(xq_t).argmax(-1).numpy()
            hit = np.nonzero(pred == cls)[0][: args.sample_queries]
            truth = np.zeros(n, dtype=bool)
            truth[ids] = True
            for method in ("gradcos", "tracin", "trak"):
                s = session.scores(xq_t[hit], [cls] * len(hit), method=method)
                row[f"auprc_{method}"] = auprc_mean(s, truth)
            # pixel level: TFA maps of the patched training images among the top Grad-Cos proponents
            model = session.model_at(-1)
            res = session.query(xq_t[hit[: args.pixel_queries]], [cls] * min(len(hit), args.pixel_queries), k=10, method="gradcos")
            for tfa in args.tfas:
                explainer = get_tfa(tfa)(model, task=session.task)
                peaks, masses = [], []
                for q, r in zip(hit[: args.pixel_queries], res):
                    pid = [p.train_id for p in r.proponents if truth[p.train_id]]
                    if not pid:
                        continue
                    tx, ty = session.training_examples(pid)
                    m = explainer.attribute(tx, target=ty, query=(xq_t[q], cls))
                    for mi in m:
                        mass, peak = peak_in_patch(mi, box)
                        peaks.append(peak)
                        masses.append(mass)
                row[f"tfa_{tfa}_peak_in_patch"] = float(np.mean(peaks)) if peaks else None
                row[f"tfa_{tfa}_mass_in_patch"] = float(np.mean(masses)) if masses else None
                row[f"tfa_{tfa}_maps"] = len(peaks)
        append(Path(args.results), row)


# --------------------------------------------------------------------------------------------- stage: harmful
HARM_K = (100, 400)


def harmful_queries(args: argparse.Namespace) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """20 CIFAR-2 test images that the seed-0 full-data model misclassifies (a seeded random choice)."""
    from influence.loading import ImageFolder
    from influence.query import Influence

    test = ImageFolder(Path(args.cifar2) / "test")
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    session = Influence.open(Path(args.work) / "stores" / f"lds_models_k{args.k}")
    wrong = np.nonzero((session.predict(x).argmax(-1).cpu() != y).numpy())[0]
    tid = np.sort(np.random.default_rng(0).choice(wrong, 20, replace=False))
    return tid, x[tid], y[tid]


def stage_harmful_plan(args: argparse.Namespace) -> None:
    """Top-k harmful training images for 20 misclassified test images (``flag_harmful``, TRAK) and k random ones."""
    from influence.flag import flag_harmful
    from influence.query import Influence

    tid, x, y = harmful_queries(args)
    session = Influence.open(Path(args.work) / "stores" / f"lds_models_k{args.k}")
    flags = flag_harmful(session, x, y, method="trak", top=max(HARM_K))
    ids = np.array([f.train_id for f in flags])
    rng = np.random.default_rng(1)
    sets = {"test_ids": tid}
    for k in HARM_K:
        sets[f"remove/top{k}"] = ids[:k]
        sets[f"remove/random{k}"] = np.sort(rng.choice(session.n_train, k, replace=False))
    np.savez(args.removal, **sets)
    log(f"{len(ids)} harmful ids for test images {tid.tolist()} -> {args.removal}")


def stage_harmful_eval(args: argparse.Namespace) -> None:
    """Fixed predictions (margin > 0) among the 20 after retraining without each set, per seed."""
    plan = np.load(args.removal)
    res = np.load(Path(args.models) / "removal.npz")
    tid = plan["test_ids"]
    for name in ["none"] + [f"{w}{k}" for k in HARM_K for w in ("top", "random")]:
        seeds = sorted(k for k in res.files if k.startswith(f"remove/{name}/"))
        fixed = [int((res[k][tid] > 0).sum()) for k in seeds]
        drop = [float(res[k][tid].mean()) for k in seeds]
        append(Path(args.results), {"stage": "harmful", "removed": name, "fixed_of_20_per_seed": fixed,
                                    "mean_margin_per_seed": [round(v, 3) for v in drop]})


# --------------------------------------------------------------------------------------------- local metrics
def detection(score: np.ndarray, positive: np.ndarray) -> dict:
    """AUC, and the fraction of positives among the top 10% / 20% of the ranking (descending score)."""
    from sklearn.metrics import roc_auc_score

    order = np.argsort(-score, kind="stable")
    n, pos = len(score), positive.sum()
    return {"auc": round(float(roc_auc_score(positive, score)), 4),
            "found_at_10%": round(float(positive[order[: n // 10]].sum() / pos), 4),
            "found_at_20%": round(float(positive[order[: n // 5]].sum() / pos), 4)}


def auprc_mean(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Average precision of ``positive`` per query column, averaged over queries."""
    from sklearn.metrics import average_precision_score

    if scores.shape[1] == 0:
        return None
    return round(float(np.mean([average_precision_score(positive, scores[:, j]) for j in range(scores.shape[1])])), 4)


def peak_in_patch(m: torch.Tensor, box: list[int]) -> tuple[float, float]:
    """(share of positive map mass inside the box, whether the map's maximum lies inside it)."""
    s = m.sum(0) if m.dim() == 3 else m
    x0, y0, x1, y1 = box
    pos = s.clamp(min=0)
    total = float(pos.sum())
    mass = float(pos[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0
    r, c = divmod(int(s.flatten().argmax()), s.shape[1])
    return mass, float(y0 <= r < y1 and x0 <= c < x1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["export", "lds", "mislabel", "shortcut", "harmful-plan", "harmful-eval"])
    p.add_argument("--removal", default="runs/cifar10/removal_plan.npz", help="harmful-plan's output")
    p.add_argument("--models", default="runs/cifar10_models", help="the trainer's --out folder")
    p.add_argument("--data-dir", default="runs/cifar10", help="scripts/cifar10_data.py's --dest")
    p.add_argument("--cifar2", default=None, help="CIFAR-2 folder (default DATA_DIR/cifar2)")
    p.add_argument("--cifar10", default=None, help="CIFAR-10 folder (default DATA_DIR/cifar10-jpg)")
    p.add_argument("--work", default="runs/cifar10")
    p.add_argument("--results", default="runs/cifar10/results.jsonl")
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--test-points", type=int, default=500)
    p.add_argument("--lds-train", default=None, help="lds: training data spec the masks index (default CIFAR2/train)")
    p.add_argument("--lds-epoch", type=int, default=24, help="lds: epoch in the checkpoint names lds_seed{s}_ep{E}")
    p.add_argument("--lds-fresh", action="store_true", help="lds: build each set's store from scratch (default: 5 models extends 1)")
    p.add_argument("--peers", nargs="*", default=[], help="lds: peer tools to run on the same checkpoints (traker captum dattri)")
    p.add_argument("--peer-rels", type=float, nargs="+", default=[0.0, 1.0],
                   help="lds: TRAK λs of traker and dattri, relative to the mean nonzero eigenvalue of their own ΦᵀΦ (our unit)")
    p.add_argument("--peer-no-tracin", action="store_true", help="lds: skip dattri's TracIn (the slowest peer row)")
    p.add_argument("--sets", nargs="+", default=["1 model", "5 models"])
    p.add_argument("--methods", nargs="+", default=["tracin", "gradcos", "trak"])
    p.add_argument("--mis-ckpts", nargs="+", default=["ep24"])
    p.add_argument("--patches", nargs="+", default=list(PATCHES) + ["clean"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SHORTCUT_SEEDS))
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--sample-queries", type=int, default=20)
    p.add_argument("--pixel-queries", type=int, default=3)
    p.add_argument("--tfas", nargs="+", default=["two_step", "gradcos"])
    args = p.parse_args()
    args.cifar2 = args.cifar2 or str(Path(args.data_dir) / "cifar2")
    args.cifar10 = args.cifar10 or str(Path(args.data_dir) / "cifar10-jpg")
    torch.set_num_threads(1)
    {"export": stage_export, "lds": stage_lds, "mislabel": stage_mislabel, "shortcut": stage_shortcut,
     "harmful-plan": stage_harmful_plan, "harmful-eval": stage_harmful_eval}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
