"""The LDS study on digits: cached retraining ground truth, attribution models, stores, results and the report.

Stages (each resumable; everything lives under one cache folder, ``runs/lds_cache`` by default):

- ``stage_retrain``: M random half-subsets (``lds.subset_masks``), one retrain each, test margins → <model>.zarr;
- ``stage_models``: the attribution models: one 10-checkpoint run, 9 more full-data and 10 half-data models;
- ``stage_ours``: ``influence.build`` stores over a grid of model sets / projectors / k, ``Influence.scores``, LDS;
- ``stage_lambda``: TRAK λ sweep from one store's features (``lds.trak_scores_dual``);
- ``stage_peers``: the same LDS for traker / captum / dattri (``influence.evaluation.peers``);
- ``write_report``: the "lds" section of the benchmarks page and the LDS-vs-cost figure.

Results are appended as JSON lines to results_<model>.jsonl (one row per (model set, projector, k, method));
the report keeps the last row per key.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import zarr

from influence.data import SizedDataset
from influence.errors import BadDataError
from influence.evaluation.digits import DEMO_CHECKPOINTS, ArrayDataset, index_subset, load_digits_split, train_classifier
from influence.evaluation.docs import write_section
from influence.evaluation.lds import M_SUBSETS, SUBSET_SEED, dual_form_inputs, lds, margins, subset_masks, trak_scores_dual
from influence.models import DigitsCNN, DigitsMLP
from influence.scoring import OLD_TRAK_LAMBDA_UNIT, TRAK, TRAK_LAMBDA_UNIT

if TYPE_CHECKING:
    from index.store import FeatureStore

MODELS = {"cnn": (DigitsCNN, "digits-cnn"), "mlp": (DigitsMLP, "digits-mlp")}
EPOCHS = 10          # the short recipe: train_classifier(epochs=10), lr 0.05, batch 64, other defaults
MODEL_SETS = ("ckpt1", "ckpt5", "ckpt10", "full10", "half10")
PROJECTORS = ("sparse", "factorized", "gaussian", "rademacher")
KS = (512, 2048, 8192)

# One JSON line of results_<model>.jsonl: tool, model, set, projector, k, method, seconds and the ``lds`` fields;
# the other keys depend on the stage that wrote it, so rows stay plain JSON objects.
Row = dict[str, Any]

COMMANDS = """### How these were produced

Ground truth first (cached in runs/lds_cache/<model>.zarr, so every later stage reuses it), then our stores and
scores, then the peers on the same checkpoints. The timed rows of "ours vs peers" were all re-run in one sequence on
an otherwise idle 2-core machine (the last block below), so their seconds compare.

