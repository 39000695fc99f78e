"""Featurization throughput as a ratio to plain training throughput, and projection fidelity.

For each model and projector kind, in one run and interleaved (so machine load
hits both alike): examples/s of a training step (forward + backward + SGD step,
train mode) and of featurization (per-example gradients + projection + float16
cast + zarr chunk write), at the same batch size. Fidelity: Spearman
correlation and top-10 overlap of projected inner products against exact
per-example-gradient inner products on a sample.

    python scripts/bench_featurize.py            # writes its table into docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from scipy.stats import spearmanr

from influence.evaluation.digits import load_digits_split, train_classifier
from influence.evaluation.docs import write_section
from influence.features import ClassificationTask, ProjectorSpec, make_projector, select_parameters
from influence.models import DigitsCNN, ResNet9


def _setup(name: str, n_sample: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model with realistic gradients and a pool of inputs."""
    torch.manual_seed(0)
    if name == "digits-cnn":
        train, _ = load_digits_split()
        model = DigitsCNN()
        train_classifier(model, train, epochs=3, seed=0)
        return model.eval(), train.x[: max(n_sample, 256)], train.y[: max(n_sample, 256)]
    model = ResNet9()
    x = torch.rand(max(n_sample, 64), 3, 32, 32)
    y = torch.randint(0, 10, (len(x),))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for b in range(0, len(x), 32):  # a few steps so BatchNorm statistics are not at init
        loss = torch.nn.functional.cross_entropy(model(x[b:b + 32]), y[b:b + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


def _throughput(model, x, y, projector, names, task, batch, reps, workdir: Path) -> tuple[float, float]:
    """Median examples/s of training and of featurization, measured alternately."""
    train_model = type(model)()
    train_model.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(train_model.parameters(), lr=1e-3)
    xb, yb = x[:batch], y[:batch]
    arr = zarr.open_array(str(workdir / "f.zarr"), mode="w", shape=(batch * reps, projector.dim), chunks=(batch, projector.dim), dtype="float16")

    def train_step() -> None:
        train_model.train()
        loss = torch.nn.functional.cross_entropy(train_model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def featurize(i: int) -> None:
        f = projector.featurize(model, task, names, xb, yb).numpy().astype(np.float16)
        arr[i * batch:(i + 1) * batch] = f

    train_step()
    if reps > 1:  # warm-up (skipped for the dense-on-big-model case, where one call takes minutes)
        featurize(0)
    t_train, t_feat = [], []
    for i in range(reps):
        s = time.perf_counter()
        train_step()
        t_train.append(time.perf_counter() - s)
        s = time.perf_counter()
        featurize(i)
        t_feat.append(time.perf_counter() - s)
    return batch / float(np.median(t_train)), batch / float(np.median(t_feat))


def _fidelity(model, x, y, projector, names, task, n_train, n_test, exact) -> tuple[float, float]:
    xt, yt, xs, ys = x[:n_train], y[:n_train], x[n_train:n_train + n_test], y[n_train:n_train + n_test]
    ft = torch.cat([projector.featurize(model, task, names, xt[b:b + 16], yt[b:b + 16]) for b in range(0, n_train, 16)])
    fs = projector.featurize(model, task, names, xs, ys)
    approx = (ft @ fs.T).numpy()
    rho = float(np.mean([spearmanr(approx[:, j], exact[:, j])[0] for j in range(n_test)]))
    top = float(np.mean([len(set(np.argsort(-approx[:, j])[:10]) & set(np.argsort(-exact[:, j])[:10])) / 10 for j in range(n_test)]))
    return rho, top


def _exact(model, x, y, names, task, n_train, n_test) -> np.ndarray:
    """Exact gradient inner products (no projection), streamed in batches of 8 training examples."""
    exact = make_projector(ProjectorSpec("none", 0), model, names)
    xs, ys = x[n_train:n_train + n_test], y[n_train:n_train + n_test]
    gs = exact.featurize(model, task, names, xs, ys)
    rows = [exact.featurize(model, task, names, x[b:min(n_train, b + 8)], y[b:min(n_train, b + 8)]) @ gs.T for b in range(0, n_train, 8)]
    return torch.cat(rows).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-cnn,resnet9")
    ap.add_argument("--kinds", default="sparse,factorized,gaussian,rademacher")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a machine shared with other jobs)")
    ap.add_argument("--section", default="bench_featurize", help="section of docs/BENCHMARKS.md to (re)write")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--doc", default="docs/BENCHMARKS.md", help="benchmarks page whose section is rewritten")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = ClassificationTask()
    rows = []
    workdir = Path(tempfile.mkdtemp())
    try:
        for name in args.models.split(","):
            n_train, n_test = (200, 10) if name == "digits-cnn" else (96, 8)
            model, x, y = _setup(name, n_train + n_test)
            names = select_parameters(model)
            p = sum(t.numel() for t in model.parameters())
            exact = _exact(model, x, y, names, task, n_train, n_test)
            for kind in args.kinds.split(","):
                proj = make_projector(ProjectorSpec(kind, args.k, 0), model, names)
                dense_big = kind in ("gaussian", "rademacher") and p * args.k > 2**28
                reps = 1 if dense_big else args.reps
                tr, fe = _throughput(model, x, y, proj, names, task, args.batch, reps, workdir)
                rho, top = _fidelity(model, x, y, proj, names, task, n_train, n_test, exact) if not dense_big else (float("nan"), float("nan"))
                rows.append((name, p, kind, proj.dim, tr, fe, fe / tr, rho, top))
                print(f"{name:11s} {kind:10s} k={proj.dim:5d} train {tr:8.1f}/s featurize {fe:8.1f}/s ratio {fe / tr:5.2f} "
                      f"spearman {rho:.3f} top10 {top:.2f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()[0]
    lines = [
        f"## Featurization throughput (ratio to training) and projection fidelity, {args.threads} thread(s)",
        "",
        f"Machine: 2 cores, load average {load:.1f} during the run (other jobs were running; ratios are measured "
        "alternately in one run so load hits both sides, but absolute examples/s are depressed).",
        "",
        f"Command: `python scripts/bench_featurize.py --models {args.models} --kinds {args.kinds} --k {args.k} --batch {args.batch} --reps {args.reps} --threads {args.threads}` "
        f"({args.threads} torch thread(s); training and featurization timed alternately in one run, medians; featurization = per-example "
        "gradients + projection + float16 cast + zarr write; fidelity = mean Spearman and top-10 overlap of projected vs exact "
        "gradient inner products, digits-cnn: 200 train × 10 test real digits after 3 epochs; resnet9: 96 × 8 random 3×32×32 inputs).",
        "",
        "| model | params | projector | dims | train ex/s | featurize ex/s | ratio | Spearman | top-10 overlap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p, kind, dim, tr, fe, ratio, rho, top in rows:
        fid = f"{rho:.3f} | {top:.2f}" if not np.isnan(rho) else "not measured (dense p×k too slow) | –"
        lines.append(f"| {name} | {p:,} | {kind} | {dim} | {tr:.1f} | {fe:.1f} | {ratio:.2f} | {fid} |")
    if not args.no_write:
        write_section(args.section, "\n".join(lines), args.doc)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
