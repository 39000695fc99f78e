"""A W-rank torchrun featurization against one process, on the commands users run: wall time and identical bytes.

1. ``influence build`` as one process (OMP_NUM_THREADS = the cores this process may use), then
   ``torchrun --standalone --nproc-per-node W -m influence build`` with the same arguments (OMP_NUM_THREADS = cores / W
   per rank), each in a subprocess under ``/usr/bin/time -v``: wall (start-up, JPEG decoding, gradients, projection,
   writes and the methods' preparation on rank 0), peak RSS as ``time`` reports it (the largest single process: the
   build, or the largest of torchrun's agent and its ranks), and the ``--json`` stage breakdown (rank 0's under
   torchrun). Both read the same files, already in the page cache (every file of ``--data`` is read once first).
2. The two stores compared: the normalised sha256 of every file (``influence.evaluation.store_bytes``: equal up to
   the random generation tokens in file names and the digests that hash them), and the exact top-k proponents and
   opponents (ids and scores) of a few test images through ``Influence.open(...).query``, for every method built.

``--methods`` defaults to ``tracin``, so the figure is featurization, not TRAK's (ΦᵀΦ + λI)⁻¹ solve, which runs on
rank 0 alone after every rank has featurized. Without ``--checkpoint`` the model's seeded initial weights (seed 0) are
saved in the work folder and used: the weights do not change the amount of computation, so not the speed either.

    python scripts/bench_sharded.py --data runs/cifar10/cifar10-jpg/train             # writes its section of docs/BENCHMARKS.md
    python scripts/bench_sharded.py --data FOLDER --limit-per-class 64 --chunk-rows 64 --no-write   # smoke run, 640 images
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


def _class_images(folder: Path) -> dict[str, list[Path]]:
    """The image files of each class of a class-folder tree, in the loader's order (classes sorted, then files)."""
    from influence.loading import IMAGE_SUFFIXES

    return {c.name: [f for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
            for c in sorted(p for p in folder.iterdir() if p.is_dir())}


def _images(folder: Path) -> list[Path]:
    return [f for files in _class_images(folder).values() for f in files]


def _limited(data: Path, per_class: int, work: Path) -> Path:
    """A folder of symlinks to the first ``per_class`` images of each class of ``data``."""
    small = work / f"data_{per_class}_per_class"
    shutil.rmtree(small, ignore_errors=True)
    for name, files in _class_images(data).items():
        (small / name).mkdir(parents=True)
        for f in files[:per_class]:
            (small / name / f.name).symlink_to(f.resolve())
    return small


def _initial_checkpoint(model: str, work: Path) -> Path:
    import torch

    from influence.loading import load_model

    torch.manual_seed(0)
    path = work / "initial_weights.pt"
    torch.save(load_model(model).state_dict(), path)
    return path


def _timed(cmd: list[str], threads: int) -> dict[str, Any]:
    """Wall seconds, peak RSS (kB) and the ``--json`` summary of one build command run under ``/usr/bin/time -v``."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], env=_env(threads), cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({run.returncode}):\n{run.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
    summary, _ = json.JSONDecoder().raw_decode(run.stdout[run.stdout.index("{"):])  # rank 0's document
    return {"wall_s": wall, "rss_kb": int(rss.group(1)) if rss else None, "summary": summary, "threads": threads}


def _same_top_k(one: Path, other: Path, test: Path, queries: int, k: int) -> tuple[bool, int, list[str], list[str]]:
    """Whether both stores give the same top-``k`` proponents and opponents (ids and scores, exactly) for ``queries``
    images of ``test`` spread over its classes, with every method they have; the count, methods and test paths."""
    from influence import Influence

    files = _images(test)
    ids = sorted({round(i * (len(files) - 1) / max(1, queries - 1)) for i in range(queries)})
    a, b = Influence.open(one), Influence.open(other)
    data = a.test_data(str(test), ids)
    same = True
    for method in a.methods:
        for ra, rb in zip(a.query(data.x, k=k, method=method), b.query(data.x, k=k, method=method)):
            for xs, ys in ((ra.proponents, rb.proponents), (ra.opponents, rb.opponents)):
                same &= [(i.train_id, i.score) for i in xs] == [(i.train_id, i.score) for i in ys]
    return same, len(ids), list(a.methods), [str(files[i].relative_to(test)) for i in ids]


def _stages(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in summary.get("stages", {}).items())


def _shown(cmd: list[str]) -> str:
    """A command as a user types it from the repository root."""
    return " ".join(a.replace(str(REPO) + os.sep, "") for a in cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="image folder with one sub-folder per class (CIFAR-10: cifar10-jpg/train)")
    ap.add_argument("--model", default="resnet9-narrow", help="MODEL SPEC (default %(default)s)")
    ap.add_argument("--checkpoint", default=None,
                    help="state dict (default: the model's seeded initial weights, saved in --work; weights do not change the speed)")
    ap.add_argument("--ranks", type=int, default=2, help="torchrun ranks W (default %(default)s)")
    ap.add_argument("--proj-dim", type=int, default=2048, help="k (default %(default)s, the build's)")
    ap.add_argument("--projector", default="sparse", help="projector (default %(default)s, the build's)")
    ap.add_argument("--chunk-rows", type=int, default=1024,
                    help="store chunk rows (default %(default)s, the build's); ranks own whole chunks, so a smoke run "
                         "on few images needs small chunks for every rank to get some")
    ap.add_argument("--methods", default="tracin",
                    help="--method of the builds (default %(default)s: featurization, not TRAK's solve on rank 0)")
    ap.add_argument("--work", default=None, help="folder for the two stores (default: runs/bench_sharded in the repository)")
    ap.add_argument("--limit-per-class", type=int, default=0,
                    help="build on a folder of symlinks to this many images per class (smoke runs; default: all)")
    ap.add_argument("--queries", type=int, default=8, help="test images whose top-k must be equal (default %(default)s)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--section", default="bench_sharded")
    ap.add_argument("--doc", default=str(REPO / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from influence.distributed import ShardPlan
    from influence.evaluation.docs import write_section
    from influence.evaluation.store_bytes import differing_files, normalised_sha256

    load0 = os.getloadavg()
    cores = len(os.sched_getaffinity(0))
    data = Path(args.data).resolve()
    work = Path(args.work).resolve() if args.work else REPO / "runs" / "bench_sharded"
    if not data.is_dir():
        sys.exit(f"--data {data} is not a folder")
    work.mkdir(parents=True, exist_ok=True)
    test = data.parent / "test" if (data.parent / "test").is_dir() else data
    if args.limit_per_class:
        data = _limited(data, args.limit_per_class, work)
    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else _initial_checkpoint(args.model, work)
    for f in data.rglob("*"):  # the page cache holds every image before either timed run
        if f.is_file():
            f.read_bytes()

    stores = {"one": work / "store_1_process", "ranks": work / f"store_{args.ranks}_ranks"}
    build = ["-m", "influence", "build", "--model", args.model, "--data", str(data), "--checkpoint", str(checkpoint),
             "--method", args.methods, "--projector", args.projector, "--proj-dim", str(args.proj_dim),
             "--chunk-rows", str(args.chunk_rows), "--json"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks)]
    cmds = {"one": [sys.executable, *build, "--out", str(stores["one"])],
            "ranks": [sys.executable, *torchrun, *build, "--out", str(stores["ranks"])]}
    threads = {"one": cores, "ranks": max(1, cores // args.ranks)}
    runs = {}
    for name in ("one", "ranks"):
        shutil.rmtree(stores[name], ignore_errors=True)
        print(f"running ({threads[name]} threads per process): {' '.join(cmds[name])}", file=sys.stderr, flush=True)
        runs[name] = _timed(cmds[name], threads[name])
        print(f"  {runs[name]['wall_s']:.1f} s; stages (s): {_stages(runs[name]['summary'])}", file=sys.stderr, flush=True)

    fa, fb = normalised_sha256(stores["one"]), normalised_sha256(stores["ranks"])
    differ = differing_files(fa, fb)
    same, n_queries, methods, test_paths = _same_top_k(stores["one"], stores["ranks"], test, args.queries, args.k)
    load1 = os.getloadavg()

    one, ranks = runs["one"], runs["ranks"]
    n = int(one["summary"]["n"])
    chunk = int(json.loads((stores["ranks"] / "zarr.json").read_text())["attributes"]["rows_per_chunk"])
    owned = [len(ShardPlan(r, args.ranks).chunks(n, chunk)) for r in range(args.ranks)]
    script = (f"python scripts/bench_sharded.py --data {args.data} --model {args.model} --ranks {args.ranks} "
              f"--proj-dim {args.proj_dim} --projector {args.projector} --chunk-rows {args.chunk_rows} --methods {args.methods}"
              + (f" --work {args.work}" if args.work else "")
              + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
              + (f" --limit-per-class {args.limit_per_class}" if args.limit_per_class else ""))
    shown_one = _shown(["influence", *build[2:], "--out", str(stores["one"])])
    shown_ranks = _shown(["torchrun", *torchrun[2:], "-m", "influence", *build[2:], "--out", str(stores["ranks"])])
    weights = (f"checkpoint `{args.checkpoint}`" if args.checkpoint else
               "the model's seeded initial weights (seed 0; the weights do not change the amount of computation, "
               "so not the speed)")

    def rss(r: dict[str, Any]) -> str:
        return f"{r['rss_kb'] / 1024:.0f} MB" if r["rss_kb"] is not None else "not reported"

    md = "\n".join([
        f"## Sharded build: {args.ranks}-rank torchrun against one process, {n:,} images (measured)",
        "",
        f"`{script}` on {cores} cores, load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load0)} at start "
        f"and {', '.join(f'{x:.2f}' for x in load1)} at end. Model `{args.model}`, {weights}; `--method "
        f"{args.methods}`, so the figure is featurization (TRAK's solve would run on rank 0 alone afterwards). Each "
        f"build is the user's command in a subprocess under `/usr/bin/time -v`, JPEGs already in the page cache:",
        "",
        f"- one process, OMP_NUM_THREADS={threads['one']}: `{shown_one}`",
        f"- {args.ranks} ranks, OMP_NUM_THREADS={threads['ranks']} each: `{shown_ranks}` (run as `python -m "
        f"torch.distributed.run`, which is what `torchrun` calls)",
        "",
        f"| quantity | 1 process | torchrun, {args.ranks} ranks |",
        "|---|---|---|",
        f"| wall, start-up to complete store | {one['wall_s']:.1f} s | {ranks['wall_s']:.1f} s |",
        f"| examples/s end to end | {n / one['wall_s']:.1f} | {n / ranks['wall_s']:.1f} |",
        f"| peak RSS (`time -v`: the largest single process; under torchrun a rank or the agent) | {rss(one)} | "
        f"{rss(ranks)} |",
        f"| build stages (s; under torchrun rank 0's, over its own chunks, and its wait for the other ranks falls in "
        f"the stage after `writes`) | {_stages(one['summary'])} | {_stages(ranks['summary'])} |",
        "",
        f"- store chunks of {chunk:,} rows owned by each rank: {' / '.join(map(str, owned))}"
        + ("" if all(owned) else " (a rank with no chunk did no featurization: give a smaller --chunk-rows)"),
        f"- wall ratio, 1 process / {args.ranks} ranks: {one['wall_s'] / ranks['wall_s']:.2f}×",
        f"- identical bytes: {'yes' if not differ else 'no'} ({len(fa)} files; compared by sha256 up to the random "
        f"generation tokens, `influence.evaluation.store_bytes`)" + (f"; differing: {', '.join(differ[:10])}" if differ else ""),
        f"- top-{args.k} equal (proponents and opponents, ids and scores exactly, `Influence.query`, {n_queries} images "
        f"of `{test.name}/` × methods {', '.join(methods)}): {'yes' if same else 'no'}",
    ])
    print(md)
    if not args.no_write:
        write_section(args.section, md, args.doc)


if __name__ == "__main__":
    main()
