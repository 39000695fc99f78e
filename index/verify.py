"""``influence verify``: check every artifact of a store against what was recorded when it was completed.

Reads and hashes everything (unlike open and query, which check metadata and chunk presence
and let the crc32c codec check the bytes they read), so it finds damage in data no query has touched yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zarr

from index import integrity
from index.errors import InfluenceError


@dataclass(frozen=True)
class Verdict:
    artifact: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.artifact}: {self.detail}"


def verify_store(path: str | os.PathLike[str]) -> list[Verdict]:
    """One verdict per artifact: the metadata, each array, each FAISS index file, each checkpoint file."""
    root = Path(path)
    if not (root / "zarr.json").is_file():
        return [Verdict("store", False, f"{root} is not an influence store (no zarr.json)")]
    try:
        attrs = dict(zarr.open_group(str(root), mode="r").attrs)
    except Exception as e:  # zarr raises many types on an unparsable zarr.json
        return [Verdict("metadata", False, f"zarr.json is unreadable ({type(e).__name__})")]
    if attrs.get("status") != "complete":
        return [Verdict("metadata", False, f"status is {attrs.get('status')!r}, not 'complete': re-run the build to finish it")]
    try:
        files = integrity.check_open(root, attrs)["files"]
    except InfluenceError as e:
        return [Verdict("metadata", False, str(e))]
    out = [Verdict("metadata", True, f"attributes and manifest match ({len(files)} files recorded)")]
    for array, problems in sorted(integrity.verify_files(root, files).items()):
        n = sum(1 for rel in files if integrity._array_of(rel) == array)
        detail = f"{n} files match" if not problems else f"{len(problems)} of {n} files fail: {'; '.join(problems[:3])}"
        out.append(Verdict(array, not problems, detail))
    out += _verify_recorded("index", attrs.get("indexes", {}), root)
    records = attrs.get("checkpoints")
    checkpoints = {str(c.get("id")): c for c in records if isinstance(c, dict)} if isinstance(records, list) else records
    out += _verify_recorded("checkpoint", checkpoints, None)
    return out


def _verify_recorded(kind: str, records: object, root: Path | None) -> list[Verdict]:
    """Files recorded by size and sha256: FAISS indexes (relative to the store) and checkpoints (absolute)."""
    if not isinstance(records, dict):
        return [Verdict(kind, False, f"{kind} records are malformed: {records!r}")]
    out = []
    for name, rec in sorted(records.items()):
        label = f"{kind} {name}"
        if isinstance(rec, dict) and rec.get("search") == "store":  # exact search: no file, it scans the verified rows
            out.append(Verdict(label, True, "exact search over the store's own rows (no index file)"))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            out.append(Verdict(label, False, f"record is malformed: {rec!r}"))
            continue
        p = Path(rec["path"]) if root is None else root / rec["path"]
        if not p.is_file():
            out.append(Verdict(label, False, f"{p} is missing"))
        elif rec.get("size") is not None and p.stat().st_size != rec["size"]:
            out.append(Verdict(label, False, f"{p} has {p.stat().st_size} bytes, recorded {rec['size']}"))
        elif integrity.sha256_of(p) != rec.get("sha256"):
            out.append(Verdict(label, False, f"{p} does not match its recorded sha256"))
        else:
            out.append(Verdict(label, True, f"{p} matches its recorded sha256"))
    return out
