"""Generations: FAISS files and matrices are written beside the live ones and switched in by one zarr.json write;
what a reader's state names is kept (the last two complete states, and anything an open session pins); the rest,
with temp files, is swept when the next writer starts."""

from __future__ import annotations

import gc
import json
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

import influence
from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM, trusted
from index.store import FeatureStore
from index.verify import verify_store
from influence.cli import main

_ROOT_WRITES: list[str] = []  # renames onto a watched zarr.json (zarr writes it as a temp file, then replaces)
_WATCH: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "os.rename" and _WATCH and str(args[1]) == _WATCH[0]:
        _ROOT_WRITES.append(str(args[1]))


sys.addaudithook(_audit)


def _build(root: Path, digits, ckpts, **kw) -> None:
    influence.build(CNN_SPEC, str(digits.train_npz), ckpts.paths, root, projector="sparse", proj_dim=PROJ_DIM,
                    lr_weights=ckpts.lrs, batch_size=BATCH, rows_per_chunk=CHUNK, progress=False, **kw)


def _record(root: Path, method: str) -> dict:
    return json.loads((root / "zarr.json").read_text())["attributes"]["indexes"][method]


def _proponents(session: influence.Influence, digits, method: str = "tracin") -> list:
    return [[(p.train_id, p.score) for p in r.proponents] for r in session.query(digits.x_test[:3], method=method, k=5)]


def _manifest(root: Path) -> dict:
    attrs = FeatureStore.open(root).attrs
    return {k: attrs[k] for k in ("model_fingerprint", "task", "params", "projector", "dataset_fingerprint",
                                  "rows_per_chunk", "n", "k", "dtype")}


def test_set_attrs_and_completion_are_one_zarr_json_write_each(copy_store):
    root = copy_store()
    _WATCH[:] = [str(root / "zarr.json")]
    try:
        with FeatureStore.open_for_write(root, _manifest(root)) as store:
            _ROOT_WRITES.clear()
            store.set_attrs(a=1, b=[2], c={"d": 3})
            assert len(_ROOT_WRITES) == 1
            _ROOT_WRITES.clear()
            store.mark_complete()  # status and the manifest record together
            assert len(_ROOT_WRITES) == 1
        _ROOT_WRITES.clear()
        with FeatureStore.open_for_write(root, _manifest(root)):  # status "building" and the build's attributes
            assert len(_ROOT_WRITES) == 1
    finally:
        _WATCH.clear()
    assert FeatureStore.open(root, allow_incomplete=True).attrs["c"] == {"d": 3}


def test_index_rewrites_are_generations_and_an_open_session_keeps_its_own(copy_store, digits, cnn_ckpts):
    root = copy_store()
    _build(root, digits, cnn_ckpts, methods=["tracin"], index_factory="SQ8", rerank=0)
    first = _record(root, "tracin")
    assert re.fullmatch(r"faiss/tracin\.[0-9a-f]{8}\.index", first["path"]), first
    chunk_mode = stat.S_IMODE((root / "features/c0/c/0/0").stat().st_mode)
    for p in (root / first["path"], root / f"{first['path']}.json"):
        assert stat.S_IMODE(p.stat().st_mode) == chunk_mode  # the store's mode, not mkstemp's 0600
    early = influence.Influence.open(root, trust_store=True)  # opened on SQ8; loads its index only later
    sq8 = _proponents(influence.Influence.open(root, trust_store=True), digits)

    paths = []
    for factory in ("SQ4", "Flat", "SQ4", "Flat"):  # four later states: SQ8 is in no kept manifest any more
        _build(root, digits, cnn_ckpts, methods=["tracin"], index_factory=factory, rerank=0)
        paths.append(_record(root, "tracin").get("path"))
    assert (root / first["path"]).is_file(), "swept while an open session pins it"
    assert _proponents(early, digits) == sq8
    flat = _proponents(influence.Influence.open(root, trust_store=True), digits)
    assert flat != sq8

    del early
    gc.collect()
    _build(root, digits, cnn_ckpts, methods=["tracin"], index_factory="SQ4", rerank=0)  # a writer starts: sweeps
    kept = sorted(f"faiss/{p.name}" for p in (root / "faiss").iterdir())
    # SQ8 and the first SQ4 are gone; the previous complete state (the second Flat) is exact, the one before it
    # (the second SQ4) is kept for readers still opened on it, and the live one
    named = sorted([paths[2], _record(root, "tracin")["path"]])
    assert kept == sorted([*named, *(f"{n}.json" for n in named)]), kept
    assert FeatureStore.open(root).status == "complete"
    assert all(v.ok for v in verify_store(root))


