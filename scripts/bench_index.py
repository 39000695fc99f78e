"""Query latency, throughput and recall of exact vs approximate FAISS indexes.

Recall of approximate search depends on the data (measured in docs/BENCHMARKS.md): it
is near 1 on gradient-like features and poor on i.i.d. Gaussians, and tiling real
features with noise distorts it. So vectors are drawn from a Gaussian with a
gradient-like covariance (or one fitted to real features, ``--features F.npy``) and
their norms are resampled separately (heavy-tailed, like per-example gradients).

    python scripts/bench_index.py                       # full table, ~20 min on 2 cores
    python scripts/bench_index.py --sizes 1e4 --dims 64 # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index.search import SearchIndex, build_index, recall_at_k
from influence.evaluation.docs import write_section

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
    p.add_argument("--out", help="write the markdown section here")
    p.add_argument("--doc", default="docs/BENCHMARKS.md", help="benchmarks page whose section is rewritten")
    a = p.parse_args(argv)
    if a.singles > a.queries:
        p.error("--singles must not exceed --queries")
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
