"""Mislabel detection with checkpoints taken during training, against loss baselines of the same run.

Reads a store built by ``influence build`` over the checkpoints of ``scripts/cifar10_train.py mislabel-ckpts`` and that
script's ``losses.npz``; ranks the training rows by

- self-influence of TracIn and TRAK (``Influence.open(store).self_influence(method)``: all the store's checkpoints,
  TracInCP weighted by the store's ``--lr-weights``; Pruthi et al., 2020) and the same scorer restricted to the final
  checkpoint alone and to other subsets (its ``ckpts``, recomputed from the stored features, nothing rebuilt);
- the final model's training loss, the 4-fold cross-validated confidence when ``--cv`` wrote it, and the mean training loss over the same checkpoints (an "area under the
  margin"-style ranking in the spirit of Pleiss et al., 2020, from saved checkpoints only);
- with ``--candidates``, every ranking ``influence flag --kind mislabel --method NAME`` offers, read from the store
  (``influence.evaluation.mislabel.candidate_rankings``), as rows ``flag --method NAME``;

and prints AUC (sklearn's ``roc_auc_score``) and the share of the flipped rows found among the top 10% / 20% as JSON
lines. Grad-Cos self-influence is 1 for every row (each checkpoint's block is normalised), so it ranks nothing.

    PYTHONPATH=. python scripts/cifar10_mislabel_ckpts_eval.py --data runs/cifar10/flip10.npz \
        --ckpts runs/flip10_ckpts --store runs/flip10_store
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from influence.evaluation.mislabel import mislabel_metrics


def detection(score: np.ndarray, positive: np.ndarray) -> dict:
    """AUC and the share of flipped rows among the top 10% / 20% (``influence.evaluation.mislabel``), as JSON keys."""
    m = mislabel_metrics(score, positive)
    return {"auc": round(m["auc"], 4), "found_at_10%": round(m["recall@10%"], 4), "found_at_20%": round(m["recall@20%"], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="flipN.npz (its 'flipped' array names the flipped rows)")
    p.add_argument("--ckpts", required=True, help="the --out folder of `cifar10_train.py mislabel-ckpts` (losses.npz, meta.json)")
    p.add_argument("--store", required=True)
    p.add_argument("--out", default="", help="also append the JSON lines here, and save every ranking's scores to OUT.scores.npz")
    p.add_argument("--candidates", action="store_true", help="add the rows of every `influence flag` mislabel ranking")
    p.add_argument("--no-subsets", action="store_true", help="skip self-influence over subsets of the checkpoints")
    a = p.parse_args()
    from influence.query import Influence
    from influence.scoring import get_method

    d = np.load(a.data)
    flipped = np.zeros(len(d["y"]), dtype=bool)
    flipped[d["flipped"]] = True
    losses = np.load(Path(a.ckpts) / "losses.npz")
    session = Influence.open(a.store)
    records = session.store.checkpoints
    ids = session.store.checkpoint_ids
    epoch = {c: int(re.search(r"e(\d+)\.pt$", r["path"]).group(1)) for c, r in zip(ids, records)}
    order = sorted(ids, key=lambda c: epoch[c])
    final = order[-1]
    eps = [epoch[c] for c in order]
    tag = lambda cs: "e" + "+".join(str(epoch[c]) for c in cs)  # noqa: E731
    rows: dict[str, np.ndarray] = {
        f"training loss (final model, e{epoch[final]})": losses[f"e{epoch[final]}"],
        f"mean training loss over {tag(order)}": np.mean([losses[f"e{e}"] for e in eps], axis=0),
    }
    if (Path(a.ckpts) / "oof_probs.npz").is_file():  # cifar10_train.py mislabel-ckpts --cv
        oof = np.load(Path(a.ckpts) / "oof_probs.npz")["probs"]
        rows["4-fold CV confidence (1 − out-of-fold p(label))"] = 1.0 - oof[np.arange(len(oof)), d["y"]]
    early = [c for c in order if epoch[c] <= max(eps) // 2]
    if early:
        rows[f"mean training loss over {tag(early)}"] = np.mean([losses[f"e{epoch[c]}"] for c in early], axis=0)
    if a.candidates:
        from influence.evaluation.mislabel import candidate_rankings

        rows.update({f"flag --method {k}": v for k, v in candidate_rankings(session).items()})
    for method in () if a.no_subsets else ("tracin", "trak"):
        rows[f"ours: {method} self-influence, all checkpoints {tag(order)} (store)"] = session.self_influence(method)
        subsets = [[final]] + ([early] if early else []) + [[c] for c in order if c != final]
        for cs in subsets:
            rows[f"ours: {method} self-influence, {tag(cs)}"] = get_method(method)(session.store, checkpoints=cs).self_influence()
        if method == "tracin":  # TracInCP with equal weights, against the store's lr weights
            scorer = get_method(method)(session.store, lr_weights=dict.fromkeys(ids, 1.0))
            rows[f"ours: tracin self-influence, {tag(order)}, equal weights"] = scorer.self_influence()
    lr = {f"e{epoch[c]}": r.get("lr_weight") for c, r in zip(ids, records)}
    if a.out:
        np.savez(f"{a.out}.scores.npz", flipped=flipped, **{k: np.asarray(v) for k, v in rows.items()})
    for name, score in rows.items():
        line = json.dumps({"ranking": name, **detection(np.asarray(score), flipped), "data": a.data, "store": a.store,
                           "lr_weights": lr})
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