def test_verify_checks_a_generation_of_an_index_file(copy_store, digits, cnn_ckpts, capsys):
    root = copy_store()
    _build(root, digits, cnn_ckpts, methods=["tracin"], index_factory="SQ8", rerank=0)
    path = root / _record(root, "tracin")["path"]
    assert main(trusted(["verify", str(root)])) == 0
    assert f"ok   index tracin: {path} matches its recorded sha256" in capsys.readouterr().out
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert main(trusted(["verify", str(root)])) == 2
    assert f"FAIL index tracin: {path} does not match its recorded sha256" in capsys.readouterr().out
    with pytest.raises(influence.InfluenceError, match="does not match its recorded checksum"):
        influence.Influence.open(root, trust_store=True).query(digits.x_test[:1], method="tracin")


def test_a_resumed_rebuild_keeps_the_matrices_the_last_complete_state_names(copy_store, digits):
    """A λ rebuild killed after switching in one new inverse, then resumed: the resumed writer replaces that
    inverse again, but the one the last complete state names stays, so readers meanwhile get the old state whole."""
    root = copy_store()
    before = influence.Influence.open(root, trust_store=True)
    want = before.scores(digits.x_test[:3], method="trak")
    complete = FeatureStore.open(root).matrix_key("trak/c0")
    with FeatureStore.open_for_write(root, _manifest(root)) as killed:
        killed.write_matrix("trak/c0", np.eye(killed.k, dtype=np.float32), {"lambda_rel": 5.0, "lambda": 5.0})
    with FeatureStore.open_for_write(root, _manifest(root)) as resumed:  # the same command again
        for _ in range(2):
            resumed.write_matrix("trak/c0", 2 * np.eye(resumed.k, dtype=np.float32), {"lambda_rel": 5.0, "lambda": 5.0})
        assert (root / complete / "zarr.json").is_file()
        reader = influence.Influence.open(root, trust_store=True)
        assert reader.store.matrix_key("trak/c0") == complete
        np.testing.assert_array_equal(reader.scores(digits.x_test[:3], method="trak"), want)
    trak = sorted(p.name for p in (root / "trak").iterdir() if p.name.startswith("c0."))
    assert len(trak) == 3, trak  # the complete state's, the killed writer's (named by the live attributes), the last


def test_a_session_reads_its_matrices_after_later_rebuilds_swept_them_from_the_state(copy_store, digits, cnn_ckpts):
    root = copy_store()
    session = influence.Influence.open(root, trust_store=True)  # has not read TRAK's inverses yet
    want = influence.Influence.open(root, trust_store=True).scores(digits.x_test[:3], method="trak")
    for lam in (0.01, 0.1, 10.0, 0.01):
        _build(root, digits, cnn_ckpts, methods=["trak"], trak_lambda=lam)
    np.testing.assert_array_equal(session.scores(digits.x_test[:3], method="trak"), want)


def test_open_starts_again_when_two_states_were_switched_in_while_it_read(copy_store, digits, cnn_ckpts, monkeypatch):
    """The manifest a reader's zarr.json names is deleted by two completions between the two reads: the open
    sees zarr.json replaced and reads the new state, rather than refusing a store that is complete."""
    from index import integrity, store as store_module

    root = copy_store()
    real = integrity.check_open
    calls = []

    busy = []

    def racing(path, attrs, snapshot=False):
        if not busy:  # the reader's own checks (the builds below open the store too)
            calls.append(attrs[integrity.ATTR]["manifest"])
        if len(calls) == 1 and not busy:
            busy.append(True)
            for factory in ("SQ8", "SQ4"):
                _build(root, digits, cnn_ckpts, methods=["tracin"], index_factory=factory, rerank=0)
            busy.clear()
        return real(path, attrs, snapshot)

    monkeypatch.setattr(store_module.integrity, "check_open", racing)
    opened = FeatureStore.open(root)
    assert len(calls) == 2 and calls[0] != calls[1] and not (root / calls[0]).exists()
    assert opened.attrs["indexes"]["tracin"]["factory"] == "SQ4"
