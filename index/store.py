"""The on-disk gradient store: a zarr v3 group with its own commit protocol.

zarr writes each chunk file atomically but knows nothing of a build as a
whole, so the store adds:
status first (``building`` before any data, ``complete`` last); chunk, then
its ``done`` flag, and readers trust flags, never array shapes; a crc32c codec
on feature arrays; one writer at a time through an OS lock (``index.lock``); and a sweep of
stale temp files (zarr's ``*.partial``, ``index.atomic``'s ``.*.tmp``) on resume.

Completion writes a digest manifest (``index.integrity``): every data file's size and
sha256, and a digest of the answer-changing attributes. A complete store is checked
against it on open (metadata, array headers, done flags) and on every read (each chunk
file read must exist with its recorded size; the crc32c codec checks its bytes), so a
deleted chunk is an error, never zarr's fill value. Matrices (TRAK's inverses, caches) and FAISS
index files are written as a new generation beside the live one and switched in by one attribute
write, so readers of the last complete state (served while a writer works) never see them change.
Rows appended by ``influence add`` follow the same rule: every per-row array is grown as a new generation
(chunk files wholly of old rows hard-linked, not copied) and the ``matrices`` attribute maps each array's name
to its live generation. Generations no state a reader may hold names are swept when the next writer starts
(under its lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import secrets
import sys
import shutil
import weakref
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, SupportsInt

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from index import integrity
from index.errors import BadDataError, BadSpecError, InfluenceError, NonFiniteError, StoreDamagedError, StoreIncompleteError, StoreMismatchError
from index.lock import LOCK_NAME as LOCK_NAME  # re-exported: the lock lives in index.lock (stdlib only)
from index.lock import _check_out_dir, _is_temp, _WriterLock
from index.lock import writer_lock as writer_lock

if TYPE_CHECKING:
    from index.search import SearchIndex

FORMAT_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")  # what feature arrays may be stored as (float16 is the default)
INDEX_DIR = "faiss"
_INDEX_FILE = re.compile(r"^(?P<method>[^/.]+)(\.[0-9a-f]{8})?\.index(\.json)?$")  # <method>[.<token>].index[.json]


_FAISS_DECODE_MIN = 1 << 24
"""Stored values (rows × k × checkpoints) from which FAISS's fp16 decoder repays its import (tens of ms) on a scan."""


def _as_float32(rows: Any, store_values: int = _FAISS_DECODE_MIN) -> np.ndarray:
    """Stored rows as float32. float16 goes through FAISS's vectorised fp16 decoder: the same values as numpy's
    cast, several times faster (every scan of the store converts all of its rows). A small store (``store_values``
    below ``_FAISS_DECODE_MIN``) uses numpy's cast unless FAISS is loaded already: a query then never imports FAISS."""
    a = np.asarray(rows)
    if a.dtype != np.float16 or a.ndim != 2 or a.size == 0:
        return np.array(a, dtype=np.float32)  # a copy: callers never share rows a store keeps in memory
    if store_values < _FAISS_DECODE_MIN and "faiss" not in sys.modules:
        return a.astype(np.float32)
    import faiss  # loaded on first use, like index.search: opening a store does not need it

    codes = np.ascontiguousarray(a).view(np.uint8)
    out = faiss.ScalarQuantizer(a.shape[1], faiss.ScalarQuantizer.QT_fp16).decode(codes)
    return np.asarray(out, dtype=np.float32).reshape(a.shape)


def _finite_as(values: Any, dtype: np.dtype[Any], what: str) -> np.ndarray:
    """``values`` cast to the array's ``dtype``, refused unless real and finite there: a row that is NaN, inf,
    or beyond float16's ±65504 would otherwise be stored as inf and turn every score it enters into NaN."""
    a = np.asarray(values)
    if a.dtype.kind not in "biuf":
        raise BadDataError(f"{what} must be real numbers, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise NonFiniteError(f"{what} contain NaN or inf")
    with np.errstate(over="ignore"):
        cast = a.astype(dtype, copy=False)
    if cast.dtype.kind == "f" and not np.isfinite(cast).all():
        big = float(np.max(np.abs(a)))
        raise NonFiniteError(f"{what} overflow {dtype} (largest |value| {big:.4g}, the limit is {float(np.finfo(dtype).max):.6g}); "
                             f"store them as float32 (build --dtype float32, into a new --out)")
    return cast


class StoreStatus(str, Enum):
    BUILDING = "building"
    COMPLETE = "complete"


def _sweep_temp(root: Path) -> None:
    """Remove the temp files a killed writer left under ``root`` (the caller holds the lock)."""
    for pattern in ("*.partial", ".*.tmp"):
        for p in root.rglob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)


