"""A build sharded over torchrun ranks (gloo, 2 ranks on this CPU) writes the bytes one process writes.

Compared file by file with sha256 after normalising what is random by design (the generation tokens in file names and
the digests that hash them, the store's own path): ``influence.evaluation.store_bytes.normalised_sha256``, which
scripts/bench_sharded.py uses too. Nothing else (no timestamps) differs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import influence
import tiny_models
from conftest import SLOW_SPEC, slow_build_env
from influence.evaluation.store_bytes import differing_files, normalised_sha256

N = 5_000  # not a multiple of the chunk size: the last chunk (of 10) has 392 rows
CHUNK, BATCH, PROJ_DIM, FACTORY = 512, 64, 64, "HNSW32"
WORKERS = 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("sharded_inputs")
    g = np.random.default_rng(0)
    np.savez(d / "train.npz", x=g.standard_normal((N, 1, 16, 16)).astype(np.float32), y=g.integers(0, 10, N))
    ckpts = []
    for i in range(2):
        torch.manual_seed(i)
        torch.save(tiny_models.slow_cnn().state_dict(), d / f"c{i}.pt")
        ckpts.append(d / f"c{i}.pt")
    return d / "train.npz", ckpts


@pytest.fixture(scope="module")
def one(inputs, tmp_path_factory) -> Path:
    """The reference: one process, in this one."""
    data, ckpts = inputs
    out = tmp_path_factory.mktemp("one") / "store"
    influence.build(SLOW_SPEC, str(data), ckpts, out, proj_dim=PROJ_DIM, batch_size=BATCH, rows_per_chunk=CHUNK,
                    index_factory=FACTORY, progress=False)
    return out


def _torchrun(inputs: tuple[Path, list[Path]], out: Path) -> list[str]:
    data, ckpts = inputs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORKERS),
           "-m", "influence", "build", "--model", SLOW_SPEC, "--data", str(data), "--out", str(out),
           "--proj-dim", str(PROJ_DIM), "--batch-size", str(BATCH), "--chunk-rows", str(CHUNK), "--index", FACTORY]
    for c in ckpts:
        cmd += ["--checkpoint", str(c)]
    return cmd


def _assert_same_store(a: Path, b: Path) -> None:
    fa, fb = normalised_sha256(a), normalised_sha256(b)
    assert sorted(fa) == sorted(fb)
    # one file per chunk and checkpoint (done flags too), plus the array and group headers
    assert len([f for f in fa if f.startswith(("features/", "done/"))]) == 2 * 2 * 10 + 2 * 2 + 2
    assert differing_files(fa, fb) == []
    # the same exact top-k (scores too) for some training rows as queries, every method
    sa, sb = (influence.Influence.open(s, trust_store=True) for s in (a, b))
    x, y = sa.training_examples(list(range(0, N, 617)))
    for method in sa.methods:
        q = sa.query_vectors(x, y, method)
        for one, other in zip(sa.exact_scan(method).search(q, 20), sb.exact_scan(method).search(q, 20)):
            np.testing.assert_array_equal(one, other)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (a descendant of ``parent`` with RANK=<rank> in its environment)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID=" in b" ".join(env):
            return pid
        todo += children.get(pid, [])
    return None


def test_a_rank_killed_mid_build_resumes_to_the_same_bytes(inputs, one, tmp_path):
    out = tmp_path / "store"
    proc = subprocess.Popen(_torchrun(inputs, out), env=slow_build_env(0.03), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = out / "done" / "c0" / "c" / "5"  # rank 1 owns chunks 5..9: its first chunk of the first checkpoint
        deadline = time.monotonic() + 180
        while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert first.exists(), "rank 1 never finished a chunk"
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun ends rank 0 too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    flags = sorted(p.name for p in (out / "done").rglob("c/*"))
    assert 0 < len(flags) < 2 * 10, flags  # killed mid-build: some chunks done, not all
    assert json.loads((out / "zarr.json").read_text())["attributes"]["status"] == "building"

    again = subprocess.run(_torchrun(inputs, out), env=slow_build_env(0), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("store ") == 1, again.stdout  # rank 0 reports the store; rank 1 exits 0 silently
    _assert_same_store(one, out)


SCRIPT = """
import json, sys
import torch.distributed as dist
import influence
from influence.distributed import ShardPlan
from influence.errors import InfluenceError

spec, data, c0, c1, base, n, chunk = sys.argv[1:8]
n, chunk = int(n), int(chunk)
dist.init_process_group("gloo")  # started by the caller: build uses it and leaves it running
plan = ShardPlan.from_env()
cases = {  # name: (this rank's rows, projection dimension, data); the last is a good plan, and builds
    "unaligned": ((0, 2 * chunk) if plan.rank == 0 else (2 * chunk + 100, n), 64, data),
    "uncovered": ((0, chunk) if plan.rank == 0 else (2 * chunk, n), 64, data),
    "disagree": (None, 64 if plan.rank == 0 else 32, data),
    "old": (None, 64, data),  # a store with unfinished chunks whose done flags share one file
    "nan": (None, 64, f"{base}/nan.npz"),  # row 4000 (rank 1's) is NaN: found mid-featurization
    "store": (None, 64, data),
}
report = {}
for name, (rows, k, source) in cases.items():
    shard = ShardPlan(plan.rank, plan.world_size, plan.local_rank, rows)
    try:
        influence.build(spec, source, [c0, c1], f"{base}/{name}", proj_dim=k, batch_size=64, rows_per_chunk=chunk,
                        index_factory="HNSW32", progress=False, shard=shard)
        report[name] = "built"
    except InfluenceError as e:
        report[name] = f"{type(e).__name__}: {e}"
