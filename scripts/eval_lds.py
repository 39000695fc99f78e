"""Linear datamodeling score (LDS) of TracIn, Grad-Cos and TRAK on digits, against retraining ground truth.

As in Park et al. 2023 (TRAK): draw M = 100 random half-subsets of the training split, retrain on each
(seeded, CPU), record the test margins; predicted margin for subset S_j is Σ_{i∈S_j} S(i, t);
LDS = mean over test points of Spearman(predicted, actual), with a bootstrap 95% interval over
test points.

Stages (each one resumable; the retraining ground truth is cached in a zarr store):

    python scripts/eval_lds.py retrain --model mlp            # 100 retrains → runs/lds_cache/mlp.zarr
    python scripts/eval_lds.py models  --model mlp            # attribution models: one 10-checkpoint run + 10+10 independent
    python scripts/eval_lds.py ours    --model mlp            # build stores for the grid, score all three methods, LDS
    python scripts/eval_lds.py lambda  --model mlp            # TRAK λ sweep (reuses the stores)
    python scripts/eval_lds.py peers   --model mlp            # traker / captum / dattri (influence.evaluation.peers)
    python scripts/eval_lds.py report                         # docs/BENCHMARKS.md + docs/lds_vs_cost.png

Results are appended as JSON lines to runs/lds_cache/results_<model>.jsonl (one row per
(model set, projector, k, method)); ``report`` keeps the last row per key. The stages live in
``influence.evaluation.lds_study``; this script only parses arguments.
"""

from __future__ import annotations

import argparse

import torch

from influence.evaluation.lds import M_SUBSETS
from influence.evaluation.lds_study import KS, MODEL_SETS, MODELS, PROJECTORS, LdsStudy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("stage", choices=["retrain", "models", "ours", "lambda", "peers", "report"])
    ap.add_argument("--model", choices=list(MODELS), default="mlp")
    ap.add_argument("--M", type=int, default=M_SUBSETS)
    ap.add_argument("--sets", default=",".join(MODEL_SETS))
    ap.add_argument("--projectors", default=",".join(PROJECTORS))
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--methods", default="tracin,gradcos,trak")
    ap.add_argument("--tools", default="traker,captum,dattri")
    ap.add_argument("--rels", default="0.001,0.01,0.1,1.0")
    ap.add_argument("--peer-rels", default="0,1",
                    help="peers: TRAK λs of traker and dattri, relative, in our unit (rel · trace(ΦᵀΦ)/min(N, k) of each peer's own features)")
    ap.add_argument("--keep", action="store_true", help="keep every store (default: only ckpt1/half10 sparse ones)")
    ap.add_argument("--cache", default="runs/lds_cache", help="folder of the ground truth, models, stores and results")
    ap.add_argument("--doc", default="docs/BENCHMARKS.md", help="report: the page whose 'lds' section is rewritten")
    ap.add_argument("--plot", default="docs/lds_vs_cost.png", help="report: the LDS-vs-cost figure")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    study = LdsStudy(a.cache)
    study.cache.mkdir(parents=True, exist_ok=True)
    sets, ks = a.sets.split(","), [int(k) for k in a.ks.split(",")]
    if a.stage == "retrain":
        study.stage_retrain(a.model, a.M)
    elif a.stage == "models":
        study.stage_models(a.model)
    elif a.stage == "ours":
        study.stage_ours(a.model, sets, a.projectors.split(","), ks, a.methods.split(","), a.keep)
    elif a.stage == "lambda":
        study.stage_lambda(a.model, sets, ks, [float(r) for r in a.rels.split(",")])
    elif a.stage == "peers":
        study.stage_peers(a.model, a.tools.split(","), sets, ks, [float(r) for r in a.peer_rels.split(",")])
    else:
        study.write_report(a.doc, a.plot)


if __name__ == "__main__":
    main()
