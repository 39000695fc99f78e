"""FAISS inner-product search over stored feature vectors, treated as untrusted on disk.

Every influence method is one inner-product search, so this module
only knows vectors and ids. It owns the three things FAISS does not do for us:
checking the index file before deserializing it (a flipped bit can make FAISS
allocate gigabytes), checking every returned id against ``[0, N)`` (a negative id
silently wraps in numpy), and writing the file atomically (``index.atomic``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from index.atomic import atomic_write
from index.errors import BadDataError, BadSpecError, IndexFileError, NonFiniteError, StoreDamagedError

if TYPE_CHECKING:  # FAISS loads when an approximate index is built, saved or loaded: exact search never needs it
    import faiss

VectorReader = Callable[[np.ndarray], np.ndarray]
"""Maps sorted unique int64 ids to their float32 rows, e.g. a read from the zarr store."""

BlockReader = Callable[[], Iterable[tuple[int, np.ndarray]]]
"""Yields ``(first_id, float32 rows)`` blocks that cover ids ``0..N-1`` in order, e.g. the store's row chunks."""

BlockScorer = Callable[[np.ndarray], Iterable[tuple[int, np.ndarray]]]
"""Maps float32 queries (nq, d) to ``(first_id, scores)`` blocks, scores (nq, rows) = ⟨v_i, q⟩ for consecutive
rows, covering ids ``0..N-1`` in order (e.g. one product per stored checkpoint block, with per-row scales)."""

EXACT = "Flat"  # the factory string of exact search (served by ExactScan over the store, or a FAISS IndexFlatIP)
_RERANK_QUERY_BLOCK = 64  # queries re-ranked together: bounds the rows fetched at once
_IO_BLOCK = 1 << 22  # bytes per FAISS IO callback


