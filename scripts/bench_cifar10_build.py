"""ResNet-9 on all 50,000 CIFAR-10 training images: build throughput against training throughput, size, query latency.

Everything in one run, on the command users run:

1. training throughput of the same model (``resnet9``, train mode, SGD with Nesterov momentum, forward + backward +
   step) at the build's batch size, on images already decoded into memory (a user's data loader decodes in
   parallel worker processes), median of ``--train-reps`` epochs over ``--train-rows`` stratified images;
2. ``influence build`` over the whole image folder in a subprocess under ``/usr/bin/time -v`` (wall, peak RSS,
   start-up and JPEG decoding included), with its ``--json`` stage breakdown;
3. training throughput again (the ratio uses the mean of both sides, so drift in machine load shows);
4. store bytes (``du -sb`` equivalent) and bytes per example;
5. query latency at N = 50,000 through ``Influence.query`` (exact scan of the store's float16 rows, one test image
   at a time; the first query, which reads the store, reported apart) and one ``influence query --image`` wall.

    python scripts/bench_cifar10_build.py --data runs/cifar10/cifar10-jpg --checkpoint runs/cifar10/ckpt/resnet9_full.pt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from influence import Influence
from influence.evaluation.docs import write_section
from influence.evaluation.throughput import train_epoch_seconds
from influence.loading import read_image


def _stratified_files(root: Path, rows: int) -> tuple[list[Path], list[int]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())]
    step = max(1, len(files) // rows)
    picked = files[::step][:rows]
    return [f for f, _ in picked], [c for _, c in picked]



def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the unpacked cifar10-jpg folder (holding train/ and test/)")
    ap.add_argument("--checkpoint", required=True, help="a ResNet-9 state dict trained on CIFAR-10")
    ap.add_argument("--out", default="runs/cifar10/stores/resnet9_bench", help="store folder (deleted first)")
    ap.add_argument("--projector", default="factorized")
    ap.add_argument("--batch", type=int, default=64, help="build batch size, also used for training")
    ap.add_argument("--train-rows", type=int, default=1024)
    ap.add_argument("--train-reps", type=int, default=3)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--limit-rows", type=int, default=0, help="build on a folder of this many images per class (smoke runs)")
    ap.add_argument("--section", default="cifar10_resnet9_build")
    ap.add_argument("--doc", default="docs/BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    data = Path(args.data)
    train_dir, test_dir = data / "train", data / "test"
    if args.limit_rows:
        small = Path("/tmp/bench_cifar10_small")
        shutil.rmtree(small, ignore_errors=True)
        for c in sorted(p.name for p in train_dir.iterdir()):
            (small / c).mkdir(parents=True)
            for f in sorted((train_dir / c).iterdir())[: args.limit_rows]:
                (small / c / f.name).symlink_to(f.resolve())
        train_dir = small
    threads = torch.get_num_threads()
    load0 = os.getloadavg()[0]

    files, labels = _stratified_files(train_dir, args.train_rows)
    x = torch.stack([read_image(f) for f in files])
    y = torch.tensor(labels)
    before = train_epoch_seconds(x, y, args.batch, args.train_reps)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "influence", "build", "--model", "resnet9", "--data", str(train_dir), "--checkpoint",
           args.checkpoint, "--out", str(out), "--projector", args.projector, "--batch-size", str(args.batch), "--json"]
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"build failed ({run.returncode}): {run.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))  # type: ignore[union-attr]
    summary = json.loads(run.stdout)

    after = train_epoch_seconds(x, y, args.batch, args.train_reps)
    train_s = statistics.median(before + after) / len(x)  # seconds per training example
    session = Influence.open(out)
    n = session.n_train
    build_eps = n / wall
    train_eps = 1.0 / train_s
    store_bytes = _du(out)

    test_files, _ = _stratified_files(test_dir, args.queries)
    first_start = time.perf_counter()
    session.query(read_image(test_files[0])[None], k=10)
    first_ms = (time.perf_counter() - first_start) * 1000
    lat = []
    for f in test_files[1:]:
        xq = read_image(f)[None]
        start = time.perf_counter()
        session.query(xq, k=10)
        lat.append((time.perf_counter() - start) * 1000)
    cli = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "influence", "query", str(out), "--image", str(test_files[1]), "--json"],
                       check=True, capture_output=True)
        cli.append(time.perf_counter() - start)

    stages = summary.get("stages") or summary.get("seconds") or {}
    shown = " ".join(cmd[1:]).replace(sys.executable, "python")
    md = "\n".join([
        "### Throughput, size and query latency (ResNet-9, all 50,000 images): measured",
        "",
        f"`python scripts/bench_cifar10_build.py --data {args.data} --checkpoint {args.checkpoint}` ({threads} torch "
        f"threads, load average {load0:.1f} at start and {os.getloadavg()[0]:.1f} at end). The build is the user's "
        f"command, run in a subprocess under `/usr/bin/time -v`: `{shown}`.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| images | {n:,} |",
        f"| build wall (start-up, JPEG decoding, gradients, projection, writes, TRAK, caches) | {wall:.1f} s |",
        f"| build throughput end to end | {build_eps:.1f} examples/s |",
        f"| training throughput, same model and batch {args.batch}, decoded images (median of {2 * args.train_reps} "
        f"epochs over {len(x):,} images, before and after the build: {statistics.median(before):.2f} / "
        f"{statistics.median(after):.2f} s per epoch) | {train_eps:.1f} examples/s |",
        f"| ratio build / training throughput | {build_eps / train_eps:.2f} (build wall = {train_eps / build_eps:.2f}× "
        f"one training epoch over the same rows) |",
        f"| build stages (s) | {', '.join(f'{k} {v:.1f}' for k, v in stages.items()) if isinstance(stages, dict) else stages} |",
        f"| peak RSS of the build | {rss_kb / 1024:.0f} MB |",
        f"| store bytes | {store_bytes:,} ({store_bytes / n / 1000:.1f} kB per example) |",
        f"| query p50 / p95, exact scan, one image, k = 10 (`Influence.query`, {len(lat)} test images) | "
        f"{statistics.median(lat):.0f} / {np.percentile(lat, 95):.0f} ms |",
        f"| first query of a session (reads the store's rows) | {first_ms:.0f} ms |",
        f"| `influence query STORE --image X.jpg --json` wall, start-up included (median of 3) | {statistics.median(cli):.2f} s |",
    ])
    print(md)
    if not args.no_write:
        write_section(args.section, md, args.doc)


if __name__ == "__main__":
    main()
