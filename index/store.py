"""The on-disk gradient store: a zarr v3 group with its own commit protocol.

zarr writes each chunk file atomically but knows nothing of a build as a
whole, so the store adds:
status first (``building`` before any data, ``complete`` last); chunk, then
its ``done`` flag, and readers trust flags, never array shapes; a crc32c codec
on feature arrays; one writer at a time through an OS lock; and a sweep of
zarr's stale ``*.partial`` temp files on resume.
"""

from __future__ import annotations

import fcntl
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, SupportsInt

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from index.errors import BadSpecError, StoreDamagedError, StoreIncompleteError, StoreLockedError, StoreMismatchError

FORMAT_VERSION = 1
LOCK_NAME = ".influence.lock"
FEATURE_DTYPES = ("float16", "float32")  # what feature arrays may be stored as (float16 is the default)


def _as_float32(rows: Any) -> np.ndarray:
    """Stored rows as float32. float16 goes through FAISS's vectorised fp16 decoder: the same values as numpy's
    cast, several times faster (every scan of the store converts all of its rows)."""
    a = np.asarray(rows)
    if a.dtype != np.float16 or a.ndim != 2 or a.size == 0:
        return np.array(a, dtype=np.float32)  # a copy: callers never share rows a store keeps in memory
    import faiss  # loaded on first use, like index.search: opening a store does not need it

    codes = np.ascontiguousarray(a).view(np.uint8)
    out = faiss.ScalarQuantizer(a.shape[1], faiss.ScalarQuantizer.QT_fp16).decode(codes)
    return np.asarray(out, dtype=np.float32).reshape(a.shape)


class StoreStatus(str, Enum):
    BUILDING = "building"
    COMPLETE = "complete"


