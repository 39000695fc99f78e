"""Query engine: project test examples like the store did, search the index, return influencers.

``Influence.open(store)`` loads the manifest, the model (from the recorded
spec or one the caller passes, checked by fingerprint), the task (built-in, or
the caller's instance checked against the stored import path) and the
checkpoints (checked by sha256, then kept as read-only parameter dicts).
Queries never touch a store that is not ``complete``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from index.search import EXACT, ExactScan, SearchIndex, load_index
from index.store import FeatureStore
from influence._inputs import as_batch, as_targets
from influence.data import ConcatRows, Preprocessing, batch_of, index_subset
from influence.errors import BadDataError, BadSpecError, StoreDamagedError, StoreIncompleteError, StoreMismatchError
from influence.features import ProjectorSpec, Task, make_projector
from influence.features.encoder import Checkpoint, QueryEncoder
from influence.features.specs import resolve_task
from influence.loading import load_checkpoint, load_data, load_model, load_recorded_data, model_fingerprint
from influence.models import BUILTIN_MODELS
from influence.scoring import ScoringMethod, get_method

if TYPE_CHECKING:
    from influence.recipe import Recipe  # exact mode only: imported by influence.exact when it runs


KEEP_FEATURE_BYTES = 2 << 30
"""A session keeps up to this many bytes of the store's float16 feature rows in memory for repeated exact scans
(one copy for all methods; a float32 FAISS Flat index per method held 6× as much for three methods)."""


@dataclass
class Influencer:
    """One training example's score, with its stored label's class name and (image folders) its file path."""

    train_id: int
    score: float
    label: int
    label_name: str = ""
    path: str | None = None


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
    target_name: str = ""
    predicted_name: str = ""
    opponents_target_name: str = ""
    label_name: str | None = None
    test_path: str | None = None
    exact: bool = False  # scores from replaying training (Influence.exact_scores), not from the store's features

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
        self.trust_store = False  # set by ``open``: whether a recorded ``module:function`` data spec may be imported
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
        self._labels: np.ndarray | None = None
        self._label_prob: np.ndarray | None = None
        self._self_influence: dict[str, np.ndarray] = {}
        self._train_data: Any = None  # what load_data returns for the store's data spec, read on first use
        self._paths: list[str | None] | None = None  # training rows' file paths, read on first use
        self._paths_read = False
        names = attrs.get("classes")  # a store from before names were recorded: "0".."K-1"
        self.class_names: list[str] = (
            [str(c) for c in names] if names is not None else [str(c) for c in range(int(attrs.get("num_classes", 0)))]
        )
        """The name of each class in output order."""

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], model: str | nn.Module | None = None, device: str | torch.device = "cpu", *,
        task: Task | None = None, trust_store: bool = False,
    ) -> "Influence":
        """Open a complete store; a store built with a custom ``Task`` needs an instance of it as ``task``.

        A store is data, never code: the model spec it records is imported only when it names a built-in model or
        the caller opts in with ``trust_store=True`` (as ``trust_remote_code`` in Hugging Face); otherwise pass the
        model yourself as ``model=`` (a spec or a module). The recorded factory arguments are reused either way.
        """
        store = FeatureStore.open(path)
        net = store_model(path, store.attrs, model, trust_store).to(device).eval()
        session = cls(store, net, torch.device(device), task=task)
        session.trust_store = trust_store
        return session

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

    def class_name(self, c: int) -> str:
        return class_name(c, self.class_names)

    def class_index(self, name: str | int, what: str = "--target") -> int:
        """A class given by name or by index → its index; anything else is an error listing the names."""
        return class_index(name, self.class_names, what)

    @property
    def preprocessing(self) -> Preprocessing:
        """How the store's training images were turned into model inputs; test data gets the same."""
        return Preprocessing.from_attrs(self.store.attrs.get("preprocessing"))

    def train_path(self, i: int) -> str | None:
        """Training row ``i``'s file path relative to its image folder (None when the data had no files)."""
        if not self._paths_read:
            self._paths, self._paths_read = self._read_paths(), True
        paths = self._paths
        return paths[i] if paths is not None and 0 <= i < len(paths) else None

    def _read_paths(self) -> list[str | None] | None:
        from influence.pipeline import read_paths  # the paths file's format lives with its writer

        rec = self.store.attrs.get("paths")
        return read_paths(self.store.root, rec) if rec else None

    def _influencer(self, i: int, score: float, labels: np.ndarray) -> Influencer:
        label = int(labels[i])
        return Influencer(i, score, label, self.class_name(label), self.train_path(i))

    def test_data(
        self, spec: str | Dataset[Any], ids: Sequence[int] | None = None, *, size: tuple[int, int] | None = None,
        channels: int | None = None,
    ) -> "TestData":
        """Test examples from a DATA SPEC, read as the training data was: the store's preprocessing, and its
        class names (a test folder's sub-folders and an ``.npz``'s ``classes`` are mapped by name, so a
        missing class never renumbers the others). ``size`` / ``channels`` convert images that differ."""
        pre = self.preprocessing.replace(size=size, channels=channels)
        dataset = load_data(spec, pre, classes=self.class_names, shape=self.input_shape)
        x, y, ids = _select(dataset, ids)
        paths = getattr(dataset, "paths", None)
        return TestData(x, y, ids, None if paths is None else [paths[i] for i in ids])

    @property
    def methods(self) -> tuple[str, ...]:
        """The scoring methods this store has an index for."""
        return tuple(self.store.attrs.get("indexes", {}))

    def model_at(self, checkpoint: int = -1) -> nn.Module:
        """A new model (eval mode) with checkpoint ``checkpoint``'s weights (default: the final one); the caller owns it."""
        return self.encoder.model_at(checkpoint)


    def training_labels(self) -> np.ndarray:
        """The stored label of every training example, (N,) int64."""
        if self._labels is None:
            self._labels = self.store.labels()
        return self._labels

    def label_probability(self) -> np.ndarray:
        """The final checkpoint's probability of each training example's label, (N,) float32."""
        if self._label_prob is None:
            self._label_prob = self.store.column("prob", self.checkpoints[-1].id)
        return self._label_prob

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
                self._indexes[method] = self.exact_scan(method)
                return self._indexes[method]
            # One FAISS thread: a query is a handful of vectors, and on a busy 2-core machine a second OpenMP
            # thread waiting to be scheduled made single queries ~4× slower (docs/BENCHMARKS.md, index table).
            self._indexes[method] = load_index(self.store.root / rec["path"], rec, vectors=self.scorer(method).train_rows,
                                               threads=1, opened=self.store.index_file(rec["path"]))
        return self._indexes[method]

    def exact_scan(self, method: str) -> ExactScan:
        """Exact search with ``method``'s scores ⟨v_i, q⟩, one store chunk at a time from the stored rows (what a
        Flat build serves, and the reference an approximate index is checked against)."""
        scorer = self.scorer(method)

        def blocks(q: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
            for s, e in self.store.iter_chunks():
                yield s, scorer.train_scores(q, s, e)

        return ExactScan(blocks, scorer.dim, self.store.n)

    def _as_batch(self, inputs: Any) -> torch.Tensor:
        return as_batch(inputs, self.input_shape, single=True).to(self.device, torch.float32)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of the final checkpoint."""
        return torch.softmax(self.encoder.logits(self._as_batch(inputs)), dim=-1)

    def query_vectors(
        self, inputs: torch.Tensor, targets: torch.Tensor, method: str, last_logits: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Project test examples exactly as the store's training features were, then apply the method
        (``last_logits``: the final checkpoint's logits of ``inputs``, when already computed)."""
        x = self._as_batch(inputs)
        y = as_targets(targets, len(x)).to(self.device)
        q = self.encoder.encode(x, y, last_logits)
        return self.scorer(method).query_vectors(q.features, q.loss_weights, q.probs)

    def _targets(self, probs: torch.Tensor, targets: Sequence[int] | torch.Tensor | None, what: str = "targets") -> torch.Tensor:
        if targets is None:
            return probs.argmax(-1).cpu()
        return as_targets(targets, probs.shape[0], probs.shape[1], what=what)

    # ------------------------------------------------------------------ public queries
    def query(
        self, inputs: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None, *, k: int = 10,
        method: str = "tracin", labels: Sequence[int] | None = None, test_ids: Sequence[int] | None = None,
        test_paths: Sequence[str | None] | None = None,
    ) -> list[QueryResult]:
        """Top-``k`` proponents and opponents of each input.

        Proponents answer "why this class?" for the target (default: the predicted class). Opponents are
        the most harmful examples for the same class, except when ``labels`` are given and no target is:
        then, as suits a misclassified image, they answer "what pulled it away from its true
        label?" (``opponents_target`` in the result says which class they were searched for).
        """
        if k < 1:
            raise BadSpecError(f"--k must be a positive integer, got {k}")
        x = self._as_batch(inputs)
        logits = self.encoder.logits(x)  # once: the prediction and the final checkpoint's loss weight both use it
        probs = torch.softmax(logits, dim=-1)
        t = self._targets(probs, targets)
        q = self.query_vectors(x, t, method, logits)
        opp_t, q_opp = t, q
        if targets is None and labels is not None:
            opp_t = self._targets(probs, labels, "labels")
            differ = (opp_t != t).numpy()
            if differ.any():
                q_opp = q.copy()
                rows = torch.as_tensor(differ)
                q_opp[differ] = self.query_vectors(x[rows], opp_t[rows], method)
        index = self.index(method)
        train_labels = self.training_labels()
        start = time.perf_counter()
        (pro_s, pro_i), (opp_s, opp_i) = index.search_both(q, q_opp, k)
        ms = (time.perf_counter() - start) * 1000 / max(1, len(q))
        results = []
        for r in range(len(q)):
            label = None if labels is None else int(labels[r])
            results.append(QueryResult(
                target=int(t[r]), predicted=int(probs[r].argmax()), probability=float(probs[r, t[r]]),
                proponents=[self._influencer(int(i), float(s), train_labels) for s, i in zip(pro_s[r], pro_i[r])],
                opponents=[self._influencer(int(i), float(s), train_labels) for s, i in zip(opp_s[r], opp_i[r])],
                opponents_target=int(opp_t[r]),
                label=label, test_id=None if test_ids is None else int(test_ids[r]),
                method=method, search_ms=round(ms, 3),
                target_name=self.class_name(int(t[r])), predicted_name=self.class_name(int(probs[r].argmax())),
                opponents_target_name=self.class_name(int(opp_t[r])),
                label_name=None if label is None else self.class_name(label),
                test_path=None if test_paths is None else test_paths[r],
            ))
        return results

    def scores(
        self, inputs: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None, *, method: str = "tracin",
        progress: bool = True,
    ) -> np.ndarray:
        """The full (n_train, n_test) score matrix, streamed over the store's row chunks.

        ``progress``: a bar over the training rows on stderr, shown only when stderr is a terminal.
        """
        x = self._as_batch(inputs)
        logits = self.encoder.logits(x)
        q = self.query_vectors(x, self._targets(torch.softmax(logits, dim=-1), targets), method, logits)
        scorer = self.scorer(method)
        out = np.empty((self.store.n, len(q)), dtype=np.float32)
        with tqdm(total=self.store.n, desc=f"scores ({method})", unit="ex", disable=None if progress else True) as bar:
            for s, e in self.store.iter_chunks():
                out[s:e] = scorer.train_vectors(s, e) @ q.T
                bar.update(e - s)
        return out

    def exact_scores(
        self, inputs: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None, *, recipe: Recipe,
        progress: bool = True,
    ) -> np.ndarray:
        """Exact-mode scores d margin_target / d w_i, (n_train, n_test) float32, by replaying ``recipe``'s training.

        The recipe is trained on the store's own training rows (its data spec, in store order), so the answer is
        the true derivative for the run that made the checkpoints when ``recipe`` describes that run. It costs
        about 3–4 training runs for the whole batch; the estimate is printed to stderr before starting.
        ``targets`` default to the predicted classes. ``progress``: a bar over the replayed steps on stderr, shown
        only when stderr is a terminal.
        """
        from influence.exact import metagradient
        from influence.recipe import prepare

        fingerprint = model_fingerprint(recipe.build_model().to(torch.float32))
        if fingerprint != self.store.attrs["model_fingerprint"]:
            raise BadSpecError(
                f"recipe model {_recipe_model_name(recipe)!r} (fingerprint {fingerprint}) is not the store's model "
                f"{self.model_spec!r} (fingerprint {self.store.attrs['model_fingerprint']}); give the recipe that trained this store's checkpoints"
            )
        x = self._as_batch(inputs)
        t = self._targets(self.predict(x), targets)
        self.training_examples([])  # loads the store's training data once and checks its length
        data = self._train_data
        _, run = prepare(recipe, data, None, self.device)
        steps = len(run.steps)
        timed = min(steps, 3)
        state = run.initial_state()
        start = time.perf_counter()
        for s in range(timed):
            state = run.step(state, s)
        per_step = (time.perf_counter() - start) / max(1, timed)
        del state, run
        # forward pass + recomputation + second-order vjp (about two steps' work) per step
        print(f"exact: replaying {steps} training steps for {len(x)} test point(s) on {len(data)} examples; "
              f"expected about {_duration(4 * steps * per_step)}", file=sys.stderr)
        with tqdm(total=2 * steps, desc="exact (replay)", unit="step", disable=None if progress else True) as bar:
            replay = metagradient(recipe, data, x, t, device=self.device, on_step=lambda: bar.update(1))
        return replay.scores.astype(np.float32)

    def self_influence(self, method: str = "tracin", *, progress: bool = True) -> np.ndarray:
        """S(i, i) of every training example, (N,) float32: the store's cache, or one pass over it for older stores."""
        if method not in self._self_influence:
            self._self_influence[method] = self.scorer(method).self_influence(progress=progress).astype(np.float32)
        return self._self_influence[method]

    def training_examples(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images and labels by row id, from the data spec the store was built on."""
        if self._train_data is None:
            # the build's data, then each appended set (influence add) in the order its rows were appended
            refusal = None if self.trust_store else (
                f"store {self.store.root} records data spec {{spec}}, which is code and is not imported unless you "
                f"ask: if you trust this store, add --trust-store (trust_store=True)")
            parts = load_recorded_data(self.store.attrs, str(self.store.root), code_refusal=refusal)
            self._train_data = parts[0] if len(parts) == 1 else ConcatRows(parts)
        dataset = self._train_data
        if len(dataset) != self.store.n:
            raise StoreMismatchError(f"training data {self.store.attrs.get('data_spec')} has {len(dataset)} examples; the store has {self.store.n}")
        if not ids:
            return torch.empty(0, *self.input_shape), torch.empty(0, dtype=torch.long)
        subset = index_subset(dataset, [int(i) for i in ids])
        return batch_of(subset, 0, len(subset))


def store_model(path: str | os.PathLike[str], attrs: dict[str, Any], model: str | nn.Module | None, trust_store: bool) -> nn.Module:
    """The store's model: the caller's (checked by fingerprint), or the recorded spec when built-in or trusted.

    A store is data, never code: its recorded spec is imported only when the caller opts in with ``trust_store``.
    """
    spec = model if model is not None else attrs.get("model_spec")
    if spec is None:
        raise BadSpecError(f"store {path} was built from an in-memory model; pass model= to open it")
    if model is None and not trust_store and spec not in BUILTIN_MODELS:
        raise BadSpecError(
            f"store {path} records model spec {spec!r}, which is code and is not imported unless you ask: name the "
            f"model yourself (--model SPEC, model=) or, if you trust this store, add --trust-store (trust_store=True)"
        )
    net = load_model(spec, attrs.get("model_args"))
    if model_fingerprint(net) != attrs["model_fingerprint"]:
        raise StoreMismatchError(
            f"model {type(net).__name__} does not match the store's model (fingerprint {model_fingerprint(net)} != "
            f"{attrs['model_fingerprint']}); use the model the store was built with"
        )
    return net


def _recipe_model_name(recipe: Recipe) -> str:
    m = recipe.model
    return m if isinstance(m, str) else f"{getattr(m, '__module__', '?')}:{getattr(m, '__qualname__', repr(m))}"


def _duration(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def describe_store(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a store holds, readable even while it is still building."""
    store = FeatureStore.open(path, allow_incomplete=True)
    a = store.attrs
    return {
        "path": str(Path(path).resolve()), "status": a.get("status"), "progress": store.progress() if "n" in a else None,
        "model_spec": a.get("model_spec"), "model_fingerprint": a.get("model_fingerprint"), "task": a.get("task"),
        "params": a.get("params"), "num_parameters_selected": len(a.get("param_names", [])),
        "projector": a.get("projector"), "k": a.get("k"), "dtype": a.get("dtype"), "n": a.get("n"),
        "data_spec": a.get("data_spec"), "dataset_fingerprint": a.get("dataset_fingerprint"), "added": a.get("added", []),
        "input_shape": a.get("input_shape"), "num_classes": a.get("num_classes"), "classes": a.get("classes"),
        "preprocessing": a.get("preprocessing"), "model_args": a.get("model_args"),
        "paths": (a.get("paths") or {}).get("count"),
        "checkpoints": [{k: c[k] for k in ("id", "path", "lr_weight", "sha256")} for c in store.checkpoints],
        "indexes": {m: {"factory": r.get("factory"), "size": r.get("size")} for m, r in a.get("indexes", {}).items()},
        "trak": _describe_trak(store),
    }


def _describe_trak(store: FeatureStore) -> dict[str, Any] | None:
    """TRAK's λ as its stored inverses were computed: relative, absolute per checkpoint, and the unit between them
    (``scoring.TRAK_LAMBDA_UNIT``; ``trace/k`` for inverses from before the unit was recorded); None without them.
    ``lambda_rel`` and ``lambda_unit`` are lists only where checkpoints differ (a rebuild that did not finish)."""
    from influence.scoring import TRAK

    done = {c: d for c in store.checkpoint_ids if (d := TRAK.stored_lambda(store, c)) is not None}
    if not done:
        return None
    rels = sorted({d.rel for d in done.values()})
    units = sorted({d.unit for d in done.values()})
    return {"lambda_rel": rels[0] if len(rels) == 1 else rels, "lambda": {c: d.value for c, d in done.items()},
            "lambda_unit": units[0] if len(units) == 1 else units}


def class_name(c: int, names: Sequence[str]) -> str:
    """Class ``c``'s name, or its index as text where ``names`` has none for it."""
    return names[c] if 0 <= c < len(names) else str(c)


def class_index(name: str | int, names: Sequence[str] | None, what: str = "--target") -> int:
    """A class given by name (one of ``names``) or by index → its index; anything else is an error that lists the
    names. ``names=None`` (a model without recorded names) takes any index ≥ 0."""
    if names is not None and isinstance(name, str) and name in names:
        return list(names).index(name)
    try:
        c = int(name)
    except ValueError:
        c = -1
    if names is None and c < 0:
        raise BadSpecError(f"{what} {name!r} is not a class index; give an index 0, 1, ... (or --classes to use names)")
    if names is not None and not 0 <= c < len(names):
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise BadSpecError(f"{what} {name!r} is not a class of this store: give a name ({shown}) or an index 0..{len(names) - 1}")
    return c


@dataclass(frozen=True)
class TestData:
    """Test examples as a query needs them: images, labels in the store's numbering, ids, and file paths (folders)."""

    x: torch.Tensor
    y: torch.Tensor
    ids: list[int]
    paths: list[str] | None = None


def load_queries(spec: str | Dataset[Any], ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Test examples from a DATA SPEC (optionally only ``ids``) as (x, labels, ids), read as they are.

    For a store's test data prefer :meth:`Influence.test_data`: it applies the store's preprocessing and class names.
    """
    return _select(load_data(spec), ids)


def _select(dataset: Any, ids: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    ids = list(range(len(dataset))) if ids is None else list(ids)
    if not ids:
        raise BadDataError("no test examples selected")
    bad = [i for i in ids if not 0 <= i < len(dataset)]
    if bad:
        raise BadDataError(f"--ids {bad[:5]} out of range for a data set of {len(dataset)} examples (0..{len(dataset) - 1})")
    subset = index_subset(dataset, ids)
    x, y = batch_of(subset, 0, len(subset))
    return x, y, ids
