"""CIFAR-10 models and retrained ground truth, in a user's own plain-torch training loop (torch + numpy + pillow only).

Its training loop is plain torch; from the package it takes only the model layout (``influence.models``, torch
alone) and the benchmark plan (``influence.evaluation.cifar10``, numpy and pillow), so it runs on a machine with torch
but none of the package's other dependencies (``PYTHONPATH=.`` from the repository root). It is what a user runs
before pointing ``influence build`` at the checkpoints it saves. It reads the image folder written by ``scripts/cifar10_data.py`` (one sub-folder per
class, classes and files sorted by name: the same index ``influence build --data FOLDER`` uses) and trains, on as
many worker processes as asked (all on one GPU when there is one), in this priority order:

1. ``lds``: the narrow ResNet (``resnet9-narrow``, width 16) on CIFAR-2 (cat vs dog, all 10,000 training and 2,000
   test images): 5 full-data models (seed 0 keeps 3 checkpoints for TracInCP) and ``--retrains`` models on random
   half subsets, with their masks and the test margins ``logit_y − logsumexp(other logits)`` (Ilyas et al., 2022);
2. ``mislabel``: 10% and 20% synthetic label flips on a 10,000-image CIFAR-10 subset (the first 1,000 per class):
   the full model's checkpoint and final per-example training loss, and 4-fold out-of-fold probabilities (the
   cross-validated confidence baseline of confident learning, Northcutt et al., 2021);
3. ``shortcut``: planted patches (``PATCHES``) on half of one class's training images of the same subset, 3 seeds
   each, plus 3 clean runs;
4. ``resnet9``: the built-in ResNet-9 on all 50,000 training images (one float16 checkpoint).

Every model is a 10-way classifier (CIFAR-2 uses labels 0 = cat, 1 = dog of its two-class folder) so that the
built-in names load the checkpoints as they are. Workers stop taking jobs after ``--deadline`` seconds and the
finished results are packed into a few .npz files under ``--out``.

    PYTHONPATH=. python scripts/cifar10_train.py --data data/cifar10-jpg --out runs/cifar10_models --workers 8
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from influence.evaluation.cifar10 import (  # the shared plan (numpy and pillow only)
    CIFAR2, CLASSES, FLIP_RATES, FOLDS, PATCHES, SHORTCUT_SEEDS, SUBSET_PER_CLASS, apply_patch, flip_labels, read_folder,
    shortcut_plan, subset_ids,
)
from influence.evaluation.cifar10_recipe import train
from influence.models import ResNet9  # the built-in layout, so `--model resnet9[-narrow]` loads the checkpoints


# --- one training run: influence.evaluation.cifar10_recipe (torch and the model layout only), shared with
# scripts/cifar2_lds_cpu.py


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch].float().div(255).contiguous(memory_format=torch.channels_last)).float()
                      for i in range(0, len(x), batch)]).cpu()


def margins(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """logit_y − logsumexp(other logits), TRAK's model output for classification."""
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (correct - others.logsumexp(1)).numpy()