with open(f"{base}/report.{plan.rank}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.fixture(scope="module")
def two(inputs, one, tmp_path_factory) -> tuple[list[dict[str, str]], Path]:
    """Two ranks under torchrun calling ``influence.build`` in the cases of ``SCRIPT`` (the last one good): their
    reports, and the folder holding the stores."""
    data, (c0, c1) = inputs
    base = tmp_path_factory.mktemp("two")
    shutil.copytree(one, base / "old")  # made as before done flags had a file per chunk, chunk 3 of c1 unfinished
    group = zarr.open_group(str(base / "old"), mode="r+")
    flags = np.asarray(group["done/c1"][:])
    flags[3] = False
    group.create_array("done/c1", shape=flags.shape, chunks=flags.shape, dtype="bool", fill_value=False, overwrite=True)[:] = flags
    group.attrs["status"] = "building"
    before = normalised_sha256(base / "old")
    with np.load(data) as d:
        x = d["x"].copy()
        x[4000] = np.nan
        np.savez(base / "nan.npz", x=x, y=d["y"])
    script = base / "ranks.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORKERS), str(script),
           SLOW_SPEC, str(data), str(c0), str(c1), str(base), str(N), str(CHUNK)]
    run = subprocess.run(cmd, env=slow_build_env(0), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert normalised_sha256(base / "old") == before  # refused: no chunk or flag written
    return [json.loads((base / f"report.{r}.json").read_text()) for r in range(WORKERS)], base


def test_two_ranks_write_the_bytes_of_one_process(two, one):
    reports, base = two
    assert [r["store"] for r in reports] == ["built", "built"]
    _assert_same_store(one, base / "store")


def test_bad_plans_are_refused_before_any_write_and_a_failing_rank_fails_every_rank(two):
    reports, base = two
    for name in ("unaligned", "uncovered", "disagree"):
        assert not (base / name).exists(), name  # nothing written, not even the folder
    # the rank with the unaligned rows names them; the other says which rank failed, with the same error class
    assert re.fullmatch(r"BadSpecError: rank 1: rows 1124\.\.5000 do not start and end on the store's 512-row chunk "
                        r"boundaries .*", reports[1]["unaligned"]), reports[1]
    assert reports[0]["unaligned"].startswith("BadSpecError: rank 1 failed: rank 1: rows 1124..5000"), reports[0]
    for r in reports:
        assert r["uncovered"].startswith("BadSpecError: the ranks' shard plans do not cover the 10 chunks once each "
                                         "(owned twice: [], owned by none: [1])"), r
        assert r["disagree"].startswith("BadSpecError: the ranks were started with different build arguments"), r
        # a rank that fails mid-featurization fails the others at the next step, instead of leaving them waiting
        assert r["nan"].startswith("BadDataError: " + ("rank 1 failed: " if r is reports[0] else "")
                                   + "images 3968..4031 contain NaN or inf"), r
        assert re.match(r"StoreMismatchError: (rank 0 failed: )?store .*/old was started before done flags had a file "
                        r"per chunk, and checkpoints c1 are unfinished: finish it with one process", r["old"]), r


def test_a_plan_comes_from_torchrun_s_environment_and_owns_whole_chunks():
    from influence.distributed import ShardPlan, check_partition
    from influence.errors import BadSpecError

    assert ShardPlan.from_env({}) == ShardPlan() and not ShardPlan().sharded
    plan = ShardPlan.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1"})
    assert (plan.rank, plan.world_size, plan.local_rank, plan.sharded, plan.is_root) == (1, 2, 1, True, False)
    with pytest.raises(BadSpecError, match="torchrun environment is malformed: RANK='x'"):
        ShardPlan.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(BadSpecError, match="rank 2 is outside world size 2"):
        ShardPlan(rank=2, world_size=2)
    owned = [ShardPlan(r, 3).chunks(N, CHUNK) for r in range(3)]  # 10 chunks over 3 ranks: contiguous, whole
    assert owned == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    check_partition(owned, 10)
    assert ShardPlan(1, 2, rows=(4 * CHUNK, N)).chunks(N, CHUNK) == [4, 5, 6, 7, 8, 9]  # may end at the last row
    for rows in [(1, CHUNK), (0, CHUNK + 1), (0, N + 1)]:
        with pytest.raises(BadSpecError, match=f"rows {rows[0]}..{rows[1]}"):
            ShardPlan(0, 2, rows=rows).chunks(N, CHUNK)
    with pytest.raises(BadSpecError, match=r"owned twice: \[2\], owned by none: \[9\]"):
        check_partition([[0, 1, 2], [2, 3, 4, 5, 6, 7, 8]], 10)
