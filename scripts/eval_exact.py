"""Exact mode (metagradients) against TRAK / TracIn / Grad-Cos on the same-seed small-drop LDS, digits MLP.

One recipe (``Recipe(model="digits-mlp", epochs=10)``: SGD, momentum 0.9, weight decay
5e-4, lr 0.05 decayed linearly per epoch, batch 64, seed 0, as ``train_classifier(epochs=10)``)
is trained once with 10 checkpoints. Exact-mode scores come from replaying that run
(``influence.exact.metagradient``); the baselines are ``influence.build`` +
``Influence.scores`` on the same run's checkpoints (the final one alone, and all ten).
Ground truth: ``--retrains`` retrains of the same recipe with a random 1–5% of the
training set weighted 0 (same seed, same data order, same batches). LDS = mean over
test points of Spearman(−Σ_{i∈S} score_i, actual margin change); see influence/exact_eval.py.

    python scripts/eval_exact.py --retrains 100 --test-points 60      # cached in runs/exact_cache/<variant>/
    python scripts/eval_exact.py --dtype float64 --no-baselines       # an ablation: exact mode only
    python scripts/eval_exact.py --report                              # rewrite the docs section only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from influence.demo.digits import load_digits_split  # noqa: E402
from influence.exact import metagradient  # noqa: E402
from influence.exact_eval import drop_lds, drop_masks, final_margins, retrain_margins  # noqa: E402
from influence.recipe import Recipe  # noqa: E402

CACHE = ROOT / "runs" / "exact_cache"
DOC = ROOT / "docs" / "BENCHMARKS.md"
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


def fashion_mlp() -> torch.nn.Module:
    """The digits MLP's shape on 28×28 Fashion-MNIST: 784 → 128 → 128 → 10, ReLU."""
    from influence.models import DigitsMLP

    return DigitsMLP(in_features=784)


MODELS = {"digits-mlp": "digits-mlp", "gelu-mlp": f"{Path(__file__).resolve()}:gelu_mlp", "digits-cnn": "digits-cnn",
          "fashion-mlp": f"{Path(__file__).resolve()}:fashion_mlp"}
FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (gzipped idx files)
FASHION_TRAIN = 5000


def _idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic, dims as big-endian uint32, then uint8 data)."""
    import gzip

    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def load_fashion() -> tuple["ArrayDataset", "ArrayDataset"]:
    """5,000 Fashion-MNIST training images (a seeded random draw from the 60,000) and the 10,000 test images, 1×28×28 in [0, 1]."""
    from influence.data import ArrayDataset

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


def load_data(model: str) -> tuple["ArrayDataset", "ArrayDataset"]:
    return load_fashion() if model.startswith("fashion") else load_digits_split()


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def variant_dir(model: str, dtype: str, drop: tuple[float, float], n_test: int) -> Path:
    prefix = "" if model == "digits-mlp" else f"{model}_"
    return CACHE / f"{prefix}{dtype}_drop{drop[0]:g}-{drop[1]:g}_test{n_test}"


def run(n_retrains: int, n_test: int, query_batch: int, proj_dim: int, dtype: str = "float32",
        drop: tuple[float, float] = (0.01, 0.05), baselines: bool = True, model: str = "digits-mlp") -> dict:
    recipe = dataclasses.replace(RECIPE, dtype=dtype, model=MODELS[model])
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
    t0 = time.perf_counter()
    metagradient(recipe, train, x[:1], y[:1])
    timing["exact_one_query_s"] = time.perf_counter() - t0
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
    scores["exact"] = exact
    rep = metagradient(recipe, train, x[:1], y[:1]) if not timed else rep
    memory = {"steps": rep.steps, "checkpoint_every": rep.checkpoint_every, "peak_states": rep.peak_states,
              "step_evals": rep.step_evals}

    # Baselines on the same run's checkpoints.
    from influence.pipeline import build
    from influence.query import Influence

    for name, (paths, weights) in ({"ckpt1": (ckpts[-1:], [1.0]), f"ckpt{len(ckpts)}": (ckpts, lrs)} if baselines else {}).items():
        out = cache / f"store_{name}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        build(recipe.model, train, paths, out, projector="sparse", proj_dim=proj_dim, lr_weights=weights, progress=False)
        session = Influence.open(out)
        for method in ("tracin", "gradcos", "trak"):
            scores[f"{method} ({name})"] = session.scores(x, y, method=method)
        timing[f"baselines_{name}_s"] = time.perf_counter() - t0

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
        after[j] = retrain_margins(recipe, train, x, y, masks[j:j + 1])[0]
        np.savez(truth_path, masks=masks, margins=after)
        if j % 10 == 9:
            log(f"[retrain] {j + 1}/{n_retrains}, {time.perf_counter() - t0:.1f}s")
    if len(todo):
        timing["retrain_s_each"] = (time.perf_counter() - t0) / len(todo)
    change = after - base

    rows = {name: drop_lds(s, masks, change) for name, s in scores.items()}
    timing = {**(json.loads((cache / "result.json").read_text())["timing"] if (cache / "result.json").is_file() else {}),
              **timing}
    result = {"model": model, "dtype": dtype, "drop": list(drop), "n_train": len(train), "test_ids": test_ids.tolist(), "proj_dim": proj_dim, "query_batch": query_batch,
              "drop_sizes": [int(masks.sum(1).min()), int(masks.sum(1).max())], "timing": timing, "memory": memory,
              "mean_abs_change": float(np.abs(change).mean()), "rows": rows}
    (cache / "result.json").write_text(json.dumps(result, indent=1))
    return result


FINDINGS = """Findings. Exact mode ranks the effect of dropping small subsets far better than every store-based
method on the same run (ReLU MLP: 0.75 against 0.49 for the best, TRAK over 10 checkpoints), and its Pearson of 0.80
says it predicts the size of the changes too, not only their order. With ReLU it stays below MAGIC's 0.92
(CIFAR-10 ResNet-9), and float64 training changes nothing (0.750 against 0.749): rounding is not the limit. The
activation is: the same MLP with GELU for ReLU (`gelu-mlp`) scores 0.93 at 1–5% drops and 0.98 at 1–7 images, where
TRAK scores 0.52 and 0.37. With ReLU, smaller drops score lower (0.52), consistent with a part of the response that
no derivative sees (units switching on or off) whose share grows as the drop shrinks. For near-exact answers,
train with a smooth activation."""


def _fmt_lds(r: dict | None) -> str:
    return "–" if r is None else f"{r['lds']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"


def test_accuracy(result: dict) -> float | None:
    """Accuracy of the variant's final model on the whole digits test split (from its saved run)."""
    run_dir = variant_dir(result.get("model", "digits-mlp"), result["dtype"], tuple(result["drop"]), result["rows"]["exact"]["n_test"]) / "run"
    ckpts = sorted(run_dir.glob("epoch_*.pt"))
    if not ckpts:
        return None
    from influence.loading import load_checkpoint

    net = load_checkpoint(Recipe.load(run_dir / "recipe.json").build_model(), ckpts[-1])
    _, test = load_data(result.get("model", "digits-mlp"))
    with torch.no_grad():
        return float((net(test.x.to(next(net.parameters()).dtype)).argmax(-1) == test.y).float().mean())


