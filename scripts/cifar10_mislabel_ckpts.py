"""One narrow ResNet on a flipped-label CIFAR-10 subset, with checkpoints kept during training (for TracInCP).

The recipe is ``scripts/cifar10_train.py``'s ``mis_full`` job (its ``train``: SGD, Nesterov, one-cycle linear
schedule peaking at ``--lr`` a quarter of the way in, wd 5e-4, crops and flips, seed 7), on the ``flipN.npz`` file
written by ``scripts/cifar10_data.py --derived`` (its ``y`` holds the noisy labels, ``flipped`` the flipped rows).
For every epoch in ``--keep`` it writes ``OUT/e{epoch}.pt`` (a state dict ``influence build --checkpoint`` loads)
and the per-example training loss of that checkpoint (eval mode, no augmentation) into ``OUT/losses.npz``; the
learning rate in force during the epoch that ended there goes to ``OUT/meta.json`` (the TracInCP weight: the lr at
the end of the last epoch is 0 under the one-cycle schedule, so the weight is the mean lr over that epoch).

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/cifar10_mislabel_ckpts.py --data runs/cifar10/flip10.npz \
        --out runs/flip10_ckpts --epochs 24 --keep 2,4,8,12,16,20,24 --cpu
    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/cifar10_mislabel_ckpts.py --data runs/cifar10/flip10.npz \
        --out runs/flip10_ckpts --epochs 24 --cpu --cv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_train import FOLDS, logits_of, train  # noqa: E402  (the trainer's own loop, so the recipe is the same)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="flipN.npz (x uint8 NCHW, y noisy labels, flipped ids)")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--keep", default="4,8,12,16,24", help="comma-separated epochs whose checkpoints are saved")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--cv", action="store_true",
                   help="instead: the 4-fold out-of-fold probabilities of cifar10_train.py's mis_fold jobs (same folds and "
                        "seeds) into OUT/oof_probs.npz, the cross-validated confidence baseline")
    a = p.parse_args()
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
    from influence.models import ResNet9

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


if __name__ == "__main__":
    raise SystemExit(main())
