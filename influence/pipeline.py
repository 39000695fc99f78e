"""extract → store → index (the `build` stage): featurize the training set for each checkpoint, then build the indexes.

Work is done in whole row chunks (the unit of resume): a chunk is computed in
batches whose size divides the chunk, written, then flagged done. Re-running
the same command after a crash skips flagged chunks and yields byte-identical
features, because batch boundaries (and so every floating-point sum) repeat.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from index.atomic import atomic_write
from index.search import EXACT, IndexSpec, SearchIndex, build_index, load_index
from index.store import FEATURE_DTYPES, FeatureStore, writer_lock
from influence.distributed import ShardPlan, check_partition, ranks, rank_device
from influence.data import ConcatRows, Preprocessing, SizedDataset, batch_of, fingerprint_dataset
from influence.errors import (
    BadDataError, BadSpecError, InfluenceError, NonFiniteError, StoreDamagedError, StoreMismatchError,
)
from influence.features import ClassificationTask, Projector, ProjectorSpec, Task, make_projector, select_parameters
from influence.features.specs import BuildSpec, TrakSpec, task_ref
from influence.loading import load_checkpoint, load_data, load_model, load_recorded_data, model_fingerprint, sha256_file
from influence.scoring import METHOD_NAMES, get_method

log = logging.getLogger(__name__)

DEFAULT_ROWS_PER_CHUNK = 1024
TRAIN_SAMPLE = 50_000  # vectors used to train an approximate index
RERANK = 256  # an approximate index's shortlist, re-ranked exactly from the store
NPROBE = 32  # IVF lists searched (FAISS's default of 1 misses most neighbours of gradient features)
EF_SEARCH = 256  # HNSW search depth

# build stages, as StageTimer names them (``influence build --json`` prints them under "stages")
LOAD = "model_and_data_load"  # model, data, checkpoint checks and loads, fingerprints
READ = "data_read"  # reading and checking each batch of images
GRADIENTS = "gradients_and_projection"  # per-example gradients, projected layer by layer as they are produced
WRITES = "writes"  # store chunks, columns and status
TRAK_SOLVE = "trak_solve"  # TRAK's (ΦᵀΦ + λI)⁻¹ per checkpoint, then its cached self-influence
SELF_INFLUENCE = "self_influence"  # the other methods' cached self-influence
INDEXES = "indexes"  # approximate FAISS indexes (exact search builds none)


@dataclass
class StageTimer:
    """Wall-clock seconds per build stage, summed over its repeats, in the order stages first ran.

    ``lap(name)`` charges the time since the previous lap to ``name``, so interleaved stages (read a batch,
    featurize it, write the chunk) are timed without nesting. Passed in by the caller (``influence build --json``
    prints it): the build keeps no timing state of its own.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter, init=False, repr=False)

    def reset(self) -> None:
        """Start the next lap now (time before it is charged to no stage)."""
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def _spec_string(spec: object) -> str | None:
    """Record a spec so later commands can rebuild it; relative file paths become absolute."""
    if not isinstance(spec, str):
        return None
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{os.path.abspath(target)}:{attr}"
    if os.path.exists(spec):
        return os.path.abspath(spec)
    return spec


def _rows_per_chunk(batch_size: int, wanted: int) -> int:
    """The chunk size, a multiple of the batch size, so batches never straddle chunks."""
    return batch_size * max(1, round(wanted / batch_size))


def featurize_batch(
    model: nn.Module, task: Task, names: list[str], projector: Projector, x: torch.Tensor, y: torch.Tensor
) -> dict[str, np.ndarray]:
    """Projected output gradients plus the loss, margin, p_y and dloss/doutput of one batch."""
    with torch.no_grad():
        logits = model(x)
    columns = {
        "loss": task.loss(logits, y), "margin": task.output(logits, y),
        "prob": task.probability(logits, y), "loss_weight": task.loss_weight(logits, y),
    }
    if not torch.isfinite(columns["loss"]).all():
        bad = torch.nonzero(~torch.isfinite(columns["loss"])).flatten()[:5].tolist()
        raise NonFiniteError(f"the loss is NaN or inf for batch rows {bad}; check the checkpoint and the data's value range")
    feats = projector.featurize(model, task, names, x, y)
    if not torch.isfinite(feats).all():
        raise NonFiniteError("gradient features are NaN or inf; check the checkpoint and the data's value range")
    out = {k: v.detach().float().cpu().numpy() for k, v in columns.items()}
    out["features"] = feats.detach().float().cpu().numpy()
    return out


