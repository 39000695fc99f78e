"""Counterfactual check of attribution: remove a test prediction's top-k proponents, retrain, does it flip?

For ``--n-test`` correctly classified test images (random, seeded) of the digits split, remove
the top-k proponents (k ∈ {10, 20, 40}) of the true class by our method, retrain with the same
seeded recipe as the attributed model (scripts/eval_lds.py: train_classifier(epochs=10), seed 0),
and count how often the prediction flips and how much the margin drops; the same with k
random training examples as the control.

    python scripts/eval_lds.py models --model mlp       # the attributed model (seed 0, full data)
    python scripts/eval_removal.py --model mlp --method trak --set ckpt1

Uses the store runs/lds_cache/stores/<model>_<set>_sparse_<k>.zarr (built if missing).
Results: runs/lds_cache/removal_<model>.json, and a section of docs/BENCHMARKS.md via
``python scripts/eval_lds.py report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import eval_lds as E  # noqa: E402
from influence.data import index_subset  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(E.MODELS), default="mlp")
    ap.add_argument("--method", default="trak")
    ap.add_argument("--set", default="ckpt1", help="model set of the store (eval_lds.py names)")
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--ks", default="10,20,40")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    from influence.query import Influence

    train, test = E.data()
    meta = json.loads((E.models_dir(a.model) / "models.json").read_text())
    base = E.MODELS[a.model][0]()
    base.load_state_dict(torch.load(meta["run"]["ckpts"][-1], weights_only=True))
    m0 = E.margins(base, test)
    with torch.no_grad():
        pred0 = base.eval()(test.x).argmax(-1)
    correct = np.flatnonzero((pred0 == test.y).numpy())
    rng = np.random.default_rng(a.seed)
    ids = np.sort(rng.choice(correct, a.n_test, replace=False))
    store = E.store_path(a.model, a.set, "sparse", a.proj_dim)
    if not (store / "zarr.json").is_file():
        store, _ = E.build_store(a.model, a.set, "sparse", a.proj_dim)
    session = Influence.open(store)
    scores = session.scores(test.x[ids], test.y[ids], method=a.method)  # (n_train, n_test)
    ks = [int(k) for k in a.ks.split(",")]
    rows = []
    t0 = time.perf_counter()
    for j, t in enumerate(ids):
        order = np.argsort(-scores[:, j], kind="stable")
        for k in ks:
            for how in ("top", "random"):
                removed = order[:k] if how == "top" else rng.choice(len(train), k, replace=False)
                keep = np.setdiff1d(np.arange(len(train)), removed)
                net, _ = E.train_one(a.model, index_subset(train, keep.tolist()), seed=0)
                m1 = float(E.margins(net, test)[t])
                with torch.no_grad():
                    p1 = int(net.eval()(test.x[t:t + 1]).argmax(-1))
                rows.append({"test_id": int(t), "k": k, "how": how, "flipped": p1 != int(test.y[t]),
                             "margin_before": float(m0[t]), "margin_after": m1})
        E.log(f"[removal {a.model}] {j + 1}/{len(ids)} test points, {time.perf_counter() - t0:.0f}s")
    summary = {}
    for k in ks:
        for how in ("top", "random"):
            r = [x for x in rows if x["k"] == k and x["how"] == how]
            summary[f"{how}{k}"] = {"flip_rate": float(np.mean([x["flipped"] for x in r])),
                                    "flips": int(sum(x["flipped"] for x in r)), "n": len(r),
                                    "mean_margin_drop": float(np.mean([x["margin_before"] - x["margin_after"] for x in r]))}
    # control: retraining with nothing removed (same seed) reproduces the base model's margins up to float noise
    out = {"model": a.model, "method": a.method, "set": a.set, "k_proj": a.proj_dim, "n_test": len(ids), "test_ids": ids.tolist(),
           "recipe": f"train_classifier(epochs={E.EPOCHS}), seed 0, same as the attributed model", "summary": summary, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    path = E.CACHE / f"removal_{a.model}.json"
    path.write_text(json.dumps(out, indent=1))
    for key, v in summary.items():
        E.log(f"[removal {a.model}] {key}: flips {v['flips']}/{v['n']}, mean margin drop {v['mean_margin_drop']:.2f}")
    return out


if __name__ == "__main__":
    main()
