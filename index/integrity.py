"""The digest manifest of a complete store: what was committed, so damage is an error rather than an answer.

zarr reads a missing chunk file as the array's fill value and keeps no checksum of its
own ``zarr.json``, so a deleted chunk or a flipped bit in the attributes (a seed, a
learning-rate weight, a class count) would change answers silently. At completion the
store writes ``.influence-manifest.<token>.json``: the sha256 of a canonical form of the
answer-changing attributes, and the size and sha256 of every data file (FAISS files are
covered by their own size and sha256 in the ``indexes`` attribute; generations of matrices that the
attributes no longer name are left out, so they can be swept). The root attributes
then name the manifest and its sha256 in the same ``zarr.json`` write that sets
``status: complete``, so readers never see one without the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from index.atomic import atomic_write
from index.errors import StoreDamagedError

ATTR = "integrity"
MANIFEST_PREFIX = ".influence-manifest."
_UNCOVERED = ("status", ATTR)  # the attributes the manifest cannot cover: the ones written with it
_SKIP_DIRS = ("faiss",)  # FAISS files: checked against their own records in the `indexes` attribute
_GENERATION = re.compile(r"\.[0-9a-f]{8}$")  # `trak/c0.1a2b3c4d`: a matrix generation (FeatureStore.write_matrix)


def is_generation(array: str) -> bool:
    """Whether the array at ``array`` is one generation of a matrix (named ``<key>.<token>``)."""
    return bool(_GENERATION.search(array))


def attrs_digest(attrs: dict[str, Any]) -> str:
    """sha256 of the attributes in canonical JSON (sorted keys), without ``status`` and the integrity record."""
    body = {k: v for k, v in attrs.items() if k not in _UNCOVERED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def data_files(root: Path, attrs: dict[str, Any] | None = None) -> Iterator[str]:
    """Every file the manifest covers, as a '/'-separated path relative to ``root``.

    With ``attrs``: only the files of the generations they name (:func:`is_live`), so a generation kept only for
    readers of an earlier state, or an orphan of a killed write, is never recorded as part of this one.
    """
    matrices = (attrs or {}).get("matrices") or {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0] in _SKIP_DIRS or len(rel.parts) == 1:
            continue  # top-level files: the root zarr.json (covered by attrs_digest), the lock, manifests
        if p.name.endswith((".tmp", ".partial")):
            continue
        path = rel.as_posix()
        if attrs is not None and not is_live(_array_of(path), matrices):
            continue
        yield path


def is_live(array: str, matrices: Any) -> bool:
    """Whether ``array`` is the generation the ``matrices`` attribute names for its key (``trak/c0.<token>`` for
    ``trak/c0``); a key it does not map lives at its own plain name. One rule for superseded generations, orphans
    of a killed write, and an array's first generation once an add has grown it into a new one."""
    key = _GENERATION.sub("", array)
    live = matrices.get(key, key) if isinstance(matrices, dict) else key
    return array == live


def write_manifest(root: Path, attrs: dict[str, Any], previous: Any = None) -> dict[str, str]:
    """Hash every data file and write a new manifest atomically; return the record for the root attributes.

    Matrix generations the attributes do not name (superseded, or orphans of a killed write), and an array's
    first generation once ``matrices`` maps it to a newer one (rows grown by an add), are not state:
    they are left out, so a later writer may sweep them without damaging this state. When the manifest
    ``previous`` (the last complete state's integrity record) names holds exactly these bytes, it is reused:
    re-running a finished build leaves the store byte-identical.
    """
    files = {rel: [(root / rel).stat().st_size, sha256_of(root / rel)] for rel in data_files(root, attrs)}
    covered = {k: v for k, v in attrs.items() if k not in _UNCOVERED}
    body = json.dumps({"format": 1, "attrs_sha256": attrs_digest(attrs), "attrs": covered, "files": files},
                      sort_keys=True).encode()
    digest = hashlib.sha256(body).hexdigest()
    old = previous.get("manifest") if isinstance(previous, dict) else None
    if isinstance(old, str) and old.startswith(MANIFEST_PREFIX) and "/" not in old and previous.get("sha256") == digest:
        with contextlib.suppress(OSError):
            if sha256_of(root / old) == digest:
                return {"manifest": old, "sha256": digest}
    name = f"{MANIFEST_PREFIX}{secrets.token_hex(6)}.json"
    with atomic_write(root / name) as f:
        f.write(body)
    return {"manifest": name, "sha256": digest}


def sweep_manifests(root: Path, keep: str, previous: Any = None) -> None:
    """Delete every manifest but ``keep`` and the one the previous complete state named (``previous``, its
    integrity record): a reader that read the old zarr.json may still want that one. Manifests of builds
    killed before their zarr.json write were never named, so no reader can want them."""
    named = previous.get("manifest") if isinstance(previous, dict) else None
    for p in root.glob(f"{MANIFEST_PREFIX}*.json"):
        if p.name not in (keep, named):
            p.unlink(missing_ok=True)


def _damaged(root: Path, why: str) -> StoreDamagedError:
    return StoreDamagedError(f"store {root} is damaged: {why}; run `influence verify {root}` and rebuild it")


