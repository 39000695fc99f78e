"""TracIn, Grad-Cos and TRAK as transforms of one inner product ``score(i, t) = ⟨v_i, q_t⟩``.

Each method says how to turn stored features into train vectors ``v_i`` and a
test example's features into a query ``q``; one search per method (an exact scan
of the store's rows, or an approximate FAISS index) then answers proponents
(search with ``q``) and opponents (search with ``−q``).
Scores are positive for proponents (helpful: a step on i lowers t's loss /
raises its margin) and negative for opponents.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from tqdm import tqdm

from influence._registry import Registry
from influence.errors import BadSpecError
from influence.features.specs import TrakSpec

if TYPE_CHECKING:
    from index.store import FeatureStore

EPS = 1e-12

METHODS: "Registry[type[ScoringMethod]]" = Registry("method")
"""CLI name → scoring method class; filled by each class statement (``name=...``)."""


class ScoringMethod:
    """A scoring method registers its CLI name by subclassing: ``class X(ScoringMethod, name="x")``.

    The contract every method keeps: ``prepare`` (once per build, after the features), ``train_vectors`` /
    ``train_rows`` (the index side), ``query_vectors`` (the query side) and ``self_influence`` (or a
    ``BadSpecError`` saying why it is meaningless for the method).
    """

    name: ClassVar[str]
    has_self_influence: ClassVar[bool] = True  # False where S(i, i) is meaningless (self_influence raises)

    def __init_subclass__(cls, name: str, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls.name = name
        METHODS.register(name, cls)

    @classmethod
    def prepare(cls, store: "FeatureStore", spec: TrakSpec) -> None:
        """Precompute and store what this method needs beyond the features (default: nothing).

        ``spec`` carries the build's scoring options; each method reads back what it wrote itself. The base
        caches self-influence in the store (methods that precompute more call it last).
        """
        if cls.has_self_influence:
            cls(store).cache_self_influence()

    def __init__(self, store: "FeatureStore", *, checkpoints: Sequence[str] | None = None,
                 lr_weights: Mapping[str, float] | None = None) -> None:
        """``checkpoints`` (ids, a subset of the store's) and ``lr_weights`` (id → weight) replace the store's for an
        ablation, e.g. self-influence from the final checkpoint alone; such a scorer never reads the store's
        self-influence cache of the full set (its stamp differs) and never writes it."""
        self.store = store
        self.ckpts = list(store.checkpoint_ids if checkpoints is None else checkpoints)
        unknown = sorted(set(self.ckpts) - set(store.checkpoint_ids))
        if unknown or not self.ckpts:
            raise BadSpecError(f"checkpoints {unknown or '[]'} are not among the store's {store.checkpoint_ids}")
        self.eta = {c["id"]: float(c.get("lr_weight", 1.0)) for c in store.checkpoints}
        self.eta.update(lr_weights or {})
        self._columns: dict[tuple[str, str], np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.store.k * len(self.ckpts)

    def _column(self, name: str, ckpt: str) -> np.ndarray:
        """A per-example (N,) column, read once: small next to the features."""
        key = (name, ckpt)
        if key not in self._columns:
            self._columns[key] = self.store.column(name, ckpt).astype(np.float32)
        return self._columns[key]

    def _row_scale(self, ckpt: str, rows: slice | np.ndarray) -> np.ndarray:
        """s_c(i): the per-row factor that turns stored φ_c(i) into this method's train block of checkpoint c."""
        raise NotImplementedError

    def _transform(self, ckpt: str, feats: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        """This method's per-checkpoint train block from stored features of ``rows``."""
        block: np.ndarray = feats * self._row_scale(ckpt, rows)[:, None]
        return block

    def _finish(self, v: np.ndarray) -> np.ndarray:
        return v

    def _finish_scores(self, scores: np.ndarray, start: int, stop: int) -> np.ndarray:
        """What ``_finish`` does to v_i, done to the scores ⟨v_i, q⟩ (nq, rows) instead (default: nothing)."""
        return scores

    def train_vectors(self, start: int, stop: int) -> np.ndarray:
        """Train vectors v_i for rows ``start:stop`` (one store chunk at a time when streaming)."""
        rows = slice(start, stop)
        return self._finish(np.concatenate([self._transform(c, self.store.read_features(c, start, stop), rows) for c in self.ckpts], axis=1))

    def train_scores(self, q: np.ndarray, start: int, stop: int) -> np.ndarray:
        """⟨v_i, q⟩ for rows ``start:stop``, (nq, rows), without forming v_i: per checkpoint, one product with
        the stored rows, times the per-row scales (what an exact search scans)."""
        rows, k = slice(start, stop), self.store.k
        out = np.zeros((len(q), stop - start), dtype=np.float32)
        # float64: |v_i|² overflows float32 once |v_i| > 1.8e19, and an inf norm would turn cosines into 0
        sq_norms = np.zeros(stop - start, dtype=np.float64) if self._needs_norms(start, stop) else None
        for j, c in enumerate(self.ckpts):
            phi, scale = self.store.read_features(c, start, stop), self._row_scale(c, rows)
            out += (q[:, j * k : (j + 1) * k] @ phi.T) * scale
            if sq_norms is not None:  # |v_i|² from the rows just read, not a second pass over the store
                sq_norms += scale.astype(np.float64) ** 2 * np.einsum("ij,ij->i", phi, phi, dtype=np.float64)
        if sq_norms is not None:
            self._columns[("norm", f"{start}:{stop}")] = np.maximum(np.sqrt(sq_norms), EPS)
        return self._finish_scores(out, start, stop)

    def _needs_norms(self, start: int, stop: int) -> bool:
        """Whether ``train_scores`` should also record |v_i| for these rows (methods that normalise: Grad-Cos)."""
        return False

    def train_rows(self, ids: np.ndarray) -> np.ndarray:
        """Train vectors of arbitrary rows: exact re-ranking of an approximate index's shortlist."""
        ids = np.asarray(ids, dtype=np.int64)
        return self._finish(np.concatenate([self._transform(c, self.store.read_rows(c, ids), ids) for c in self.ckpts], axis=1))

    def query_vectors(self, feats: dict[str, np.ndarray], weights: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> np.ndarray:
        """Query vectors (nq, dim) from per-checkpoint test features φ_c(t), ``dloss/doutput`` and p_y."""
        raise NotImplementedError

    def self_influence(self, *, progress: bool = False) -> np.ndarray:
        """S(i, i) = ⟨v_i, M φ(i)⟩ for every training row, (N,) float64.

        Read from the store's cache when it was computed for these checkpoints (and λ); otherwise computed in
        one pass over the store (``progress``: a bar on stderr when it is a terminal).
        """
        cached = self.store.read_cache(self._self_key(), self._self_stamp())
        if cached is not None and cached.shape == (self.store.n,):
            return cached.astype(np.float64, copy=False)
        return self._self_influence(progress)

    def cache_self_influence(self) -> None:
        """Compute self-influence and write it to the store, unless a valid copy is there (a build's step)."""
        if self.ckpts != self.store.checkpoint_ids or any(
                self.eta[c["id"]] != float(c.get("lr_weight", 1.0)) for c in self.store.checkpoints):
            raise BadSpecError("only a scorer over the store's own checkpoints and lr weights writes its cache")
        stamp = self._self_stamp()
        if self.store.read_cache(self._self_key(), stamp) is None:
            self.store.write_cache(self._self_key(), self._self_influence(False), stamp)

    def _self_key(self) -> str:
        return f"self_influence/{self.name}"

    def _self_stamp(self) -> str:
        """What the cached values depend on beyond the store's fixed model, data and projector."""
        inputs = {"method": self.name, "n": self.store.n,
                  "checkpoints": [[c["id"], c.get("sha256"), self.eta[c["id"]]] for c in self.store.checkpoints if c["id"] in self.ckpts]}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def _self_influence(self, progress: bool) -> np.ndarray:
        raise NotImplementedError

    def _bar(self, progress: bool, passes: int = 1) -> "tqdm[None]":
        """A bar over ``passes`` scans of the store's rows, shown when ``progress`` and stderr is a terminal."""
        return tqdm(total=passes * self.store.n, desc=f"self-influence ({self.name})", unit="ex", disable=None if progress else True)


class TracIn(ScoringMethod, name="tracin"):
    """TracInCP: Σ_c η_c ⟨∇ℓ_c(i), ∇ℓ_c(t)⟩, with ∇ℓ = (dℓ/dm)·∇m from the stored output gradients."""

    def _row_scale(self, ckpt: str, rows: slice | np.ndarray) -> np.ndarray:
        return math.sqrt(self.eta[ckpt]) * self._column("loss_weight", ckpt)[rows]

    def query_vectors(self, feats: dict[str, np.ndarray], weights: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([feats[c] * (math.sqrt(self.eta[c]) * weights[c])[:, None] for c in self.ckpts], axis=1).astype(np.float32)

    def _self_influence(self, progress: bool) -> np.ndarray:
        out = np.zeros(self.store.n)
        with self._bar(progress) as bar:
            for start, stop in self.store.iter_chunks():
                v = self.train_vectors(start, stop).astype(np.float64)
                out[start:stop] = (v * v).sum(1)
                bar.update(stop - start)
        return out


class GradCos(TracIn, name="gradcos"):
    """Grad-Cos: cosine of the (checkpoint-concatenated) loss gradients; not dominated by high-loss examples.

    Measured and rejected: the lr-weighted mean of per-checkpoint cosines (GAS). It raised shortcut AUPRC
    (0.687 → 0.754 over 6 digits runs) but let the early, high-lr checkpoint pick the top proponents, which
    stopped being same-class images, and the shortcut detector then missed 3 of 6 patches (docs/BENCHMARKS.md).
    """

    def _finish(self, v: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(v.astype(np.float64), axis=1, keepdims=True)  # float64: squares overflow float32
        unit: np.ndarray = (v / np.maximum(norms, EPS)).astype(v.dtype, copy=False)  # numpy's stubs: Any
        return unit

    def _needs_norms(self, start: int, stop: int) -> bool:
        return ("norm", f"{start}:{stop}") not in self._columns  # |v_i| before normalising, once per chunk: N floats

    def _finish_scores(self, scores: np.ndarray, start: int, stop: int) -> np.ndarray:
        cosines: np.ndarray = (scores / self._columns[("norm", f"{start}:{stop}")]).astype(np.float32)
        return cosines

    def query_vectors(self, feats: dict[str, np.ndarray], weights: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> np.ndarray:
        return self._finish(super().query_vectors(feats, weights, probs))

    has_self_influence = False

    def self_influence(self, *, progress: bool = False) -> np.ndarray:
        raise BadSpecError("self-influence under gradcos is 1 for every example; use --method tracin or trak")


class TRAK(ScoringMethod, name="trak"):
    """TRAK: mean over checkpoints of φ_c(t)ᵀ (Φ_cᵀΦ_c + λI)⁻¹ φ_c(i) · (1 − p_c(i)), on margin gradients.

    The inverse of each checkpoint is stored as ``trak/<ckpt>`` with its λ in that array's own attributes
    (``lambda_rel`` as asked, ``lambda`` as applied, ``lambda_unit`` the rule between them, :data:`TRAK_LAMBDA_UNIT`):
    the one place they are written and read. An inverse without ``lambda_unit`` was made by a build that took
    λ = lambda_rel · trace/k; queries still use it as it is (it is consistent with its own ``lambda``), and the next
    build or ``influence add`` on the store recomputes it in the current unit.
    """

    def __init__(self, store: "FeatureStore", *, checkpoints: Sequence[str] | None = None,
                 lr_weights: Mapping[str, float] | None = None) -> None:
        super().__init__(store, checkpoints=checkpoints, lr_weights=lr_weights)
        self._inv: dict[str, np.ndarray] = {}

    @staticmethod
    def _key(ckpt: str) -> str:
        return f"trak/{ckpt}"

    @classmethod
    def stored_lambda(cls, store: "FeatureStore", ckpt: str) -> "StoredLambda | None":
        """The λ the stored inverse of ``ckpt`` was computed with, read from that array's attributes; None where
        there is no inverse or it has no λ (a build killed between writing the two)."""
        attrs = store.matrix_attrs(cls._key(ckpt))
        if attrs is None or "lambda_rel" not in attrs:
            return None
        return StoredLambda(float(attrs["lambda_rel"]), float(attrs["lambda"]),
                            str(attrs.get("lambda_unit", OLD_TRAK_LAMBDA_UNIT)))

    @staticmethod
    def _gram_key(ckpt: str) -> str:
        return f"trak_gram/{ckpt}"

    @classmethod
    def prepare(cls, store: "FeatureStore", spec: TrakSpec) -> None:
        """(Φ_cᵀΦ_c + λI)⁻¹ per checkpoint, recomputed when missing, computed with another λ or in another unit of λ
        (an inverse from before ``lambda_unit`` was recorded), or for fewer rows.

        Φ_cᵀΦ_c is kept too (float64, with the rows it covers), so rows appended later (``influence add``) update it
        by their own ΦᵀΦ without rereading the old features.
        """
        for ckpt in store.checkpoint_ids:
            done = cls.stored_lambda(store, ckpt)
            rows = (store.matrix_attrs(cls._key(ckpt)) or {}).get("rows", store.n)  # stores before appends: all rows
            if done is not None and done.is_current(spec.lambda_rel) and rows == store.n:
                continue
            gram = cls._gram(store, ckpt)
            inv, lam = trak_inverse(gram, spec.lambda_rel, n=store.n)
            # Written beside the live inverse with its λ, then switched in: a killed build leaves the old one live.
            store.write_matrix(cls._key(ckpt), inv.astype(np.float32),
                               attrs={"lambda_rel": spec.lambda_rel, "lambda": lam, "lambda_unit": TRAK_LAMBDA_UNIT,
                                      "rows": store.n})
        super().prepare(store, spec)  # self-influence, after the inverses it uses

    @classmethod
    def _gram(cls, store: "FeatureStore", ckpt: str) -> np.ndarray:
        """Φ_cᵀΦ_c over all rows: the stored one plus the rows appended since (read once), stored again if it grew."""
        key = cls._gram_key(ckpt)
        covered = int((store.matrix_attrs(key) or {}).get("rows", 0))
        if 0 < covered <= store.n:
            gram = store.read_matrix(key).astype(np.float64)
        else:
            gram, covered = np.zeros((store.k, store.k)), 0
        for s, e in store.iter_chunks():
            if e > covered:
                phi = store.read_features(ckpt, max(s, covered), e).astype(np.float64)
                gram += phi.T @ phi
        if covered < store.n:
            store.write_matrix(key, gram, attrs={"rows": store.n})
        return gram

    def inverse(self, ckpt: str) -> np.ndarray:
        if ckpt not in self._inv:
            self._inv[ckpt] = self.store.read_matrix(self._key(ckpt)).astype(np.float32)
        return self._inv[ckpt]

    def _row_scale(self, ckpt: str, rows: slice | np.ndarray) -> np.ndarray:
        return self._q(ckpt)[rows]

    def _q(self, ckpt: str) -> np.ndarray:
        """TRAK's Q = 1 − p per row, read as −dℓ/dm = σ(−m): ``1 − prob`` rounds to 0 for well-fit rows in float32."""
        if ("q", ckpt) not in self._columns:
            self._columns[("q", ckpt)] = -self._column("loss_weight", ckpt)
        return self._columns[("q", ckpt)]

    def query_vectors(self, feats: dict[str, np.ndarray], weights: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> np.ndarray:
        n = len(self.ckpts)
        return np.concatenate([feats[c] @ self.inverse(c) / n for c in self.ckpts], axis=1).astype(np.float32)

    def _self_stamp(self) -> str:
        lams = [d.value if (d := self.stored_lambda(self.store, c)) else None for c in self.ckpts]
        return hashlib.sha256(f"{super()._self_stamp()} lambda={lams}".encode()).hexdigest()

    def leverage(self, ckpt: str, bar: "tqdm[None] | None" = None) -> np.ndarray:
        """φᵢᵀ (ΦᵀΦ + λI)⁻¹ φᵢ of every row at checkpoint ``ckpt``, (N,) float32 (the stored rows' and the inverse's
        precision): self-influence before the 1 − p weight."""
        inv = self.inverse(ckpt)
        out = np.zeros(self.store.n, dtype=np.float32)
        for start, stop in self.store.iter_chunks():
            phi = self.store.read_features(ckpt, start, stop)
            # a whole chunk as one matrix product (BLAS), not a per-row einsum contraction
            out[start:stop] = ((phi @ inv) * phi).sum(1)
            if bar is not None:
                bar.update(stop - start)
        return out

    def _self_influence(self, progress: bool) -> np.ndarray:
        out = np.zeros(self.store.n)
        with self._bar(progress, len(self.ckpts)) as bar:
            for c in self.ckpts:
                out += self.leverage(c, bar) * self._q(c) / len(self.ckpts)
        return out


TRAK_LAMBDA_UNIT = "trace/min(n,k)"
"""The unit of TRAK's relative λ, recorded as ``lambda_unit`` beside every stored inverse: λ = lambda_rel · trace(ΦᵀΦ) /
min(N, k), the mean nonzero eigenvalue of ΦᵀΦ (Φ the N×k features of one checkpoint)."""

OLD_TRAK_LAMBDA_UNIT = "trace/k"
"""The unit of an inverse stored without ``lambda_unit`` (builds before it was recorded): λ = lambda_rel · trace/k."""


@dataclass(frozen=True)
class StoredLambda:
    """TRAK's λ as one stored inverse was computed: ``rel`` as asked (``--trak-lambda``), ``value`` as applied, and
    ``unit``, the rule between them (:data:`TRAK_LAMBDA_UNIT`, or :data:`OLD_TRAK_LAMBDA_UNIT` for an inverse written
    before the unit was recorded)."""

    rel: float
    value: float
    unit: str

    def is_current(self, rel: float) -> bool:
        """Whether this inverse is what ``--trak-lambda rel`` gives now: that rel, in :data:`TRAK_LAMBDA_UNIT`."""
        return self.rel == rel and self.unit == TRAK_LAMBDA_UNIT


def trak_lambda(lam_rel: float, trace: float, n: int, k: int) -> float:
    """The absolute ridge λ of a relative one: ``lam_rel · trace / min(n, k)`` (:data:`TRAK_LAMBDA_UNIT`).

    ``trace`` is trace(ΦᵀΦ) = trace(ΦΦᵀ) of an ``n``×``k`` feature matrix Φ. ΦᵀΦ has at most min(n, k) nonzero
    eigenvalues, so this is lam_rel times their mean: with fewer rows than k (n < k), trace/k would be smaller by k/n
    and lam_rel = 1 far weaker than meant. The one rule every caller uses (the store's k×k inverse, the N×N dual form
    of λ sweeps, the peers' adapters), so a relative λ means the same everywhere.
    """
    if n < 1 or k < 1:
        raise BadSpecError(f"TRAK's λ needs at least one row and one feature column; got n = {n}, k = {k}")
    return float(lam_rel * trace / min(n, k))


def trak_inverse(gram: np.ndarray, lam_rel: float, *, n: int) -> tuple[np.ndarray, float]:
    """(ΦᵀΦ + λI)⁻¹ with λ relative to the spectrum: λ = lam_rel · trace(ΦᵀΦ)/min(n, k) (:func:`trak_lambda`), for
    ``gram`` = ΦᵀΦ (k×k) of ``n`` rows; never 0 (ΦᵀΦ is singular when k ≥ N). Returns the inverse and λ.

    The default lam_rel = 1 (the mean nonzero eigenvalue) is measured: on the digits MLP, LDS peaks at 0.3–3 and
    falls on both sides (0.320 at 0.01, 0.446 at 1, 0.347 at 10; 10 half-data models, k = 512 < N = 1,437, where
    trace/k and trace/min(N, k) agree), and it removes the "larger k scores worse" effect seen with small λ
    (docs/BENCHMARKS.md, LDS section).
    """
    k = gram.shape[0]
    lam = trak_lambda(lam_rel, float(np.trace(gram)), n, k) or 1e-8
    return _spd_inverse(gram + lam * np.eye(k)), lam


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor (LAPACK potrf + potri): about n³
    flops against LU's 2n³, 1.4-1.6× faster than ``np.linalg.inv`` at k = 2048 on one thread (same values to
    1e-15 relative); falls back to LU if the factorisation fails (a matrix that is not positive definite)."""
    from scipy.linalg import lapack  # scipy comes with scikit-learn

    k = len(a)
    c, info = lapack.dpotrf(np.asarray(a, dtype=np.float64), lower=0, clean=1)  # clean: zeros below the diagonal
    if info == 0:
        upper, info = lapack.dpotri(c, lower=0, overwrite_c=1)  # fills the upper triangle, leaves those zeros
    if info != 0:
        return np.asarray(np.linalg.inv(a))
    inv: np.ndarray = upper + upper.T  # (np.triu twice took 4× longer at k = 2048)
    inv[np.diag_indices(k)] *= 0.5
    return inv


def get_method(name: str) -> type[ScoringMethod]:
    """The scoring method registered under ``name``; an unknown name lists the choices."""
    return METHODS.get(name)


METHOD_NAMES = tuple(METHODS.names())
