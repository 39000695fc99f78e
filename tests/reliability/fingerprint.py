"""A store's fingerprint: the sha256 of each of its files, with the documented random tokens normalised, so two
builds of the same command can be compared byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from index.integrity import MANIFEST_PREFIX
from index.store import LOCK_NAME

# Names that carry a random token by design: the manifest (``.influence-manifest.<12 hex>.json``), the
# generations of matrices and caches (``self_influence/tracin.<8 hex>``, ``trak/c0.<8 hex>``) and of the per-row
# arrays an add grows (``features/c0.<8 hex>``, ``labels.<8 hex>``), and an add's paths file.
_ARRAYS = r"(?:self_influence|trak|trak_gram|features|loss|margin|prob|loss_weight|done)/[A-Za-z0-9_]+\.|labels\.|train_paths\."
_TOKENS = re.compile(rf"(\.influence-manifest\.)([0-9a-f]{{12}})(?=\.json)|((?:^|(?<=[/\"]))(?:{_ARRAYS}))([0-9a-f]{{8}})")
# Values derived from those names (digests of text that contains them): checked by ``FeatureStore.open`` instead.
_DERIVED = {"sha256", "attrs_sha256"}


def _token_names(root: Path, files: list[Path]) -> dict[str, str]:
    """Each random token -> ``T<i>``, numbered per name in the order their files were written (oldest first)."""
    born: dict[tuple[str, str], float] = {}
    for p in files:
        for m in _TOKENS.finditer(p.relative_to(root).as_posix()):
            key = (m[1] or m[3], m[2] or m[4])
            born[key] = min(born.get(key, float("inf")), p.stat().st_mtime)
    names: dict[str, str] = {}
    for prefix in sorted({k[0] for k in born}):
        tokens = sorted((t for t in born if t[0] == prefix), key=lambda t: born[t])
        names.update({tok: f"T{i}" for i, (_, tok) in enumerate(tokens)})
    return names


def _untoken(text: str, names: dict[str, str]) -> str:
    return _TOKENS.sub(lambda m: (m[1] or m[3]) + names.get(m[2] or m[4], "GONE"), text)


def _drop_derived(doc: Any, names: dict[str, str]) -> Any:
    if isinstance(doc, dict):
        return {_untoken(k, names): _drop_derived(v, names) for k, v in doc.items() if k not in _DERIVED}
    if isinstance(doc, list):
        return [_drop_derived(v, names) for v in doc]
    return _untoken(doc, names) if isinstance(doc, str) else doc


def fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file but the lock (it holds its holder's pid), with random tokens normalised.

    Tokens are renamed by age; the root ``zarr.json`` and the manifest are compared as JSON with the tokens
    renamed and the digests of token-bearing text dropped (those are checked by opening the store).
    """
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME]
    names = _token_names(root, files)
    out = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        body = p.read_bytes()
        if rel == "zarr.json" or rel.startswith(MANIFEST_PREFIX):
            body = json.dumps(_drop_derived(json.loads(body), names), sort_keys=True).encode()
        out[_untoken(rel, names)] = hashlib.sha256(body).hexdigest()
    return out
