"""The exact-mode study behind scripts/eval_exact.py (its docstring lists the runs): exact mode
(``influence.exact.metagradient``) against TRAK / TracIn / Grad-Cos from ``influence.build`` + ``Influence.scores``
on the same recipe's checkpoints, judged by the same-seed small-drop LDS (``influence.evaluation.exact_lds``), the
half-subset LDS and removal; plus cost and peak memory against the number of steps T.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence.evaluation.digits import load_digits_split
from influence.exact import metagradient
from influence.data import ArrayDataset
from influence.evaluation.exact_lds import drop_lds, drop_masks, final_margins, retrain_margins
from influence.recipe import Recipe

# relative to where the study runs (the repository root), like the other studies; INFLUENCE_EXACT_CACHE moves it
CACHE = Path(os.environ.get("INFLUENCE_EXACT_CACHE", "runs/exact_cache"))
DOC = Path("docs/BENCHMARKS.md")
RECIPE = Recipe(model="digits-mlp", epochs=10)
CHECKPOINTS = 10
DROP_SEED = 2024
TEST_SEED = 7


def gelu_mlp() -> torch.nn.Module:
    """The digits MLP with GELU for ReLU: a smooth training map, for the ablation."""
    from influence.models import DigitsMLP

    net = DigitsMLP()
    net.net[2], net.net[4] = torch.nn.GELU(), torch.nn.GELU()
    return net


def smooth_cnn() -> torch.nn.Module:
    """The digits CNN with GELU for ReLU and average for max pooling: the smooth ("metasmooth") variant, for the ablation."""
    from influence.models import DigitsCNN

    net = DigitsCNN()
    for seq in (net.features, net.head):
        for i, layer in enumerate(seq):
            if isinstance(layer, torch.nn.ReLU):
                seq[i] = torch.nn.GELU()
            elif isinstance(layer, torch.nn.MaxPool2d):
                seq[i] = torch.nn.AvgPool2d(2)
    return net


def fashion_smooth_cnn() -> torch.nn.Module:
    """The smooth CNN's shape on 28×28 Fashion-MNIST (GELU, average pooling, BatchNorm; 7×7 maps before the head)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.GELU(), nn.Linear(64, 10))


def fashion_gelu_mlp() -> torch.nn.Module:
    """The Fashion-MNIST MLP with GELU for ReLU."""
    from influence.models import DigitsMLP

    net = DigitsMLP(in_features=784)
    net.net[2], net.net[4] = torch.nn.GELU(), torch.nn.GELU()
    return net


def fashion_mlp() -> torch.nn.Module:
    """The digits MLP's shape on 28×28 Fashion-MNIST: 784 → 128 → 128 → 10, ReLU."""
    from influence.models import DigitsMLP

    return DigitsMLP(in_features=784)


MODELS = {"digits-mlp": "digits-mlp", "gelu-mlp": f"{Path(__file__).resolve()}:gelu_mlp", "digits-cnn": "digits-cnn",
          "smooth-cnn": f"{Path(__file__).resolve()}:smooth_cnn",
          "fashion-mlp": f"{Path(__file__).resolve()}:fashion_mlp",
          # the "metasmooth" recipes (smooth activation, average pooling, lr 0.01 instead of 0.05; RECIPE_OVERRIDES)
          "smooth-cnn-lr0.01": f"{Path(__file__).resolve()}:smooth_cnn",
          "digits-cnn-lr0.01": "digits-cnn",
          "fashion-gelu-mlp": f"{Path(__file__).resolve()}:fashion_gelu_mlp",
          "fashion-gelu-mlp-lr0.01": f"{Path(__file__).resolve()}:fashion_gelu_mlp",
          "fashion-smooth-cnn-lr0.01": f"{Path(__file__).resolve()}:fashion_smooth_cnn"}
RECIPE_OVERRIDES: dict[str, dict[str, Any]] = {m: {"lr": 0.01} for m in MODELS if m.endswith("-lr0.01")}


def recipe_of(model: str, dtype: str = "float32") -> Recipe:
    """The study's recipe for ``model``: RECIPE with that model, dtype and the model's own RECIPE_OVERRIDES."""
    return dataclasses.replace(RECIPE, dtype=dtype, model=MODELS[model], **RECIPE_OVERRIDES.get(model, {}))


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (gzipped idx files)
FASHION_TRAIN = 5000