def state_arrays(sd: dict, prefix: str, half: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        a = v.cpu().numpy()
        out[f"{prefix}/{k}"] = a.astype(np.float16) if half and a.dtype == np.float32 else a
    return out


# --- jobs ----------------------------------------------------------------------------------------------------------
def job_list(args: argparse.Namespace) -> list[dict]:
    jobs: list[dict] = []
    if args.removal:  # harmful-example removal: retrain CIFAR-2 without each named id set, 3 seeds each
        names = [k for k in np.load(args.removal).files if k.startswith("remove/")] + ["remove/none"]
        jobs = [{"kind": "removal", "set": n, "seed": s, "id": i} for i, (n, s) in enumerate((n, s) for n in names for s in range(3))]
        return jobs
    for s in range(args.full_models):
        jobs.append({"kind": "lds_full", "seed": s})
    for r in range(args.retrains):
        jobs.append({"kind": "lds_half", "seed": 100 + r})
    for rate in FLIP_RATES:
        jobs.append({"kind": "mis_full", "rate": rate})
        for f in range(FOLDS):
            jobs.append({"kind": "mis_fold", "rate": rate, "fold": f})
    for name in PATCHES:
        for s in SHORTCUT_SEEDS:
            jobs.append({"kind": "shortcut", "patch": name, "seed": s})
    for s in SHORTCUT_SEEDS:
        jobs.append({"kind": "shortcut", "patch": "clean", "seed": s})
    if args.resnet9_epochs > 0:
        jobs.append({"kind": "resnet9"})
    for i, j in enumerate(jobs):
        j["id"] = i
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        jobs = [j for j in jobs if j["id"] in keep]
    return jobs


def run_job(j: dict, d: dict, args: argparse.Namespace) -> dict:
    dev = d["dev"]
    W, E = args.width, args.epochs
    out: dict = {}
    if j["kind"] in ("lds_full", "lds_half"):
        x, y = d["c2_x"], d["c2_y"]
        if j["kind"] == "lds_half":
            rng = np.random.default_rng(j["seed"])
            mask = np.zeros(len(x), dtype=bool)
            mask[rng.choice(len(x), len(x) // 2, replace=False)] = True
            sel = torch.from_numpy(np.nonzero(mask)[0]).to(dev)
            model, _ = train(x[sel], y[sel], width=W, epochs=E, seed=j["seed"])
            out["mask"] = mask
        else:
            keep = (E // 2, 3 * E // 4, E) if j["seed"] == 0 else (E,)
            model, kept = train(x, y, width=W, epochs=E, seed=j["seed"], keep=keep)
            for epoch, lr, sd in kept:
                out.update(state_arrays(sd, f"seed{j['seed']}_ep{epoch}"))
                out[f"lr/seed{j['seed']}_ep{epoch}"] = np.float32(lr)
        lg = logits_of(model, d["c2_xt"])
        out["margins"] = margins(lg, d["c2_yt"].cpu())
        out["acc"] = np.float32((lg.argmax(1) == d["c2_yt"].cpu()).float().mean())
    elif j["kind"] in ("mis_full", "mis_fold"):
        x = d["sub_x"]
        noisy = torch.from_numpy(flip_labels(d["sub_y_np"], j["rate"])[0]).to(dev)
        if j["kind"] == "mis_full":
            model, kept = train(x, noisy, width=W, epochs=E, seed=7, keep=(E // 2, E))
            for epoch, lr, sd in kept:
                out.update(state_arrays(sd, f"ep{epoch}"))
                out[f"lr/ep{epoch}"] = np.float32(lr)
            lg = logits_of(model, x)
            out["train_loss"] = F.cross_entropy(lg, noisy.cpu(), reduction="none").numpy()
        else:
            fold = np.random.default_rng(11).permutation(len(x)) % FOLDS == j["fold"]
            tr = torch.from_numpy(np.nonzero(~fold)[0]).to(dev)
            model, _ = train(x[tr], noisy[tr], width=W, epochs=E, seed=20 + j["fold"])
            held = np.nonzero(fold)[0]
            out["held"] = held
            out["probs"] = logits_of(model, x[torch.from_numpy(held).to(dev)]).softmax(1).numpy()
        lt = logits_of(model, d["test_x"])
        out["test_acc"] = np.float32((lt.argmax(1) == d["test_y"].cpu()).float().mean())
    elif j["kind"] == "shortcut":
        x_np, y_np = d["sub_x_np"], d["sub_y_np"]
        yt_np = d["test_y"].cpu().numpy()
        if j["patch"] != "clean":
            cls, ids = shortcut_plan(y_np, j["patch"], j["seed"])
            x_np = x_np.copy()
            x_np[ids] = apply_patch(x_np[ids], j["patch"])
            out["cls"], out["ids"] = np.int64(cls), ids
        model, _ = train(torch.from_numpy(x_np).to(dev), d["sub_y"], width=W, epochs=E, seed=j["seed"])
        lt = logits_of(model, d["test_x"])
        out["test_acc"] = np.float32((lt.argmax(1) == d["test_y"].cpu()).float().mean())
        if j["patch"] != "clean":
            others = np.nonzero(yt_np != out["cls"])[0]
            xt = apply_patch(d["test_x_np"][others], j["patch"])
            lp = logits_of(model, torch.from_numpy(xt).to(dev))
            out["patched_to_cls"] = np.float32((lp.argmax(1) == int(out["cls"])).float().mean())
        out.update(state_arrays(model.state_dict(), "final", half=True))
    elif j["kind"] == "removal":
        x, y = d["c2_x"], d["c2_y"]
        drop = np.load(args.removal)[j["set"]] if j["set"] != "remove/none" else np.array([], dtype=np.int64)
        keep = torch.from_numpy(np.setdiff1d(np.arange(len(x)), drop)).to(dev)
        model, _ = train(x[keep], y[keep], width=W, epochs=E, seed=j["seed"])
        lg = logits_of(model, d["c2_xt"])
        out["margins"] = margins(lg, d["c2_yt"].cpu())
        out["acc"] = np.float32((lg.argmax(1) == d["c2_yt"].cpu()).float().mean())
    elif j["kind"] == "resnet9":
        model, _ = train(d["all_x"], d["all_y"], width=64, epochs=args.resnet9_epochs, seed=0, batch=512, lr=0.1,
                         amp=dev.type == "cuda")
        lt = logits_of(model, d["test_x"])
        out["test_acc"] = np.float32((lt.argmax(1) == d["test_y"].cpu()).float().mean())
        out.update(state_arrays(model.state_dict(), "final", half=True))
    return out


def worker(rank: int, args: argparse.Namespace, jobs: "mp.Queue", results: "mp.Queue", t_start: float) -> None:
    torch.set_num_threads(1)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    arr = np.load(Path(args.work) / "arrays.npz")
    t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
    d = {"dev": dev, "c2_x": t(arr["c2_x"]), "c2_y": t(arr["c2_y"]), "c2_xt": t(arr["c2_xt"]), "c2_yt": t(arr["c2_yt"]),
         "sub_x": t(arr["sub_x"]), "sub_y": t(arr["sub_y"]), "sub_x_np": arr["sub_x"], "sub_y_np": arr["sub_y"],
         "test_x": t(arr["test_x"]), "test_y": t(arr["test_y"]), "test_x_np": arr["test_x"],
         "all_x": t(arr["all_x"]), "all_y": t(arr["all_y"])}
    while True:
        if time.time() - t_start > args.deadline:
            break
        try:
            j = jobs.get_nowait()
        except queue.Empty:
            break
        t0 = time.time()
        try:
            out = run_job(j, d, args)
            np.savez(Path(args.work) / f"job{j['id']:04d}.npz", **out)
            acc = out.get("acc", out.get("test_acc"))
            results.put((j["id"], "ok", time.time() - t0, None if acc is None else float(acc)))
        except Exception as e:  # report and carry on with the next job
            results.put((j["id"], f"{type(e).__name__}: {e}", time.time() - t0, None))
    results.put((-1, f"worker {rank} done", 0.0, None))


def pack(args: argparse.Namespace, jobs: list[dict], done: dict[int, str]) -> dict:
    """Gather the finished jobs into lds.npz, mislabel.npz, shortcut.npz, resnet9.npz and summary.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = lambda j: dict(np.load(Path(args.work) / f"job{j['id']:04d}.npz"))  # noqa: E731
    ok = [j for j in jobs if done.get(j["id"]) == "ok"]
    summary: dict = {"width": args.width, "epochs": args.epochs, "jobs": len(jobs), "finished": len(ok),
                     "failed": {j["id"]: done[j["id"]] for j in jobs if j["id"] in done and done[j["id"]] != "ok"}}
    lds: dict = {}
    full = [j for j in ok if j["kind"] == "lds_full"]
    half = [j for j in ok if j["kind"] == "lds_half"]
    for j in full:
        r = load(j)
        lds.update({k: v for k, v in r.items() if "/" in k})
        lds[f"full_margins/seed{j['seed']}"] = r["margins"]
    if half:
        rs = [load(j) for j in half]
        lds["masks"] = np.stack([r["mask"] for r in rs])
        lds["margins"] = np.stack([r["margins"] for r in rs]).astype(np.float32)
        lds["half_acc"] = np.array([r["acc"] for r in rs])
    if lds:
        np.savez(out / "lds.npz", **lds)
    summary["lds"] = {"full_models": len(full), "retrains": len(half),
                      "full_acc": [float(load(j)["acc"]) for j in full],
                      "half_acc_mean": float(lds["half_acc"].mean()) if half else None}
    mis: dict = {}
    for rate in FLIP_RATES:
        tag = f"flip{int(rate * 100)}"
        fj = [j for j in ok if j["kind"] == "mis_full" and j["rate"] == rate]
        folds = [j for j in ok if j["kind"] == "mis_fold" and j["rate"] == rate]
        if fj:
            r = load(fj[0])
            mis.update({f"{tag}/{k}": v for k, v in r.items()})
            summary[f"mislabel_{tag}_test_acc"] = float(r["test_acc"])
        if len(folds) == FOLDS:
            probs = np.zeros((sum(len(load(j)["held"]) for j in folds), 10), dtype=np.float32)
            for j in folds:
                r = load(j)
                probs[r["held"]] = r["probs"]
            mis[f"{tag}/oof_probs"] = probs
    if mis:
        np.savez(out / "mislabel.npz", **mis)
    sc: dict = {}
    runs = []
    for j in ok:
        if j["kind"] != "shortcut":
            continue
        r = load(j)
        tag = f"{j['patch']}_s{j['seed']}"
        sc.update({f"{tag}/{k}": v for k, v in r.items()})
        runs.append({"patch": j["patch"], "seed": j["seed"], "test_acc": float(r["test_acc"]),
                     "cls": int(r["cls"]) if "cls" in r else None,
                     "patched_to_cls": float(r["patched_to_cls"]) if "patched_to_cls" in r else None})
    if sc:
        np.savez(out / "shortcut.npz", **sc)
    summary["shortcut_runs"] = runs
    rem = {f"{j['set']}/seed{j['seed']}": load(j)["margins"] for j in ok if j["kind"] == "removal"}
    if rem:
        np.savez(out / "removal.npz", **rem)
        summary["removal_runs"] = len(rem)
    rj = [j for j in ok if j["kind"] == "resnet9"]
    if rj:
        r = load(rj[0])
        np.savez(out / "resnet9.npz", **r)
        summary["resnet9_test_acc"] = float(r["test_acc"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


MISLABEL_DOC = """One narrow ResNet on a flipped-label CIFAR-10 subset, with checkpoints kept during training (for TracInCP).

The recipe is this trainer's ``mis_full`` job (``train``: SGD, Nesterov, one-cycle linear
schedule peaking at ``--lr`` a quarter of the way in, wd 5e-4, crops and flips, seed 7), on the ``flipN.npz`` file
written by ``scripts/cifar10_data.py --derived`` (its ``y`` holds the noisy labels, ``flipped`` the flipped rows).
For every epoch in ``--keep`` it writes ``OUT/e{epoch}.pt`` (a state dict ``influence build --checkpoint`` loads)
and the per-example training loss of that checkpoint (eval mode, no augmentation) into ``OUT/losses.npz``; the
learning rate in force during the epoch that ended there goes to ``OUT/meta.json`` (the TracInCP weight: the lr at
the end of the last epoch is 0 under the one-cycle schedule, so the weight is the mean lr over that epoch).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/cifar10_train.py mislabel-ckpts --data runs/cifar10/flip10.npz \
        --out runs/flip10_ckpts --epochs 24 --keep 2,4,8,12,16,20,24 --cpu
    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/cifar10_train.py mislabel-ckpts --data runs/cifar10/flip10.npz \
        --out runs/flip10_ckpts --epochs 24 --cpu --cv
"""


def mislabel_ckpts_main(argv: list[str]) -> int:
    """`mislabel-ckpts` mode: see MISLABEL_DOC."""
    p = argparse.ArgumentParser(prog="cifar10_train.py mislabel-ckpts", description=MISLABEL_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="flipN.npz (x uint8 NCHW, y noisy labels, flipped ids)")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--keep", default="4,8,12,16,24", help="comma-separated epochs whose checkpoints are saved")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--cv", action="store_true",
                   help="instead: the 4-fold out-of-fold probabilities of this trainer's mis_fold jobs (same folds and "
                        "seeds) into OUT/oof_probs.npz, the cross-validated confidence baseline")
    a = p.parse_args(argv)
    dev = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    d = np.load(a.data)
    x = torch.from_numpy(d["x"]).contiguous().to(dev)  # uint8 NCHW
    y = torch.from_numpy(d["y"].astype(np.int64)).to(dev)
    keep = tuple(int(e) for e in a.keep.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.cv:
        probs = np.zeros((len(x), 10), dtype=np.float32)
        for f in range(FOLDS):
            fold = np.random.default_rng(11).permutation(len(x)) % FOLDS == f
            tr = torch.from_numpy(np.nonzero(~fold)[0]).to(dev)
            model, _ = train(x[tr], y[tr], width=a.width, epochs=a.epochs, seed=20 + f)
            held = np.nonzero(fold)[0]
            probs[held] = logits_of(model, x[torch.from_numpy(held).to(dev)]).softmax(1).numpy()
            print(f"fold {f} {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        np.savez(out / "oof_probs.npz", probs=probs, cv_s=np.float32(time.perf_counter() - t0))
        return 0
    # the trainer keeps the lr at each kept epoch's end; the mean lr over that epoch is recomputed here
    steps = len(x) // 128
    total, peak = steps * a.epochs, steps * a.epochs // 4

    def lr_at(step: int) -> float:
        return 0.05 * (step / peak if step < peak else max(0.0, (total - step) / (total - peak)))

    _, kept = train(x, y, width=a.width, epochs=a.epochs, seed=a.seed, keep=keep,
                    on_epoch=lambda e: print(f"epoch {e} {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True))
    meta: dict = {"epochs": a.epochs, "keep": list(keep), "seed": a.seed, "width": a.width, "data": a.data,
                  "train_s": round(time.perf_counter() - t0, 1), "lr_end": {}, "lr_mean": {}}
    losses = {}
    for epoch, lr_end, sd in kept:
        torch.save(sd, out / f"e{epoch}.pt")
        m = ResNet9(width=a.width).to(dev).to(memory_format=torch.channels_last)
        m.load_state_dict(sd)
        losses[f"e{epoch}"] = F.cross_entropy(logits_of(m, x), y.cpu(), reduction="none").numpy()
        meta["lr_end"][f"e{epoch}"] = lr_end
        meta["lr_mean"][f"e{epoch}"] = float(np.mean([lr_at(s) for s in range((epoch - 1) * steps, epoch * steps)]))
    np.savez(out / "losses.npz", **losses)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta), file=sys.stderr)
    return 0



def main() -> None:
    if sys.argv[1:2] == ["mislabel-ckpts"]:  # one run with checkpoints kept during training (TracInCP study)
        raise SystemExit(mislabel_ckpts_main(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the unpacked folder holding train/ and test/")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/cifar10_train_work")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--full-models", type=int, default=5)
    p.add_argument("--retrains", type=int, default=100)
    p.add_argument("--resnet9-epochs", type=int, default=12)
    p.add_argument("--deadline", type=float, default=300.0, help="seconds after which no new job starts")
    p.add_argument("--grace", type=float, default=90.0, help="seconds after the deadline before running jobs are killed")
    p.add_argument("--removal", default="", help=".npz of id sets (remove/<name>) to retrain CIFAR-2 without")
    p.add_argument("--only", default="", help="comma-separated job ids to run (to finish an interrupted run)")
    p.add_argument("--tiny", type=int, default=0, help="keep only this many images per class (a smoke test)")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    t_start = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = Path(args.data)
    x, y = read_folder(root / "train")
    xt, yt = read_folder(root / "test")
    if args.tiny:
        keep = subset_ids(y, args.tiny)
        x, y = x[keep], y[keep]
        keept = subset_ids(yt, args.tiny)
        xt, yt = xt[keept], yt[keept]
    print(f"read {len(x)} train / {len(xt)} test images in {time.time() - t_start:.1f}s", flush=True)
    c2 = [CLASSES.index(c) for c in CIFAR2]
    m, mt = np.isin(y, c2), np.isin(yt, c2)
    remap = {c: i for i, c in enumerate(c2)}
    sub = subset_ids(y, args.tiny // 2 if args.tiny else SUBSET_PER_CLASS)
    np.savez(work / "arrays.npz", c2_x=x[m], c2_y=np.vectorize(remap.get)(y[m]), c2_xt=xt[mt],
             c2_yt=np.vectorize(remap.get)(yt[mt]), sub_x=x[sub], sub_y=y[sub], test_x=xt, test_y=yt, all_x=x, all_y=y)
    jobs = job_list(args)
    ctx = mp.get_context("spawn")
    jq, rq = ctx.Queue(), ctx.Queue()
    for j in jobs:
        jq.put(j)
    procs = [ctx.Process(target=worker, args=(r, args, jq, rq, t_start)) for r in range(args.workers)]
    for pr in procs:
        pr.start()
    done: dict[int, str] = {}
    alive = args.workers
    while alive:
        try:
            jid, status, secs, acc = rq.get(timeout=5)
        except queue.Empty:
            over = time.time() - t_start > args.deadline + args.grace
            if over or not any(pr.is_alive() for pr in procs):
                print("stopping: workers gone or past the grace period; packing what finished", flush=True)
                for pr in procs:
                    pr.terminate()
                break
            continue
        if jid < 0:
            alive -= 1
            continue
        done[jid] = status
        j = next(j for j in jobs if j["id"] == jid)
        print(f"[{time.time() - t_start:6.1f}s] job {jid} {j['kind']} {status} in {secs:.1f}s, test acc {acc}", flush=True)
    for pr in procs:
        pr.join()
    summary = pack(args, jobs, done)
    print(json.dumps({k: v for k, v in summary.items() if k != "shortcut_runs"}), flush=True)
    print(f"total {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