@dataclass(frozen=True)
class IndexSpec:
    """What was built, recorded next to the index so a reader can check and reproduce it."""

    factory: str = "Flat"
    metric: str = "ip"
    dim: int = 0
    ntotal: int = 0
    nprobe: int | None = None
    efSearch: int | None = None
    rerank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> "IndexSpec":
        """Parse a recorded spec; a malformed record means the store's metadata is damaged (StoreDamagedError)."""
        if not isinstance(d, dict):
            raise StoreDamagedError(f"index spec record is not a mapping: {d!r}")
        try:
            spec = cls(
                factory=str(d["factory"]),
                metric=str(d.get("metric", "ip")),
                dim=_int(d["dim"]),
                ntotal=_int(d["ntotal"]),
                nprobe=None if d.get("nprobe") is None else _int(d["nprobe"]),
                efSearch=None if d.get("efSearch") is None else _int(d["efSearch"]),
                rerank=_int(d.get("rerank", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreDamagedError(f"index spec record is malformed ({e!r}): {d!r}") from None
        if spec.metric != "ip" or spec.dim <= 0 or spec.ntotal < 0 or spec.rerank < 0:
            raise StoreDamagedError(f"index spec record is invalid: {d!r}")
        return spec


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"expected an integer, got {v!r}")
    return int(v)


@contextlib.contextmanager
def _faiss_threads(n: int | None) -> Iterator[None]:
    """Use n OpenMP threads inside the block and restore the previous setting after.

    The setting is process-wide, so concurrent searches from several Python threads
    should share one value.
    """
    import faiss

    if n is None:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


class SearchIndex:
    """A FAISS index plus the spec it was built with; returns only ids that exist."""

    def __init__(
        self,
        index: faiss.Index,
        spec: IndexSpec,
        vectors: VectorReader | None = None,
        threads: int | None = None,
    ) -> None:
        self.index = index
        self.spec = spec
        self.vectors = vectors
        self.threads = threads

    def with_vectors(self, vectors: VectorReader | None) -> "SearchIndex":
        """Same index, with a row reader for exact re-ranking of approximate shortlists."""
        return SearchIndex(self.index, self.spec, vectors, self.threads)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k training rows by inner product, best first: (scores float32, ids int64).

        Returns fewer than k columns when fewer rows exist (or an approximate index found
        fewer for some query), never the -1 padding FAISS uses.
        """
        k = _check_k(k)
        q = self._check_queries(queries)
        exact = self.spec.rerank > 0 and self.vectors is not None
        depth = max(k, self.spec.rerank) if exact else k
        depth = min(depth, max(self.spec.ntotal, 1))
        with _faiss_threads(self.threads):
            scores, ids = self.index.search(q, depth)
        scores, ids = self._checked(scores, ids)
        if exact and ids.shape[1]:
            scores, ids = self._rerank(q, ids)
        return scores[:, :k].copy(), ids[:, :k].copy()

    def opponents(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Most negative inner products first: a search with -q, never a scan of all rows."""
        q = self._check_queries(queries)
        scores, ids = self.search(-q, k)
        return -scores, ids

    def search_both(self, queries: np.ndarray, opponent_queries: np.ndarray, k: int) -> tuple[Hits, Hits]:
        """``(search(queries, k), opponents(opponent_queries, k))``; :class:`ExactScan` does both in one pass."""
        return self.search(queries, k), self.opponents(opponent_queries, k)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        return _check_queries(queries, self.spec.dim)

    def _checked(self, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refuse ids outside [0, N); move -1 padding to the end and cut it off."""
        bad = (ids < -1) | (ids >= self.spec.ntotal)
        if bad.any():
            raise IndexFileError(
                f"FAISS index ({self.spec.factory}, N={self.spec.ntotal}) is corrupt: it returned "
                f"id {int(ids[bad][0])} outside [0, {self.spec.ntotal}); rebuild the index "
                f"with `influence build ... --index {self.spec.factory}`"
            )
        valid = ids >= 0
        if valid.all():
            return scores, ids
        n = int(valid.sum(axis=1).min())
        order = np.argsort(~valid, axis=1, kind="stable")[:, :n]  # valid entries first, in order
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _rerank(self, q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products for a shortlist, read from the store, re-sorted best first."""
        read = self.vectors
        if read is None:
            raise BadSpecError("exact re-ranking needs a vector reader (with_vectors)")
        out = np.empty(ids.shape, dtype=np.float32)
        for s in range(0, len(q), _RERANK_QUERY_BLOCK):
            block = ids[s : s + _RERANK_QUERY_BLOCK]
            uniq, inv = np.unique(block, return_inverse=True)
            rows = np.asarray(read(uniq))
            if rows.shape != (len(uniq), self.spec.dim):
                raise BadDataError(
                    f"vector reader returned shape {rows.shape} for {len(uniq)} ids; "
                    f"expected ({len(uniq)}, {self.spec.dim})"
                )
            full = rows.astype(np.float32, copy=False) @ q[s : s + _RERANK_QUERY_BLOCK].T
            inv = inv.reshape(block.shape)
            out[s : s + len(block)] = full[inv, np.arange(len(block))[:, None]]
        if not np.isfinite(out).all():
            raise NonFiniteError("stored vectors read for re-ranking contain NaN or inf")
        order = np.lexsort((ids, -out), axis=-1)  # score descending, ties by id
        return np.take_along_axis(out, order, 1), np.take_along_axis(ids, order, 1)


Hits = tuple[np.ndarray, np.ndarray]
"""(scores float32, ids int64), one row per query, best first."""


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise BadDataError(f"queries must have shape (n, {dim}); got {np.shape(queries)}")
    if q.dtype.kind not in "iuf":  # complex would lose its imaginary part in the cast, silently
        raise BadDataError(f"queries must be real numbers; got dtype {q.dtype}")
    if not np.isfinite(q).all():
        raise NonFiniteError("queries contain NaN or inf")
    with np.errstate(over="ignore"):
        q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise NonFiniteError("queries overflow float32 (|value| > 3.4e38)")
    return q


class ExactScan:
    """Exact inner-product top-k by scanning score blocks computed from the store: no copy of the vectors.

    The store already holds every train vector (float16 rows and per-row scales), so an exact search does
    not need a float32 FAISS ``IndexFlatIP`` beside it: ``scores`` computes ⟨v_i, q⟩ block by block from the
    stored rows (BLAS products), and the scan merges each block into a running top-k. Results equal a Flat
    index's (float32 inner products; ties broken by the smaller id). Memory: one block plus the top-k.
    """

    def __init__(self, scores: BlockScorer, dim: int, ntotal: int) -> None:
        self.scores = scores
        self.spec = IndexSpec(EXACT, "ip", int(dim), int(ntotal))

    @classmethod
    def of_rows(cls, blocks: BlockReader, dim: int, ntotal: int) -> "ExactScan":
        """A scan over blocks of the vectors themselves: one BLAS product per block."""

        def scores(q: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
            for start, rows in blocks():
                rows = np.asarray(rows)
                if rows.ndim != 2 or rows.shape[1] != dim:
                    raise BadDataError(f"block reader gave rows of shape {rows.shape} at row {start}; expected (n, {dim})")
                yield start, q @ rows.astype(np.float32, copy=False).T

        return cls(scores, dim, ntotal)

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """Top-k rows by inner product, best first (fewer columns only when fewer rows exist)."""
        q = _check_queries(queries, self.spec.dim)
        return self._scan(q, _check_k(k))

    def opponents(self, queries: np.ndarray, k: int) -> Hits:
        """Most negative inner products first (a search with -q)."""
        scores, ids = self.search(-_check_queries(queries, self.spec.dim), k)
        return -scores, ids

    def search_both(self, queries: np.ndarray, opponent_queries: np.ndarray, k: int) -> tuple[Hits, Hits]:
        """Proponents of ``queries`` and opponents of ``opponent_queries`` in one pass over the rows."""
        k = _check_k(k)
        q = _check_queries(queries, self.spec.dim)
        q_opp = _check_queries(opponent_queries, self.spec.dim)
        scores, ids = self._scan(np.concatenate([q, -q_opp]), k)
        n = len(q)
        return (scores[:n], ids[:n]), (-scores[n:], ids[n:])

    @np.errstate(over="ignore", invalid="ignore")  # an overflowing product is inf, refused below naming its rows
    def _scan(self, q: np.ndarray, k: int) -> Hits:
        best_s = np.empty((len(q), 0), dtype=np.float32)
        best_i = np.empty((len(q), 0), dtype=np.int64)
        seen = 0
        for start, block in self.scores(q):
            s = np.asarray(block, dtype=np.float32)
            n = s.shape[-1] if s.ndim == 2 else -1
            if start != seen or s.shape != (len(q), n) or seen + n > self.spec.ntotal:
                raise BadDataError(
                    f"block scorer gave scores of shape {s.shape} for rows from {start} after row {seen}; "
                    f"expected consecutive ({len(q)}, rows) blocks covering {self.spec.ntotal} rows"
                )
            if not np.isfinite(s).all():
                raise NonFiniteError(f"scores of rows {start}..{start + n} are NaN or inf: the stored vectors hold NaN or inf, "
                                     "or query and rows are too large for float32 inner products")
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + n), s.shape)], axis=1)
            if cand_s.shape[1] > k:
                keep = _top_k_columns(cand_s, cand_i, k)
                cand_s, cand_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
            best_s, best_i = cand_s, cand_i
            seen += n
        if seen != self.spec.ntotal:
            raise BadDataError(f"block scorer covered {seen} rows; the store has {self.spec.ntotal}")
        order = np.lexsort((best_i, -best_s), axis=-1)  # score descending, ties by id
        return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def _top_k_columns(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's k best (score descending, a tie at the cut won by the smaller id)."""
    keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # linear time; which of several tied scores it keeps is arbitrary
    kept = np.take_along_axis(scores, keep, 1)
    cut = kept.min(axis=1, keepdims=True)
    tied = (scores == cut).sum(1) > (kept == cut).sum(1)  # a score equal to the cut was left out
    for r in np.flatnonzero(tied):  # rare with float scores: sort that row fully
        keep[r] = np.lexsort((ids[r], -scores[r]))[:k]
    return keep


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise BadSpecError(f"k must be a positive integer; got {k!r}")
    return int(k)


def _set_search_params(index: faiss.Index, nprobe: int | None, efSearch: int | None) -> None:
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", efSearch)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise BadSpecError(f"{name} must be a positive integer; got {value!r}")
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise BadSpecError(f"{name} does not apply to this index type") from None


def build_index(
    vectors: Iterable[np.ndarray] | np.ndarray,
    dim: int,
    factory: str = "Flat",
    train_sample: np.ndarray | None = None,
    nprobe: int | None = None,
    efSearch: int | None = None,
    rerank: int = 0,
    *,
    threads: int | None = None,
) -> SearchIndex:
    """Build an inner-product index from streamed row blocks (memory: the index itself).

    ``factory`` is a FAISS factory string ("Flat" is exact; "IVF1024,Flat", "HNSW32",
    "SQ8", "IVF1024,PQ64" are approximate and need ``train_sample`` if they train).
    """
    import faiss

    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise BadSpecError(f"dim must be a positive integer; got {dim!r}")
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0:
        raise BadSpecError(f"rerank must be a non-negative integer; got {rerank!r}")
    dim = int(dim)
    try:
        index = faiss.index_factory(dim, str(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise BadSpecError(f"invalid FAISS factory string {factory!r}: {_first_line(e)}") from None
    _set_search_params(index, nprobe, efSearch)
    _skip_polysemous_training(index)
    with _faiss_threads(threads):
        if not index.is_trained:
            if train_sample is None:
                raise BadSpecError(f"index {factory!r} needs training: pass train_sample")
            sample = _block(train_sample, dim, "train_sample")
            try:
                index.train(sample)
            except RuntimeError as e:
                raise BadSpecError(
                    f"cannot train {factory!r} on {len(sample)} vectors (too few for its "
                    f"clusters or codebooks?): {_first_line(e)}"
                ) from None
        if isinstance(vectors, np.ndarray):
            vectors = [vectors]
        for block in vectors:
            block = _block(block, dim, "vectors")
            try:
                index.add(block)
            except RuntimeError as e:
                raise BadSpecError(f"cannot add to {factory!r}: {_first_line(e)}") from None
    spec = IndexSpec(str(factory), "ip", dim, int(index.ntotal), nprobe, efSearch, int(rerank))
    return SearchIndex(index, spec, threads=threads)


def _skip_polysemous_training(index: faiss.Index) -> None:
    """The factory turns on polysemous training for 8-bit PQ ("PQ64", "IVF1024,PQ64").

    It only reorders PQ codes for Hamming pre-filtering, which inner-product search
    never uses, and it made training IVF64,PQ64 on 10k x 512 take minutes instead of
    seconds here. Distances and results are the same without it.
    """
    import faiss

    parts = [faiss.downcast_index(index)]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        parts.append(faiss.downcast_index(ivf))
    for part in parts:
        if getattr(part, "do_polysemous_training", False):
            # only IndexPQ / IndexIVFPQ have it; the stubs type downcast_index's result as the base Index
            part.do_polysemous_training = False  # type: ignore[attr-defined]


def _block(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] != dim or not np.issubdtype(a.dtype, np.number):
        raise BadDataError(f"{what} must be numeric with shape (n, {dim}); got {a.shape} {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise NonFiniteError(f"{what} contain NaN or inf")
    return a


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _spec_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def save_index(index: SearchIndex, path: str | Path) -> dict[str, Any]:
    """Write the index and its spec atomically; return the record to keep in the store.

    The record (path, size, sha256, spec) is what ``load_index`` checks the file against.
    Bytes are hashed as FAISS writes them, so no second copy of the index is held.
    """
    import faiss

    path = Path(path)
    digest = hashlib.sha256()
    size = 0
    with atomic_write(path) as f:

        def write(b: bytes) -> int:
            nonlocal size
            digest.update(b)
            f.write(b)
            size += len(b)
            return len(b)

        writer = faiss.PyCallbackIOWriter(write, _IO_BLOCK)  # type: ignore[attr-defined]  # missing from faiss's stubs
        try:
            faiss.write_index(index.index, writer)
        finally:
            del writer  # flushes its buffer into `write` before the file is closed
    record: dict[str, Any] = {"path": str(path), "size": size, "sha256": digest.hexdigest(), "spec": index.spec.to_dict()}
    with atomic_write(_spec_path(path)) as f:
        f.write(json.dumps(record, indent=1, sort_keys=True).encode())
    return record


def load_index(
    path: str | Path,
    expected: dict[str, Any],
    vectors: VectorReader | None = None,
    *,
    threads: int | None = None,
    opened: int | None = None,
) -> SearchIndex:
    """Load an index file after checking it against its record from ``save_index``.

    The file is hashed and deserialized through one open descriptor (a concurrent
    replace cannot swap it in between), with FAISS's per-vector allocation capped near
    the file size, so a damaged file gives IndexFileError, not a crash or a
    runaway allocation. ``opened``: a descriptor already open on ``path`` (read from its start; the
    caller keeps it), e.g. one a store opened with the state it serves, which a later sweep cannot take away.
    """
    import faiss

    path = Path(path)
    if not isinstance(expected, dict) or "size" not in expected or "sha256" not in expected:
        raise IndexFileError(f"no valid record for index file {path}: {expected!r}")
    spec = IndexSpec.from_dict(expected.get("spec"))
    rebuild = f"rebuild with `influence build ... --index {spec.factory}`"
    try:
        f = open(path, "rb") if opened is None else os.fdopen(os.dup(opened), "rb")
    except OSError as e:
        raise IndexFileError(f"index file {path} cannot be opened ({e.strerror}); {rebuild}") from None
    with f:
        f.seek(0)
        size = os.fstat(f.fileno()).st_size
        if size != expected["size"] or _sha256(f) != expected["sha256"]:
            raise IndexFileError(
                f"index file {path} does not match its recorded checksum "
                f"(size {size}, recorded {expected['size']}); {rebuild}"
            )
        f.seek(0)
        old_bytes = faiss.get_deserialization_vector_byte_limit()
        old_loop = faiss.get_deserialization_loop_limit()
        limit = size + 4096  # no vector or loop in a valid file can exceed the file's size
        faiss.set_deserialization_vector_byte_limit(limit)
        faiss.set_deserialization_loop_limit(limit)
        try:
            reader = faiss.PyCallbackIOReader(f.read, _IO_BLOCK)  # type: ignore[attr-defined]  # missing from faiss's stubs
            index = faiss.read_index(reader)
            del reader
        except Exception as e:  # FAISS raises RuntimeError, MemoryError, ... on damage
            raise IndexFileError(
                f"index file {path} is corrupt ({type(e).__name__}: {_first_line(e)[:200]}); {rebuild}"
            ) from None
        finally:
            faiss.set_deserialization_vector_byte_limit(old_bytes)
            faiss.set_deserialization_loop_limit(old_loop)
    if index.ntotal != spec.ntotal or index.d != spec.dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFileError(
            f"index file {path} holds {index.ntotal} vectors of dim {index.d} "
            f"(metric {index.metric_type}), recorded {spec.ntotal} of dim {spec.dim} (inner product); {rebuild}"
        )
    try:
        _set_search_params(index, spec.nprobe, spec.efSearch)
    except BadSpecError as e:
        raise IndexFileError(f"index file {path} does not fit its recorded spec: {e}") from None
    return SearchIndex(index, spec, vectors, threads)


def _sha256(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 24):
        h.update(chunk)
    return h.hexdigest()


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (-1 never counts)."""
    k = _check_k(k)
    a, e = np.atleast_2d(approx_ids)[:, :k], np.atleast_2d(exact_ids)[:, :k]
    if len(a) != len(e):
        raise BadDataError(f"recall needs the same queries: {len(a)} vs {len(e)} rows")
    hits = total = 0
    for ar, er in zip(a, e):
        er = er[er >= 0]
        hits += len(np.intersect1d(ar[ar >= 0], er))
        total += len(er)
    return hits / total if total else 1.0
