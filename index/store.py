"""The on-disk gradient store: a zarr v3 group with its own commit protocol.

zarr writes each chunk file atomically but knows nothing of a build as a
whole, so the store adds:
status first (``building`` before any data, ``complete`` last); chunk, then
its ``done`` flag, and readers trust flags, never array shapes; a crc32c codec
on feature arrays; one writer at a time through an OS lock; and a sweep of
stale temp files (zarr's ``*.partial``, ``index.atomic``'s ``.*.tmp``) on resume.

Completion writes a digest manifest (``index.integrity``): every data file's size and
sha256, and a digest of the answer-changing attributes. A complete store is checked
against it on open (metadata, array headers, done flags) and on every read (each chunk
file read must exist with its recorded size; the crc32c codec checks its bytes), so a
deleted chunk is an error, never zarr's fill value. Matrices (TRAK's inverses) are written as
a new generation beside the live one and switched in by one attribute write, so readers of
the last complete state (served while a writer works) never see them change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, SupportsInt

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from index import integrity
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


_HELD: dict[str, list[int]] = {}
"""Lock files this process holds, as path -> [fd, depth]. ``flock`` belongs to one open file, so a
second take in the same process (the CLI locks before ``build`` opens the store) must reuse it."""


class _WriterLock:
    """``fcntl.flock`` on ``<store>/.influence.lock``: released by the OS the moment the holder dies.

    The store group is created without ``mode="w"`` (which deletes the folder), so creating the
    store never removes the lock file that guards it.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.key = str(self.path.resolve())
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreLockedError(
                    f"store {root} is locked by pid {holder} (another build is writing it); wait for it to finish"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by a holder cleaning up between our open and flock: retry
        else:
            raise StoreLockedError(f"store {root}: could not take the writer lock {self.path}; try again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[self.key] = [fd, 1]

    def release(self, remove: bool = False) -> None:
        """Drop one hold; the last one unlocks (``remove``: and deletes the lock file first, still locked)."""
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])


