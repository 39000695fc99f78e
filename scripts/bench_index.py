"""Query latency, throughput and recall of exact vs approximate FAISS indexes.

Recall of approximate search depends on the data (measured in docs/BENCHMARKS.md): it
is near 1 on gradient-like features and poor on i.i.d. Gaussians, and tiling real
features with noise distorts it. So vectors are drawn from a Gaussian with a
gradient-like covariance (or one fitted to real features, ``--features F.npy``) and
their norms are resampled separately (heavy-tailed, like per-example gradients).

    python scripts/bench_index.py                       # full table, ~20 min on 2 cores
    python scripts/bench_index.py --sizes 1e4 --dims 64 # smoke run

``--suite scale`` runs the N = 10^6 comparison of docs/BENCHMARKS.md instead: rows held as float16 (as the store
holds them), the exact reference an ``ExactScan`` over them, real held-out query vectors (``--query-features``),
and each approximate index built in a forked child so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.search import ExactScan, SearchIndex, build_index, recall_at_k
from influence.evaluation.docs import write_section
from influence.index_check import score_error

EFF_DIM = 40.0  # effective dimension (participation ratio) of real projected gradients
NORM_P99_P50 = 15.0  # 99th/50th percentile ratio of their norms


@dataclass
class FeatureModel:
    """A Gaussian over directions plus a separate norm distribution."""

    mean: np.ndarray  # (d,)
    factor: np.ndarray  # (r, d): x = z @ factor + mean, z ~ N(0, I_r)
    draw_norms: Callable[[np.random.Generator, int], np.ndarray]

    @property
    def dim(self) -> int:
        return self.factor.shape[1]

    def sample(self, n: int, seed: int, block: int = 65536) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), np.float32)
        for s in range(0, n, block):
            m = min(block, n - s)
            x = rng.standard_normal((m, self.factor.shape[0]), dtype=np.float32) @ self.factor
            x += self.mean
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            x *= self.draw_norms(rng, m)[:, None]
            out[s : s + m] = x
        return out


def synthetic_model(d: int, seed: int = 0) -> FeatureModel:
    """Power-law spectrum with participation ratio EFF_DIM, random directions, lognormal norms."""
    i = np.arange(1, d + 1, dtype=np.float64)

    def pr(alpha: float) -> float:
        lam = i**-alpha
        return lam.sum() ** 2 / (lam**2).sum()

    lo, hi = 0.0, 4.0  # pr decreases in alpha
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pr(mid) > EFF_DIM else (lo, mid)
    lam = i**-lo
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]
    factor = (np.sqrt(lam)[:, None] * basis.T).astype(np.float32)
    sigma = math.log(NORM_P99_P50) / 2.3263  # z(0.99)
    return FeatureModel(np.zeros(d, np.float32), factor, lambda rng, m: rng.lognormal(0.0, sigma, m))


def fitted_model(path: str, max_rows: int = 20000, seed: int = 0) -> FeatureModel:
    """Gaussian fitted to real features (mean + top covariance), norms resampled from them."""
    feats = np.load(path, mmap_mode="r", allow_pickle=False)
    if feats.ndim != 2:
        raise SystemExit(f"{path}: expected a 2-D array of features, got shape {feats.shape}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(feats), min(max_rows, len(feats)), replace=False))
    x = np.asarray(feats[rows], dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    factor = (s[:, None] * vt / math.sqrt(max(len(x) - 1, 1))).astype(np.float32)
    return FeatureModel(mean.astype(np.float32), factor, lambda g, m: g.choice(norms, m))


def participation_ratio(x: np.ndarray) -> float:
    lam = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return float(lam.sum() ** 2 / (lam**2).sum())


def index_size_mb(idx: SearchIndex) -> float:
    """Serialized size, counted without holding a second copy."""
    n = 0

    def count(b: bytes) -> int:
        nonlocal n
        n += len(b)
        return len(b)

    w = faiss.PyCallbackIOWriter(count)
    faiss.write_index(idx.index, w)
    del w
    return n / 2**20


def configs(n: int, d: int, max_hnsw: int) -> list[tuple[str, list[dict]]]:
    """(factory, search-parameter variants): each index is built once, searched per variant."""
    nlist = 64 if n <= 10**4 else 512 if n <= 10**5 else 1024
    m = d // 8 if d <= 512 else d // 16  # PQ sub-vectors: 8 or 16 dims each
    out = [
        ("Flat", [{}]),
        (f"IVF{nlist},Flat", [{"nprobe": nlist // 16}, {"nprobe": nlist // 4}]),
        ("HNSW32", [{"efSearch": 64}, {"efSearch": 256}]),
        ("SQ8", [{}]),
        ("SQfp16", [{}]),
        (f"IVF{nlist},PQ{m}", [{"nprobe": nlist // 4}, {"nprobe": nlist // 4, "rerank": 200}]),
    ]
    return [c for c in out if not (c[0].startswith("HNSW") and n > max_hnsw)]


def timed_singles(idx: SearchIndex, q: np.ndarray, singles: int) -> list[float]:
    idx.search(q[:1], 10)  # warm-up
    lat = []
    for i in range(singles):
        t = time.perf_counter()
        idx.search(q[i : i + 1], 10)
        lat.append(time.perf_counter() - t)
    return lat


def bench_one(
    x: np.ndarray, q: np.ndarray, factory: str, variants: list[dict], threads: int, singles: int,
    exact: np.ndarray | None,
) -> tuple[list[dict], np.ndarray]:
    """Build one index, then time and score it under each search-parameter variant."""
    n, d = x.shape
    ntrain = min(n, 50_000)
    t0 = time.perf_counter()
    built = build_index(
        (x[s : s + 65536] for s in range(0, n, 65536)), d, factory,
        train_sample=x[:: max(1, n // ntrain)][:ntrain], threads=threads,
    )
    build_s = time.perf_counter() - t0
    mb = index_size_mb(built)
    rows, ids = [], None
    for params in variants:
        search = {k: v for k, v in params.items() if k != "rerank"}
        for name, value in search.items():
            faiss.ParameterSpace().set_index_parameter(built.index, name, value)
        spec = dataclasses.replace(built.spec, rerank=params.get("rerank", 0), **search)
        reader = (lambda ids: x[ids]) if spec.rerank else None  # RAM here; the CLI reads the zarr store
        idx = SearchIndex(built.index, spec, reader, threads)
        lat = timed_singles(idx, q, singles)
        idx.threads = 1  # OpenMP barriers stall when the cores are shared: compare one thread
        lat1 = timed_singles(idx, q, singles)
        idx.threads = threads
        t = time.perf_counter()
        _, ids = idx.search(q, 50)
        batch_s = time.perf_counter() - t
        ref = ids if exact is None else exact
        rows.append({
            "N": n, "d": d, "index": factory,
            "params": ", ".join(f"{k}={v}" for k, v in params.items()) or "-",
            "build_s": build_s, "mb": mb,
            "p50": 1e3 * float(np.percentile(lat, 50)), "p95": 1e3 * float(np.percentile(lat, 95)),
            "p50_1t": 1e3 * float(np.percentile(lat1, 50)),
            "qps": len(q) / batch_s,
            "r10": recall_at_k(ids, ref, 10), "r50": recall_at_k(ids, ref, 50),
        })
    return rows, ids


HEADER = (
    "| N | d | index | search params | build s | size MB | p50 ms | p95 ms | p50 ms, 1 thread | batch q/s | recall@10 | recall@50 |\n"
    "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def fmt(r: dict) -> str:
    return (
        f"| {r['N']:.0e} | {r['d']} | {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['mb']:.0f} "
        f"| {r['p50']:.2f} | {r['p95']:.2f} | {r['p50_1t']:.2f} | {r['qps']:.0f} | {r['r10']:.3f} | {r['r50']:.3f} |"
    ).replace("e+0", "e")


# ----------------------------------------------------------------------------- the N = 10^6 suite (--suite scale)

SCALE_K = 50  # single queries ask for the top-50 (the recall target's cut-off)


def scale_configs(n: int, d: int, max_hnsw: int) -> list[tuple[str, list[dict[str, int]]]]:
    """The ANN candidates of the scale benchmark: (factory, search-parameter variants)."""
    nlist = 1024 if n > 2 * 10**5 else 256
    out = [
        (f"IVF{nlist},Flat", [{"nprobe": p} for p in (8, 16, 32, 64, 128)]),
        (f"IVF{nlist},PQ{d // 8}", [{"nprobe": p, "rerank": r} for p in (32, 64, 128) for r in (100, 500)]),
        ("HNSW32", [{"efSearch": e} for e in (64, 128, 256, 512)]),
    ]
    return [c for c in out if not (c[0].startswith("HNSW") and n > max_hnsw)]


def vm_hwm_mb() -> float:
    """This process's peak resident set (Linux VmHWM), MB; a forked child starts from its parent's current RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fp16_scan(x16: np.ndarray, block: int = 65536) -> ExactScan:
    """Exact search over float16 rows, block by block in float32 (what the store's exact scan does)."""
    n, d = x16.shape

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, n, block):
            yield s, x16[s : s + block]

    return ExactScan.of_rows(blocks, d, n)


