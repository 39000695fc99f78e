"""Counterfactual check of attribution: remove a test prediction's top-k proponents, retrain, does it flip?

For ``--n-test`` correctly classified test images (random, seeded) of the digits split, remove
the top-k proponents (k ∈ {10, 20, 40}) of the true class by ``Influence.scores``, retrain with the
same seeded recipe as the attributed model (train_classifier(epochs=10), seed 0), and count how
often the prediction flips and how much the margin drops; the same with k random training
examples as the control (``influence.evaluation.removal``).

    python scripts/eval_lds.py models --model mlp       # the attributed model (seed 0, full data)
    python scripts/eval_removal.py --model mlp --method trak --set ckpt1

Uses the store runs/lds_cache/stores/<model>_<set>_sparse_<k>.zarr (built if missing).
Results: runs/lds_cache/removal_<model>.json, and a section of docs/BENCHMARKS.md via
``python scripts/eval_lds.py report``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from influence.evaluation.digits import index_subset
from influence.evaluation.lds import margins
from influence.evaluation.lds_study import EPOCHS, MODELS, LdsStudy, log
from influence.evaluation.removal import removal_trials, summarize
from influence.query import Influence


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="mlp")
    ap.add_argument("--method", default="trak")
    ap.add_argument("--set", default="ckpt1", help="model set of the store (eval_lds.py names)")
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--ks", default="10,20,40")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="runs/lds_cache", help="the LDS study's cache folder")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    study = LdsStudy(a.cache)
    train, test = study.data()
    meta = json.loads((study.models_dir(a.model) / "models.json").read_text())
    base = MODELS[a.model][0]()
    base.load_state_dict(torch.load(meta["run"]["ckpts"][-1], weights_only=True))
    m0 = margins(base, test.x, test.y)
    with torch.no_grad():
        pred0 = base.eval()(test.x).argmax(-1)
    correct = np.flatnonzero((pred0 == test.y).numpy())
    rng = np.random.default_rng(a.seed)
    ids = np.sort(rng.choice(correct, a.n_test, replace=False))
    store = study.store_path(a.model, a.set, "sparse", a.proj_dim)
    if not (store / "zarr.json").is_file():
        store, _ = study.build_store(a.model, a.set, "sparse", a.proj_dim)
    scores = Influence.open(store).scores(test.x[ids], test.y[ids], method=a.method)  # (n_train, n_test)

    def retrain(keep: np.ndarray, t: int) -> tuple[float, bool]:
        net, _ = study.train_one(a.model, index_subset(train, keep.tolist()), seed=0)
        with torch.no_grad():
            correct_after = int(net.eval()(test.x[t:t + 1]).argmax(-1)) == int(test.y[t])
        return float(margins(net, test.x[t:t + 1], test.y[t:t + 1])[0]), correct_after

    t0 = time.perf_counter()
    rows = removal_trials(scores, ids.tolist(), m0[ids].tolist(), [int(k) for k in a.ks.split(",")], retrain, rng,
                          progress=lambda j, n: log(f"[removal {a.model}] {j}/{n} test points, {time.perf_counter() - t0:.0f}s"))
    summary = summarize(rows)
    out = {"model": a.model, "method": a.method, "set": a.set, "k_proj": a.proj_dim, "n_test": len(ids), "test_ids": ids.tolist(),
           "recipe": f"train_classifier(epochs={EPOCHS}), seed 0, same as the attributed model", "summary": summary, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    (study.cache / f"removal_{a.model}.json").write_text(json.dumps(out, indent=1))
    for key, v in summary.items():
        log(f"[removal {a.model}] {key}: flips {v['flips']}/{v['n']}, mean margin drop {v['mean_margin_drop']:.2f}")
    return out


if __name__ == "__main__":
    main()
