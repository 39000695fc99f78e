"""The whole CLI measured from outside: subprocess wall times, start-up included, medians of several runs.

Three figures, each against its target (issue: speed end to end):

(a) ``influence build`` of ResNet-9 (``resnet9``, 6.6M parameters, briefly trained on the rows) over N = 1,024
    random 3×32×32 images in an ``.npz``, one checkpoint, batch 64, k = 2048 factorized, against one training epoch
    over the same rows (forward + backward + SGD step, batch 64, in this process), measured in the same run:
    target build wall ≤ 1.6× the epoch;
(b) Fashion-MNIST, 4,500 training and 500 test images, a 784-128-64-10 MLP given as a user's own
    ``file.py:factory``, 10 independently trained checkpoints (trained here, not timed), TRAK only:
    ``influence build`` + ``influence score`` of the 500 test images, total wall: target ≤ 60 s;
(c) ``influence query STORE --image X.png`` on the store of (a): target ≤ 2 s.

Subprocesses run without ``PYTHONDONTWRITEBYTECODE`` (an installed package has its bytecode compiled), after
one untimed warm-up run of each command.

    python scripts/bench_cli.py                   # writes its section of docs/BENCHMARKS.md
    python scripts/bench_cli.py --quick --no-write   # smoke run: small N, one repetition
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from influence.evaluation.docs import write_section
from influence.evaluation.throughput import train_epoch_seconds
from influence.loading import load_model
from influence.models import ResNet9

FASHION = Path("/usr/share/datasets/fashion-mnist")
MLP_FILE = '''"""A user's own model file: the 784-128-64-10 MLP of the Fashion-MNIST benchmark."""
from torch import nn


def factory() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    repo = str(Path(__file__).resolve().parents[1])
    return env | {"PYTHONPATH": os.pathsep.join([repo, env.get("PYTHONPATH", "")])}


def _cli(args: list[str], cwd: Path) -> tuple[float, str]:
    """Wall seconds and stdout of ``python -m influence ARGS`` (exit on failure, with its stderr)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "influence", *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"`influence {' '.join(args)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, done.stdout



def _shown(args: list[str], work: Path) -> str:
    return "influence " + " ".join(a.replace(str(work) + os.sep, "") for a in args)


# ----------------------------------------------------------------------------- (a) ResNet-9 build vs training

def _resnet_rows(n: int, work: Path) -> tuple[torch.Tensor, torch.Tensor, Path, Path]:
    """N random images with random labels as an .npz, and a ResNet-9 checkpoint after one short pass over them."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    data = work / "rows.npz"
    np.savez(data, x=(x * 255).round().to(torch.uint8).numpy(), y=y.numpy())
    x = torch.as_tensor(np.load(data)["x"]).float() / 255  # the rows exactly as the build reads them
    torch.manual_seed(0)
    model = ResNet9().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for b in range(0, min(n, 256), 64):  # BatchNorm statistics and weights away from their initial values
        loss = F.cross_entropy(model(x[b:b + 64]), y[b:b + 64])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ckpt = work / "resnet9.pt"
    torch.save(model.state_dict(), ckpt)
    return x, y, data, ckpt