def _singles(search: Callable[[np.ndarray], object], q: np.ndarray, singles: int) -> list[float]:
    search(q[:1])  # warm-up
    lat = []
    for i in range(singles):
        t = time.perf_counter()
        search(q[i : i + 1])
        lat.append(time.perf_counter() - t)
    return lat


def scale_one(
    x16: np.ndarray, q: np.ndarray, factory: str, variants: list[dict[str, int]], singles: int,
    exact: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> list[dict[str, Any]]:
    """Build one index from the float16 rows (in a child process), then score each variant; one FAISS thread."""
    n, d = x16.shape
    ntrain = min(n, 50_000)
    t0 = time.perf_counter()
    built = build_index(
        (x16[s : s + 65536].astype(np.float32) for s in range(0, n, 65536)), d, factory,
        train_sample=x16[:: max(1, n // ntrain)][:ntrain].astype(np.float32), threads=1,
    )
    build_s = time.perf_counter() - t0
    mb = index_size_mb(built)
    (pro_s, pro_i), (opp_s, opp_i) = exact
    rows = []
    for params in variants:
        search: dict[str, Any] = {k: v for k, v in params.items() if k != "rerank"}
        for name, value in search.items():
            faiss.ParameterSpace().set_index_parameter(built.index, name, value)
        spec = dataclasses.replace(built.spec, rerank=params.get("rerank", 0), **search)
        reader = (lambda ids: x16[ids].astype(np.float32)) if spec.rerank else None
        idx = SearchIndex(built.index, spec, reader, 1)
        lat = _singles(lambda v: idx.search(v, SCALE_K), q, singles)
        t = time.perf_counter()
        got = idx.search(q, SCALE_K)
        batch_s = time.perf_counter() - t
        opp = idx.opponents(q, SCALE_K)
        rows.append({
            "N": n, "d": d, "index": factory,
            "params": ", ".join(f"{k}={v}" for k, v in params.items()) or "-",
            "build_s": build_s, "mb": mb, "rss_mb": vm_hwm_mb(),
            "p50": 1e3 * float(np.percentile(lat, 50)), "p95": 1e3 * float(np.percentile(lat, 95)),
            "qps": len(q) / batch_s,
            "r10": recall_at_k(got[1], pro_i, 10), "r50": recall_at_k(got[1], pro_i, 50),
            "opp_r50": recall_at_k(opp[1], opp_i, 50),
            "err": score_error(got, (pro_s, pro_i)),
        })
    return rows


def _child(conn: Any, *args: Any) -> None:
    try:
        conn.send(scale_one(*args))
    except BaseException as e:  # report, do not hang the parent
        conn.send(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def run_forked(timeout_s: float, *args: Any) -> list[dict[str, Any]] | str:
    """``scale_one`` in a forked child (its own peak RSS); a message instead of rows if it fails or runs out of time."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, *args))
    proc.start()
    send.close()
    if not recv.poll(timeout_s):
        proc.kill()
        proc.join()
        return f"not finished in {timeout_s / 60:.0f} min"
    out = recv.recv()
    proc.join()
    return out  # type: ignore[no-any-return]


SCALE_HEADER = (
    "| index | search params | build s | index MB | peak RSS MB | p50 ms | p95 ms | batch q/s | recall@10 | recall@50 "
    "| opponents recall@50 | score error | target |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def meets(r: dict[str, Any]) -> bool:
    """The issue's target for a default ANN configuration (re-ranked scores equal to exact up to float32 rounding)."""
    return bool(r["r50"] >= 0.95 and r["p50"] <= 10 and r["rss_mb"] <= 8 * 1024 and r["err"] <= 1e-5)


def scale_fmt(r: dict[str, Any]) -> str:
    return (
        f"| {r['index']} | {r['params']} | {r['build_s']:.0f} | {r['mb']:.0f} | {r['rss_mb']:.0f} | {r['p50']:.2f} "
        f"| {r['p95']:.2f} | {r['qps']:.0f} | {r['r10']:.3f} | {r['r50']:.3f} | {r['opp_r50']:.3f} | {r['err']:.1e} "
        f"| {'meets' if meets(r) else 'misses'} |"
    )


def run_scale(a: argparse.Namespace, argv: list[str] | None) -> str:
    """The N = 10^6 comparison: exact fp16 scan vs IVF-Flat, IVF-PQ + re-rank, HNSW32; returns the doc section."""
    if not a.features or not a.query_features:
        raise SystemExit("--suite scale needs --features (real train features) and --query-features (held-out queries)")
    n = int(float(a.sizes.split(",")[-1]))
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    model = fitted_model(a.features, seed=a.seed)
    q = np.ascontiguousarray(np.load(a.query_features, allow_pickle=False)[: a.queries], dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != model.dim:
        raise SystemExit(f"{a.query_features}: expected ({a.queries}, {model.dim}) queries, got {q.shape}")
    x16 = model.sample(n, seed=a.seed + 3).astype(np.float16)
    nrm = np.linalg.norm(x16.astype(np.float32)[:100_000], axis=1)
    note = (f"sample participation ratio {participation_ratio(model.sample(5000, a.seed + 2)):.1f}, "
            f"norm p99/p50 {np.percentile(nrm, 99) / np.median(nrm):.2f}")
    print(f"# N={n} d={model.dim}: {note}", file=sys.stderr, flush=True)
    faiss.omp_set_num_threads(1)
    scan = fp16_scan(x16)
    t = time.perf_counter()
    exact = scan.search_both(q, q, SCALE_K)
    exact_batch_s = time.perf_counter() - t
    lat = _singles(lambda v: scan.search(v, SCALE_K), q, a.exact_singles)
    flat = {"N": n, "d": model.dim, "index": "Flat-fp16 (ExactScan)", "params": "-", "build_s": 0.0,
            "mb": x16.nbytes / 2**20, "rss_mb": vm_hwm_mb(), "p50": 1e3 * float(np.percentile(lat, 50)),
            "p95": 1e3 * float(np.percentile(lat, 95)), "qps": len(q) / exact_batch_s, "r10": 1.0, "r50": 1.0,
            "opp_r50": 1.0, "err": 0.0}
    rows: list[dict[str, Any]] = [flat]
    failed = []
    print(scale_fmt(flat), flush=True)
    deadline = time.time() + a.child_timeout
    for factory, variants in scale_configs(n, model.dim, int(a.max_hnsw)):
        if a.only and not factory.startswith(a.only):
            continue
        out = run_forked(max(60.0, deadline - time.time()), x16, q, factory, variants, a.singles, exact)
        if isinstance(out, str):
            failed.append(f"- {factory}: {out}")
            print(f"# {factory}: {out}", file=sys.stderr, flush=True)
            continue
        rows += out
        for r in out:
            print(scale_fmt(r), flush=True)
    minutes = (time.perf_counter() - t_start) / 60
    cmd = "python " + " ".join(shlex.quote(s) for s in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    best = [r for r in rows[1:] if meets(r)]
    verdict = (
        "Configurations meeting the target (recall@50 ≥ 0.95, p50 ≤ 10 ms, peak RSS ≤ 8 GiB, re-ranked scores equal "
        "to exact): " + ("; ".join(f"{r['index']} ({r['params']})" for r in best) if best else
                         "none: exact search stays the default")
    )
    return f"""### N = {n:,}, k = {model.dim}: exact fp16 scan vs approximate indexes with re-rank

Produced by `{cmd}` ({minutes:.0f} min, faiss {faiss.__version__}, one FAISS thread, {os.cpu_count()} CPUs; measured
under load: load average {load0:.1f} at start and {os.getloadavg()[0]:.1f} at end, the machine shared by other jobs, so
times and latencies are upper bounds and only their ratios within this table are meaningful; recall, bytes and peak
RSS do not depend on the load).

Rows: {n:,} drawn from a Gaussian fitted to real features of the digits demo (`{a.features}`: its directions'
mean and covariance), norms resampled from theirs ({note}), held as float16 like the store ({x16.nbytes / 2**30:.2f} GiB
in RAM). Queries: {len(q)} held-out real test gradients (`{a.query_features}`). Reference: exact top-{SCALE_K} of the
float16 rows in float32 (`ExactScan`, what `--index Flat` serves), proponents (q) and opponents (−q).
Latency: {a.singles} single queries (Flat: {a.exact_singles}), top-{SCALE_K}, one at a time, re-rank included (rows read from RAM
here; from the zarr store it adds that read). Peak RSS: VmHWM of the process that built and searched the index,
which includes the float16 rows it was forked with. Score error: largest |returned − exact| score over ids in both
top-50s, relative to the largest exact |score| (float32 rounding ≈ 1e-7; without re-rank PQ scores are approximate).

{SCALE_HEADER}
{chr(10).join(scale_fmt(r) for r in rows)}

{verdict}
{chr(10).join(failed)}
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated N values")
    p.add_argument("--dims", default="512,2048", help="comma-separated dims (ignored with --features)")
    p.add_argument("--max-n-large-d", type=float, default=1e5, help="largest N run at d > 512")
    p.add_argument("--max-hnsw", type=float, default=1e5, help="largest N for HNSW (its build is slow)")
    p.add_argument("--features", help="real features (N, d) .npy to fit the generator to")
    p.add_argument("--queries", type=int, default=200, help="batched queries (recall, throughput)")
    p.add_argument("--singles", type=int, default=100, help="single queries timed one at a time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", choices=("default", "scale"), default="default",
                   help="scale: the N = 10^6 comparison (last --sizes value) on real held-out queries")
    p.add_argument("--query-features", help="(scale) held-out real query vectors (n, d) .npy")
    p.add_argument("--only", help="(scale) run only the approximate indexes whose factory starts with this")
    p.add_argument("--exact-singles", type=int, default=10, help="(scale) single exact queries timed")
    p.add_argument("--child-timeout", type=float, default=3600, help="(scale) seconds for all approximate indexes together")
    p.add_argument("--out", help="write the markdown section here")
    p.add_argument("--doc", default="docs/BENCHMARKS.md", help="benchmarks page whose section is rewritten")
    a = p.parse_args(argv)
    if a.singles > a.queries:
        p.error("--singles must not exceed --queries")
    if a.suite == "scale":
        doc = run_scale(a, argv)
        print(doc)
        if a.out:
            Path(a.out).write_text(doc)
        else:
            write_section("bench_index_scale", doc, a.doc)
        return
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    dims = [int(s) for s in a.dims.split(",")]
    if a.features:
        model0 = fitted_model(a.features, seed=a.seed)
        dims = [model0.dim]
    rows, notes = [], []
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    for d in dims:
        model = model0 if a.features else synthetic_model(d, a.seed)
        q = model.sample(a.queries, seed=a.seed + 1)
        notes.append(f"d={d}: sample participation ratio {participation_ratio(model.sample(5000, a.seed + 2)):.1f}")
        for n in sizes:
            if d > 512 and n > a.max_n_large_d:
                continue
            x = model.sample(n, seed=a.seed + 3)
            nrm = np.linalg.norm(x, axis=1)
            print(f"# N={n} d={d}: norm p99/p50 {np.percentile(nrm, 99) / np.median(nrm):.1f}",
                  file=sys.stderr, flush=True)
            exact = None
            for factory, variants in configs(n, d, int(a.max_hnsw)):
                new, ids = bench_one(x, q, factory, variants, a.threads, a.singles, exact)
                if factory == "Flat":
                    exact = ids
                rows += new
                for r in new:
                    print(fmt(r), flush=True)
            del x
    minutes = (time.perf_counter() - t_start) / 60
    cmd = "python " + " ".join(shlex.quote(s) for s in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    table = HEADER + "\n" + "\n".join(fmt(r) for r in rows)
    targets = []
    for d in dims:
        r = [x for x in rows if x["index"] == "Flat" and x["N"] == 10**5 and x["d"] == d]
        if r:
            verdict = [f"{r[0][key]:.1f} ms with {th} ({'meets' if r[0][key] <= 20 else 'misses'})"
                       for key, th in (("p50", f"{a.threads} threads"), ("p50_1t", "1 thread"))]
            targets.append(f"- N=10^5, d={d}: exact p50 " + "; ".join(verdict))
    doc = f"""## Index search (index/search.py)

Produced by `{cmd}` ({minutes:.1f} min, faiss {faiss.__version__}, {a.threads} FAISS threads,
{os.cpu_count()} CPUs, load average {load0:.1f} at start and {os.getloadavg()[0]:.1f} at end).

Data: {"a Gaussian fitted to " + a.features if a.features else f"synthetic gradient-like vectors: power-law covariance spectrum with participation ratio {EFF_DIM:.0f}, random directions, lognormal norms with 99th/50th percentile ratio {NORM_P99_P50:.0f}"}; queries drawn from the same distribution. {"; ".join(notes)}.
Latency: {a.singles} single queries, k=10, one at a time through `SearchIndex.search` (id checks and re-rank included).
Throughput: {a.queries} queries in one batch, k=50. Recall@10/@50 against the exact (Flat) top-50 of that batch
(recall@10 uses the first 10 of the k=50 results). Re-rank reads rows from RAM here; from the zarr store it adds that read.

{table}

Exact-search latency target (p50 ≤ 20 ms at N=10^5):
{chr(10).join(targets) if targets else "- not measured in this run"}

Not run: N > {a.max_n_large_d:.0e} at d > 512 (a 10^6 x 2048 flat index is 8 GB; it keeps the run under
~25 min) and HNSW above N = {a.max_hnsw:.0e} (its build alone would take 10+ min on 2 cores).
"""
    print(doc)
    if a.out:
        Path(a.out).write_text(doc)
    else:
        write_section("bench_index", doc, a.doc)


if __name__ == "__main__":
    main()
