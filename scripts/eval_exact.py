"""Exact mode (metagradients) against TRAK / TracIn / Grad-Cos: same-seed small-drop LDS, half-subset LDS, removal.

One recipe (``Recipe(model="digits-mlp", epochs=10)``: SGD, momentum 0.9, weight decay
5e-4, lr 0.05 decayed linearly per epoch, batch 64, seed 0, as ``train_classifier(epochs=10)``)
is trained once with 10 checkpoints. Exact-mode scores come from replaying that run
(``influence.exact.metagradient``); the baselines are ``influence.build`` +
``Influence.scores`` on the same run's checkpoints (the final one alone, and all ten).
Ground truth: ``--retrains`` retrains of the same recipe with a random 1–5% of the
training set weighted 0 (same seed, same data order, same batches). LDS = mean over
test points of Spearman(−Σ_{i∈S} score_i, actual margin change); see influence/evaluation/exact_lds.py.

    python scripts/eval_exact.py --retrains 100 --test-points 60      # cached in runs/exact_cache/<variant>/
    python scripts/eval_exact.py --dtype float64 --no-baselines       # an ablation: exact mode only
    python scripts/eval_exact.py --model digits-cnn                    # BatchNorm CNN; fashion-mlp: 5,000 Fashion-MNIST
    python scripts/eval_exact.py --half-subset 100                     # half-subset LDS of the cached scores
    python scripts/eval_exact.py --removal --model fashion-mlp         # drop top-k proponents of misclassifications
    python scripts/eval_exact.py --scaling 2,5,10,20                   # cost and peak memory against T
    python scripts/eval_exact.py --report                              # rewrite the docs section only
    python scripts/eval_exact.py --rows                                # print the cached variants' table rows
    python scripts/eval_exact.py --model smooth-cnn-lr0.01             # the "metasmooth" CNN: GELU, avg pooling, lr 0.01

The cache directory is runs/exact_cache, or $INFLUENCE_EXACT_CACHE.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json

import torch

from influence.evaluation.exact_study import (
    CACHE, DOC, MODELS, ablation_lines, command_of, deadline_of, half_subset, log, removal, report, run, scaling, scaling_child, variant_row,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--retrains", type=int, default=100)
    ap.add_argument("--test-points", type=int, default=60)
    ap.add_argument("--query-batch", type=int, default=8, help="test points per replay (the reverse pass is vmapped)")
    ap.add_argument("--proj-dim", type=int, default=512, help="k of the baselines' sparse projector")
    ap.add_argument("--model", choices=list(MODELS), default="digits-mlp", help="gelu-mlp: the ablation with a smooth activation")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--drop", default="0.01,0.05", help="LOW,HIGH: fraction of the training set dropped per retrain")
    ap.add_argument("--no-baselines", action="store_true", help="exact mode only (ablations)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only rewrite the docs section from the cached results")
    ap.add_argument("--rows", action="store_true",
                    help="only print the variants table's rows and commands of the cached results (to add to the docs by hand)")
    ap.add_argument("--stop-at", default=None, help="HH:MM (UTC): start no retrain after this; judge by those done")
    ap.add_argument("--removal", action="store_true", help="the removal experiment (misclassified test images) instead")
    ap.add_argument("--removal-images", type=int, default=20)
    ap.add_argument("--removal-k", default="5,10,20")
    ap.add_argument("--scaling", default=None, help="E1,E2,...: cost and peak memory of one query against T (epochs)")
    ap.add_argument("--half-subset", type=int, default=0, help="N: the half-subset LDS over N models trained on random halves")
    ap.add_argument("--scaling-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.scaling_child:
        e, mode = a.scaling_child.split(",")
        print(json.dumps(scaling_child(int(e), mode)))
        return
    if a.scaling and not a.report:
        scaling(tuple(int(e) for e in a.scaling.split(",")))
    if a.half_subset and not a.report:
        for name, r in half_subset(a.model, a.half_subset, a.test_points, deadline_of(a.stop_at)).items():
            log(f"[half] {name:>18}: LDS {r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] over {r['n_retrains']} models")
    from influence.evaluation.docs import write_section

    if a.removal and not a.report:
        res = removal(a.model, a.removal_images, tuple(int(k) for k in a.removal_k.split(",")), a.proj_dim, a.query_batch,
                      deadline_of(a.stop_at))
        for name, r in res["rows"].items():
            log(f"{name:>12}: flipped {r['flipped']}/{len(res['test_ids'])}, now correct {r['now_correct']}, "
                f"mean margin drop {r['mean_margin_drop']:.3f}")

    drop = tuple(float(v) for v in a.drop.split(","))
    if a.rows:
        for r in (json.loads(p.read_text()) for p in sorted(CACHE.glob("*/result.json"))):
            if "dtype" in r:
                print(variant_row(r))
                print(command_of(r))
        print("\n".join(ablation_lines()))
        return
    if not (a.report or a.removal or a.scaling or a.half_subset):
        stop_at = deadline_of(a.stop_at)
        result = run(a.retrains, a.test_points, a.query_batch, a.proj_dim, a.dtype, (drop[0], drop[1]), not a.no_baselines,
                     a.model, stop_at)
        for name, r in result["rows"].items():
            log(f"{name:>18}: LDS {r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  Pearson {r['pearson']:.3f}")
    results = [r for r in (json.loads(p.read_text()) for p in sorted(CACHE.glob("*/result.json"))) if "dtype" in r]
    main_rows = [r for r in results if len(r["rows"]) > 1 and r["dtype"] == "float32" and r["drop"] == [0.01, 0.05]
                 and r.get("model", "digits-mlp") == "digits-mlp"]
    if not main_rows:
        log("no default run (float32, 1–5% drops, with baselines) cached yet; the docs section is written from one")
        return
    others = [r for r in results if r is not main_rows[0]]
    write_section("exact", report(main_rows[0], others), doc=DOC)
    log(f"wrote the 'exact' section of {DOC}")


if __name__ == "__main__":
    main()
