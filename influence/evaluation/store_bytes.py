"""Two stores' bytes compared file by file, up to what is random by design.

A sharded build (torchrun) and a one-process build of the same command write the same bytes except for the random
generation tokens: in matrix names (``trak/c0.<8 hex>``, ``self_influence/<method>.<8 hex>``), in the manifest's
file name and in FAISS index file names, the manifest's sha256 in zarr.json and the attributes' digest in the
manifest (both hash those names), and the store's own path in ``faiss/*.index.json``. ``normalised_sha256``
replaces exactly those, so any other difference (no timestamps are written) shows as a differing file. Used by
tests/test_sharded.py and scripts/bench_sharded.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from index import integrity

LOCK = ".influence.lock"  # the writer lock: not part of the store's contents
_FAISS_GEN = re.compile(r"([A-Za-z_]+)\.[0-9a-f]{8}\.index")  # FAISS files are generations: <method>.<token>.index


def normalised_sha256(root: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file of the store at ``root`` but its lock, by relative path, with the random names and the
    digests that hash them replaced by placeholders (module docstring)."""
    root = Path(root)
    attrs = json.loads((root / "zarr.json").read_text())["attributes"]
    names = {actual: f"{key}.<gen>" for key, actual in attrs["matrices"].items()}
    names[attrs[integrity.ATTR]["manifest"]] = ".influence-manifest.<token>.json"
    names[str(root)] = "<store>"
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == LOCK:
            continue
        rel, body = p.relative_to(root).as_posix(), p.read_bytes()
        if p.suffix == ".json":
            text = body.decode()
            if rel == "zarr.json":
                text = text.replace(attrs[integrity.ATTR]["sha256"], "<manifest sha256>")
            if rel == attrs[integrity.ATTR]["manifest"]:
                text = re.sub(r'"attrs_sha256": "[0-9a-f]{64}"', '"attrs_sha256": "<digest>"', text)
            for old, new in sorted(names.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(old, new)
            text = _FAISS_GEN.sub(r"\1.<gen>.index", text)
            body = text.encode()
        for old, new in names.items():
            rel = rel.replace(old, new)
        rel = _FAISS_GEN.sub(r"\1.<gen>.index", rel)
        out[rel] = hashlib.sha256(body).hexdigest()
    return out


def differing_files(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The normalised paths whose digests differ between two ``normalised_sha256`` results, or that only one has."""
    return sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
