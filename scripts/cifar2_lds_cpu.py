"""CPU-sized LDS ground truth on a CIFAR-2 subset (issue #10): the data, M half-subset retrains and the attribution models.

The GPU-trained CIFAR-2 models of ``scripts/cifar10_train.py`` are gone, so this rebuilds a smaller study that a
2-core CPU can train in well under an hour: the first ``--train-per-class`` training images of each class (cat, dog;
sorted file order, the index ``influence build --data FOLDER`` uses) and the first ``--test-per-class`` test images.
Every model is the trainer's own recipe (``influence.evaluation.cifar10_recipe.train``, what ``scripts/cifar10_train.py`` runs: resnet9-narrow, SGD Nesterov, one-cycle lr 0.05,
batch 128 with the last partial batch dropped, wd 5e-4, crops and flips) with ``--epochs`` epochs.

Writes, under ``--work``, what ``scripts/cifar10_eval.py lds`` reads (``--models WORK --work WORK``):

- ``train.npz`` (x uint8 N×3×32×32, y: 0 = cat, 1 = dog; ids into the folder): the training subset, the ``--data`` of ``influence build``;
- ``lds.npz``: ``masks`` (M, N) from ``influence.evaluation.lds.subset_masks`` (seed 12345), ``margins`` (M, T) of
  each retrain (seed = 100 + subset index) on the test subset (``influence.evaluation.lds.margins``), ``test_ids``
  (indices into the CIFAR-2 test folder), ``seconds`` per retrain;
- ``ckpt/lds_seed{s}_ep{E}.pt``: full-subset models of seeds 0..``--full-models``−1 (state dicts).

Resumable: finished retrains are kept in ``retrains/j{j}.npy`` and skipped on a re-run. ``--report RESULTS`` prints
the markdown table of a results JSONL that ``cifar10_eval.py lds`` wrote (last row per set, tool and method).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/cifar2_lds_cpu.py --work runs/lds_c2 --M 50 --epochs 24
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/cifar10_eval.py lds --models runs/lds_c2 --work runs/lds_c2 \
        --lds-train runs/lds_c2/train.npz --cifar2 runs/cifar10/cifar2 --results runs/lds_c2/results.jsonl \
        --sets "1 model" --lds-fresh --peers traker dattri captum
    PYTHONPATH=. python scripts/cifar2_lds_cpu.py --report runs/lds_c2/results.jsonl
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/cifar2_lds_cpu.py --lambda-sweep runs/lds_c2/stores/lds_1_model_k2048
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from influence.evaluation.cifar10 import read_folder, subset_ids
from influence.evaluation.cifar10_recipe import train  # the trainer's recipe, not a copy
from influence.evaluation.lds import margins, subset_masks


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def report(path: Path) -> None:
    """Print the results table (markdown) of a ``cifar10_eval.py lds`` JSONL: the last row per (set, tool, method)."""
    last: dict[tuple[str, str, str], dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("stage") == "lds":
            last[(r["set"], r.get("tool", "ours"), r["method"])] = r
    print("| models | tool | method | projector, k | LDS | 95% CI | seconds |")
    print("|---|---|---|---|---|---|---|")
    for (name, tool, method), r in last.items():
        if r.get("failed"):
            print(f"| {name} | {tool} | {method} | – | failed | – | – |")
            continue
        proj = f"sparse, {r['k']}" if tool == "ours" else (f"{r['projector']}, {r['k']}" if r.get("k") else r.get("projector"))
        secs = f"{r['build_s']:.1f} + {r['score_s']:.1f} = {r['seconds']:.1f}" if tool == "ours" else f"{r['seconds']:.1f}"
        print(f"| {name} | {tool} | {method} | {proj} | {r['lds']:.3f} | {r['ci'][0]:.3f}–{r['ci'][1]:.3f} | {secs} |")


def lambda_sweep(store: Path, work: Path, cifar2: Path, rels: list[float]) -> None:
    """LDS of TRAK at several relative λ (λ = rel · trace(ΦᵀΦ)/min(N, k), ``scoring.trak_lambda``) from one store's
    features (``lds.trak_scores_dual``), on WORK's ground truth."""
    from influence.evaluation.lds import dual_form_inputs, lds, trak_scores_dual
    from influence.loading import ImageFolder
    from influence.query import Influence
    from influence.scoring import TRAK, TRAK_LAMBDA_UNIT

    t = np.load(work / "lds.npz")
    test = ImageFolder(cifar2 / "test")
    xt = torch.stack([test[i][0] for i in t["test_ids"]])
    yt = torch.tensor([test[i][1] for i in t["test_ids"]])
    s = Influence.open(store)
    phi, q, pt = dual_form_inputs(s, xt, yt)
    ref = s.scores(xt, yt, method="trak")
    stored = TRAK.stored_lambda(s.store, s.store.checkpoint_ids[0])
    for rel in rels:
        sc = trak_scores_dual(phi, q, pt, rel)
        row = {"store": str(store), "lambda_rel": rel, "lambda_unit": TRAK_LAMBDA_UNIT, **lds(sc, t["masks"], t["margins"])}
        if stored is not None and stored.is_current(rel):
            row["corr_with_store_trak"] = float(np.corrcoef(sc.ravel(), ref.ravel())[0, 1])
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar2", default="runs/cifar10/cifar2", help="CIFAR-2 folder with train/ and test/")
    p.add_argument("--work", default="runs/lds_c2")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--M", type=int, default=50, help="half-subset retrains")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--full-models", type=int, default=5)
    p.add_argument("--only", choices=["all", "models", "retrains"], default="all")
    p.add_argument("--report", default=None, help="print the table of this results JSONL and exit")
    p.add_argument("--lambda-sweep", default=None, metavar="STORE", help="print TRAK's LDS at --rels from STORE's features and exit")
    p.add_argument("--rels", default="0.001,0.01,0.1,1,10")
    a = p.parse_args(argv)
    if a.lambda_sweep:
        torch.set_num_threads(1)
        lambda_sweep(Path(a.lambda_sweep), Path(a.work), Path(a.cifar2), [float(r) for r in a.rels.split(",")])
        return 0
    if a.report:
        report(Path(a.report))
        return 0
    torch.set_num_threads(1)
    work = Path(a.work)
    (work / "ckpt").mkdir(parents=True, exist_ok=True)
    (work / "retrains").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    x_all, y_all = read_folder(Path(a.cifar2) / "train")
    xt_all, yt_all = read_folder(Path(a.cifar2) / "test")
    ids, tid = subset_ids(y_all, a.train_per_class), subset_ids(yt_all, a.test_per_class)
    x, y, xt, yt = x_all[ids], y_all[ids], xt_all[tid], yt_all[tid]
    np.savez(work / "train.npz", x=x, y=y, ids=ids)  # no classes array: the 10-way model would refuse 2 names
    log(f"data: {len(x)} train / {len(xt)} test images in {time.perf_counter() - t0:.1f}s")
    xtr, ytr = torch.from_numpy(x), torch.from_numpy(y)
    xte, yte = torch.from_numpy(xt).float() / 255, torch.from_numpy(yt)
    meta_path = work / "meta.json"

    def update_meta(**fields: object) -> None:
        """Re-read meta.json just before each write and replace it whole: `--only models` and `--only retrains` may run side
        by side (a short window between read and write remains: no lock)."""
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        for key, value in fields.items():
            if key == "full":
                meta.setdefault("full", {}).update(value)
            else:
                meta[key] = value
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(meta_path)

    update_meta(epochs=a.epochs, width=a.width, n_train=len(x), n_test=len(xt), M=a.M,
                recipe=f"scripts/cifar10_train.py train(width={a.width}, epochs={a.epochs}, lr 0.05, batch 128)")

    def full(s: int) -> None:
        path = work / "ckpt" / f"lds_seed{s}_ep{a.epochs}.pt"
        if path.is_file():
            return
        t = time.perf_counter()
        net, _ = train(xtr, ytr, width=a.width, epochs=a.epochs, seed=s)
        m = margins(net, xte, yte)
        torch.save(net.state_dict(), path)
        done = {"seconds": round(time.perf_counter() - t, 1), "test_share_margin_pos": float((m > 0).mean())}
        update_meta(full={str(s): done})
        log(f"full model seed {s}: {done}")

    if a.only in ("all", "models"):
        full(0)
    if a.only in ("all", "retrains"):
        masks = subset_masks(len(x), a.M)
        for j in range(a.M):
            f = work / "retrains" / f"j{j}.npy"
            if f.is_file():
                continue
            t = time.perf_counter()
            sel = torch.from_numpy(np.flatnonzero(masks[j]))
            net, _ = train(xtr[sel], ytr[sel], width=a.width, epochs=a.epochs, seed=100 + j)
            m = margins(net, xte, yte)
            np.save(f, np.concatenate([m, [time.perf_counter() - t]]).astype(np.float32))
            log(f"retrain {j + 1}/{a.M}: {time.perf_counter() - t:.1f}s, margin>0 on {(m > 0).mean():.3f} of test")
        rows = np.stack([np.load(work / "retrains" / f"j{j}.npy") for j in range(a.M)])
        np.savez(work / "lds.npz", masks=masks, margins=rows[:, :-1], seconds=rows[:, -1], test_ids=tid,
                 half_acc=(rows[:, :-1] > 0).mean(1))
        half_acc = float((rows[:, :-1] > 0).mean())
        update_meta(retrain_s_mean=float(rows[:, -1].mean()), half_acc_mean=half_acc)
        log(f"lds.npz: {a.M} retrains, mean {rows[:, -1].mean():.1f}s, half-data test acc {half_acc:.3f}")
    if a.only in ("all", "models"):
        for s in range(1, a.full_models):
            full(s)
    log(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