def _check_out_dir(root: Path) -> None:
    """``--out`` must be absent, an empty folder, or an influence store (checked before any file is made)."""
    if root.exists() and not root.is_dir():
        raise BadSpecError(f"--out {root} exists and is not a directory; choose a new path")
    if root.is_dir() and not (root / "zarr.json").is_file():
        if any(p.name != LOCK_NAME for p in root.iterdir()):
            raise BadSpecError(f"--out {root} is a non-empty directory that is not an influence store; choose a new path")


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the store's writer lock for the block (creating the folder if needed); refuses a held one at once.

    The CLI takes it right after parsing arguments, before loading the model and data, so a second
    writer is refused in its first second rather than after start-up.
    """
    root = Path(path)
    _check_out_dir(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = _WriterLock(root)
    try:
        yield
    finally:
        # A run refused before it created the store leaves no folder behind (others re-check the inode).
        empty = created and not (root / "zarr.json").exists() and all(p.name == LOCK_NAME for p in root.iterdir())
        lock.release(remove=empty)
        if empty:
            with contextlib.suppress(OSError):
                root.rmdir()


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
        if attrs.get("status") == StoreStatus.COMPLETE.value:
            store._files = integrity.check_open(root, attrs)["files"]
        elif not allow_incomplete:
            store._serve_last_complete(attrs)
        return store

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
                    group.attrs.update(head)  # a writer killed right after creating the group: adopt it
                store._check_compatible(manifest)
                store._sweep_partials()
            else:
                # One write creates the group with its format and status (never mode="w": it deletes the lock file).
                group = zarr.create_group(str(root), attributes=head)
                store = cls(root, group, lock)
            # Status first: nothing else is written before the store says it is building.
            store.group.attrs.update(head)
            for key, value in manifest.items():
                if key != "checkpoints":
                    store.group.attrs[key] = value
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
        for pattern in ("*.partial", ".*.tmp"):
            for p in self.root.rglob(pattern):
                if p.is_file():
                    p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ manifest
    @property
    def _meta(self) -> Any:
        """The attributes this handle serves: the group's, or the last complete ones while a writer works."""
        return self._snapshot if self._snapshot is not None else self.group.attrs

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._meta)

    def set_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    @property
    def status(self) -> str:
        return str(self._meta.get("status"))

    def mark_complete(self) -> None:
        """The last write of a build: only now may readers use the store."""
        for ckpt in self.checkpoint_ids:
            if not self.done(ckpt).all():
                raise StoreIncompleteError(f"cannot mark complete: {self.progress()}")
        # The manifest first, then one zarr.json write switches status and manifest together.
        record = integrity.write_manifest(self.root, self.attrs)
        self.group.attrs.update({"status": StoreStatus.COMPLETE.value, integrity.ATTR: record})
        integrity.sweep_manifests(self.root, keep=record["manifest"])

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
        """The array at ``key`` (a group there means the store's layout is damaged)."""
        node = self.group[key]
        if not isinstance(node, zarr.Array):
            raise StoreDamagedError(f"store {self.root} has a group at {key}, where an array belongs; rebuild it")
        return node

    def _read(self, key: str, rows: slice | np.ndarray | None = None, select: Any = None, full: bool = False) -> np.ndarray:
        """Read ``key`` (``rows`` of axis 0, or all) after checking each chunk file it touches against the manifest.

        A chunk file recorded at completion must still be there with its size (zarr would read a missing one
        as its fill value); the crc32c codec then checks its bytes. Either failure is StoreDamagedError.
        """
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
            raw = np.asarray(self._read(f"features/{ckpt}", slice(start, stop)))
            if self._kept_bytes + raw.nbytes <= self._keep_bytes:
                self._kept[key] = raw
                self._kept_bytes += raw.nbytes
        return _as_float32(raw)

    def read_rows(self, ckpt: str, ids: np.ndarray) -> np.ndarray:
        """Features of arbitrary rows (for exact re-ranking of an approximate shortlist)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise StoreIncompleteError(f"row ids out of range [0, {self.n}) requested from store {self.root}")
        return _as_float32(np.asarray(self._read(f"features/{ckpt}", ids, lambda a: a.get_orthogonal_selection((ids, slice(None))))))

    def column(self, name: str, ckpt: str | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
        key = name if ckpt is None else f"{name}/{ckpt}"
        return self._read(key, slice(start, stop))

    def labels(self) -> np.ndarray:
        return np.asarray(self._read("labels", full=True), dtype=np.int64)  # small, and rewritten by every extension

    def matrix_key(self, key: str) -> str:
        """Where matrix ``key`` lives now: each write makes a new generation (``key.<token>``) beside the old."""
        mapping = self._meta.get("matrices", {})
        actual = mapping.get(key, key) if isinstance(mapping, dict) else key
        if not isinstance(actual, str) or not (actual == key or actual.startswith(f"{key}.")):
            raise StoreDamagedError(f"store {self.root} maps matrix {key} to {actual!r} in its manifest; rebuild it")
        return actual

    def write_matrix(self, key: str, value: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        """Write a new generation of ``key`` with its ``attrs``, then switch to it in one zarr.json write.

        The live generation stays untouched, so readers of the last complete state (whose attributes still
        name it) keep reading it whole; older generations and orphans of killed writes are deleted.
        """
        live = self.matrix_key(key) if key in self._meta.get("matrices", {}) else None
        actual = f"{key}.{secrets.token_hex(4)}"
        self.group.create_array(actual, shape=value.shape, chunks=value.shape, dtype=value.dtype,
                                compressors=[Crc32cCodec()], overwrite=True)
        self._array(actual)[...] = value
        if attrs:
            self._array(actual).attrs.update(attrs)
        self.group.attrs["matrices"] = {**self._meta.get("matrices", {}), key: actual}
        parent, _, name = key.rpartition("/")
        holder = self.group[parent] if parent else self.group
        if isinstance(holder, zarr.Group):
            for old in list(holder.array_keys()):
                full = f"{parent}/{old}" if parent else old
                if full.startswith(f"{key}.") and full not in (actual, live):
                    del holder[old]

    def matrix_attrs(self, key: str) -> dict[str, Any] | None:
        """The attributes written with matrix ``key`` (None when there is no such matrix)."""
        actual = self.matrix_key(key)
        if actual not in self.group:
            return None
        return dict(self._array(actual).attrs)

    def read_matrix(self, key: str) -> np.ndarray:
        actual = self.matrix_key(key)
        if actual not in self.group:
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
        d = self.root / "faiss"
        d.mkdir(exist_ok=True)
        return d


def _only_group_header(root: Path) -> bool:
    """True when ``root`` holds nothing but the group's zarr.json (and the lock): a store killed at creation."""
    return all(p.name in ("zarr.json", LOCK_NAME) or p.name.endswith((".tmp", ".partial")) for p in root.iterdir())