def build(
    model: str | nn.Module,
    data: str | Dataset[Any],
    checkpoints: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    projector: str = "sparse",
    proj_dim: int = 2048,
    params: str = "all",
    lr_weights: Sequence[float] | None = None,
    batch_size: int = 64,
    methods: Iterable[str] = METHOD_NAMES,
    index_factory: str = "Flat",
    task: Task | None = None,
    seed: int = 0,
    dtype: str = "float16",
    trak_lambda: float = 1.0,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    device: str | torch.device = "cpu",
    progress: bool = True,
    preprocessing: Preprocessing | None = None,
    classes: Sequence[str] | None = None,
    model_args: dict[str, Any] | None = None,
    rerank: int = RERANK,
    timer: StageTimer | None = None,
    shard: ShardPlan | None = None,
) -> Path:
    """Build (or resume, or extend with new checkpoints) the store at ``out``; returns its path.

    ``preprocessing`` turns every training image into a model input and is recorded, so queries repeat it.
    ``classes`` names the model's outputs in order (default: the data's own names, else "0".."K-1"); an image
    folder's sub-folders are mapped to them by name. ``model_args`` are the model factory's keyword arguments.
    ``rerank`` is an approximate index's shortlist, re-ranked exactly from the store (0: none). ``timer``, when
    given, receives the seconds spent per stage (model and data load, data reads, per-example gradients with their
    projection, writes, TRAK solve, self-influence, indexes). ``shard`` makes this process one rank of a sharded
    build (``ShardPlan.from_env()`` under torchrun): every rank writes its own whole chunks of the one store, and
    rank 0 creates it and, once all ranks are done, prepares the methods, builds the indexes and completes it.
    """
    methods = list(dict.fromkeys(methods))
    for m in methods:
        get_method(m)
    if not checkpoints:
        raise BadSpecError("give at least one --checkpoint")
    lr_weights = list(lr_weights) if lr_weights is not None else [1.0] * len(checkpoints)
    if len(lr_weights) != len(checkpoints):
        raise BadSpecError(f"--lr-weights has {len(lr_weights)} values for {len(checkpoints)} checkpoints; give one per checkpoint")
    if any(not np.isfinite(w) or w <= 0 for w in lr_weights):
        raise BadSpecError(f"--lr-weights must be positive and finite, got {lr_weights}")
    if batch_size < 1:
        raise BadSpecError(f"--batch-size must be positive, got {batch_size}")
    if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
        raise BadSpecError(f"--rerank must be a non-negative integer, got {rerank!r}")
    if dtype not in FEATURE_DTYPES:
        raise BadSpecError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype}")
    clock = timer if timer is not None else StageTimer()
    clock.reset()
    plan = shard if shard is not None else ShardPlan()
    trak = TrakSpec(float(trak_lambda))
    task = task or ClassificationTask()
    device = rank_device(device, plan)
    progress = progress and plan.is_root  # one bar per build, not one per rank

    with ranks(plan, device) as group, contextlib.ExitStack() as held:
        # A sharded build's root holds the writer lock for the whole build (a one-process caller may hold it already).
        group.together(lambda: held.enter_context(writer_lock(out)) if plan.sharded and plan.is_root else None)
        setup = group.together(lambda: _setup(model, data, checkpoints, out, lr_weights, task, device, plan,
                                              projector=projector, proj_dim=proj_dim, params=params, seed=seed,
                                              batch_size=batch_size, dtype=dtype, rows_per_chunk=rows_per_chunk,
                                              preprocessing=preprocessing, classes=classes, model_args=model_args))
        digest = _digest(setup, out, methods=methods, index_factory=index_factory, rerank=rerank, trak_lambda=trak_lambda)
        views = group.gather((digest, setup.chunks))
        if any(d != digest for d, _ in views):
            raise BadSpecError(f"the ranks were started with different build arguments, models, data or checkpoints "
                               f"(digests {', '.join(d[:12] for d, _ in views)}); start every rank with the same command")
        check_partition([c for _, c in views], -(-setup.n // setup.spec.rows_per_chunk))
        clock.lap(LOAD)

        # Rank 0 creates the store and its arrays; the others open it only after that step has ended everywhere.
        store = group.together(lambda: _open_store(out, setup, plan.sharded) if plan.is_root else None)
        if store is not None:
            held.enter_context(store)
        opened = group.together(lambda: store or FeatureStore.open_shard(out, setup.manifest))
        group.together(lambda: _featurize(opened, setup, task, set(setup.chunks), progress, clock))
        if not plan.is_root:
            return Path(out)  # rank 0 prepares the methods, builds the indexes and marks the store complete

        # TRAK's inverses, cached self-influence, approximate indexes: seconds to minutes, so a bar of its own
        with tqdm(total=2 * len(methods), desc="index", unit="step", disable=None if progress else True, file=None) as bar:
            for m in methods:
                get_method(m).prepare(opened, trak)
                bar.update()
                clock.lap(TRAK_SOLVE if m == "trak" else SELF_INFLUENCE)

            indexes = dict(opened.attrs.get("indexes", {}))
            for m in methods:
                if not (m in indexes and _same_index(indexes[m], index_factory, rerank)):
                    build_method_index(opened, m, index_factory, seed=seed, rerank=rerank)  # switched in as it is written
                bar.update()
                clock.lap(INDEXES)
        opened.mark_complete()
        clock.lap(WRITES)
        return Path(out)


@dataclass
class _Setup:
    """What every rank derives from the build's arguments before anything is written."""

    net: nn.Module
    device: torch.device
    names: list[str]
    dataset: Any
    n: int
    input_shape: tuple[int, ...]
    num_classes: int
    paths: Any
    spec: BuildSpec
    proj: Projector
    manifest: dict[str, Any]
    records: list[dict[str, Any]]
    chunks: list[int]


def _setup(
    model: str | nn.Module, data: str | Dataset[Any], checkpoints: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str], lr_weights: list[float], task: Task, device: torch.device, plan: ShardPlan, *,
    projector: str, proj_dim: int, params: str, seed: int, batch_size: int, dtype: str, rows_per_chunk: int,
    preprocessing: Preprocessing | None, classes: Sequence[str] | None, model_args: dict[str, Any] | None,
) -> _Setup:
    """Load and check the model, data and checkpoints; the store's manifest; this rank's chunks (no writes)."""
    pre = preprocessing or Preprocessing()
    given = _class_list(classes)
    net = load_model(model, model_args).to(device)
    names = select_parameters(net, params)
    dataset = load_data(data, pre, classes=given)
    data_fingerprint, base_n = fingerprint_dataset(dataset), len(dataset)
    dataset = _with_added_rows(Path(out), dataset, data_fingerprint)
    n = len(dataset)
    x0, y0 = batch_of(dataset, 0, 1)
    if x0.ndim != 4:
        raise BadDataError(f"images must be (C, H, W) tensors; got a batch of shape {tuple(x0.shape)}")
    try:
        with torch.no_grad():
            logits0 = net.eval()(x0.to(device))
    except RuntimeError as e:  # shape mismatches surface here as RuntimeError from some layer
        raise BadDataError(
            f"the model cannot run on this data's images of shape {tuple(x0.shape[1:])}: {str(e).strip().splitlines()[0][:160]}"
        ) from None
    num_classes = int(logits0.shape[-1])
    class_names = given or getattr(dataset, "classes", None) or [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise BadDataError(
            f"the data names {len(class_names)} classes ({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''}) "
            f"but the model has {num_classes} outputs; pass --classes with all {num_classes} names in output order"
        )
    paths = getattr(dataset, "paths", None)
    spec = BuildSpec(task=task_ref(task), params=params, projector=ProjectorSpec(projector, int(proj_dim), int(seed)),
                     batch_size=batch_size, rows_per_chunk=_rows_per_chunk(batch_size, min(rows_per_chunk, max(batch_size, base_n))),
                     dtype=dtype)
    chunks = plan.chunks(n, spec.rows_per_chunk)  # an unaligned plan is refused here, before the store exists
    proj = make_projector(spec.projector, net, names)
    manifest = {
        "model_spec": _spec_string(model), "model_fingerprint": model_fingerprint(net), **spec.to_attrs(),
        "param_names": names, "k": proj.dim, "data_spec": _spec_string(data),
        "dataset_fingerprint": data_fingerprint, "n": n, "input_shape": list(x0.shape[1:]), "num_classes": num_classes,
        "classes": list(class_names), "preprocessing": pre.to_attrs(), "model_args": dict(model_args or {}),
    }
    records: list[dict[str, Any]] = [  # the store's checkpoint records (index.store keeps them as plain dicts)
        {"path": str(Path(c).resolve()), "sha256": sha256_file(c) if Path(c).is_file() else None,
         "size": Path(c).stat().st_size if Path(c).is_file() else None, "lr_weight": float(w)}
        for c, w in zip(checkpoints, lr_weights)
    ]
    for c in checkpoints:  # a missing, unreadable or mismatched checkpoint fails before the store is created,
        load_checkpoint(net, c)  # so the corrected command does not meet a half-made store of another model
    if plan.is_root:
        _check_resume(Path(out), spec, manifest, records)
    return _Setup(net, device, names, dataset, n, tuple(x0.shape[1:]), num_classes, paths, spec, proj, manifest, records, chunks)


def _digest(setup: _Setup, out: str | os.PathLike[str], **options: Any) -> str:
    """What the ranks must agree on: the store's manifest, the checkpoints, the output and the build options."""
    doc = {"manifest": setup.manifest, "records": setup.records, "out": os.path.abspath(out),
           "options": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _open_store(out: str | os.PathLike[str], setup: _Setup, sharded: bool) -> FeatureStore:
    """Create or reopen the store (root only): labels, file paths and the arrays of new checkpoints."""
    store = FeatureStore.open_for_write(out, setup.manifest)
    try:
        store.ensure_labels()
        paths, n = setup.paths, setup.n
        if isinstance(paths, list) and len(paths) == n:
            store.set_attrs(paths=write_paths(store.root, [str(p) for p in paths]))
        known = store.checkpoints
        if len(setup.records) < len(known):
            log.warning("store has %d checkpoints; %d given: keeping all stored ones", len(known), len(setup.records))
        for rec in setup.records[len(known):]:
            load_checkpoint(setup.net, rec["path"])  # fail fast on a bad checkpoint before writing anything for it
            store.add_checkpoint(rec)
            store.set_attrs(indexes={})
        if sharded and store.shared_flags():
            raise StoreMismatchError(
                f"store {out} was started before done flags had a file per chunk, and checkpoints "
                f"{', '.join(store.shared_flags())} are unfinished: finish it with one process (the same command without "
                "torchrun), or use a new --out for a sharded build")
        return store
    except BaseException:
        store.close()
        raise


def _featurize(store: FeatureStore, setup: _Setup, task: Task, mine: set[int], progress: bool, clock: StageTimer) -> None:
    """Compute and write this rank's chunks that are not flagged done yet, each whole, then its flag."""
    rows = setup.spec.rows_per_chunk
    todo = [(c, int(i)) for c in store.checkpoint_ids for i in np.flatnonzero(~store.done(c)) if int(i) in mine]
    # disable=None: no bar unless stderr is a terminal (logs and captured stderr stay clean); closed on
    # error too, so an error message starts on its own line.
    bar = tqdm(total=len(todo) * rows, desc="featurize", unit="ex", disable=None if progress else True, file=None)
    try:
        featurize_chunks(store, todo, setup.dataset, setup.net, task, setup.names, setup.proj, batch_size=setup.spec.batch_size,
                         input_shape=setup.input_shape, num_classes=setup.num_classes, device=setup.device, clock=clock, bar=bar)
    finally:
        bar.close()
    clock.lap(WRITES)  # store setup before the loop, and closing the bar


def featurize_chunks(
    store: FeatureStore, todo: Sequence[tuple[str, int]], dataset: SizedDataset, net: nn.Module, task: Task, names: list[str],
    proj: Projector, *, batch_size: int, input_shape: tuple[int, ...], num_classes: int, device: torch.device,
    clock: StageTimer, bar: "tqdm[None]", first_row: int = 0,
) -> None:
    """Featurize and write each ``(checkpoint, chunk)`` of ``todo``, then flag it done: the loop of a build and of an add.

    ``dataset`` holds the store's rows from ``first_row`` on (an add: the appended rows; rows before it in the same
    chunk are already written). Batches start at multiples of ``batch_size`` counted from row 0, so a row's batch,
    and with it every floating-point sum, is the same whether the store was built in one go or appended to.
    """
    current = None
    for ckpt, chunk in todo:
        if ckpt != current:
            stored = store.checkpoints[int(ckpt[1:])]
            load_checkpoint(net, stored["path"], expected_sha256=stored["sha256"]).to(device)
            current = ckpt
            clock.lap(LOAD)
        start, stop = store.chunk_rows(int(chunk))
        lo = max(start, first_row)
        parts: list[dict[str, np.ndarray]] = []
        labels = []
        b = lo
        while b < stop:
            e = min(stop, (b // batch_size + 1) * batch_size)
            x, y = batch_of(dataset, b - first_row, e - first_row)
            _check_batch(x, y, input_shape, num_classes, b - first_row)
            clock.lap(READ)
            parts.append(featurize_batch(net, task, names, proj, x.to(device), y.to(device)))
            labels.append(y.numpy())
            bar.update(len(y))
            clock.lap(GRADIENTS)
            b = e
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        feats = cols.pop("features")  # write_chunk refuses rows that overflow the store's dtype
        store.write_chunk(ckpt, int(chunk), feats, np.concatenate(labels), first=lo if first_row else None, **cols)
        clock.lap(WRITES)


def _with_added_rows(out: Path, dataset: SizedDataset, fingerprint: str) -> SizedDataset:
    """The build's data followed by the rows ``influence add`` appended to the store at ``out`` (reloaded from their
    recorded specs and checked by fingerprint), so a new checkpoint is featurized for every row; else ``dataset``."""
    if not (out / "zarr.json").is_file():
        return dataset
    try:
        attrs = FeatureStore.open(out, allow_incomplete=True).attrs
    except InfluenceError:
        return dataset  # not one of our stores: open_for_write says so
    added = attrs.get("added") or []
    if not added or attrs.get("dataset_fingerprint") != fingerprint:
        return dataset
    refusal = (f"store {out} holds rows added from {{spec}}, which a build does not reload; build all the data and "
               "checkpoints into a new --out")
    parts = [dataset, *load_recorded_data(attrs, str(out), base=False, code_refusal=refusal)]
    return ConcatRows(parts)


def _same_index(record: dict[str, Any], factory: str, rerank: int) -> bool:
    """A stored index can be kept: same factory and (approximate ones) the same re-rank shortlist."""
    if record.get("factory") != factory:
        return False
    return factory == EXACT or record.get("spec", {}).get("rerank") == rerank


PATHS_FILE = "train_paths.json"


def _class_list(classes: Sequence[str] | None) -> list[str] | None:
    if classes is None:
        return None
    names = [str(c).strip() for c in classes]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if not names or dupes or "" in names:
        raise BadSpecError(f"--classes must be distinct non-empty names, got {list(classes)}")
    return names


def write_paths(root: Path, paths: Sequence[str | None], name: str = PATHS_FILE) -> dict[str, Any]:
    """Each training row's file path, in a JSON file beside the store (atomic); returns its record for the attrs.

    A separate file, not an attribute: the attrs are rewritten on every status change, and 10⁶ paths would
    make each rewrite tens of megabytes. ``name``: an add writes a new file, so readers of the old one keep it.
    """
    body = json.dumps({"paths": list(paths)}).encode()
    with atomic_write(root / name) as f:
        f.write(body)
    return {"file": name, "sha256": hashlib.sha256(body).hexdigest(), "count": len(paths)}


def read_paths(root: Path, rec: dict[str, Any]) -> list[str | None]:
    """The paths file ``rec`` names, checked against its recorded sha256 (None: a row from data without files)."""
    try:
        body = (root / rec["file"]).read_bytes()
    except OSError:
        raise StoreDamagedError(f"store {root} lost its {rec['file']}; rebuild it") from None
    if hashlib.sha256(body).hexdigest() != rec["sha256"]:
        raise StoreDamagedError(f"store {root}: {rec['file']} has changed since the build (sha256 differs); rebuild it")
    return [None if p is None else str(p) for p in json.loads(body)["paths"]]


def _check_resume(out: Path, spec: BuildSpec, manifest: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Before anything is written: a store at ``out`` must have the same ``BuildSpec`` and known checkpoints.

    A different model or data set is left to the store's own check, which names it.
    """
    if not (out / "zarr.json").is_file():
        return
    try:
        existing = FeatureStore.open(out, allow_incomplete=True)
        attrs, known = existing.attrs, existing.checkpoints
        saved = BuildSpec.from_attrs(attrs)
    except (InfluenceError, KeyError, TypeError):
        return  # not one of our stores, or another format: open_for_write says so
    if any(attrs.get(k) != manifest[k] for k in ("model_fingerprint", "dataset_fingerprint", "n")):
        return
    spec.check_same(saved, str(out))
    _check_checkpoints(out, known, records)


def _check_checkpoints(out: Path, known: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Known checkpoints must come back in the same order, with the same bytes and learning-rate weights."""
    for old, new in zip(known, records):
        if old["sha256"] != new["sha256"]:
            raise BadSpecError(
                f"checkpoint {new['path']} differs from the one this store was built with at that position "
                f"({old['path']}); pass the same checkpoints in the same order, new ones last"
            )
    old_w = [float(c.get("lr_weight", 1.0)) for c in known]
    new_w = [r["lr_weight"] for r in records[:len(known)]]
    if old_w[:len(new_w)] != new_w:
        raise StoreMismatchError(
            f"store {out} was built with lr_weights={old_w} for its {len(known)} checkpoints but this run has "
            f"--lr-weights {new_w} for them; pass the same --lr-weights (weights of new checkpoints last) to resume or "
            "extend it, or use a new --out for a different build"
        )


def build_method_index(
    store: FeatureStore, method: str, factory: str = "Flat", seed: int = 0, rerank: int = RERANK,
) -> dict[str, Any]:
    """Stream a method's train vectors into a FAISS index, write it as a new generation and switch its record in
    (``FeatureStore.write_index``); return the record.

    The exact default ("Flat") builds nothing: queries scan the store's own rows (``index.search.ExactScan``),
    which gives the same top-k as a float32 ``IndexFlatIP`` copy without holding one per method.
    """
    scorer = get_method(method)(store)
    if factory == EXACT:
        exact = {"factory": EXACT, "search": "store", "spec": IndexSpec(EXACT, "ip", scorer.dim, store.n).to_dict()}
        return store.write_index(method, None, exact)
    # a seeded uniform sample for training IVF/PQ, gathered chunk by chunk (memory: the sample)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(store.n, size=min(store.n, TRAIN_SAMPLE), replace=False))
    parts = []
    for s, e in store.iter_chunks():
        rows = ids[(ids >= s) & (ids < e)] - s
        if len(rows):
            parts.append(scorer.train_vectors(s, e)[rows])
    sample = np.concatenate(parts)
    index = build_index((scorer.train_vectors(s, e) for s, e in store.iter_chunks()), dim=scorer.dim,
                        factory=factory, train_sample=sample, rerank=rerank,
                        nprobe=NPROBE if "IVF" in factory else None, efSearch=EF_SEARCH if "HNSW" in factory else None)
    return store.write_index(method, index, {"factory": factory})


def extend_method_index(store: FeatureStore, method: str, record: dict[str, Any], first: int) -> dict[str, Any]:
    """Add rows ``first:`` of the store to ``method``'s approximate index (the one ``record`` names) and write it as
    a new generation; return its record. Falls back to :func:`build_method_index` for an exact search or an
    index that does not hold exactly rows ``:first``.

    Every method's train vector v_i depends on row i alone (TRAK's inverse and 1/n apply to the query), so the
    old rows' vectors stay valid and an add costs the new rows only; a trained quantizer (IVF centroids, PQ
    codebooks) is kept as trained on the build's sample.
    """
    factory = str(record.get("factory", EXACT))
    spec = IndexSpec.from_dict(record["spec"]) if isinstance(record.get("spec"), dict) else None
    if factory == EXACT or not isinstance(record.get("path"), str) or spec is None or spec.ntotal != first:
        rerank = spec.rerank if spec is not None else RERANK
        return build_method_index(store, method, factory, int(store.attrs["projector"].get("seed", 0)), rerank)
    index = load_index(store.root / record["path"], record)
    scorer = get_method(method)(store)
    for s, e in store.iter_chunks():
        if e > first:
            index.index.add(np.ascontiguousarray(scorer.train_vectors(max(s, first), e), dtype=np.float32))
    grown = SearchIndex(index.index, replace(spec, ntotal=int(index.index.ntotal)))
    return store.write_index(method, grown, {"factory": factory})


def _check_batch(x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...], num_classes: int, offset: int) -> None:
    if tuple(x.shape[1:]) != tuple(shape):
        raise BadDataError(f"example {offset} has shape {tuple(x.shape[1:])}, expected {tuple(shape)} like the first example")
    if not torch.isfinite(x).all():
        raise BadDataError(f"images {offset}..{offset + len(y) - 1} contain NaN or inf")
    if y.min() < 0 or y.max() >= num_classes:
        raise BadDataError(f"labels in {offset}..{offset + len(y) - 1} must lie in [0, {num_classes}), found {int(y.min())}..{int(y.max())}")