```
pip install -c constraints.txt -e ".[peers]"                  # traker, dattri, captum (never runtime dependencies)
python scripts/eval_lds.py retrain --model mlp --M 100        # 100 half-subset retrains
python scripts/eval_lds.py retrain --model cnn --M 100        # 0.7 s per CNN retrain on an idle machine
python scripts/eval_lds.py models  --model mlp                # 10-checkpoint run + 9 full-data + 10 half-data models
python scripts/eval_lds.py models  --model cnn
python scripts/eval_lds.py ours    --model cnn --sets ckpt1,ckpt5,ckpt10,half10 --projectors sparse --ks 512,2048
python scripts/eval_lds.py ours    --model cnn --sets ckpt1 --projectors factorized --ks 512,2048
python scripts/eval_lds.py ours    --model mlp --sets ckpt1 --projectors sparse,factorized,gaussian,rademacher --ks 512,2048
python scripts/eval_lds.py ours    --model mlp --sets ckpt5,ckpt10,full10,half10 --projectors sparse --ks 512,2048
python scripts/eval_lds.py lambda  --model mlp --sets ckpt1,half10 --ks 512,2048 --rels 0.001,0.01,0.1,1,10,100,1000
python scripts/eval_lds.py lambda  --model cnn --sets ckpt1,half10 --ks 512 --rels 0.01,0.1,1,10
# one sequence on an idle machine:
python scripts/eval_lds.py peers   --model mlp --sets ckpt1 --ks 512,2048 --tools traker,captum
python scripts/eval_lds.py peers   --model mlp --sets ckpt1 --ks 512 --tools dattri
python scripts/eval_lds.py peers   --model mlp --sets half10 --ks 512 --tools traker,captum
python scripts/eval_lds.py peers   --model cnn --sets ckpt1,half10 --ks 512 --tools traker,captum
python scripts/eval_lds.py ours    --model mlp --sets ckpt1 --projectors sparse,factorized --ks 8192
python scripts/eval_removal.py --model mlp --method tracin --set ckpt10 --proj-dim 512
python scripts/eval_removal.py --model cnn --method trak --set ckpt10 --proj-dim 512
python -c "from influence.repair import run_repair; run_repair('/tmp/demo2_repair', action='drop')"   # + boxes=/oracle= variants
python scripts/eval_lds.py report                             # this file and docs/lds_vs_cost.png
```"""


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def stored_trak_lambda(store: "FeatureStore") -> dict[str, Any]:
    """The relative λ and its unit that a store's TRAK inverses were computed with (its first checkpoint's), as row
    fields ``trak_lambda_rel`` / ``trak_lambda_unit``; empty for a store without TRAK."""
    done = TRAK.stored_lambda(store, store.checkpoint_ids[0])
    return {"trak_lambda_rel": done.rel, "trak_lambda_unit": done.unit} if done else {}


def _fmt(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "–"
    return f"{r['lds']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"


@dataclass
class LdsStudy:
    """One LDS study's cache folder; every stage reads and writes under ``cache``."""

    cache: Path = Path("runs/lds_cache")

    def __post_init__(self) -> None:
        self.cache = Path(self.cache)

    def data(self) -> tuple[ArrayDataset, ArrayDataset]:
        return load_digits_split()

    def train_one(self, model: str, ds: SizedDataset, seed: int, *, epochs: int = EPOCHS,
                  checkpoint_dir: str | os.PathLike[str] | None = None,
                  checkpoints: int = DEMO_CHECKPOINTS) -> tuple[torch.nn.Module, list[tuple[Path, float]]]:
        """Train a fresh ``model`` on ``ds`` with the short recipe; (the net, its saved (checkpoint, lr) pairs)."""
        torch.manual_seed(seed)
        net = MODELS[model][0]()
        saved = train_classifier(net, ds, epochs=epochs, seed=seed, checkpoint_dir=checkpoint_dir, checkpoints=checkpoints)
        return net, saved

    # --- stage: retrain (ground truth)
    def open_truth(self, model: str, mode: Literal["r", "r+"] = "r") -> zarr.Group:
        return zarr.open_group(str(self.cache / f"{model}.zarr"), mode=mode)

    def _truth_array(self, g: zarr.Group, key: str) -> zarr.Array[Any]:
        """The ground-truth array ``key`` of ``g`` (a group there means the cache is damaged)."""
        node = g[key]
        if not isinstance(node, zarr.Array):
            raise BadDataError(f"{g.store_path} has a group at {key!r}, where an array belongs; delete it to redo")
        return node

    def stage_retrain(self, model: str, m: int = M_SUBSETS) -> None:
        train, test = self.data()
        path = self.cache / f"{model}.zarr"
        masks = subset_masks(len(train), m)
        if (path / "zarr.json").is_file():
            g = self.open_truth(model, "r+")
            if g.attrs.get("epochs") != EPOCHS or not np.array_equal(np.asarray(self._truth_array(g, "masks")[:]), masks):
                raise BadDataError(f"{path} was made with another recipe; delete it to redo")
        else:
            g = zarr.open_group(str(path), mode="w")
            g.attrs.update({"epochs": EPOCHS, "subset_seed": SUBSET_SEED, "model": model, "n_train": len(train), "n_test": len(test),
                            "recipe": f"train_classifier(epochs={EPOCHS}, lr=0.05, batch 64, momentum 0.9, wd 5e-4), seed = subset index"})
            g.create_array("masks", data=masks, chunks=masks.shape)
            g.create_array("margins", shape=(m, len(test)), dtype="float32", chunks=(1, len(test)), fill_value=np.nan)
            g.create_array("done", shape=(m,), dtype="bool", chunks=(m,), fill_value=False)
            g.create_array("seconds", shape=(m,), dtype="float32", chunks=(m,), fill_value=np.nan)
        done_arr, margins_arr, seconds_arr = (self._truth_array(g, key) for key in ("done", "margins", "seconds"))
        done = np.asarray(done_arr[:], dtype=bool)
        for j in map(int, np.flatnonzero(~done)):
            t0 = time.perf_counter()
            net, _ = self.train_one(model, index_subset(train, np.flatnonzero(masks[j]).tolist()), seed=j)
            margins_arr[j] = margins(net, test.x, test.y)
            seconds_arr[j] = time.perf_counter() - t0
            done[j] = True
            done_arr[:] = done
            if j % 10 == 0:
                log(f"[retrain {model}] {j + 1}/{m} {time.perf_counter() - t0:.1f}s")
        log(f"[retrain {model}] done; mean {np.nanmean(np.asarray(seconds_arr[:])):.2f}s per retrain")

    # --- LDS
    def truth(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        g = self.open_truth(model)
        done = np.asarray(self._truth_array(g, "done")[:], dtype=bool)
        if not done.any():
            raise BadDataError(f"no retrains cached for {model}; run the retrain stage first")
        return np.asarray(self._truth_array(g, "masks")[:])[done], np.asarray(self._truth_array(g, "margins")[:])[done]

    # --- stage: attribution models
    def models_dir(self, model: str) -> Path:
        return self.cache / f"{model}_models"

    def stage_models(self, model: str) -> None:
        """One full-data run with 10 checkpoints (seed 0); 9 more full-data models (seeds 1..9); 10 half-data models."""
        train, _ = self.data()
        root = self.models_dir(model)
        meta_path = root / "models.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if "run" not in meta:
            t0 = time.perf_counter()
            _, saved = self.train_one(model, train, seed=0, checkpoint_dir=root / "run", checkpoints=10)
            meta["run"] = {"ckpts": [str(p) for p, _ in saved], "lrs": [lr for _, lr in saved], "seconds": time.perf_counter() - t0}
        for kind in ("full", "half"):
            if kind in meta:
                continue
            rng = np.random.default_rng(777)
            paths, secs = [], 0.0
            for j in range(10):
                t0 = time.perf_counter()
                if kind == "full":
                    if j == 0:
                        paths.append(meta["run"]["ckpts"][-1])
                        continue
                    ds: SizedDataset = train
                else:
                    ds = index_subset(train, np.sort(rng.choice(len(train), len(train) // 2, replace=False)).tolist())
                net, _ = self.train_one(model, ds, seed=100 * (kind == "half") + j)
                p = root / f"{kind}_{j}.pt"
                torch.save(net.state_dict(), p)
                paths.append(str(p))
                secs += time.perf_counter() - t0
            meta[kind] = {"ckpts": paths, "seconds": secs}
        root.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta, indent=1))
        log(f"[models {model}] {json.dumps({k: round(v['seconds'], 1) for k, v in meta.items()})}")

    def model_set(self, model: str, name: str) -> tuple[list[str], list[float], float]:
        """(checkpoints, lr weights, extra training seconds beyond the one ordinary training run)."""
        meta = json.loads((self.models_dir(model) / "models.json").read_text())
        run = meta["run"]
        if name == "ckpt1":
            return run["ckpts"][-1:], [1.0], 0.0
        if name == "ckpt5":
            return run["ckpts"][1::2], run["lrs"][1::2], 0.0
        if name == "ckpt10":
            return run["ckpts"], run["lrs"], 0.0
        kind = name[:4]
        return meta[kind]["ckpts"], [1.0] * 10, meta[kind]["seconds"]

    # --- stage: ours
    def results_path(self, model: str) -> Path:
        return self.cache / f"results_{model}.jsonl"

    def append(self, model: str, row: Row) -> None:
        with self.results_path(model).open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"[{model}] {row.get('tool', 'ours')} {row['set']} {row.get('projector')} k={row.get('k')} {row['method']}: "
            f"LDS {row['lds']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]  {row['seconds']:.1f}s")

    def store_path(self, model: str, set_name: str, projector: str, k: int) -> Path:
        return self.cache / "stores" / f"{model}_{set_name}_{projector}_{k}.zarr"

    def build_store(self, model: str, set_name: str, projector: str, k: int, trak_lambda: float = 1.0) -> tuple[Path, float]:
        from influence.pipeline import build

        train, _ = self.data()
        ckpts, lrs, _ = self.model_set(model, set_name)
        out = self.store_path(model, set_name, projector, k)
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        build(MODELS[model][1], train, ckpts, out, projector=projector, proj_dim=k, lr_weights=lrs, trak_lambda=trak_lambda, progress=False)
        return out, time.perf_counter() - t0

    def stage_ours(self, model: str, sets: list[str], projectors: list[str], ks: list[int], methods: list[str], keep: bool) -> None:
        from influence.query import Influence

        _, test = self.data()
        masks, actual = self.truth(model)
        for set_name in sets:
            for projector in projectors:
                for k in ks:
                    out, build_s = self.build_store(model, set_name, projector, k)
                    session = Influence.open(out)
                    for method in methods:
                        t0 = time.perf_counter()
                        s = session.scores(test.x, test.y, method=method)
                        score_s = time.perf_counter() - t0
                        row: Row = {"tool": "ours", "model": model, "set": set_name, "n_models": len(session.store.checkpoint_ids),
                               "projector": projector, "k": int(session.store.k), "method": method,
                               "build_s": round(build_s, 2), "score_s": round(score_s, 2), "seconds": round(build_s + score_s, 2),
                               "extra_train_s": round(self.model_set(model, set_name)[2], 1),
                               **stored_trak_lambda(session.store), **lds(s, masks, actual)}
                        self.append(model, row)
                    session.store.close() if hasattr(session.store, "close") else None
                    if not keep and not (set_name in ("ckpt1", "half10") and projector == "sparse"):
                        shutil.rmtree(out, ignore_errors=True)

    # --- stage: TRAK λ sweep
    def stage_lambda(self, model: str, sets: list[str], ks: list[int], rels: list[float]) -> None:
        from influence.query import Influence

        _, test = self.data()
        masks, actual = self.truth(model)
        for set_name in sets:
            for k in ks:
                out = self.store_path(model, set_name, "sparse", k)
                if not (out / "zarr.json").is_file():
                    out, _ = self.build_store(model, set_name, "sparse", k)
                session = Influence.open(out)
                phi, q, pt = dual_form_inputs(session, test.x, test.y)
                ref = session.scores(test.x, test.y, method="trak")
                stored = TRAK.stored_lambda(session.store, session.store.checkpoint_ids[0])
                for rel in rels:
                    s = trak_scores_dual(phi, q, pt, rel)
                    if stored is not None and stored.is_current(rel):
                        c = np.corrcoef(s.ravel(), ref.ravel())[0, 1]
                        log(f"[lambda] dual form vs library at λ_rel={rel}: correlation {c:.5f}")
                    row: Row = {"tool": "ours-lambda", "model": model, "set": set_name, "n_models": len(phi), "projector": "sparse",
                           "k": k, "method": "trak", "lambda_rel": rel, "lambda_unit": TRAK_LAMBDA_UNIT, "seconds": 0.0,
                           **lds(s, masks, actual)}
                    self.append(model, row)

    # --- stage: peers
    def stage_peers(self, model: str, tools: list[str], sets: list[str], ks: list[int],
                    rels: list[float] | None = None) -> None:
        """``rels``: TRAK's relative λs for traker and dattri, in our unit (default: the adapters' 0 and 1)."""
        from influence.evaluation import peers

        train, test = self.data()
        masks, actual = self.truth(model)
        for set_name in sets:
            ckpts, lrs, extra = self.model_set(model, set_name)
            for tool in tools:
                for k in ks:
                    kw: dict[str, Any] = {"exact": k == ks[0]} if tool == "captum" else {}
                    if rels is not None and tool in ("traker", "dattri"):
                        kw["rels"] = rels
                    for method, res in peers.run(tool, MODELS[model][0], ckpts, lrs, train, test, k=k, **kw):
                        if res is None:
                            continue
                        s, secs, note = res
                        row: Row = {"tool": tool, "model": model, "set": set_name, "n_models": len(ckpts), "projector": note.get("projector"),
                               "k": note.get("k", k), "method": method, "seconds": round(secs, 2), "extra_train_s": round(extra, 1),
                               **({"lambdas": note["lambdas"]} if "lambdas" in note else {}), **lds(s, masks, actual)}
                        self.append(model, row)

    # --- stage: report
    def _rows(self, model: str) -> list[Row]:
        p = self.results_path(model)
        if not p.is_file():
            return []
        last: dict[tuple[Any, ...], Row] = {}
        for line in p.read_text().splitlines():
            r = json.loads(line)
            key = (r.get("tool"), r["set"], r.get("projector"), r.get("k"), r["method"], r.get("lambda_rel"),
                   r.get("lambda_unit", OLD_TRAK_LAMBDA_UNIT) if "lambda_rel" in r else None)
            last[key] = r
        return list(last.values())

    def write_report(self, doc: str | os.PathLike[str], plot: str | os.PathLike[str]) -> None:
        """Write the "lds" section of ``doc`` from the cached results, and the LDS-vs-cost figure to ``plot``."""
        parts = [COMMANDS]
        for model in MODELS:
            rows = self._rows(model)
            if not rows:
                continue
            g = self.open_truth(model)
            n_done = int(np.asarray(self._truth_array(g, "done")[:]).sum())
            recipe = g.attrs.get("recipe")
            ours = [r for r in rows if r.get("tool") == "ours"]
            lines = [f"### LDS on digits, {model.upper()} (ours)", "",
                     f"Ground truth: {n_done} half-subsets of the 1,437-image training split, each retrained with {recipe}; "
                     f"margins of the true label on all {rows[0]['n_test']} test images. LDS = mean Spearman over test points, "
                     "[bootstrap 95% interval over test points]. Seconds = `influence.build` (featurize, TRAK solve, three FAISS "
                     "indexes) + `Influence.scores` for all test images, 2 CPU threads (rows built while other jobs shared the "
                     "machine are slower than idle ones by up to 25×: compare seconds within the peers table). Model sets: `ckptN` = N checkpoints of one full-data run (lr-weighted for TracIn), "
                     "`full10` = 10 independently seeded full-data models, `half10` = 10 models each trained on a random half "
                     "(extra training cost in the last column).", "",
                     "| models | projector | k | TracIn | Grad-Cos | TRAK | seconds | extra training s |",
                     "|---|---|---|---|---|---|---|---|"]
            keys = sorted({(r["set"], r["projector"], r["k"]) for r in ours},
                          key=lambda t: (MODEL_SETS.index(t[0]) if t[0] in MODEL_SETS else 9, PROJECTORS.index(t[1]) if t[1] in PROJECTORS else 9, t[2]))
            for key in keys:
                by = {r["method"]: r for r in ours if (r["set"], r["projector"], r["k"]) == key}
                any_r = next(iter(by.values()))
                lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {_fmt(by.get('tracin'))} | {_fmt(by.get('gradcos'))} | "
                             f"{_fmt(by.get('trak'))} | {any_r['seconds']:.1f} | {any_r.get('extra_train_s', 0):.0f} |")
            parts.append("\n".join(lines))
            lam = [r for r in rows if r.get("tool") == "ours-lambda"]
            for unit in sorted({r.get("lambda_unit", OLD_TRAK_LAMBDA_UNIT) for r in lam}, key=lambda u: u != TRAK_LAMBDA_UNIT):
                sweep = [r for r in lam if r.get("lambda_unit", OLD_TRAK_LAMBDA_UNIT) == unit]
                rels = sorted({r["lambda_rel"] for r in sweep})
                rule = ("trace(ΦᵀΦ)/min(N, k), the mean nonzero eigenvalue of ΦᵀΦ" if unit == TRAK_LAMBDA_UNIT
                        else "trace(ΦᵀΦ)/k (the unit before trace/min(N, k); the same where N ≥ k)")
                lines = [f"### TRAK λ ({model.upper()}, sparse projector{'' if unit == TRAK_LAMBDA_UNIT else ', λ in trace/k'})", "",
                         f"λ = rel · {rule} (`trak_lambda=rel`); scores from the store's features in the N×N dual form "
                         "(identical to the library's TRAK at the store's λ, checked by correlation).", "",
                         "| models | k | " + " | ".join(f"rel = {x:g}" for x in rels) + " |", "|---|---|" + "---|" * len(rels)]
                for set_name, k in sorted({(r["set"], r["k"]) for r in sweep}, key=lambda t: (MODEL_SETS.index(t[0]), t[1])):
                    by = {r["lambda_rel"]: r for r in sweep if (r["set"], r["k"]) == (set_name, k)}
                    lines.append(f"| {set_name} | {k} | " + " | ".join(_fmt(by.get(x)) for x in rels) + " |")
                parts.append("\n".join(lines))
            peer = [r for r in rows if r.get("tool") not in ("ours", "ours-lambda")]
            if peer:
                lines = [f"### Ours vs peers ({model.upper()}, same checkpoints, data and ground truth)", "",
                         "| models | k | tool | method | projector | LDS [95% CI] | seconds |", "|---|---|---|---|---|---|---|"]
                combos = sorted({(r["set"], r["k"]) for r in peer if r.get("k")}, key=lambda t: (MODEL_SETS.index(t[0]), t[1]))
                for set_name, k in combos:
                    mine = [r for r in ours if r["set"] == set_name and r["k"] == k and r["projector"] == "sparse"]
                    for r in sorted(mine, key=lambda r: r["method"]) + sorted(
                            [r for r in peer if r["set"] == set_name and r.get("k") == k], key=lambda r: (r["tool"], r["method"])):
                        lines.append(f"| {set_name} | {k} | {r['tool']} | {r['method']} | {r.get('projector')} | {_fmt(r)} | {r['seconds']:.1f} |")
                for r in [r for r in peer if not r.get("k")]:
                    lines.append(f"| {r['set']} | exact | {r['tool']} | {r['method']} | none | {_fmt(r)} | {r['seconds']:.1f} |")
                parts.append("\n".join(lines))
            rem = self.cache / f"removal_{model}.json"
            if rem.is_file():
                d = json.loads(rem.read_text())
                ks = sorted({int(key[3:] if key.startswith("top") else key[6:]) for key in d["summary"]})
                lines = [f"### Removal and retraining ({model.upper()})", "",
                         f"{d['n_test']} random correctly classified test images; remove the top-k proponents of the true class by "
                         f"{d['method']} ({d['set']}, sparse k = {d['k_proj']}) or k random training images, retrain ({d['recipe']}).", "",
                         "| k | flips, top-k proponents removed | flips, k random removed | mean margin drop, top-k | mean margin drop, random |",
                         "|---|---|---|---|---|"]
                for k in ks:
                    t, r = d["summary"][f"top{k}"], d["summary"][f"random{k}"]
                    lines.append(f"| {k} | {t['flips']}/{t['n']} | {r['flips']}/{r['n']} | {t['mean_margin_drop']:.2f} | {r['mean_margin_drop']:.2f} |")
                parts.append("\n".join(lines))
        reps = sorted(self.cache.glob("repair_*.json"))
        if reps:
            lines = ["### Repair loop (`influence.repair.run_repair` on a demo run)", "",
                     "| run | action | mask | shortcut boxes | flagged (truly flipped) | masked (truly patched) | clean acc before → after | patched-test acc before → after | oracle clean / patched |",
                     "|---|---|---|---|---|---|---|---|---|"]
            for p in reps:
                d = json.loads(p.read_text())
                t, b, a, o = d.get("truth", {}), d["before"], d["after"], d.get("oracle")
                lines.append(f"| {p.stem[7:]} | {d['action']} | {d['mask_scope']} | {len(d['shortcuts'])} | {d['flagged_mislabels']} "
                             f"({t.get('flagged_truly_flipped', '?')}) | {d['masked_images']} ({t.get('masked_truly_patched', '?')}) | "
                             f"{b['clean_accuracy']:.3f} → {a['clean_accuracy']:.3f} | {b.get('patched_accuracy', float('nan')):.3f} → "
                             f"{a.get('patched_accuracy', float('nan')):.3f} | "
                             + (f"{o['clean_accuracy']:.3f} / {o.get('patched_accuracy', float('nan')):.3f}" if o else "–") + " |")
            parts.append("\n".join(lines))
        write_section("lds", "\n\n".join(parts), doc)
        self._plot(plot)
        log(f"wrote {doc} and {plot}")

    def _plot(self, plot: str | os.PathLike[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models = [m for m in MODELS if self._rows(m)]
        fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
        for ax, model in zip(axes[0], models):
            allrows = self._rows(model)
            rows = [r for r in allrows if r.get("tool") != "ours-lambda" and r.get("seconds", 0) > 0]
            groups: dict[str, list[Row]] = {}
            for r in rows:
                groups.setdefault(f"{r['tool']}: {r['method']}", []).append(r)
            for i, (name, rs) in enumerate(sorted(groups.items())):
                mine = name.startswith("ours")
                ax.scatter([r["seconds"] for r in rs], [r["lds"] for r in rs], label=name, s=28 if mine else 60,
                           marker="o" if mine else ["s", "^", "D", "v", "P", "X"][i % 6], alpha=0.75)
            ax.set_xscale("log")
            ax.set_xlabel("wall time, seconds (log; featurize + score, 2 CPU threads)")
            ax.set_ylabel("LDS")
            ax.set_title(f"digits {model.upper()}: LDS vs cost")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