class FeatureStore:
    """Feature arrays per checkpoint, per-example metadata, and the manifest in the group attributes.

    Open for reading with :meth:`open` (refuses an incomplete store) or for
    writing with :meth:`open_for_write` (takes the writer lock).
    """

    def __init__(self, root: Path, group: zarr.Group, lock: _WriterLock | None = None) -> None:
        self.root, self.group, self._lock = root, group, lock
        self._kept: dict[tuple[str, int, int], np.ndarray] = {}  # feature chunks as stored (see keep_in_memory)
        self._keep_bytes = self._kept_bytes = 0
        self._files: dict[str, list[Any]] | None = None  # the verified manifest of a complete store opened to read
        self._snapshot: dict[str, Any] | None = None  # the last complete attributes, served while a writer extends
        self._fresh: set[str] = set()  # generations this writer made: no complete state names them, so they may go
        self._unpinned = 0  # files the served state names that could not be opened to pin them
        self._pinned: dict[str, int] = {}  # generation file (relative path) -> descriptor held, shared-locked, by a reader
        weakref.finalize(self, _close_all, self._pinned)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> "FeatureStore":
        """Open to read: a complete store, or (while a writer works) its last complete state.

        A writer may switch states between our read of zarr.json and our reads of the files it names (the
        manifest, headers, generations): when a check fails or a named file is gone and zarr.json has been
        replaced meanwhile, the open starts again from the new zarr.json.
        """
        root = Path(path)
        for attempt in range(_OPEN_TRIES):
            seen = _identity(root / "zarr.json")
            try:
                store = cls._open_once(root, allow_incomplete)
            except (StoreDamagedError, StoreIncompleteError):
                if attempt + 1 < _OPEN_TRIES and _identity(root / "zarr.json") != seen:
                    continue
                raise
            if not store._unpinned or attempt + 1 == _OPEN_TRIES or _identity(root / "zarr.json") == seen:
                return store
        raise AssertionError("unreachable")

    @classmethod
    def _open_once(cls, root: Path, allow_incomplete: bool) -> "FeatureStore":
        if not (root / "zarr.json").is_file():
            raise StoreIncompleteError(f"{root} is not an influence store (no zarr.json); build one with `influence build`")
        try:
            group = zarr.open_group(str(root), mode="r")
            attrs = dict(group.attrs)
        except Exception as e:
            raise StoreDamagedError(f"store {root} is unreadable ({type(e).__name__}); rebuild it") from None
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreIncompleteError(f"{root} is not an influence store of format {FORMAT_VERSION} (found {attrs.get('format_version')!r})")
        store = cls(root, group)
        if attrs.get("status") == StoreStatus.COMPLETE.value:
            store._files = integrity.check_open(root, attrs)["files"]
        elif not allow_incomplete:
            store._serve_last_complete(attrs)
        if store._files is not None:
            store._pin_generations()
        return store

    def _pin_generations(self) -> None:
        """Hold the generations the served state names for as long as this handle lives: a shared ``flock`` on
        each FAISS file and each matrix generation's header, which a writer's sweep will not delete (it takes an
        exclusive one first). The FAISS file is also loaded through this descriptor (``index_file``)."""
        indexes, matrices = self._meta.get("indexes", {}), self._meta.get("matrices", {})
        paths = [r.get("path") for r in indexes.values() if isinstance(r, dict)] if isinstance(indexes, dict) else []
        paths += [f"{m}/zarr.json" for m in matrices.values() if isinstance(m, str)] if isinstance(matrices, dict) else []
        for rel in paths:
            if isinstance(rel, str) and ".." not in rel.split("/") and rel not in self._pinned:
                try:  # a missing file is reported when it is read
                    fd = os.open(self.root / rel, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    self._unpinned += 1
                    continue
                self._pinned[rel] = fd
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:  # refused only while a sweep is deleting it
                    self._unpinned += 1

    def index_file(self, rel: str) -> int | None:
        """The descriptor opened on ``rel`` (a FAISS file of the served state) when the store was opened, if any."""
        return self._pinned.get(rel)

    def _serve_last_complete(self, attrs: dict[str, Any]) -> None:
        """A store being extended or rebuilt keeps serving its last complete state, when that is still intact.

        Its manifest holds those attributes; the arrays they name are checked as for a complete store (headers
        and done flags now, chunk files on read). Anything changed in place since is refused, never mixed in.
        """
        incomplete = StoreIncompleteError(
            f"store incomplete: {self.progress()}; re-run the same `influence build` command to finish it")
        if integrity.ATTR not in attrs:
            raise incomplete
        try:
            doc = integrity.check_open(self.root, attrs, snapshot=True)
        except StoreDamagedError:
            raise incomplete from None
        self._files, self._snapshot = doc["files"], {**doc["attrs"], "status": StoreStatus.COMPLETE.value}

    @classmethod
    def open_for_write(cls, path: str | os.PathLike[str], manifest: dict[str, Any]) -> "FeatureStore":
        """Create the store, or reopen it to resume or extend; refuses a different model/projector/task."""
        root = Path(path)
        _check_out_dir(root)
        root.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(root)
        try:
            _check_out_dir(root)  # again under the lock: another writer may have filled it meanwhile
            head: dict[str, Any] = {"format_version": FORMAT_VERSION, "status": StoreStatus.BUILDING.value}
            if (root / "zarr.json").is_file():
                group = zarr.open_group(str(root), mode="r+")
                store = cls(root, group, lock)
                if "format_version" not in group.attrs and _only_group_header(root):
                    store.set_attrs(**head)  # a writer killed right after creating the group: adopt it
                store._check_compatible(manifest)
                store._sweep_partials()
                store.sweep_generations()
            else:
                _sweep_temp(root)  # a first build killed before its group header was in place
                # One write creates the group with its format and status (never mode="w": it deletes the lock file).
                group = zarr.create_group(str(root), attributes=head)
                store = cls(root, group, lock)
            # One zarr.json write says building and records the build's spec: nothing is written before it.
            store.set_attrs(**{**{key: value for key, value in manifest.items() if key != "checkpoints"}, **head})
            return store
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open_shard(cls, path: str | os.PathLike[str], manifest: dict[str, Any]) -> "FeatureStore":
        """Open a store that another rank created and holds the writer lock of, to write the chunks this rank owns.

        Takes no lock and writes no attributes: only :meth:`write_chunk` of whole chunks, whose files (done flags
        included) no other rank writes. The store must carry this build's manifest (rank 0 wrote it).
        """
        root = Path(path)
        if not (root / "zarr.json").is_file():
            raise StoreIncompleteError(f"{root} has no store: the rank that creates it (rank 0) has not made it")
        store = cls(root, zarr.open_group(str(root), mode="r+"))
        if store.group.attrs.get("status") != StoreStatus.BUILDING.value:
            raise StoreIncompleteError(f"store {root} is not being built (status {store.group.attrs.get('status')!r})")
        store._check_compatible(manifest)
        return store

    @classmethod
    def open_to_extend(cls, path: str | os.PathLike[str]) -> "FeatureStore":
        """Reopen an existing store to append rows (takes the writer lock, sweeps temp files; writes nothing)."""
        root = Path(path)
        if not (root / "zarr.json").is_file():
            raise StoreIncompleteError(f"{root} is not an influence store (no zarr.json); build one with `influence build`")
        lock = _WriterLock(root)
        try:
            store = cls(root, zarr.open_group(str(root), mode="r+"), lock)
            store._sweep_partials()
            store.sweep_generations()
            return store
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_compatible(self, manifest: dict[str, Any]) -> None:
        attrs = dict(self.group.attrs)
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError(f"{self.root} holds a store of another format; choose a new --out")
        for key in ("model_fingerprint", "task", "params", "projector", "dataset_fingerprint", "rows_per_chunk", "n"):
            saved, new = attrs.get(key), manifest.get(key)
            if saved is not None and saved != new:
                raise StoreMismatchError(
                    f"store {self.root} was built with {key}={json.dumps(saved)} but this run has {key}={json.dumps(new)}; "
                    "use a new --out for a different model, data or projector"
                )

    def _sweep_partials(self) -> None:
        """Remove temp files a killed writer leaves behind: zarr's ``*.partial``, ``atomic_write``'s ``.*.tmp`` (we hold the lock)."""
        _sweep_temp(self.root)

    # ------------------------------------------------------------------ manifest
    @property
    def _meta(self) -> Any:
        """The attributes this handle serves: the group's, or the last complete ones while a writer works."""
        return self._snapshot if self._snapshot is not None else self.group.attrs

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._meta)

    def set_attrs(self, **values: Any) -> None:
        """Set several attributes in ONE zarr.json write (``attrs.update`` writes the file once per key), so a
        reader never sees some of them new and others old (a new status with the old manifest)."""
        self.group.update_attributes(values)

    @property
    def status(self) -> str:
        return str(self._meta.get("status"))

    def mark_complete(self, drop: tuple[str, ...] = ()) -> None:
        """The last write of a build: only now may readers use the store (``drop``: attributes of the writer's own
        bookkeeping, removed in the same write)."""
        for ckpt in self.checkpoint_ids:
            if not self.done(ckpt).all():
                raise StoreIncompleteError(f"cannot mark complete: {self.progress()}")
        # The manifest first, then one zarr.json write switches status and manifest together.
        previous = self.group.attrs.get(integrity.ATTR)
        attrs = {k: v for k, v in self.attrs.items() if k not in drop}
        record = integrity.write_manifest(self.root, attrs, previous=previous)
        if any(k in self.attrs for k in drop):  # one write of all attributes, without the dropped ones
            self.group.attrs.put({**attrs, "status": StoreStatus.COMPLETE.value, integrity.ATTR: record})
        else:
            self.set_attrs(status=StoreStatus.COMPLETE.value, **{integrity.ATTR: record})
        if record != previous:  # a re-run that changed nothing keeps the store as it was, older manifest included
            integrity.sweep_manifests(self.root, keep=record["manifest"], previous=previous)

    def _int_attr(self, key: str) -> int:
        value = self._meta[key]
        if not isinstance(value, SupportsInt):
            raise StoreDamagedError(f"store {self.root} has {key}={value!r} in its manifest, not an integer; rebuild it")
        return int(value)

    @property
    def n(self) -> int:
        return self._int_attr("n")

    @property
    def k(self) -> int:
        return self._int_attr("k")

    @property
    def rows_per_chunk(self) -> int:
        return self._int_attr("rows_per_chunk")

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        records = self._meta.get("checkpoints", [])
        if isinstance(records, list):
            found = [r for r in records if isinstance(r, dict)]
            if len(found) == len(records):
                return found
        raise StoreDamagedError(f"store {self.root} has checkpoints={records!r} in its manifest, not a list of records; rebuild it")

    @property
    def _values(self) -> int:
        """Feature values the store holds (rows × k × checkpoints): how much a full scan decodes."""
        return self.n * self.k * len(self.checkpoints)

    @property
    def checkpoint_ids(self) -> list[str]:
        return [c["id"] for c in self.checkpoints]

    def n_chunks(self) -> int:
        return -(-self.n // self.rows_per_chunk)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.rows_per_chunk
        return start, min(self.n, start + self.rows_per_chunk)

    def progress(self) -> str:
        """How far a build got, for messages; a build killed before it recorded its sizes or arrays says so."""
        try:
            total = self.n_chunks() * max(1, len(self.checkpoints))
            done = sum(int(self.done(c).sum()) for c in self.checkpoint_ids) if self.checkpoints else 0
        except (KeyError, InfluenceError):
            return f"no chunk written yet, status {self.status}"
        return f"{done}/{total} chunks written, status {self.status}"

    # ------------------------------------------------------------------ arrays
    def add_checkpoint(self, record: dict[str, Any]) -> str:
        """Append a checkpoint record and create its (empty) arrays; returns its id."""
        ckpt = f"c{len(self.checkpoints)}"
        rows, k, n = self.rows_per_chunk, self.k, self.n
        dtype = self.group.attrs.get("dtype", "float16")
        if not isinstance(dtype, str):
            raise StoreDamagedError(f"store {self.root} has dtype={dtype!r} in its manifest, not a dtype name; rebuild it")
        self.group.create_array(f"features/{ckpt}", shape=(n, k), chunks=(rows, k), dtype=dtype,
                                compressors=[Crc32cCodec()], fill_value=0, overwrite=True)
        for name in ("loss", "margin", "prob", "loss_weight"):
            self.group.create_array(f"{name}/{ckpt}", shape=(n,), chunks=(rows,), dtype="float32",
                                    compressors=[Crc32cCodec()], fill_value=0, overwrite=True)
        # one file per row chunk's flag: ranks of a sharded build set their own chunks' flags concurrently
        self.group.create_array(f"done/{ckpt}", shape=(self.n_chunks(),), chunks=(1,), dtype="bool",
                                fill_value=False, overwrite=True)
        # The record is written after its arrays exist, so a reader never sees a checkpoint without them.
        self.group.attrs["checkpoints"] = self.checkpoints + [{**record, "id": ckpt}]
        return ckpt

    def ensure_labels(self) -> None:
        if "labels" not in self.group:
            self.group.create_array("labels", shape=(self.n,), chunks=(self.rows_per_chunk,), dtype="int64",
                                    compressors=[Crc32cCodec()], fill_value=-1)

    def _array(self, key: str) -> zarr.Array[Any]:
        """The array at ``key``'s live generation (a group there means the store's layout is damaged)."""
        node = self.group[self.matrix_key(key)]
        if not isinstance(node, zarr.Array):
            raise StoreDamagedError(f"store {self.root} has a group at {key}, where an array belongs; rebuild it")
        return node

    def _read(self, key: str, rows: slice | np.ndarray | None = None, select: Any = None, full: bool = False) -> np.ndarray:
        """Read ``key`` (``rows`` of axis 0, or all) after checking each chunk file it touches against the manifest.

        A chunk file recorded at completion must still be there with its size (zarr would read a missing one
        as its fill value); the crc32c codec then checks its bytes. Either failure is StoreDamagedError.
        """
        key = self.matrix_key(key)
        arr = self._array(key)
        if self._files is not None:
            # while a writer works on the store, every chunk read is compared by sha256 (it may rewrite in place)
            integrity.check_chunks(self.root, key, arr, rows, self._files, full=full or self._snapshot is not None)
        try:
            if select is not None:
                return np.asarray(select(arr))
            return np.asarray(arr[rows if rows is not None else slice(None)])
        except (ValueError, OSError) as e:
            raise StoreDamagedError(
                f"store {self.root} is damaged: reading {key} failed ({type(e).__name__}: {str(e)[:80]}); "
                f"run `influence verify {self.root}` and rebuild it"
            ) from None

    def done(self, ckpt: str) -> np.ndarray:
        return np.asarray(self._read(f"done/{ckpt}"), dtype=bool)

    def shared_flags(self) -> list[str]:
        """Checkpoints with chunks still to write whose done flags share one file (stores made before one file per
        chunk): concurrent writers of such a store would overwrite each other's flags."""
        return [c for c in self.checkpoint_ids
                if self._array(f"done/{c}").chunks != (1,) and not self.done(c).all()]

    def write_chunk(self, ckpt: str, chunk: int, features: np.ndarray, labels: np.ndarray, first: int | None = None,
                    **columns: np.ndarray) -> None:
        """Write one whole row chunk (from row ``first`` on when given: an add's rows after the ones already
        there), then (and only then) its done flag.

        Checked before anything is written: shapes, integer labels, and rows and columns real and finite in the
        arrays' dtypes (``BadDataError`` / ``NonFiniteError``), so a refused chunk leaves the store as it was.
        """
        start, stop = self.chunk_rows(chunk)
        start = start if first is None else max(start, first)
        where = f"chunk {chunk} of checkpoint {ckpt} in store {self.root}"
        if np.shape(features) != (stop - start, self.k):
            raise BadDataError(f"{where} needs features of shape {(stop - start, self.k)}, got {np.shape(features)}")
        if np.shape(labels) != (stop - start,) or np.asarray(labels).dtype.kind not in "iu":
            raise BadDataError(f"{where} needs integer labels of shape {(stop - start,)}, got {np.asarray(labels).dtype} {np.shape(labels)}")
        arr = self._array(f"features/{ckpt}")
        rows = _finite_as(features, arr.dtype, f"features for {where}")
        values = {name: _finite_as(v, self._array(f"{name}/{ckpt}").dtype, f"column {name} for {where}") for name, v in columns.items()}
        arr[start:stop] = rows
        self._array("labels")[start:stop] = labels
        for name, v in values.items():
            self._array(f"{name}/{ckpt}")[start:stop] = v
        self._array(f"done/{ckpt}")[chunk] = True

    def keep_in_memory(self, max_bytes: int) -> None:
        """Keep feature rows read from now on in memory as stored (float16), up to ``max_bytes`` in all.

        For readers of a complete store, whose features never change: repeated exact scans then skip the disk.
        The rows are the store's own, one copy for every method; past the budget, reads stream from disk.
        """
        self._keep_bytes = int(max_bytes)

    def read_features(self, ckpt: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n if stop is None else stop
        key = (ckpt, start, stop)
        raw = self._kept.get(key)
        if raw is None:
            raw = np.asarray(self._read(f"features/{ckpt}", slice(start, stop)))
            if self._kept_bytes + raw.nbytes <= self._keep_bytes:
                self._kept[key] = raw
                self._kept_bytes += raw.nbytes
        return _as_float32(raw, self._values)

    def read_rows(self, ckpt: str, ids: np.ndarray) -> np.ndarray:
        """Features of arbitrary rows (for exact re-ranking of an approximate shortlist)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise StoreIncompleteError(f"row ids out of range [0, {self.n}) requested from store {self.root}")
        return _as_float32(np.asarray(self._read(f"features/{ckpt}", ids, lambda a: a.get_orthogonal_selection((ids, slice(None))))),
                           self._values)

    def column(self, name: str, ckpt: str | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
        key = name if ckpt is None else f"{name}/{ckpt}"
        return self._read(key, slice(start, stop))

    def labels(self) -> np.ndarray:
        return np.asarray(self._read("labels", full=True), dtype=np.int64)  # small, and rewritten by every extension

    def matrix_key(self, key: str) -> str:
        """Where array ``key`` lives now: a matrix write or a row append makes a new generation (``key.<token>``)
        beside the old; an array never rewritten that way lives at ``key`` itself."""
        mapping = self._meta.get("matrices", {})
        actual = mapping.get(key, key) if isinstance(mapping, dict) else key
        if not isinstance(actual, str) or not (actual == key or actual.startswith(f"{key}.")):
            raise StoreDamagedError(f"store {self.root} maps matrix {key} to {actual!r} in its manifest; rebuild it")
        return actual

    def write_matrix(self, key: str, value: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """Write a new generation of ``key`` with its ``attrs``, then switch to it in one zarr.json write.

        The live generation stays untouched, so readers of the last complete state (whose attributes still
        name it) keep reading it whole. Only a generation this writer made itself is deleted when replaced
        (no complete state names it); the rest wait for the sweep at the next writer's start.
        """
        live = self.matrix_key(key) if key in self._meta.get("matrices", {}) else None
        actual = f"{key}.{secrets.token_hex(4)}"
        self._fresh.add(actual)
        self.group.create_array(actual, shape=value.shape, chunks=value.shape, dtype=value.dtype,
                                compressors=[Crc32cCodec()], attributes=attrs or {}, overwrite=True)
        self._array(actual)[...] = value
        self.set_attrs(matrices={**self._meta.get("matrices", {}), key: actual})
        if live is not None and live != actual and live in self._fresh:
            parent, _, name = live.rpartition("/")
            holder = self.group[parent] if parent else self.group
            if isinstance(holder, zarr.Group) and name in holder:
                del holder[name]

    def row_keys(self) -> list[str]:
        """Every per-row array: labels, then each checkpoint's features, columns and done flags."""
        per = ("features", "loss", "margin", "prob", "loss_weight", "done")
        return ["labels"] + [f"{name}/{c}" for c in self.checkpoint_ids for name in per]

    def grow(self, n_new: int, token: str) -> dict[str, str]:
        """New generations ``key.<token>`` of every per-row array for ``n_new`` rows, returned as key → generation.

        The live arrays are not touched: readers of the last complete state keep reading them. Chunk files made
        only of old rows are hard-linked into the new generation (copied where links fail), the old rows of a
        short last chunk are copied, and those chunks are flagged done; the new rows are left to the caller.
        Re-running it with the same token recreates the generations from scratch.
        """
        n_old, rows = self.n, self.rows_per_chunk
        whole = n_old // rows  # chunks wholly of old rows
        n_chunks = -(-n_new // rows)
        made: dict[str, str] = {}
        for key in self.row_keys():
            old = self._array(key)
            new = f"{key}.{token}"
            made[key] = new
            self._fresh.add(new)
            if key.startswith("done/"):  # one file per chunk's flag, as a build makes them
                self.group.create_array(new, shape=(n_chunks,), chunks=(1,), dtype="bool", fill_value=False, overwrite=True)
                if whole:
                    self._array(new)[:whole] = True
                continue
            self.group.create_array(new, shape=(n_new, *old.shape[1:]), chunks=old.chunks, dtype=old.dtype,
                                    compressors=[Crc32cCodec()], fill_value=old.fill_value, overwrite=True)
            src, dst = self.root / self.matrix_key(key), self.root / new
            rest = [range(-(-s // c)) for s, c in zip(old.shape[1:], old.chunks[1:])]
            for i in range(whole):
                for coord in itertools.product([i], *rest):
                    name = old.metadata.encode_chunk_key(coord)
                    _link_or_copy(src / name, dst / name)
            if n_old > whole * rows:
                self._array(new)[whole * rows : n_old] = old[whole * rows : n_old]
        return made

    def matrix_attrs(self, key: str) -> dict[str, Any] | None:
        """The attributes written with matrix ``key`` (None when there is no such matrix)."""
        actual = self.matrix_key(key)
        if actual not in self.group:
            return None
        return dict(self._array(actual).attrs)

    def read_matrix(self, key: str) -> np.ndarray:
        actual = self.matrix_key(key)
        if actual not in self.group:
            if self._files is not None and f"{actual}/zarr.json" in self._files:
                raise StoreDamagedError(f"store {self.root}: {actual}, which this session's state names, was swept by "
                                        "later rebuilds since the session opened the store; open the store again")
            raise StoreIncompleteError(f"store {self.root} has no {key}; rebuild with the method that needs it")
        return self._read(actual, full=True)

    def write_cache(self, key: str, value: np.ndarray, valid_for: str) -> None:
        """Store a derived array (e.g. self-influence) that is valid only for the inputs ``valid_for`` names.

        Written as a new generation with its ``valid_for`` stamp and switched in by one metadata write (see
        :meth:`write_matrix`), so a write killed half-way leaves the old cache live or none. Only a writer (a
        build, under the lock, while the store says ``building``) calls this.
        """
        self.write_matrix(key, value, attrs={"valid_for": valid_for})

    def read_cache(self, key: str, valid_for: str) -> np.ndarray | None:
        """The array written by :meth:`write_cache` for the same ``valid_for``; None if missing or stale."""
        if key not in self._meta.get("matrices", {}):
            return None
        attrs = self.matrix_attrs(key)
        if attrs is None or attrs.get("valid_for") != valid_for:
            return None
        return self.read_matrix(key)

    def iter_chunks(self) -> Iterator[tuple[int, int]]:
        for c in range(self.n_chunks()):
            yield self.chunk_rows(c)

    @property
    def index_dir(self) -> Path:
        d = self.root / INDEX_DIR
        d.mkdir(exist_ok=True)
        return d

    def write_index(self, method: str, index: "SearchIndex | None", record: dict[str, Any]) -> dict[str, Any]:
        """Write ``method``'s FAISS index as a new generation, then switch its record in by one zarr.json write.

        The file is ``faiss/<method>.<token>.index`` (with the spec beside it), never the live one's name, so a
        reader of the last complete state keeps loading the file its record names, with its size and sha256.
        ``index`` None records an exact search with no file. Returns the record (``path``, ``size``, ``sha256``,
        ``spec`` from the file, plus ``record``'s own keys).
        """
        if not _INDEX_FILE.match(f"{method}.index"):
            raise BadSpecError(f"method name {method!r} cannot name an index file")
        if index is not None:
            from index.search import save_index  # FAISS is loaded on first use: opening a store does not need it

            rel = f"{INDEX_DIR}/{method}.{secrets.token_hex(4)}.index"
            self._fresh.add(rel)
            saved = save_index(index, self.index_dir / rel.split("/", 1)[1])
            record = {**saved, **record, "path": rel}
        indexes = self._meta.get("indexes", {})
        old = indexes.get(method) if isinstance(indexes, dict) else None
        self.set_attrs(indexes={**(indexes if isinstance(indexes, dict) else {}), method: record})
        old_path = old.get("path") if isinstance(old, dict) else None
        if isinstance(old_path, str) and old_path in self._fresh and old_path != record.get("path"):
            for p in (self.root / old_path, self.root / f"{old_path}.json"):
                p.unlink(missing_ok=True)
        return record

    def _named_generations(self) -> set[str] | None:
        """Matrix generations and index files that a state a reader may hold names: the live attributes and the
        attribute copies in the manifests kept (the last complete state and the one before). None if one cannot
        be read: then nothing is deleted."""
        states = [dict(self.group.attrs)]
        for p in self.root.glob(f"{integrity.MANIFEST_PREFIX}*.json"):
            try:
                states.append(json.loads(p.read_bytes())["attrs"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        named: set[str] = set()
        for attrs in states:
            if not isinstance(attrs, dict):
                return None
            matrices, indexes = attrs.get("matrices", {}), attrs.get("indexes", {})
            if not isinstance(matrices, dict) or not isinstance(indexes, dict):
                return None
            named.update(v for v in matrices.values() if isinstance(v, str))
            named.update(r["path"] for r in indexes.values() if isinstance(r, dict) and isinstance(r.get("path"), str))
        return named

    def sweep_generations(self) -> None:
        """Delete matrix generations and FAISS files no kept state names (a writer starting, under the lock).

        Superseded generations wait here rather than at the switch, so readers opened on the state before keep
        them through the next build; orphans of a killed writer (never switched in) go too. An array's first
        generation (its plain name) is never deleted, even once an add has grown it into a new one: readers of
        older states do not pin it, and its whole chunks are hard links the live generation shares.
        """
        named = self._named_generations()
        if named is None:
            return
        for header in sorted(self.root.rglob("zarr.json")):
            array = header.parent.relative_to(self.root).as_posix()
            if integrity.is_generation(array) and array not in named:
                _unless_pinned(header, lambda: shutil.rmtree(header.parent, ignore_errors=True))
        d = self.root / INDEX_DIR
        if d.is_dir():
            for p in sorted(d.iterdir()):
                rel = f"{INDEX_DIR}/{p.name.removesuffix('.json')}"
                if p.is_file() and _INDEX_FILE.match(p.name) and rel not in named:
                    _unless_pinned(self.root / rel, lambda: p.unlink(missing_ok=True))


def _unless_pinned(path: Path, delete: Callable[[], object]) -> None:
    """``delete()`` holding an exclusive ``flock`` on ``path``; skipped while a reader pins the file (shared lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        delete()  # nothing left to pin (a header-less orphan, or a spec file whose index is gone)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return  # a session still reads this generation: left for a later sweep
    try:
        delete()
    finally:
        os.close(fd)


_OPEN_TRIES = 5


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which zarr.json this is: every write replaces the file, so a new write gives a new inode or mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of ``src`` at ``dst`` (no bytes copied), or a copy where the file system refuses links."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _only_group_header(root: Path) -> bool:
    """True when ``root`` holds nothing but the group's zarr.json (and the lock): a store killed at creation."""
    return all(p.name in ("zarr.json", LOCK_NAME) or _is_temp(p.name) for p in root.iterdir())
