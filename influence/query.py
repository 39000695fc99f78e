"""Query engine: project test examples like the store did, search the index, return influencers.

``Influence.open(store)`` loads the manifest, the model (from the recorded
spec or one the caller passes, checked by fingerprint), the task (built-in, or
the caller's instance checked against the stored import path) and the
checkpoints (checked by sha256, then kept as read-only parameter dicts).
Queries never touch a store that is not ``complete``.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from index.search import EXACT, ExactScan, SearchIndex, load_index
from index.store import FeatureStore
from influence._inputs import as_batch, as_targets
from influence.data import batch_of, index_subset
from influence.errors import BadDataError, BadSpecError, StoreIncompleteError, StoreMismatchError
from influence.features import ProjectorSpec, Task, make_projector
from influence.features.encoder import Checkpoint, QueryEncoder
from influence.features.specs import resolve_task
from influence.loading import load_checkpoint, load_data, load_model, model_fingerprint
from influence.scoring import ScoringMethod, get_method


KEEP_FEATURE_BYTES = 2 << 30
"""A session keeps up to this many bytes of the store's float16 feature rows in memory for repeated exact scans
(one copy for all methods; a float32 FAISS Flat index per method held 6× as much for three methods)."""


@dataclass
class Influencer:
    train_id: int
    score: float
    label: int


@dataclass
class QueryResult:
    """Who influenced one test prediction: proponents (helpful, score > 0 first) and opponents (harmful)."""

    target: int
    predicted: int
    probability: float
    proponents: list[Influencer]
    opponents: list[Influencer]
    opponents_target: int = -1
    label: int | None = None
    test_id: int | None = None
    method: str = "tracin"
    search_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Influence:
    """A complete store opened for queries: its checkpoints as immutable parameter dicts, and a query encoder.

    Nothing is loaded into a shared module between calls, so queries, scores, explanations and flags give the
    same answers in any order. Callers get what they need through methods (``training_labels``,
    ``label_probability``, ``model_at``), not by reading the store's layout.
    """

    def __init__(self, store: FeatureStore, model: nn.Module, device: torch.device, task: Task | None = None) -> None:
        self.store, self.device = store, device
        store.keep_in_memory(KEEP_FEATURE_BYTES)
        attrs = store.attrs
        self.task = resolve_task(attrs.get("task"), task)
        self.names: list[str] = list(attrs["param_names"])
        self.input_shape = tuple(attrs["input_shape"])
        scratch = copy.deepcopy(model).eval()  # checkpoints are read through a private module, then kept as dicts
        checkpoints = []
        for rec in store.checkpoints:
            load_checkpoint(scratch, rec["path"], expected_sha256=rec["sha256"])
            checkpoints.append(Checkpoint.of(rec["id"], scratch))
        self.checkpoints: tuple[Checkpoint, ...] = tuple(checkpoints)
        self.projector = make_projector(ProjectorSpec(**attrs["projector"]), scratch, self.names)
        self.encoder = QueryEncoder(scratch, self.task, self.projector, self.names, self.checkpoints)
        self._indexes: dict[str, SearchIndex | ExactScan] = {}
        self._scorers: dict[str, ScoringMethod] = {}
        self._cache: dict[Any, Any] = {}

    @classmethod
    def open(
        cls, path: str | os.PathLike, model: str | nn.Module | None = None, device: str | torch.device = "cpu", *,
        task: Task | None = None,
    ) -> "Influence":
        """Open a complete store; a store built with a custom ``Task`` needs an instance of it as ``task``."""
        store = FeatureStore.open(path)
        attrs = store.attrs
        spec = model if model is not None else attrs.get("model_spec")
        if spec is None:
            raise BadSpecError(f"store {path} was built from an in-memory model; pass model= to open it")
        net = load_model(spec).to(device).eval()
        if model_fingerprint(net) != attrs["model_fingerprint"]:
            raise StoreMismatchError(
                f"model {type(net).__name__} does not match the store's model (fingerprint {model_fingerprint(net)} != "
                f"{attrs['model_fingerprint']}); query with the model the store was built with"
            )
        return cls(store, net, torch.device(device), task=task)

    # ------------------------------------------------------------------ pieces
    @property
    def checkpoint_count(self) -> int:
        return len(self.checkpoints)

    @property
    def n_train(self) -> int:
        return self.store.n

    @property
    def model_spec(self) -> str | None:
        """The model spec the store was built from (None for an in-memory model)."""
        return self.store.attrs.get("model_spec")

    @property
    def methods(self) -> tuple[str, ...]:
        """The scoring methods this store has an index for."""
        return tuple(self.store.attrs.get("indexes", {}))

    def model_at(self, checkpoint: int = -1) -> nn.Module:
        """A new model (eval mode) with checkpoint ``checkpoint``'s weights (default: the final one); the caller owns it."""
        return self.encoder.model_at(checkpoint)

    use_checkpoint = model_at  # the former name; it too returns a new model now, never a shared one

    def training_labels(self) -> np.ndarray:
        """The stored label of every training example, (N,) int64."""
        if "labels" not in self._cache:
            self._cache["labels"] = self.store.labels()
        return self._cache["labels"]

    def label_probability(self) -> np.ndarray:
        """The final checkpoint's probability of each training example's label, (N,) float32."""
        if "label_prob" not in self._cache:
            self._cache["label_prob"] = self.store.column("prob", self.checkpoints[-1].id)
        return self._cache["label_prob"]

    def scorer(self, method: str) -> ScoringMethod:
        if method not in self._scorers:
            self._scorers[method] = get_method(method)(self.store)
        return self._scorers[method]

    def index(self, method: str) -> SearchIndex | ExactScan:
        """The search answering ``method``'s queries: an exact scan of the store's rows, or its approximate index."""
        if method not in self._indexes:
            records = self.store.attrs.get("indexes", {})
            if method not in records:
                raise StoreIncompleteError(
                    f"store has no index for method {method!r} (has {', '.join(records) or 'none'}); rebuild with --method {method}"
                )
            rec = records[method]
            if rec.get("factory") == EXACT:
                # Exact search scans the store's own float16 rows; a store built before this also holds a FAISS
                # Flat copy (float32, per method), which gives the same answers and is left unused.
                self._indexes[method] = ExactScan(self._train_scores(method), self.scorer(method).dim, self.store.n)
                return self._indexes[method]
            # One FAISS thread: a query is a handful of vectors, and on a busy 2-core machine a second OpenMP
            # thread waiting to be scheduled made single queries ~4× slower (docs/BENCHMARKS.md, index table).
            self._indexes[method] = load_index(self.store.root / rec["path"], rec, vectors=self.scorer(method).train_rows, threads=1)
        return self._indexes[method]

    def _train_scores(self, method: str) -> Callable[[np.ndarray], Iterator[tuple[int, np.ndarray]]]:
        """``method``'s scores ⟨v_i, q⟩ one store chunk at a time, from the stored rows (what an exact scan ranks)."""
        scorer = self.scorer(method)

        def blocks(q: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
            for s, e in self.store.iter_chunks():
                yield s, scorer.train_scores(q, s, e)

        return blocks

    def _as_batch(self, inputs: Any) -> torch.Tensor:
        return as_batch(inputs, self.input_shape, single=True).to(self.device, torch.float32)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of the final checkpoint."""
        return torch.softmax(self.encoder.logits(self._as_batch(inputs)), dim=-1)

    def query_vectors(self, inputs: torch.Tensor, targets: torch.Tensor, method: str) -> np.ndarray:
        """Project test examples exactly as the store's training features were, then apply the method."""
        x = self._as_batch(inputs)
        y = as_targets(targets, len(x)).to(self.device)
        q = self.encoder.encode(x, y)
        return self.scorer(method).query_vectors(q.features, q.loss_weights, q.probs)

    def _targets(self, probs: torch.Tensor, targets: Sequence[int] | torch.Tensor | None, what: str = "targets") -> torch.Tensor:
        if targets is None:
            return probs.argmax(-1).cpu()
        return as_targets(targets, probs.shape[0], probs.shape[1], what=what)

    # ------------------------------------------------------------------ public queries
    def query(
        self, inputs: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None, *, k: int = 10,
        method: str = "tracin", labels: Sequence[int] | None = None, test_ids: Sequence[int] | None = None,
    ) -> list[QueryResult]:
        """Top-``k`` proponents and opponents of each input.

        Proponents answer "why this class?" for the target (default: the predicted class). Opponents are
        the most harmful examples for the same class, except when ``labels`` are given and no target is:
        then, as METHODS.md recommends for failures, they answer "what pulled it away from its true
        label?" (``opponents_target`` in the result says which class they were searched for).
        """
        if k < 1:
            raise BadSpecError(f"--k must be a positive integer, got {k}")
        x = self._as_batch(inputs)
        probs = self.predict(x)
        t = self._targets(probs, targets)
        q = self.query_vectors(x, t, method)
        opp_t, q_opp = t, q
        if targets is None and labels is not None:
            opp_t = self._targets(probs, labels, "labels")
            differ = (opp_t != t).numpy()
            if differ.any():
                q_opp = q.copy()
                q_opp[differ] = self.query_vectors(x[torch.as_tensor(differ)], opp_t[torch.as_tensor(differ)], method)
        index = self.index(method)
        train_labels = self.training_labels()
        start = time.perf_counter()
        (pro_s, pro_i), (opp_s, opp_i) = index.search_both(q, q_opp, k)
        ms = (time.perf_counter() - start) * 1000 / max(1, len(q))
        results = []
        for r in range(len(q)):
            results.append(QueryResult(
                target=int(t[r]), predicted=int(probs[r].argmax()), probability=float(probs[r, t[r]]),
                proponents=[Influencer(int(i), float(s), int(train_labels[i])) for s, i in zip(pro_s[r], pro_i[r])],
                opponents=[Influencer(int(i), float(s), int(train_labels[i])) for s, i in zip(opp_s[r], opp_i[r])],
                opponents_target=int(opp_t[r]),
                label=None if labels is None else int(labels[r]), test_id=None if test_ids is None else int(test_ids[r]),
                method=method, search_ms=round(ms, 3),
            ))
        return results

    def scores(
        self, inputs: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None, *, method: str = "tracin",
        progress: bool = True,
    ) -> np.ndarray:
        """The full (n_train, n_test) score matrix, streamed over the store's row chunks.

        ``progress``: a bar over the training rows on stderr, shown only when stderr is a terminal.
        """
        probs = self.predict(inputs)
        q = self.query_vectors(inputs, self._targets(probs, targets), method)
        scorer = self.scorer(method)
        out = np.empty((self.store.n, len(q)), dtype=np.float32)
        with tqdm(total=self.store.n, desc=f"scores ({method})", unit="ex", disable=None if progress else True) as bar:
            for s, e in self.store.iter_chunks():
                out[s:e] = scorer.train_vectors(s, e) @ q.T
                bar.update(e - s)
        return out

    def self_influence(self, method: str = "tracin", *, progress: bool = True) -> np.ndarray:
        """S(i, i) of every training example, (N,) float32: the store's cache, or one pass over it for older stores."""
        if (method, "self") not in self._cache:
            self._cache[(method, "self")] = self.scorer(method).self_influence(progress=progress).astype(np.float32)
        return self._cache[(method, "self")]

    def training_examples(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images and labels by row id, from the data spec the store was built on."""
        if "train_data" not in self._cache:
            spec = self.store.attrs.get("data_spec")
            if spec is None:
                raise BadSpecError("this store was built from an in-memory dataset; training images are not available")
            self._cache["train_data"] = load_data(spec)
        dataset = self._cache["train_data"]
        if len(dataset) != self.store.n:
            raise StoreMismatchError(f"training data {self.store.attrs.get('data_spec')} has {len(dataset)} examples; the store has {self.store.n}")
        if not ids:
            return torch.empty(0, *self.input_shape), torch.empty(0, dtype=torch.long)
        subset = index_subset(dataset, [int(i) for i in ids])
        return batch_of(subset, 0, len(subset))


def describe_store(path: str | os.PathLike) -> dict[str, Any]:
    """What a store holds, readable even while it is still building."""
    store = FeatureStore.open(path, allow_incomplete=True)
    a = store.attrs
    return {
        "path": str(Path(path).resolve()), "status": a.get("status"), "progress": store.progress() if "n" in a else None,
        "model_spec": a.get("model_spec"), "model_fingerprint": a.get("model_fingerprint"), "task": a.get("task"),
        "params": a.get("params"), "num_parameters_selected": len(a.get("param_names", [])),
        "projector": a.get("projector"), "k": a.get("k"), "dtype": a.get("dtype"), "n": a.get("n"),
        "data_spec": a.get("data_spec"), "dataset_fingerprint": a.get("dataset_fingerprint"),
        "input_shape": a.get("input_shape"), "num_classes": a.get("num_classes"),
        "checkpoints": [{k: c[k] for k in ("id", "path", "lr_weight", "sha256")} for c in store.checkpoints],
        "indexes": {m: {"factory": r.get("factory"), "size": r.get("size")} for m, r in a.get("indexes", {}).items()},
    }


def load_queries(spec: str | Dataset, ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Test examples from a DATA SPEC (optionally only ``ids``) as (x, labels, ids)."""
    dataset = load_data(spec)
    ids = list(range(len(dataset))) if ids is None else list(ids)
    if not ids:
        raise BadDataError("no test examples selected")
    bad = [i for i in ids if not 0 <= i < len(dataset)]
    if bad:
        raise BadDataError(f"--ids {bad[:5]} out of range for a data set of {len(dataset)} examples (0..{len(dataset) - 1})")
    subset = index_subset(dataset, ids)
    x, y = batch_of(subset, 0, len(subset))
    return x, y, ids