class _WriterLock:
    """``fcntl.flock`` on a file in the store: released by the OS if the holder dies."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise StoreLockedError(f"store {root} is locked by pid {holder} (another build is writing it); wait for it to finish") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class FeatureStore:
    """Feature arrays per checkpoint, per-example metadata, and the manifest in the group attributes.

    Open for reading with :meth:`open` (refuses an incomplete store) or for
    writing with :meth:`open_for_write` (takes the writer lock).
    """

    def __init__(self, root: Path, group: zarr.Group, lock: _WriterLock | None = None) -> None:
        self.root, self.group, self._lock = root, group, lock
        self._kept: dict[tuple[str, int, int], np.ndarray] = {}  # feature chunks as stored (see keep_in_memory)
        self._keep_bytes = self._kept_bytes = 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> "FeatureStore":
        root = Path(path)
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
        if not allow_incomplete and attrs.get("status") != StoreStatus.COMPLETE.value:
            raise StoreIncompleteError(f"store incomplete: {store.progress()}; re-run the same `influence build` command to finish it")
        return store

    @classmethod
    def open_for_write(cls, path: str | os.PathLike[str], manifest: dict[str, Any]) -> "FeatureStore":
        """Create the store, or reopen it to resume or extend; refuses a different model/projector/task."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise BadSpecError(f"--out {root} exists and is not a directory; choose a new path")
        root.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(root)
        try:
            if (root / "zarr.json").is_file():
                group = zarr.open_group(str(root), mode="r+")
                store = cls(root, group, lock)
                store._check_compatible(manifest)
                store._sweep_partials()
            else:
                if any(p.name != LOCK_NAME for p in root.iterdir()):
                    raise BadSpecError(f"--out {root} is a non-empty directory that is not an influence store; choose a new path")
                group = zarr.open_group(str(root), mode="w")
                store = cls(root, group, lock)
            # Status first: nothing else is written before the store says it is building.
            store.group.attrs.update({"format_version": FORMAT_VERSION, "status": StoreStatus.BUILDING.value})
            for key, value in manifest.items():
                if key != "checkpoints":
                    store.group.attrs[key] = value
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
        """Remove temp files zarr leaves behind when a writer is killed mid-rename (we hold the lock)."""
        for p in self.root.rglob("*.partial"):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ manifest
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def set_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    @property
    def status(self) -> str:
        return str(self.group.attrs.get("status"))

    def mark_complete(self) -> None:
        """The last write of a build: only now may readers use the store."""
        for ckpt in self.checkpoint_ids:
            if not self.done(ckpt).all():
                raise StoreIncompleteError(f"cannot mark complete: {self.progress()}")
        self.group.attrs["status"] = StoreStatus.COMPLETE.value

    def _int_attr(self, key: str) -> int:
        value = self.group.attrs[key]
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
        records = self.group.attrs.get("checkpoints", [])
        if isinstance(records, list):
            found = [r for r in records if isinstance(r, dict)]
            if len(found) == len(records):
                return found
        raise StoreDamagedError(f"store {self.root} has checkpoints={records!r} in its manifest, not a list of records; rebuild it")

    @property
    def checkpoint_ids(self) -> list[str]:
        return [c["id"] for c in self.checkpoints]

    def n_chunks(self) -> int:
        return -(-self.n // self.rows_per_chunk)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.rows_per_chunk
        return start, min(self.n, start + self.rows_per_chunk)

    def progress(self) -> str:
        total = self.n_chunks() * max(1, len(self.checkpoints))
        done = sum(int(self.done(c).sum()) for c in self.checkpoint_ids) if self.checkpoints else 0
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
        self.group.create_array(f"done/{ckpt}", shape=(self.n_chunks(),), chunks=(self.n_chunks(),), dtype="bool",
                                fill_value=False, overwrite=True)
        # The record is written after its arrays exist, so a reader never sees a checkpoint without them.
        self.group.attrs["checkpoints"] = self.checkpoints + [{**record, "id": ckpt}]
        return ckpt

    def ensure_labels(self) -> None:
        if "labels" not in self.group:
            self.group.create_array("labels", shape=(self.n,), chunks=(self.rows_per_chunk,), dtype="int64",
                                    compressors=[Crc32cCodec()], fill_value=-1)

    def _array(self, key: str) -> zarr.Array[Any]:
        """The array at ``key`` (a group there means the store's layout is damaged)."""
        node = self.group[key]
        if not isinstance(node, zarr.Array):
            raise StoreDamagedError(f"store {self.root} has a group at {key}, where an array belongs; rebuild it")
        return node

    def done(self, ckpt: str) -> np.ndarray:
        return np.asarray(self._array(f"done/{ckpt}")[:], dtype=bool)

    def write_chunk(self, ckpt: str, chunk: int, features: np.ndarray, labels: np.ndarray, **columns: np.ndarray) -> None:
        """Write one whole row chunk, then (and only then) its done flag."""
        start, stop = self.chunk_rows(chunk)
        if features.shape != (stop - start, self.k):
            raise ValueError(f"chunk {chunk} needs features of shape {(stop - start, self.k)}, got {features.shape}")
        arr = self._array(f"features/{ckpt}")
        arr[start:stop] = features.astype(arr.dtype, copy=False)
        self._array("labels")[start:stop] = labels
        for name, values in columns.items():
            self._array(f"{name}/{ckpt}")[start:stop] = values
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
            raw = np.asarray(self._array(f"features/{ckpt}")[start:stop])
            if self._kept_bytes + raw.nbytes <= self._keep_bytes:
                self._kept[key] = raw
                self._kept_bytes += raw.nbytes
        return _as_float32(raw)

    def read_rows(self, ckpt: str, ids: np.ndarray) -> np.ndarray:
        """Features of arbitrary rows (for exact re-ranking of an approximate shortlist)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise StoreIncompleteError(f"row ids out of range [0, {self.n}) requested from store {self.root}")
        return _as_float32(self._array(f"features/{ckpt}").get_orthogonal_selection((ids, slice(None))))

    def column(self, name: str, ckpt: str | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
        key = name if ckpt is None else f"{name}/{ckpt}"
        return np.asarray(self._array(key)[start:stop])

    def labels(self) -> np.ndarray:
        return np.asarray(self._array("labels")[:], dtype=np.int64)

    def write_matrix(self, key: str, value: np.ndarray) -> None:
        self.group.create_array(key, shape=value.shape, chunks=value.shape, dtype=value.dtype,
                                compressors=[Crc32cCodec()], overwrite=True)
        self._array(key)[...] = value

    def read_matrix(self, key: str) -> np.ndarray:
        if key not in self.group:
            raise StoreIncompleteError(f"store {self.root} has no {key}; rebuild with the method that needs it")
        return np.asarray(self._array(key)[...])

    def write_cache(self, key: str, value: np.ndarray, valid_for: str) -> None:
        """Store a derived array (e.g. self-influence) that is valid only for the inputs ``valid_for`` names.

        Data first, the ``valid_for`` stamp last: the old array (and its stamp) is removed before the new
        data is written, so a write killed half-way leaves an array without a stamp, which reads as stale.
        Only a writer (a build, under the lock, while the store says ``building``) calls this.
        """
        self.write_matrix(key, value)
        self._array(key).attrs["valid_for"] = valid_for

    def read_cache(self, key: str, valid_for: str) -> np.ndarray | None:
        """The array written by :meth:`write_cache` for the same ``valid_for``; None if missing or stale."""
        if key not in self.group:
            return None
        arr = self._array(key)
        if arr.attrs.get("valid_for") != valid_for:
            return None
        return np.asarray(arr[...])

    def iter_chunks(self) -> Iterator[tuple[int, int]]:
        for c in range(self.n_chunks()):
            yield self.chunk_rows(c)

    @property
    def index_dir(self) -> Path:
        d = self.root / "faiss"
        d.mkdir(exist_ok=True)
        return d
