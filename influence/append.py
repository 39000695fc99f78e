"""Append training rows to a complete store (``influence add``) without rebuilding it.

New rows get the next ids and are featurized at every checkpoint the store holds, with its recorded model,
projector, seed and preprocessing, by the build's own chunk loop. Every per-row array is grown as a new
generation beside the live one (chunk files of old rows are hard-linked), TRAK's stored ΦᵀΦ is updated by
the new rows' ΦᵀΦ, self-influence caches and indexes are redone, and completion switches everything in with
one zarr.json write. Until then readers are served the last complete state; a killed add is finished by
running the same command again.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from index import integrity
from index.store import FeatureStore, StoreStatus
from influence.data import Preprocessing, fingerprint_dataset
from influence.errors import StoreIncompleteError
from influence.features import Task, make_projector
from influence.features.specs import BuildSpec, TrakSpec, resolve_task
from influence.loading import load_data
from influence.pipeline import (
    INDEXES, LOAD, SELF_INFLUENCE, TRAK_SOLVE, WRITES, StageTimer, _spec_string, extend_method_index, featurize_chunks,
    read_paths, write_paths,
)
from influence.query import store_model
from influence.scoring import TRAK, get_method

PENDING = "adding"  # the attribute an unfinished add keeps its plan in (removed by the completing write)


def add(
    store: str | os.PathLike[str],
    data: str | Dataset[Any],
    *,
    model: str | nn.Module | None = None,
    task: Task | None = None,
    trust_store: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    timer: StageTimer | None = None,
) -> Path:
    """Append the examples of ``data`` to the complete store at ``store``; returns its path.

    Labels are mapped to the store's classes by name (an unknown class is an error, never a renumbering). The
    model is the recorded one when built-in or when ``trust_store`` (else pass ``model``, checked by fingerprint);
    a store built with a custom ``Task`` needs an instance of it as ``task``.
    """
    root = Path(store)
    clock = timer if timer is not None else StageTimer()
    clock.reset()
    base = FeatureStore.open(root).attrs  # the last complete state (also while an earlier add is unfinished)
    dev = torch.device(device)
    net = store_model(root, base, model, trust_store).to(dev)
    task = resolve_task(base.get("task"), task)
    spec = BuildSpec.from_attrs(base)
    names = list(base["param_names"])
    proj = make_projector(spec.projector, net, names)
    shape = tuple(int(s) for s in base["input_shape"])
    dataset = load_data(data, Preprocessing.from_attrs(base.get("preprocessing")), classes=base["classes"], shape=shape,
                        reference="the store's images",
                        advice="an add applies the store's recorded preprocessing only: convert the new images to "
                               f"{'×'.join(str(v) for v in shape)} (channels×H×W) first, or build a new store with --size/--channels")
    n_old = int(base["n"])
    plan: dict[str, Any] = {"dataset_fingerprint": fingerprint_dataset(dataset), "n_old": n_old, "rows": len(dataset)}
    clock.lap(LOAD)

    with FeatureStore.open_to_extend(root) as w:
        pending: Any = w.group.attrs.get(PENDING)
        if not (isinstance(pending, dict) and all(pending.get(k) == v for k, v in plan.items())):
            if w.group.attrs.get("status") != StoreStatus.COMPLETE.value and not isinstance(pending, dict):
                raise StoreIncompleteError(
                    f"store {root} is being extended by an unfinished `influence build`; re-run that build before adding data")
            # a new add (an unfinished one of other data is abandoned: its generations are swept below)
            if FeatureStore.open(root).attrs["n"] != base["n"]:
                raise StoreIncompleteError(f"store {root} changed while this add started; run the same command again")
            pending = {**plan, "token": secrets.token_hex(4), "created": False}
            # One write: building (readers now get the last complete state), with that state's attributes (an
            # abandoned add may have changed them) and this add's plan.
            kept = {k: v for k, v in base.items() if k != "status"}
            w.group.attrs.put({**kept, "status": StoreStatus.BUILDING.value,
                               integrity.ATTR: w.group.attrs[integrity.ATTR], PENDING: pending})
        if not pending["created"]:
            _create(w, base, pending, dataset, data)
        todo = [(c, int(i)) for c in w.checkpoint_ids for i in np.flatnonzero(~w.done(c))]
        bar = tqdm(total=len(todo) * w.rows_per_chunk, desc="add", unit="ex", disable=None if progress else True)
        try:
            featurize_chunks(w, todo, dataset, net, task, names, proj, batch_size=spec.batch_size, input_shape=shape,
                             num_classes=int(base["num_classes"]), device=dev, clock=clock, bar=bar, first_row=n_old)
        finally:
            bar.close()
        _prepare(w, n_old, clock)
        w.mark_complete(drop=(PENDING,))
        clock.lap(WRITES)
    return root


def _create(w: FeatureStore, base: dict[str, Any], pending: dict[str, Any], dataset: Any, data: object) -> None:
    """Grow every per-row array as a new generation and record the new rows, in one attribute write at the end."""
    live = dict(base.get("matrices", {}))
    token, n_new = pending["token"], pending["n_old"] + pending["rows"]
    w.sweep_generations()  # an abandoned add's generations, no longer named since this add's first write
    grown = w.grow(n_new, token)
    values: dict[str, Any] = {
        "n": n_new, "matrices": {**live, **grown},
        "added": [*base.get("added", []), {"data_spec": _spec_string(data), "dataset_fingerprint": pending["dataset_fingerprint"],
                                           "n": pending["rows"]}],
    }
    new_paths = getattr(dataset, "paths", None)
    old = read_paths(w.root, base["paths"]) if base.get("paths") else None
    if old is not None or isinstance(new_paths, list):
        rows: list[str | None] = old if old is not None else [None] * int(base["n"])
        # Each added row's path carries its folder as given to --data: relative names alone are ambiguous once
        # rows come from several folders (a build's rows are relative to its own --data folder).
        folder = str(data) if isinstance(data, (str, os.PathLike)) else ""
        added: list[str | None] = ([os.path.join(folder, str(p)) for p in new_paths] if isinstance(new_paths, list)
                                   else [None] * pending["rows"])
        values["paths"] = write_paths(w.root, rows + added, name=f"train_paths.{token}.json")
    _sweep_files(w.root, keep={(base.get("paths") or {}).get("file"), (values.get("paths") or {}).get("file")},
                 pattern="train_paths*.json")
    w.set_attrs(**values, **{PENDING: {**pending, "created": True}})


def _prepare(w: FeatureStore, first: int, clock: StageTimer) -> None:
    """TRAK's ΦᵀΦ and inverses and self-influence caches for all rows, as the build makes them; every approximate
    index extended by rows ``first:`` (an exact search needs nothing)."""
    indexes = dict(w.attrs.get("indexes", {}))
    lam = TRAK.stored_lambda(w, w.checkpoint_ids[0]) if "trak" in indexes else None
    trak = TrakSpec(lam.rel) if lam else TrakSpec()
    for m in indexes:
        get_method(m).prepare(w, trak)
        clock.lap(TRAK_SOLVE if m == "trak" else SELF_INFLUENCE)
    for m, rec in indexes.items():  # the new rows added to each index, written as a new generation and switched in
        extend_method_index(w, m, rec, first)
    clock.lap(INDEXES)


def _sweep_files(root: Path, keep: set[str | None], pattern: str) -> None:
    for p in root.glob(pattern):
        if p.name not in keep:
            p.unlink(missing_ok=True)
