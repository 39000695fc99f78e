"""Which method should `influence explain` list influencers by? Counts ground-truth hits on a finished demo run.

- patched failures (test_patched.npz images the final model misclassifies as the patch class): patched training
  images among the top-k proponents of the predicted class;
- clean failures (test.npz misclassified): flipped training labels among the top-k proponents of the predicted
  class and among the top-k opponents of the true class.

Usage: python scripts/eval_explain_default.py runs/demo [--k 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from influence.query import Influence


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("demo")
    p.add_argument("--k", type=int, default=5)
    a = p.parse_args()
    root = Path(a.demo)
    truth = json.loads((root / "injections.json").read_text())
    flipped, patched = set(truth["flipped"]), set(truth["patched"])
    s = Influence.open(root / "store")
    rows: dict[str, dict[str, int]] = {}
    for name, pool in (("patched", "test_patched.npz"), ("clean", "test.npz")):
        d = np.load(root / pool)
        x, y = torch.as_tensor(d["x"]), torch.as_tensor(d["y"])
        pred = s.predict(x).argmax(-1).cpu()
        wrong = (pred != y).nonzero().flatten()
        if name == "patched":
            wrong = wrong[pred[wrong] == truth["patch_class"]]
        for m in s.methods:
            res = s.query(x[wrong], k=a.k, method=m, labels=y[wrong].tolist())
            r = rows.setdefault(m, {})
            if name == "patched":
                r["patched_failures"] = len(res)
                r["patched_in_proponents"] = sum(p.train_id in patched for q in res for p in q.proponents)
                r["failures_with_a_patched_proponent"] = sum(any(p.train_id in patched for p in q.proponents) for q in res)
            else:
                r["clean_failures"] = len(res)
                r["flipped_in_proponents"] = sum(p.train_id in flipped for q in res for p in q.proponents)
                r["flipped_in_opponents"] = sum(p.train_id in flipped for q in res for p in q.opponents)
    print(json.dumps({"k": a.k, "methods": rows}, indent=1))


if __name__ == "__main__":
    main()
