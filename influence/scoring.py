"""TracIn, Grad-Cos and TRAK as transforms of one inner product ``score(i, t) = ⟨v_i, q_t⟩``.

Each method says how to turn stored features into train vectors ``v_i`` and a
test example's features into a query ``q``; one FAISS index per method then
answers proponents (search with ``q``) and opponents (search with ``−q``).
Scores are positive for proponents (helpful: a step on i lowers t's loss /
raises its margin) and negative for opponents.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

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

    def __init_subclass__(cls, name: str, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls.name = name
        METHODS.register(name, cls)

    @classmethod
    def prepare(cls, store: "FeatureStore", spec: TrakSpec) -> None:
        """Precompute and store what this method needs beyond the features (default: nothing).

        ``spec`` carries the build's scoring options; each method reads back what it wrote itself.
        """

    def __init__(self, store: "FeatureStore") -> None:
        self.store = store
        self.ckpts = store.checkpoint_ids
        self.eta = {c["id"]: float(c.get("lr_weight", 1.0)) for c in store.checkpoints}
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

    def _transform(self, ckpt: str, feats: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        """This method's per-checkpoint train block from stored features of ``rows``."""
        raise NotImplementedError

    def _finish(self, v: np.ndarray) -> np.ndarray:
        return v

    def train_vectors(self, start: int, stop: int) -> np.ndarray:
        """Train vectors v_i for rows ``start:stop`` (one store chunk at a time when streaming)."""
        rows = slice(start, stop)
        return self._finish(np.concatenate([self._transform(c, self.store.read_features(c, start, stop), rows) for c in self.ckpts], axis=1))

    def train_rows(self, ids: np.ndarray) -> np.ndarray:
        """Train vectors of arbitrary rows: exact re-ranking of an approximate index's shortlist."""
        ids = np.asarray(ids, dtype=np.int64)
        return self._finish(np.concatenate([self._transform(c, self.store.read_rows(c, ids), ids) for c in self.ckpts], axis=1))

    def query_vectors(self, feats: dict[str, np.ndarray], weights: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> np.ndarray:
        """Query vectors (nq, dim) from per-checkpoint test features φ_c(t), ``dloss/doutput`` and p_y."""
        raise NotImplementedError

    def self_influence(self) -> np.ndarray:
        raise NotImplementedError


class TracIn(ScoringMethod, name="tracin"):
    """TracInCP: Σ_c η_c ⟨∇ℓ_c(i), ∇ℓ_c(t)⟩, with ∇ℓ = (dℓ/dm)·∇m from the stored output gradients."""

    def _transform(self, ckpt: str, feats: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        return feats * (math.sqrt(self.eta[ckpt]) * self._column("loss_weight", ckpt)[rows])[:, None]

    def query_vectors(self, feats, weights, probs) -> np.ndarray:
        return np.concatenate([feats[c] * (math.sqrt(self.eta[c]) * weights[c])[:, None] for c in self.ckpts], axis=1).astype(np.float32)

    def self_influence(self) -> np.ndarray:
        out = np.zeros(self.store.n)
        for start, stop in self.store.iter_chunks():
            v = self.train_vectors(start, stop).astype(np.float64)
            out[start:stop] = (v * v).sum(1)
        return out


class GradCos(TracIn, name="gradcos"):
    """Grad-Cos: cosine of the (checkpoint-concatenated) loss gradients; not dominated by high-loss examples.

    Measured and rejected: the lr-weighted mean of per-checkpoint cosines (GAS). It raised shortcut AUPRC
    (0.687 → 0.754 over 6 digits runs) but let the early, high-lr checkpoint pick the top proponents, which
    stopped being same-class images, and the shortcut detector then missed 3 of 6 patches (docs/BENCHMARKS.md).
    """

    def _finish(self, v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), EPS)

    def query_vectors(self, feats, weights, probs) -> np.ndarray:
        return self._finish(super().query_vectors(feats, weights, probs))

    def self_influence(self) -> np.ndarray:
        raise BadSpecError("self-influence under gradcos is 1 for every example; use --method tracin or trak")


class TRAK(ScoringMethod, name="trak"):
    """TRAK: mean over checkpoints of φ_c(t)ᵀ (Φ_cᵀΦ_c + λI)⁻¹ φ_c(i) · (1 − p_c(i)), on margin gradients.

    The inverse of each checkpoint is stored as ``trak/<ckpt>`` with its λ in that array's own attributes
    (``lambda_rel`` as asked, ``lambda`` as applied): the one place both are written and read.
    """

    def __init__(self, store: "FeatureStore") -> None:
        super().__init__(store)
        self._inv: dict[str, np.ndarray] = {}

    @staticmethod
    def _key(ckpt: str) -> str:
        return f"trak/{ckpt}"

    @classmethod
    def damping(cls, store: "FeatureStore", ckpt: str) -> dict[str, float] | None:
        """``{"lambda_rel", "lambda"}`` the stored inverse of ``ckpt`` was computed with; None if there is none."""
        attrs = store.matrix_attrs(cls._key(ckpt))
        if attrs is None:
            return None
        return {k: float(attrs[k]) for k in ("lambda_rel", "lambda")} if "lambda_rel" in attrs else None

    @classmethod
    def prepare(cls, store: "FeatureStore", spec: TrakSpec) -> None:
        """(Φ_cᵀΦ_c + λI)⁻¹ per checkpoint, recomputed when missing or computed with another λ."""
        for ckpt in store.checkpoint_ids:
            done = cls.damping(store, ckpt)
            if done is not None and done["lambda_rel"] == spec.lambda_rel:
                continue
            gram = np.zeros((store.k, store.k))
            for s, e in store.iter_chunks():
                phi = store.read_features(ckpt, s, e).astype(np.float64)
                gram += phi.T @ phi
            inv, lam = trak_inverse(gram, spec.lambda_rel)
            # Written beside the live inverse with its λ, then switched in: a killed build leaves the old one live.
            store.write_matrix(cls._key(ckpt), inv.astype(np.float32), attrs={"lambda_rel": spec.lambda_rel, "lambda": lam})

    def inverse(self, ckpt: str) -> np.ndarray:
        if ckpt not in self._inv:
            self._inv[ckpt] = self.store.read_matrix(self._key(ckpt)).astype(np.float32)
        return self._inv[ckpt]

    def _transform(self, ckpt: str, feats: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        return feats * (1.0 - self._column("prob", ckpt)[rows])[:, None]

    def query_vectors(self, feats, weights, probs) -> np.ndarray:
        n = len(self.ckpts)
        return np.concatenate([feats[c] @ self.inverse(c) / n for c in self.ckpts], axis=1).astype(np.float32)

    def self_influence(self) -> np.ndarray:
        out = np.zeros(self.store.n)
        for c in self.ckpts:
            inv = self.inverse(c)
            for start, stop in self.store.iter_chunks():
                phi = self.store.read_features(c, start, stop)
                q = 1.0 - self._column("prob", c)[start:stop]
                out[start:stop] += np.einsum("ik,kj,ij->i", phi, inv, phi) * q / len(self.ckpts)
        return out


def trak_inverse(gram: np.ndarray, lam_rel: float) -> tuple[np.ndarray, float]:
    """(ΦᵀΦ + λI)⁻¹ with λ relative to the spectrum: λ = lam_rel · trace(ΦᵀΦ)/k (never 0: ΦᵀΦ is singular when k ≥ N).

    The default lam_rel = 1 (the mean eigenvalue) is measured: on the digits MLP, LDS peaks at 0.3–3 and
    falls on both sides (0.320 at 0.01, 0.446 at 1, 0.347 at 10; 10 half-data models, k = 512), and it
    removes the "larger k scores worse" effect seen with small λ (docs/BENCHMARKS.md, LDS section).
    """
    k = gram.shape[0]
    lam = float(lam_rel * np.trace(gram) / k) or 1e-8
    inv = np.linalg.inv(gram + lam * np.eye(k))
    return inv, lam


def get_method(name: str) -> type[ScoringMethod]:
    """The scoring method registered under ``name``; an unknown name lists the choices."""
    return METHODS.get(name)


METHOD_NAMES = tuple(METHODS.names())