def bench_build(n: int, reps: int, train_reps: int, work: Path) -> dict[str, object]:
    x, y, data, ckpt = _resnet_rows(n, work)
    store = work / "resnet9_store"
    args = ["build", "--model", "resnet9", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(store),
            "--projector", "factorized", "--proj-dim", "2048", "--batch-size", "64", "--json"]
    before = train_epoch_seconds(x, y, 64, train_reps)
    walls, stages = [], []
    for _ in range(reps):
        shutil.rmtree(store, ignore_errors=True)
        wall, out = _cli(args, work)
        walls.append(wall)
        stages.append(json.loads(out)["stages"])
    after = train_epoch_seconds(x, y, 64, train_reps)
    epoch = statistics.median(before + after)
    build = statistics.median(walls)
    mid = stages[walls.index(sorted(walls)[(len(walls) - 1) // 2])]
    return {"n": n, "build_s": build, "build_walls": walls, "epoch_s": epoch, "epochs": before + after,
            "ratio": build / epoch, "stages": mid, "store": store, "command": _shown(args, work)}


# ----------------------------------------------------------------------------- (b) Fashion-MNIST TRAK

def _idx(name: str) -> np.ndarray:
    with gzip.open(FASHION / name, "rb") as f:
        raw = f.read()
    dims = raw[3]  # IDX header: two zero bytes, the type (0x08: uint8), the number of dimensions, then each size
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion(n_train: int, n_test: int, work: Path) -> tuple[Path, Path]:
    x, y = _idx("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz")
    xt, yt = _idx("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")
    train, test = work / "fashion_train.npz", work / "fashion_test.npz"
    np.savez(train, x=x[:n_train, None], y=y[:n_train].astype(np.int64))
    np.savez(test, x=xt[:n_test, None], y=yt[:n_test].astype(np.int64))
    return train, test


def _train_mlps(train: Path, models: int, epochs: int, work: Path) -> list[Path]:
    """``models`` MLPs trained independently (seeds 0..models-1), as TRAK's ensemble: the checkpoints a user has."""
    with np.load(train) as f:
        x, y = torch.as_tensor(f["x"]).float().div(255).flatten(1), torch.as_tensor(f["y"])
    paths = []
    for seed in range(models):
        torch.manual_seed(seed)
        model = load_model(f"{work / 'mlp.py'}:factory")  # the user's file, through the loader the CLI uses
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for b in range(0, len(x), 64):
                i = order[b:b + 64]
                loss = F.cross_entropy(model(x[i]), y[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        path = work / f"mlp_{seed}.pt"
        torch.save(model.state_dict(), path)
        paths.append(path)
    return paths


def bench_fashion(n_train: int, n_test: int, models: int, epochs: int, reps: int, work: Path) -> dict[str, object]:
    (work / "mlp.py").write_text(MLP_FILE)
    train, test = _fashion(n_train, n_test, work)
    ckpts = _train_mlps(train, models, epochs, work)
    store, scores = work / "fashion_store", work / "scores.npy"
    spec = f"{work / 'mlp.py'}:factory"
    build = ["build", "--model", spec, "--data", str(train), "--out", str(store), "--method", "trak", "--json",
             *[a for c in ckpts for a in ("--checkpoint", str(c))]]
    score = ["score", str(store), "--model", spec, "--data", str(test), "--method", "trak", "--target", "label",
             "--out", str(scores)]
    totals, builds, scorings, stages = [], [], [], []
    for _ in range(reps):
        shutil.rmtree(store, ignore_errors=True)
        b, out = _cli(build, work)
        s, _ = _cli(score, work)
        builds.append(b)
        scorings.append(s)
        totals.append(b + s)
        stages.append(json.loads(out)["stages"])
    shape = np.load(scores).shape
    mid = totals.index(sorted(totals)[(len(totals) - 1) // 2])
    return {"n_train": n_train, "n_test": n_test, "models": models, "total_s": totals[mid], "totals": totals,
            "build_s": builds[mid], "score_s": scorings[mid], "stages": stages[mid], "shape": shape,
            "build": _shown(build[:9], work) + f" --checkpoint mlp_0.pt ... (×{models})", "score": _shown(score, work)}


# ----------------------------------------------------------------------------- (c) query --image

def bench_query(store: Path, reps: int, work: Path) -> dict[str, object]:
    from PIL import Image

    image = work / "query.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    args = ["query", str(store), "--image", str(image)]
    _cli(args, work)  # warm-up: bytecode compiled, files in the page cache
    walls = [_cli(args, work)[0] for _ in range(reps)]
    return {"wall_s": statistics.median(walls), "walls": walls, "command": _shown(args, work)}


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 128, 900/100 Fashion-MNIST rows, 2 models, 1 rep")
    ap.add_argument("--reps", type=int, default=3, help="runs of each CLI command (median reported)")
    ap.add_argument("--train-reps", type=int, default=3, help="training epochs timed before and after the builds")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, deleted after)")
    ap.add_argument("--section", default="bench_cli")
    ap.add_argument("--doc", default="docs/BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not FASHION.is_dir():
        sys.exit(f"{FASHION} not found: the Fashion-MNIST .gz files are needed for (b)")
    reps, train_reps = (1, 1) if args.quick else (args.reps, args.train_reps)
    n_resnet, n_train, n_test, models, epochs = (128, 900, 100, 2, 1) if args.quick else (1024, 4500, 500, 10, 3)

    threads, load0 = torch.get_num_threads(), os.getloadavg()[0]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_cli_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        a = bench_build(n_resnet, reps, train_reps, work)
        c = bench_query(a["store"], max(reps, 3 if not args.quick else 1), work)  # type: ignore[arg-type]
        b = bench_fashion(n_train, n_test, models, epochs, reps, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def stages(d: object) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in d.items()) if isinstance(d, dict) else str(d)

    quick = " --quick" if args.quick else ""
    md = "\n".join([
        "### The CLI from outside: build against training, Fashion-MNIST TRAK, one query (measured)",
        "",
        f"`python scripts/bench_cli.py{quick}` ({threads} torch threads, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {load0:.1f} at start and {os.getloadavg()[0]:.1f} "
        f"at end). Every CLI figure is the wall time of `python -m influence ...` in a subprocess, start-up included, "
        f"median of {reps} run(s) after bytecode is compiled.",
        "",
        "| quantity | value | target |",
        "|---|---|---|",
        f"| (a) `{a['command']}` wall, ResNet-9, N = {a['n']:,} random 3×32×32 images (runs: {_fmt(a['build_walls'])} s) | "  # type: ignore[arg-type]
        f"{a['build_s']:.2f} s | |",
        f"| (a) one training epoch over the same rows, batch 64, SGD (median of {len(a['epochs'])}: "  # type: ignore[arg-type]
        f"{_fmt(a['epochs'])} s) | {a['epoch_s']:.2f} s | |",  # type: ignore[arg-type]
        f"| (a) build wall / training epoch | {a['ratio']:.2f}× | ≤ 1.6× |",
        f"| (a) build stages (s) | {stages(a['stages'])} | |",
        f"| (b) Fashion-MNIST {b['n_train']:,} train / {b['n_test']} test, 784-128-64-10 MLP (`mlp.py:factory`), "
        f"{b['models']} checkpoints, TRAK: build + score, total wall (runs: {_fmt(b['totals'])} s) | "  # type: ignore[arg-type]
        f"{b['total_s']:.1f} s | ≤ 60 s |",
        f"| (b) `{b['build']}` | {b['build_s']:.1f} s | |",
        f"| (b) build stages (s) | {stages(b['stages'])} | |",
        f"| (b) `{b['score']}` (scores of shape {b['shape']}) | {b['score_s']:.1f} s | |",
        f"| (c) `{c['command']}` on the store of (a) (runs: {_fmt(c['walls'])} s) | {c['wall_s']:.2f} s | ≤ 2 s |",  # type: ignore[arg-type]
    ])
    print(md)
    if not args.no_write:
        write_section(args.section, md, args.doc)


if __name__ == "__main__":
    main()
