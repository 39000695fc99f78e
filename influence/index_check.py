"""Recall of a store's approximate indexes against exact search, measured on real query vectors.

An approximate index (IVF, PQ, HNSW) trades recall for speed, and its recall depends on the data: near 1 on
gradient-like features, poor on i.i.d. Gaussians (docs/BENCHMARKS.md). So it is measured per store, on query
vectors made the way ``influence query`` makes them, for both searches a query runs: proponents with q and
opponents with −q. The exact reference scans the store's own rows, so no second index is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from index.search import EXACT, ExactScan, Hits, SearchIndex, recall_at_k
from influence.errors import BadSpecError

if TYPE_CHECKING:
    from influence.query import Influence, TestData

DEFAULT_KS = (10, 50)
QUERY_BATCH = 64  # test images turned into query vectors at once (bounds per-example gradient memory)


@dataclass(frozen=True)
class IndexRecall:
    """How well one method's approximate index finds the exact top-k, per k, for proponents and opponents."""

    method: str
    factory: str
    rerank: int
    queries: int
    proponents: dict[int, float]
    opponents: dict[int, float]
    score_error: float
    """Largest |approximate − exact| score over the ids both return, relative to the largest exact |score|:
    0 up to float rounding when the shortlist is re-ranked from the store."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["proponents"] = {f"recall@{k}": v for k, v in self.proponents.items()}
        d["opponents"] = {f"recall@{k}": v for k, v in self.opponents.items()}
        return d

    def line(self) -> str:
        def part(r: dict[int, float]) -> str:
            return ", ".join(f"recall@{k} {v:.3f}" for k, v in r.items())

        rerank = f"re-rank {self.rerank}" if self.rerank else "no re-rank"
        return (f"{self.method}: {self.factory} ({rerank}), {self.queries} queries: proponents {part(self.proponents)}; "
                f"opponents {part(self.opponents)}; relative score error {self.score_error:.1e}")


def score_error(approx: Hits, exact: Hits) -> float:
    """Largest |approximate − exact| score over ids present in both result lists, relative to max |exact|."""
    worst, scale = 0.0, float(np.abs(exact[0]).max(initial=0.0))
    for a_s, a_i, e_s, e_i in zip(approx[0], approx[1], exact[0], exact[1]):
        common, ia, ie = np.intersect1d(a_i, e_i, return_indices=True)
        if len(common):
            worst = max(worst, float(np.abs(a_s[ia].astype(np.float64) - e_s[ie]).max()))
    return worst / scale if scale > 0 else worst


def compare(
    approx: SearchIndex | ExactScan, exact: ExactScan, queries: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
) -> tuple[dict[int, float], dict[int, float], float]:
    """(proponent recall per k, opponent recall per k, relative score error) of ``approx`` against ``exact``."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise BadSpecError(f"recall cut-offs must be positive integers; got {list(ks)}")
    depth = ks[-1]
    ref_pro, ref_opp = exact.search_both(queries, queries, depth)
    got_pro, got_opp = approx.search(queries, depth), approx.opponents(queries, depth)
    pro = {k: recall_at_k(got_pro[1], ref_pro[1], k) for k in ks}
    opp = {k: recall_at_k(got_opp[1], ref_opp[1], k) for k in ks}
    return pro, opp, max(score_error(got_pro, ref_pro), score_error(got_opp, ref_opp))


def sample_queries(session: "Influence", data: "TestData", n: int, method: str, seed: int = 0) -> np.ndarray:
    """Query vectors of ``n`` seeded examples of ``data``, for their predicted class (``influence query``'s default)."""
    if n < 1:
        raise BadSpecError(f"--queries must be a positive integer, got {n}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data.x), size=min(n, len(data.x)), replace=False))
    out = []
    for s in range(0, len(rows), QUERY_BATCH):
        x = data.x[torch.as_tensor(rows[s : s + QUERY_BATCH])]
        targets = session.predict(x).argmax(-1).cpu()
        out.append(session.query_vectors(x, targets, method))
    return np.concatenate(out)


def check_indexes(
    session: "Influence", data: "TestData", *, queries: int = 200, methods: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS, seed: int = 0,
) -> list[IndexRecall]:
    """Recall of each approximate index in the store (exact ones need no check and are left out)."""
    records = session.store.attrs.get("indexes", {})
    names = list(methods) if methods is not None else list(session.methods)
    out = []
    for m in names:
        index = session.index(m)  # raises StoreIncompleteError naming the methods that exist
        if not isinstance(index, SearchIndex) or records.get(m, {}).get("factory") == EXACT:
            continue
        q = sample_queries(session, data, queries, m, seed)
        pro, opp, err = compare(index, session.exact_scan(m), q, ks)
        out.append(IndexRecall(m, index.spec.factory, index.spec.rerank, len(q), pro, opp, err))
    return out