def report(result: dict, others: list[dict]) -> str:
    t = result["timing"]
    m = result["memory"]
    ex = result["rows"]["exact"]
    lines = [
        "## Exact mode", "",
        "Exact mode (`influence.exact_scores`, metagradients as in Ilyas & Engstrom 2025, \"MAGIC\") replays the training",
        "run and differentiates each test margin with respect to every training example's loss weight. Supported: SGD",
        "with momentum, Adam and AdamW, with weight decay; constant, linear or cosine per-epoch learning rates; seeded data",
        "order, no augmentation. Refused with the reason: BatchNorm (running statistics are not replayed), Dropout,",
        "models whose forward or gradient is not bitwise repeatable or that write to their buffers.", "",
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
        lines += ["", "Other settings (same recipe, test points and drop seed; TRAK only where its baselines were run):", "",
                  "| model | dtype | drop | images dropped | retrains | exact LDS [95% CI] | mean Pearson | TRAK (ckpt10) LDS | "
                  "mean abs margin change | test accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in [result] + others:
            e = r["rows"]["exact"]
            lines.append(f"| {r.get('model', 'digits-mlp')} | {r['dtype']} | {r['drop'][0]:.1%}–{r['drop'][1]:.1%} | {r['drop_sizes'][0]}–{r['drop_sizes'][1]} | "
                         f"{e['n_retrains']} | {e['lds']:.3f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] | {e['pearson']:.3f} | "
                         f"{_fmt_lds(r['rows'].get('trak (ckpt10)'))} | {r['mean_abs_change']:.3f} | {test_accuracy(r) or float('nan'):.3f} |")
    lines += ["", FINDINGS]
    lines += ["", "```", f"python scripts/eval_exact.py --retrains {ex['n_retrains']} --test-points {ex['n_test']} "
              f"--query-batch {result['query_batch']} --proj-dim {result['proj_dim']}"]
    for r in others:
        lines.append(f"python scripts/eval_exact.py --retrains {r['rows']['exact']['n_retrains']} --test-points "
                     f"{r['rows']['exact']['n_test']} --model {r.get('model', 'digits-mlp')} --dtype {r['dtype']} --drop {r['drop'][0]:g},{r['drop'][1]:g}"
                     + ("" if len(r["rows"]) > 1 else " --no-baselines"))
    lines += ["python scripts/eval_exact.py --report", "```"]
    return "\n".join(lines)


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
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from _benchdoc import write_section

    drop = tuple(float(v) for v in a.drop.split(","))
    if not a.report:
        result = run(a.retrains, a.test_points, a.query_batch, a.proj_dim, a.dtype, (drop[0], drop[1]), not a.no_baselines,
                     a.model)
        for name, r in result["rows"].items():
            log(f"{name:>18}: LDS {r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  Pearson {r['pearson']:.3f}")
    results = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*/result.json"))]
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