def load_manifest(root: Path, attrs: dict[str, Any], snapshot: bool = False) -> dict[str, Any]:
    """The manifest named in ``attrs``, checked against its recorded sha256 and against ``attrs`` themselves.

    ``snapshot``: ``attrs`` are those of a store being extended or rebuilt; the manifest's own copy of the
    attributes of the last complete state is checked against its digest instead, and returned as ``attrs``.
    """
    rec = attrs.get(ATTR)
    if not isinstance(rec, dict) or not isinstance(rec.get("manifest"), str) or not isinstance(rec.get("sha256"), str):
        raise _damaged(root, f"it is marked complete but has no valid {ATTR!r} record in zarr.json (found {rec!r})")
    name = rec["manifest"]
    if "/" in name or "\\" in name or not name.startswith(MANIFEST_PREFIX):
        raise _damaged(root, f"its integrity record names {name!r}, not a manifest file")
    try:
        body = (root / name).read_bytes()
    except OSError as e:
        raise _damaged(root, f"its manifest {name} cannot be read ({e.strerror})") from None
    if hashlib.sha256(body).hexdigest() != rec["sha256"]:
        raise _damaged(root, f"its manifest {name} does not match its recorded sha256")
    try:
        doc = json.loads(body)
        files = doc["files"]
        saved = doc["attrs_sha256"]
    except (ValueError, KeyError, TypeError):
        raise _damaged(root, f"its manifest {name} is malformed") from None
    if snapshot:
        kept = doc.get("attrs")
        if not isinstance(kept, dict) or saved != attrs_digest(kept):
            raise _damaged(root, f"its manifest {name} holds no intact copy of the last complete attributes")
        attrs = kept
    if saved != attrs_digest(attrs):
        raise _damaged(root, "the attributes in zarr.json (seeds, projector, weights, classes, ...) differ from "
                             "the ones recorded when it was completed")
    if not isinstance(files, dict):
        raise _damaged(root, f"its manifest {name} is malformed")
    return {"files": files, "attrs": attrs}


def _check_file(root: Path, rel: str, entry: Any) -> str | None:
    """Why ``rel`` fails its manifest entry (None when it matches)."""
    try:
        size, digest = entry
        actual = (root / rel).stat().st_size
    except (TypeError, ValueError):
        return f"manifest entry for {rel} is malformed"
    except OSError:
        return f"{rel} is missing"
    if actual != size:
        return f"{rel} has {actual} bytes, recorded {size}"
    if sha256_of(root / rel) != digest:
        return f"{rel} does not match its recorded sha256"
    return None


def check_open(root: Path, attrs: dict[str, Any], snapshot: bool = False) -> dict[str, Any]:
    """On open of a complete store: the manifest, the attributes, array headers and done flags (all small).

    Returns ``{"files", "attrs"}``: the recorded files and the attributes to serve (see ``load_manifest``).
    """
    doc = load_manifest(root, attrs, snapshot)
    files: dict[str, list[Any]] = doc["files"]
    for rel, entry in files.items():
        if rel.endswith("zarr.json") or rel.startswith("done/"):
            why = _check_file(root, rel, entry)
            if why:
                raise _damaged(root, why)
    return doc


def check_chunks(root: Path, key: str, arr: zarr.Array[Any], rows: slice | np.ndarray | None,
                 files: dict[str, list[Any]], full: bool = False) -> None:
    """Every chunk file a read of ``rows`` touches that was recorded must still exist with its size.

    A chunk the manifest does not list was never written (all fill value), so zarr's fill is right there.
    ``full`` also compares its sha256: for small whole-array reads (TRAK's matrices), where a same-sized
    file rewritten by a later build must not be mixed into a session opened before it.
    """
    shape, chunks = arr.shape, arr.chunks
    if not shape:
        return
    n0 = -(-shape[0] // chunks[0])
    if rows is None:
        first: Any = range(n0)
    elif isinstance(rows, slice):
        start, stop, _ = rows.indices(shape[0])
        first = range(start // chunks[0], -(-stop // chunks[0])) if stop > start else range(0)
    else:
        first = np.unique(np.asarray(rows, dtype=np.int64) // chunks[0]).tolist()
    rest = [range(-(-s // c)) for s, c in zip(shape[1:], chunks[1:])]
    for i in first:
        for coord in _product([int(i)], *rest):
            rel = f"{key}/{arr.metadata.encode_chunk_key(coord)}"
            entry = files.get(rel)
            if entry is None:
                continue
            try:
                size = (root / rel).stat().st_size
            except OSError:
                raise _damaged(root, f"chunk file {rel} is missing") from None
            if not isinstance(entry, list) or size != entry[0]:
                raise _damaged(root, f"chunk file {rel} has {size} bytes, recorded {entry[0] if isinstance(entry, list) else entry!r}")
            if full and sha256_of(root / rel) != entry[1]:
                raise StoreDamagedError(
                    f"store {root}: {rel} changed after this session opened the store (rebuilt or damaged); "
                    f"open the store again, or run `influence verify {root}`"
                )


def _product(*axes: Any) -> Iterator[tuple[int, ...]]:
    if not axes:
        yield ()
        return
    for i in axes[0]:
        for tail in _product(*axes[1:]):
            yield (int(i), *tail)


def verify_files(root: Path, files: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Full check of every recorded file, and of unrecorded chunk files: problems grouped by array."""
    problems: dict[str, list[str]] = {}
    arrays: set[str] = set()
    for rel, entry in files.items():
        array = _array_of(rel)
        arrays.add(array)
        why = _check_file(root, rel, entry)
        problems.setdefault(array, [])
        if why:
            problems[array].append(why)
    for rel in data_files(root):
        if rel not in files and _array_of(rel) in arrays:
            problems[_array_of(rel)].append(f"{rel} is not in the manifest (written after completion)")
    return problems


def _array_of(rel: str) -> str:
    """``features/c0/c/3/0`` → ``features/c0``; ``features/c0/zarr.json`` → ``features/c0``."""
    if "/c/" in rel:
        return rel.split("/c/", 1)[0]
    return rel.rsplit("/", 1)[0] if "/" in rel else rel