def _idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic, dims as big-endian uint32, then uint8 data)."""
    import gzip

    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def load_fashion() -> tuple[ArrayDataset, ArrayDataset]:
    """5,000 Fashion-MNIST training images (a seeded random draw from the 60,000) and the 10,000 test images, 1×28×28 in [0, 1]."""
    if not FASHION.is_dir():
        raise SystemExit(f"{FASHION} not found: apt-get install -y dataset-fashion-mnist")
    out = []
    for split in ("train", "t10k"):
        x = torch.as_tensor(_idx(FASHION / f"{split}-images-idx3-ubyte.gz").copy(), dtype=torch.float32)[:, None] / 255.0
        y = torch.as_tensor(_idx(FASHION / f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
        out.append((x, y))
    keep = torch.as_tensor(np.sort(np.random.default_rng(0).choice(len(out[0][1]), FASHION_TRAIN, replace=False)))
    return (ArrayDataset(out[0][0][keep], out[0][1][keep], "fashion-train-5000"),
            ArrayDataset(out[1][0], out[1][1], "fashion-test"))


DATA_NAMES = {"digits": "digits 16×16", "fashion": "Fashion-MNIST 28×28"}


def _data_of(model: str) -> str:
    return "fashion" if model.startswith("fashion") else "digits"


def load_data(model: str) -> tuple[ArrayDataset, ArrayDataset]:
    return load_fashion() if _data_of(model) == "fashion" else load_digits_split()


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def variant_dir(model: str, dtype: str, drop: tuple[float, float], n_test: int) -> Path:
    prefix = "" if model == "digits-mlp" else f"{model}_"
    return CACHE / f"{prefix}{dtype}_drop{drop[0]:g}-{drop[1]:g}_test{n_test}"


def run(n_retrains: int, n_test: int, query_batch: int, proj_dim: int, dtype: str = "float32",
        drop: tuple[float, float] = (0.01, 0.05), baselines: bool = True, model: str = "digits-mlp",
        stop_at: float | None = None) -> dict[str, Any]:
    recipe = recipe_of(model, dtype)
    train, test = load_data(model)
    cache = variant_dir(model, dtype, drop, n_test)
    cache.mkdir(parents=True, exist_ok=True)
    test_ids = np.sort(np.random.default_rng(TEST_SEED).choice(len(test), n_test, replace=False))
    x, y = test.x[test_ids], test.y[test_ids]
    timing: dict[str, float] = {}

    # One training run with checkpoints: the model every method explains.
    net = recipe.train(train, checkpoint_dir=cache / "run", checkpoints=CHECKPOINTS)
    t0 = time.perf_counter()
    recipe.train(train)  # timed apart from the checkpoint writes and first-call warm-up
    timing["train_s"] = time.perf_counter() - t0
    base = final_margins(net, x, y)
    ckpts = sorted((cache / "run").glob("epoch_*.pt"))
    lrs = [recipe.lr_at(int(p.stem.split("_")[1]) - 1) for p in ckpts]

    # Exact mode: one query alone (the cost a user pays for one answer), then all in batches (resumable).
    timing_path = cache / "timing.json"
    if timing_path.is_file():
        timing = {**json.loads(timing_path.read_text()), **timing}
    if "exact_one_query_s" not in timing:
        t0 = time.perf_counter()
        metagradient(recipe, train, x[:1], y[:1])
        timing["exact_one_query_s"] = time.perf_counter() - t0
        timing_path.write_text(json.dumps(timing))
    scores: dict[str, np.ndarray] = {}
    exact_path = cache / f"exact_{n_test}.npz"
    exact = np.load(exact_path)["scores"] if exact_path.is_file() else np.full((len(train), n_test), np.nan)
    t0, timed = time.perf_counter(), 0
    for b in range(0, n_test, query_batch):
        if np.isfinite(exact[:, b]).all():
            continue
        rep = metagradient(recipe, train, x[b:b + query_batch], y[b:b + query_batch])
        exact[:, b:b + query_batch] = rep.scores
        timed += len(rep.margins)
        np.savez(exact_path, scores=exact)
        np.testing.assert_allclose(rep.margins, base[b:b + query_batch], rtol=1e-4, atol=1e-4)  # replayed = trained
        log(f"[exact] {b + len(rep.margins)}/{n_test} queries, {time.perf_counter() - t0:.1f}s")
    if timed:
        timing["exact_batched_s_per_query"] = (time.perf_counter() - t0) / timed
        timing_path.write_text(json.dumps(timing))
    scores["exact"] = exact
    rep = metagradient(recipe, train, x[:1], y[:1]) if not timed else rep
    memory = {"steps": rep.steps, "checkpoint_every": rep.checkpoint_every, "peak_states": rep.peak_states,
              "step_evals": rep.step_evals}

    # Baselines on the same run's checkpoints.
    from influence.pipeline import build
    from influence.query import Influence

    for name, (paths, weights) in ({"ckpt1": (ckpts[-1:], [1.0]), f"ckpt{len(ckpts)}": (ckpts, lrs)} if baselines else {}).items():
        out, cached = cache / f"store_{name}.zarr", cache / f"baselines_{name}_{n_test}.npz"
        if cached.is_file():
            scores.update({f"{m} ({name})": v for m, v in np.load(cached).items()})
            continue
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        build(MODELS[model], train, paths, out, projector="sparse", proj_dim=proj_dim, lr_weights=weights, progress=False)
        session = Influence.open(out, model=MODELS[model])  # the study names its own model
        got = {method: session.scores(x, y, method=method) for method in ("tracin", "gradcos", "trak")}
        scores.update({f"{m} ({name})": v for m, v in got.items()})
        np.savez(cached, **got)  # type: ignore[arg-type]
        timing[f"baselines_{name}_s"] = time.perf_counter() - t0
        timing_path.write_text(json.dumps(timing))

    # Ground truth: retrains with a small subset weighted 0 (resumable, saved row by row).
    masks = drop_masks(len(train), n_retrains, drop[0], drop[1], seed=DROP_SEED)
    truth_path = cache / f"truth_{n_test}.npz"
    after = np.full((n_retrains, n_test), np.nan)
    if truth_path.is_file():
        old = np.load(truth_path)
        k = min(len(old["masks"]), n_retrains)
        if np.array_equal(old["masks"][:k], masks[:k]):
            after[:k] = old["margins"][:k]
    todo = np.flatnonzero(~np.isfinite(after).all(1))
    t0 = time.perf_counter()
    for j in todo:
        if stop_at is not None and time.time() > stop_at:
            log(f"[retrain] stopped at the deadline after {int(np.isfinite(after).all(1).sum())} retrains")
            break
        after[j] = retrain_margins(recipe, train, x, y, masks[j:j + 1])[0]
        np.savez(truth_path, masks=masks, margins=after)
        if j % 10 == 9:
            log(f"[retrain] {j + 1}/{n_retrains}, {time.perf_counter() - t0:.1f}s")
    ran = [j for j in todo if np.isfinite(after[j]).all()]
    if ran:
        timing["retrain_s_each"] = (time.perf_counter() - t0) / len(ran)
    complete = np.isfinite(after).all(1)  # a deadline may leave the last retrains undone: judge by those run
    masks, after = masks[complete], after[complete]
    change = after - base

    rows = {name: drop_lds(s, masks, change) for name, s in scores.items()}
    timing = {**(json.loads((cache / "result.json").read_text())["timing"] if (cache / "result.json").is_file() else {}),
              **timing}
    result = {"model": model, "dtype": dtype, "drop": list(drop), "n_train": len(train), "test_ids": test_ids.tolist(), "proj_dim": proj_dim, "query_batch": query_batch,
              "drop_sizes": [int(masks.sum(1).min()), int(masks.sum(1).max())], "timing": timing, "memory": memory,
              "mean_abs_change": float(np.abs(change).mean()), "rows": rows}
    (cache / "result.json").write_text(json.dumps(result, indent=1))
    return result


def removal(model: str, n_images: int, ks: tuple[int, ...], proj_dim: int, query_batch: int,
            stop_at: float | None = None) -> dict[str, Any]:
    """Drop the top-k proponents of a misclassified test image's wrong class, retrain with the same seed: does it flip?

    Proponents by exact mode (d margin_wrong / d w_i, largest first), by TRAK over the run's 10 checkpoints
    (``Influence.scores`` for the predicted class, largest first) and k random training images. One same-seed
    retrain per (image, method, k), with the dropped images weighted 0. Resumable.
    """
    recipe = recipe_of(model)
    train, test = load_data(model)
    cache = CACHE / f"removal_{model}"
    cache.mkdir(parents=True, exist_ok=True)
    net = recipe.train(train, checkpoint_dir=cache / "run", checkpoints=CHECKPOINTS)
    with torch.no_grad():
        pred = net(test.x).argmax(-1)
    wrong = np.flatnonzero((pred != test.y).numpy())
    ids = np.sort(np.random.default_rng(TEST_SEED).choice(wrong, min(n_images, len(wrong)), replace=False))
    x, y_true, y_wrong = test.x[ids], test.y[ids], pred[ids]
    base = final_margins(net, x, y_wrong)  # > 0: the wrong class wins

    rank_path = cache / "rankings.npz"
    if rank_path.is_file():
        ranked = dict(np.load(rank_path))
    else:
        exact = np.concatenate([metagradient(recipe, train, x[b:b + query_batch], y_wrong[b:b + query_batch]).scores
                                for b in range(0, len(ids), query_batch)], axis=1)
        log("[removal] exact scores done")
        from influence.pipeline import build
        from influence.query import Influence

        ckpts = sorted((cache / "run").glob("epoch_*.pt"))
        lrs = [recipe.lr_at(int(p.stem.split("_")[1]) - 1) for p in ckpts]
        shutil.rmtree(cache / "store.zarr", ignore_errors=True)
        build(MODELS[model], train, ckpts, cache / "store.zarr", projector="sparse", proj_dim=proj_dim, lr_weights=lrs, progress=False)
        trak = np.asarray(Influence.open(cache / "store.zarr", model=MODELS[model]).scores(x, y_wrong, method="trak"))
        rng = np.random.default_rng(DROP_SEED)
        ranked = {"exact": np.argsort(-exact, axis=0).T[:, :max(ks)], "trak": np.argsort(-trak, axis=0).T[:, :max(ks)],
                  "random": np.stack([rng.choice(len(train), max(ks), replace=False) for _ in ids])}
        np.savez(rank_path, **ranked)
    out_path = cache / "result.json"
    done: dict[str, list[float]] = json.loads(out_path.read_text())["margins"] if out_path.is_file() else {}
    for k in ks:
        for method in ("exact", "trak", "random"):
            for j in range(len(ids)):
                key = f"{method},{k},{j}"
                if key in done:
                    continue
                if stop_at is not None and time.time() > stop_at:
                    break
                w = np.ones(len(train))
                w[ranked[method][j, :k]] = 0.0
                retrained = recipe.train(train, weights=w)
                with torch.no_grad():
                    logits = retrained(x[j:j + 1])
                done[key] = [float(final_margins(retrained, x[j:j + 1], y_wrong[j:j + 1])[0]), int(logits.argmax(-1)[0])]
                out_path.write_text(json.dumps({"model": model, "test_ids": ids.tolist(), "ks": list(ks), "margins": done}))
            log(f"[removal] k={k} {method} done")
    rows = {}
    ks = tuple(sorted(k for k in ks if all(f"{m},{k},{j}" in done for m in ("exact", "trak", "random")
                                           for j in range(len(ids)))))  # a deadline may leave some k undone
    for k in ks:
        for method in ("exact", "trak", "random"):
            after = [done[f"{method},{k},{j}"] for j in range(len(ids))]
            rows[f"{method},{k}"] = {
                "flipped": int(sum(a[1] != int(y_wrong[j]) for j, a in enumerate(after))),
                "now_correct": int(sum(a[1] == int(y_true[j]) for j, a in enumerate(after))),
                "mean_margin_drop": float(np.mean([base[j] - a[0] for j, a in enumerate(after)])),
            }
    result = {"model": model, "n_train": len(train), "test_ids": ids.tolist(), "n_misclassified": int(len(wrong)),
              "n_test": len(test), "ks": list(ks), "base_margin_mean": float(base.mean()), "proj_dim": proj_dim,
              "margins": done, "rows": rows}
    out_path.write_text(json.dumps(result, indent=1))
    return result


def half_subset(model: str, n_models: int, n_test: int, stop_at: float | None = None) -> dict[str, Any]:
    """The half-subset LDS of the cached exact and baseline scores (digits, 1–5% variant's test points and run).

    ``n_models`` models, each trained from scratch on a random half of the training set with its own seed
    (``Recipe(seed=j + 1)``, its own data order). Predicted margin of model j: ``Σ_{i∈S_j} score_i``;
    LDS = mean over test points of Spearman(predicted, actual) over the models. Exact-mode scores are a
    linearisation around the full run with its seed, so this protocol is far outside what they describe.
    """
    cache = variant_dir(model, "float32", (0.01, 0.05), n_test)
    result_path = cache / "result.json"
    res = json.loads(result_path.read_text())
    train, test = load_data(model)
    ids = np.asarray(res["test_ids"])
    x, y = test.x[ids], test.y[ids]
    scores = {"exact": np.load(cache / f"exact_{n_test}.npz")["scores"]}
    from influence.query import Influence

    for name in ("ckpt1", "ckpt10"):
        cached = cache / f"baselines_{name}_{n_test}.npz"
        if not cached.is_file():
            session = Influence.open(cache / f"store_{name}.zarr", model=MODELS[model])
            np.savez(cached, **{m: session.scores(x, y, method=m) for m in ("tracin", "gradcos", "trak")})  # type: ignore[arg-type]
        scores.update({f"{m} ({name})": v for m, v in np.load(cached).items()})
    dropped = drop_masks(len(train), n_models, 0.5, 0.5, seed=DROP_SEED + 1)  # True = left out: each model sees half
    path = cache / f"half_{n_test}.npz"
    margins = np.full((n_models, n_test), np.nan)
    if path.is_file():
        old = np.load(path)["margins"]
        margins[:len(old)] = old[:n_models]
    base = recipe_of(model)
    for j in np.flatnonzero(~np.isfinite(margins).all(1)):
        if stop_at is not None and time.time() > stop_at:
            break
        keep = np.flatnonzero(~dropped[j])
        sub = ArrayDataset(train.x[keep], train.y[keep], "half")
        margins[j] = final_margins(dataclasses.replace(base, seed=int(j) + 1).train(sub), x, y)
        np.savez(path, margins=margins)
    done = np.isfinite(margins).all(1)
    # Σ_{i∈S} s_i = Σ_i s_i − Σ_{i∉S} s_i: the drop-set form ranks the models identically (a constant per test point).
    rows = {name: drop_lds(s, dropped[done], margins[done]) for name, s in scores.items()}
    res["half_subset"] = rows
    result_path.write_text(json.dumps(res, indent=1))
    return rows


def scaling_child(epochs: int, mode: str) -> dict[str, Any]:
    """One measurement in a fresh process: ``train`` (a training run), ``sqrt`` (one query, √T states) or ``all`` (K = 1)."""
    import resource

    recipe = dataclasses.replace(RECIPE, epochs=epochs)
    train, test = load_digits_split()
    out: dict[str, Any] = {"epochs": epochs, "mode": mode}
    dataclasses.replace(recipe, epochs=1).train(train)  # warm-up: first-call costs are not the run's
    t0 = time.perf_counter()
    recipe.train(train)
    out["train_s"] = time.perf_counter() - t0
    if mode != "train":
        t0 = time.perf_counter()
        rep = metagradient(recipe, train, test.x[:1], test.y[:1], checkpoint_every=1 if mode == "all" else None)
        out["query_s"] = time.perf_counter() - t0
        out.update(steps=rep.steps, peak_states=rep.peak_states, states_saved=rep.states_saved, step_evals=rep.step_evals)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return out


def scaling(epochs_list: tuple[int, ...]) -> dict[str, Any]:
    """Cost of one query and peak memory against T (digits MLP, one fresh process per measurement)."""
    import subprocess

    path = CACHE / "scaling.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.is_file() else []
    for epochs in epochs_list:
        for mode in ("train", "sqrt", "all"):
            if any(r["epochs"] == epochs and r["mode"] == mode for r in rows):
                continue
            child = ("import json; from influence.evaluation.exact_study import scaling_child; "
                     f"print(json.dumps(scaling_child({epochs}, {mode!r})))")  # a fresh process per figure: its own peak RSS
            res = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"rows": rows}, indent=1))
            log(f"[scaling] {rows[-1]}")
    from influence.recipe import prepare

    _, run_ = prepare(RECIPE, load_digits_split()[0], None)
    state_mb = sum(v.numel() * v.element_size() for part in run_.initial_state().values() for v in part.values()) / 2**20
    result = {"rows": rows, "state_mb": state_mb}
    path.write_text(json.dumps(result, indent=1))
    return result


FINDINGS = """Findings. On the digits MLP exact mode ranks the effect of dropping small subsets far better than every
store-based method on the same run (0.75 against 0.49 for TRAK over 10 checkpoints), and its Pearson of 0.80 says it
predicts the size of the changes too. float64 training changes nothing (0.750 against 0.749): rounding is not the
limit. What decides the score is how smooth the training run is, as MAGIC and "Optimizing ML Training with
Metagradient Descent" (Engstrom et al. 2025) prescribe ("metasmooth" training): a smooth activation and a lower
learning rate. The ≥ 0.8 goal is met on a digits CNN and on 5,000 Fashion-MNIST images with metasmooth recipes: the
digits CNN with GELU, average pooling and BatchNorm at lr 0.01 (`smooth-cnn-lr0.01`) scores 0.990 (TRAK-10 0.743,
TracIn-10 0.491, Grad-Cos-10 0.494; test accuracy 0.975 against 0.978 for the default CNN), and the Fashion-MNIST
GELU MLP at lr 0.01 (`fashion-gelu-mlp-lr0.01`) 0.992 (TRAK-10 0.480, TracIn 0.190, Grad-Cos 0.224; test accuracy
0.803 against 0.838 for the ReLU MLP at lr 0.05). Both factors count: the default CNN (ReLU, max pooling) goes from
0.00 at lr 0.05 to 0.71 at lr 0.01 (`digits-cnn-lr0.01`); GELU and average pooling at lr 0.05 give 0.47
(`smooth-cnn`); both give 0.99. On Fashion-MNIST GELU alone gives 0.67 (`fashion-gelu-mlp`, against 0.44 for ReLU),
GELU and lr 0.01 0.99. In the ablations (20 test points, 20–30 retrains) the smooth CNN's LDS falls with the learning
rate's rise, 0.99 / 0.84 / 0.52 at lr 0.01 / 0.02 / 0.05; at lr 0.05 GroupNorm or LayerNorm for BatchNorm does not
help (0.63, 0.51) and no normalisation is worse (0.11; at lr 0.01 that CNN does not learn, accuracy 0.24, so its
LDS of 1.00 means nothing). The mean |margin change| tracks the LDS: 1.10 for the default CNN, 0.28 for `smooth-cnn`,
0.08 for `smooth-cnn-lr0.01`; a lower learning rate keeps the retrains in the regime a derivative describes. The
derivative itself is right in every case (finite differences of retraining agree to 1e-3 on a small BatchNorm CNN,
tests/test_exact.py). A smooth CNN on Fashion-MNIST (`fashion-smooth-cnn-lr0.01`) was not measured: one ablation
with 20 retrains ran out of time (over 14 CPU-minutes) and was stopped. Removal (Fashion-MNIST): dropping the top-20
exact proponents of the wrong class flips 12 of 20
misclassifications (10 to the true class), against 11 for TRAK's top-20 and 3 for 20 random images; at k = 10, 12
against 8 and 3. Cost: one query alone costs several training runs and a batch of 8 about 1–3.4 per query; these
timings were taken under heavy load and vary by 2× between runs. Memory: with √T checkpointing the states held grow
as √T (13 → 42 for T = 46 → 460) and the peak RSS over a training run from 12 to 26 MiB; keeping all T states grows
linearly (27 → 218 MiB)."""


def _fmt_lds(r: dict[str, Any] | None) -> str:
    return "–" if r is None else f"{r['lds']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"


def test_accuracy(result: dict[str, Any]) -> float | None:
    """Accuracy of the variant's final model on the whole digits test split (from its saved run)."""
    run_dir = variant_dir(result.get("model", "digits-mlp"), result["dtype"], tuple(result["drop"]), result["rows"]["exact"]["n_test"]) / "run"
    ckpts = sorted(run_dir.glob("epoch_*.pt"))
    if not ckpts:
        return None
    from influence.loading import load_checkpoint

    recipe = recipe_of(result.get("model", "digits-mlp"), result["dtype"])
    net = load_checkpoint(recipe.build_model(), ckpts[-1])
    _, test = load_data(result.get("model", "digits-mlp"))
    with torch.no_grad():
        return float((net(test.x.to(next(net.parameters()).dtype)).argmax(-1) == test.y).float().mean())


def variant_row(r: dict[str, Any]) -> str:
    """One row of the report's table of variants (models, data, dtypes, drop sizes) from a cached result."""
    e, rows = r["rows"]["exact"], r["rows"]
    tm = r["timing"]
    cost = "–"
    if "exact_one_query_s" in tm and "exact_batched_s_per_query" in tm:
        cost = f"{tm['exact_one_query_s'] / tm['train_s']:.1f}× / {tm['exact_batched_s_per_query'] / tm['train_s']:.2f}×"
    return (
        f"| {r.get('model', 'digits-mlp')} | {DATA_NAMES[_data_of(r.get('model', 'digits-mlp'))]} ({r['n_train']:,}) | "
        f"{r['dtype']} | {r['drop'][0]:.1%}–{r['drop'][1]:.1%} | "
        f"{r['drop_sizes'][0]}–{r['drop_sizes'][1]} | {e['n_retrains']} | {e['n_test']} | "
        f"{e['lds']:.3f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] | {e['pearson']:.3f} | {_fmt_lds(rows.get('trak (ckpt10)'))} | "
        f"{_fmt_lds(rows.get('tracin (ckpt10)'))} | {_fmt_lds(rows.get('gradcos (ckpt10)'))} | "
        f"{r['mean_abs_change']:.3f} | {test_accuracy(r) or float('nan'):.3f} | {cost} |")


def command_of(r: dict[str, Any]) -> str:
    """The eval_exact.py command that produced a cached variant result."""
    return (f"python scripts/eval_exact.py --retrains {r['rows']['exact']['n_retrains']} --test-points "
            f"{r['rows']['exact']['n_test']} --model {r.get('model', 'digits-mlp')} --dtype {r['dtype']} "
            f"--drop {r['drop'][0]:g},{r['drop'][1]:g}" + ("" if len(r["rows"]) > 1 else " --no-baselines"))


def ablation_lines() -> list[str]:
    """The table of scripts/exact_ablation.py's runs (CACHE/ablation.jsonl), each with its command; [] if none."""
    path = CACHE / "ablation.jsonl"
    if not path.is_file():
        return []
    lines = ["", "Ablations (scripts/exact_ablation.py: no baselines, fewer retrains and test points, same seeds and 1–5% "
             "drops; the CNN is the digits CNN's shape with the normalisation, activation and pooling named, ln = GroupNorm "
             "with one group; mlp = the 128-128 MLP; 10 epochs, SGD as above with the lr named):", "",
             "| data | norm | activation | pooling | lr | retrains | test points | test accuracy | exact LDS [95% CI] | "
             "exact Pearson | mean abs margin change | command |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        a = r["argv"]
        lines.append(f"| {'Fashion-MNIST' if a[0].startswith('f') else 'digits'} | {a[1] if a[3] != 'mlp' else '–'} | {a[2]} | "
                     f"{a[3]} | {a[4]} | {a[8]} | {a[9]} | {r['acc']:.3f} | {r['lds']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | "
                     f"{r['pearson']:.3f} | {r['mean_abs']:.3f} | `python scripts/exact_ablation.py {' '.join(a)}` |")
    return lines


def report(result: dict[str, Any], others: list[dict[str, Any]]) -> str:
    t = result["timing"]
    m = result["memory"]
    ex = result["rows"]["exact"]
    lines = [
        "## Exact mode", "",
        "Exact mode (`influence.exact_scores`, metagradients as in Ilyas & Engstrom 2025, \"MAGIC\") replays the training",
        "run and differentiates each test margin with respect to every training example's loss weight. Supported: SGD",
        "with momentum, Adam and AdamW, with weight decay; constant, linear or cosine per-epoch learning rates; seeded data",
        "order, no augmentation; BatchNorm in train mode (the running statistics are carried through every step as",
        "state and differentiated, since the final eval-mode model reads them). Refused with the reason: Dropout,",
        "InstanceNorm with running statistics, models whose forward or gradient is not bitwise repeatable or that write",
        "to other buffers.", "",
        "Judged by the same-seed small-drop LDS on digits (MLP, 1,437 training images): one recipe,",
        "`Recipe(model=\"digits-mlp\", epochs=10)` (SGD, momentum 0.9, weight decay 5e-4, lr 0.05 decayed linearly per",
        "epoch, batch 64, seed 0: `train_classifier(epochs=10)` to float rounding), trained once with 10 checkpoints;",
        f"{ex['n_retrains']} retrains of the same recipe, seed and data order with a random "
        f"{result['drop_sizes'][0]}–{result['drop_sizes'][1]} training images",
        f"({result['drop'][0]:.0%}–{result['drop'][1]:.0%}) weighted 0; margins of the true label on {ex['n_test']} random "
        f"test images (mean |margin change| {result['mean_abs_change']:.3f}).",
        "LDS = mean over test points of Spearman(−Σ_{i∈S} score_i, actual change), [bootstrap 95% interval over test",
        "points]; Pearson rewards the size of each change too. Baselines: `influence.build` (sparse projector,",
        f"k = {result['proj_dim']}) + `Influence.scores` on the recipe's own checkpoints: the final one (`ckpt1`) or all 10",
        "with their learning rates (`ckpt10`).", "",
        "| method | LDS [95% CI] | mean Pearson |", "|---|---|---|",
    ]
    for name, r in sorted(result["rows"].items(), key=lambda kv: -kv[1]["lds"]):
        lines.append(f"| {name} | {r['lds']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['pearson']:.3f} |")
    lines += [
        "",
        "Cost per query, as a multiple of one training run of the same recipe timed in the same process "
        "(measured under load: 2 shared cores; ratios only):", "",
        f"- one query alone: {t['exact_one_query_s'] / t['train_s']:.1f}× a training run "
        f"(forward pass, recomputation from √T-spaced states, reverse pass of second-order vjps);",
        f"- queries in batches of {result['query_batch']} (one replay, reverse pass vmapped over the batch): "
        f"{t['exact_batched_s_per_query'] / t['train_s']:.2f}× a training run per query;",
        f"- memory: T = {m['steps']} steps, one state kept every K = {m['checkpoint_every']} steps, at most "
        f"{m['peak_states']} optimizer states held at once ({m['step_evals']} forward steps in all, recomputation included).",
    ]
    if others:
        lines += ["", "Other models, data and settings (same recipe otherwise: 10 epochs, SGD, batch 64, seed 0, lr 0.05 "
                  "decayed linearly, or 0.01 where the model's name ends in -lr0.01; test points "
                  "and drop sets drawn with the same seeds; TracIn, Grad-Cos and TRAK over the run's 10 checkpoints, "
                  "where their baselines were run; cost = one query alone / per query in batches of 8, as multiples of one "
                  "training run in the same process, measured under load):", "",
                  "| model | data (train images) | dtype | drop | images dropped | retrains | test points | exact LDS [95% CI] | "
                  "exact Pearson | TRAK LDS | TracIn LDS | Grad-Cos LDS | mean abs margin change | test accuracy | cost per query |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [variant_row(r) for r in [result] + others]
    lines += ablation_lines()
    halves = [r for r in [result] + others if "half_subset" in r]
    if halves:
        lines += ["", "Half-subset LDS (each model trained from scratch on a random half of the training set with its own "
                  "seed and data order; predicted margin Σ_{i∈S} score_i; same test points). Exact mode differentiates "
                  "the full run with its seed, a linearisation that says nothing about a model that saw half the data in "
                  "another order, so it is not expected to lead here:", "",
                  "| model | models | exact | TRAK (ckpt10) | TRAK (ckpt1) | TracIn (ckpt10) | Grad-Cos (ckpt10) |", "|---|---|---|---|---|---|---|"]
        for r in halves:
            h = r["half_subset"]
            lines.append(f"| {r.get('model', 'digits-mlp')} | {h['exact']['n_retrains']} | {_fmt_lds(h['exact'])} | "
                         f"{_fmt_lds(h.get('trak (ckpt10)'))} | {_fmt_lds(h.get('trak (ckpt1)'))} | "
                         f"{_fmt_lds(h.get('tracin (ckpt10)'))} | {_fmt_lds(h.get('gradcos (ckpt10)'))} |")
    removal_path = next(iter(sorted(CACHE.glob("removal_*/result.json"))), None)
    if removal_path is not None and "rows" in (rem := json.loads(removal_path.read_text())):
        n = len(rem["test_ids"])
        lines += ["", f"Removal ({rem['model']}, {rem['n_train']:,} training images): {n} misclassified test images "
                  f"(drawn from the {rem['n_misclassified']} the run gets wrong out of {rem['n_test']:,}); for each, the "
                  "top-k proponents of the predicted (wrong) class are weighted 0 and the recipe is retrained with the same "
                  "seed and data order. Flipped = the prediction leaves the wrong class; correct = it becomes the true "
                  f"class; margin drop = mean fall of the wrong class's margin (it starts at {rem['base_margin_mean']:.2f}). "
                  "Proponents by exact mode, by TRAK over the 10 checkpoints, or k random training images:", "",
                  "| k | exact: flipped / correct / margin drop | TRAK: flipped / correct / margin drop | "
                  "random: flipped / correct / margin drop |", "|---|---|---|---|"]
        for k in rem["ks"]:
            cells = [f"{rem['rows'][f'{m},{k}']['flipped']}/{n} / {rem['rows'][f'{m},{k}']['now_correct']}/{n} / "
                     f"{rem['rows'][f'{m},{k}']['mean_margin_drop']:.2f}" for m in ("exact", "trak", "random")]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    scale_path = CACHE / "scaling.json"
    if scale_path.is_file() and "state_mb" in (sc := json.loads(scale_path.read_text())):
        lines += ["", "Cost and memory against the number of steps T (digits MLP, one query, each figure from a fresh process; "
                  "time ratios to a training run in the same process and peak RSS, measured under load; one optimizer "
                  f"state = parameters + momentum = {sc['state_mb']:.2f} MiB):", "",
                  "| epochs | T | query / training run (√T states) | states held (√T) | peak RSS over training-only (√T) | "
                  "query / training run (all T states) | states held (all) | peak RSS over training-only (all) |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(r["epochs"], r["mode"]): r for r in sc["rows"]}
        for e in sorted({r["epochs"] for r in sc["rows"]}):
            tr, sq, al = by.get((e, "train")), by.get((e, "sqrt")), by.get((e, "all"))
            if not (tr and sq and al):
                continue
            lines.append(f"| {e} | {sq['steps']} | {sq['query_s'] / sq['train_s']:.1f}× | {sq['peak_states']} | "
                         f"{sq['maxrss_mb'] - tr['maxrss_mb']:+.0f} MiB | {al['query_s'] / al['train_s']:.1f}× | "
                         f"{al['peak_states']} | {al['maxrss_mb'] - tr['maxrss_mb']:+.0f} MiB |")
    lines += ["", FINDINGS]
    lines += ["", "```", f"python scripts/eval_exact.py --retrains {ex['n_retrains']} --test-points {ex['n_test']} "
              f"--query-batch {result['query_batch']} --proj-dim {result['proj_dim']}"]
    lines += [command_of(r) for r in others]
    if halves:
        lines += [f"python scripts/eval_exact.py --half-subset {r['half_subset']['exact']['n_retrains']} --model "
                  f"{r.get('model', 'digits-mlp')}" for r in halves]
    if removal_path is not None and "rows" in rem:
        lines.append(f"python scripts/eval_exact.py --removal --model {rem['model']} --removal-images {len(rem['test_ids'])} "
                     f"--removal-k {','.join(str(k) for k in rem['ks'])} --query-batch 10")
    if scale_path.is_file() and "state_mb" in sc:
        lines.append(f"python scripts/eval_exact.py --scaling {','.join(str(e) for e in sorted({r['epochs'] for r in sc['rows']}))}")
    lines += ["python scripts/eval_exact.py --report", "```"]
    return "\n".join(lines)


def deadline_of(hhmm: str | None) -> float | None:
    """Today's HH:MM (UTC) as a timestamp, or None."""
    if not hhmm:
        return None
    import datetime as dt

    hh, mm = (int(v) for v in hhmm.split(":"))
    return dt.datetime.now(dt.timezone.utc).replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()

