"""Exact search over the store's own rows (no FAISS copy) and the store's self-influence cache.

Oracles: a FAISS ``IndexFlatIP`` over the same train vectors (what stores held before), and self-influence
written out per row in float64 from the raw zarr arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import influence
from conftest import BATCH, CHUNK, CNN_SPEC, N_TRAIN, PROJ_DIM
from index.errors import StoreDamagedError
from index.search import ExactScan, SearchIndex, build_index, load_index, save_index
from index.store import FeatureStore
from influence.errors import BadSpecError
from influence.scoring import ScoringMethod, get_method

METHODS = ("tracin", "gradcos", "trak")


def _old_flat_records(path) -> dict[str, dict]:
    """Give a store what builds wrote before exact search scanned the store: a float32 FAISS Flat file per method."""
    store = FeatureStore.open(path)
    records = {}
    for m in METHODS:
        scorer = get_method(m)(store)
        index = build_index((scorer.train_vectors(s, e) for s, e in store.iter_chunks()), dim=scorer.dim)
        (path / "faiss").mkdir(exist_ok=True)
        rec = save_index(index, path / "faiss" / f"{m}.index")
        records[m] = {**rec, "factory": "Flat", "path": f"faiss/{m}.index"}
    from index import integrity

    group = zarr.open_group(str(path), mode="r+")
    group.attrs["indexes"] = records
    group.attrs["integrity"] = integrity.write_manifest(path, dict(group.attrs))  # sealed: as if built that way
    return records


def test_new_store_holds_no_float32_copy_and_scans_exactly(store):
    session = influence.Influence.open(store, trust_store=True)
    assert not list(store.glob("faiss/*.index"))
    for m in METHODS:
        assert isinstance(session.index(m), ExactScan)
        assert session.index(m).spec.dim == 3 * PROJ_DIM and session.index(m).spec.ntotal == session.n_train


def test_session_keeps_the_float16_rows_once_within_its_budget(store, digits, monkeypatch):
    session = influence.Influence.open(store, trust_store=True)
    first = session.query(digits.x_test[:3], k=4, method="gradcos")
    kept = session.store._kept
    assert {c for c, _, _ in kept} == {"c0", "c1", "c2"} and all(a.dtype == np.float16 for a in kept.values())
    assert session.store._kept_bytes == 3 * N_TRAIN * PROJ_DIM * 2  # one float16 copy, shared by every method

    array = FeatureStore._array

    def features_not_from_disk(self: FeatureStore, key: str) -> object:
        assert not key.startswith("features/"), f"read {key} from disk again"
        return array(self, key)

    monkeypatch.setattr(FeatureStore, "_array", features_not_from_disk)
    for method in METHODS:  # every method scans the same kept rows
        again = session.query(digits.x_test[:3], k=4, method=method)
        assert len(again[0].proponents) == 4
    again = session.query(digits.x_test[:3], k=4, method="gradcos")
    assert [r.proponents for r in again] == [r.proponents for r in first]
    monkeypatch.undo()

    small = FeatureStore.open(store)
    small.keep_in_memory(N_TRAIN * PROJ_DIM)  # room for less than one checkpoint's rows: streams from disk
    small.read_features("c0", 0, CHUNK)
    small.read_features("c0", CHUNK, 2 * CHUNK)
    assert small._kept_bytes <= N_TRAIN * PROJ_DIM and len(small._kept) == 1


@pytest.mark.parametrize("method", METHODS)
def test_exact_scan_answers_like_the_faiss_flat_of_older_stores(copy_store, digits, method):
    """A store built before (FAISS Flat files on disk) still opens and answers; the scan gives the Flat's answers."""
    path = copy_store()
    records = _old_flat_records(path)
    old = influence.Influence.open(path, trust_store=True)
    flat = load_index(path / records[method]["path"], records[method])
    assert isinstance(flat, SearchIndex)
    x, y = digits.x_test, digits.y_test
    q = old.query_vectors(x, y, method)
    for k in (1, 7, 40):
        want_pro, want_opp = flat.search(q, k), flat.opponents(q, k)
        results = old.query(x, y, k=k, method=method)
        for j, r in enumerate(results):
            got_ids = [p.train_id for p in r.proponents], [p.train_id for p in r.opponents]
            got_scores = [p.score for p in r.proponents], [p.score for p in r.opponents]
            for side, (s, i) in enumerate((want_pro, want_opp)):
                tol = 1e-5 * float(np.abs(s[j]).max())
                np.testing.assert_allclose(got_scores[side], s[j], rtol=1e-5, atol=tol)
                for a, b, sa, sb in zip(got_ids[side], i[j], got_scores[side], s[j]):
                    assert a == b or abs(sa - sb) <= tol, (method, k, j, side)  # ties aside


def _oracle_self_influence(path, method: str, only: list[str] | None = None, eta: float | None = None) -> np.ndarray:
    """S(i, i) row by row in float64 from the raw arrays: TracIn Σ_c η_c (dℓ/dm)² |φ|², TRAK mean_c (1−p) φᵀMφ
    (over the checkpoints ``only`` when given, with every η_c = ``eta`` when given)."""
    g = zarr.open_group(str(path), mode="r")
    ckpts = [c for c in g.attrs["checkpoints"] if only is None or c["id"] in only]
    out = np.zeros(g.attrs["n"])
    for c in ckpts:
        c = {**c, "lr_weight": c["lr_weight"] if eta is None else eta}
        phi = np.asarray(g[f"features/{c['id']}"][:], dtype=np.float64)
        if method == "tracin":
            w = np.asarray(g[f"loss_weight/{c['id']}"][:], dtype=np.float64)
            out += c["lr_weight"] * w**2 * np.array([row @ row for row in phi])
        else:
            inv = np.asarray(g[g.attrs["matrices"][f"trak/{c['id']}"]][...], dtype=np.float64)  # the live generation
            p = np.asarray(g[f"prob/{c['id']}"][:], dtype=np.float64)
            out += (1 - p) * np.array([row @ inv @ row for row in phi]) / len(ckpts)
    return out


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_build_caches_self_influence_and_sessions_read_it(store, method, monkeypatch):
    want = _oracle_self_influence(store, method)
    g = zarr.open_group(str(store), mode="r")
    live = g.attrs["matrices"]  # cache key -> its live generation
    assert f"self_influence/{method}" in live and "valid_for" in g[live[f"self_influence/{method}"]].attrs
    assert "self_influence/gradcos" not in live
    np.testing.assert_allclose(np.asarray(g[live[f"self_influence/{method}"]][:]), want, rtol=2e-4)

    def recompute(self: ScoringMethod, progress: bool) -> np.ndarray:
        raise AssertionError("recomputed although the store holds a valid cache")

    monkeypatch.setattr(type(get_method(method)(FeatureStore.open(store))), "_self_influence", recompute)
    got = influence.Influence.open(store, trust_store=True).self_influence(method)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-4)


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_a_scorer_over_some_checkpoints_computes_its_own_self_influence(store, method):
    """``checkpoints=`` / ``lr_weights=`` (ablations: the final checkpoint alone, TracInCP without lr weights) give
    those checkpoints' self-influence, not the full store's cache, and may not overwrite that cache."""
    cls, st = get_method(method), FeatureStore.open(store)
    final = st.checkpoint_ids[-1]
    alone = cls(st, checkpoints=[final]).self_influence()
    np.testing.assert_allclose(alone, _oracle_self_influence(store, method, only=[final]), rtol=2e-4)
    assert not np.allclose(alone, cls(st).self_influence(), rtol=1e-2)
    if method == "tracin":
        equal = cls(st, lr_weights=dict.fromkeys(st.checkpoint_ids, 1.0)).self_influence()
        np.testing.assert_allclose(equal, _oracle_self_influence(store, method, eta=1.0), rtol=2e-4)
    with pytest.raises(BadSpecError, match="store's own checkpoints"):
        cls(st, checkpoints=[final]).cache_self_influence()
    with pytest.raises(BadSpecError, match="not among the store's"):
        cls(st, checkpoints=["nope"])


def test_stale_or_half_written_cache_is_not_used(copy_store):
    path = copy_store()
    want = _oracle_self_influence(path, "trak")
    with FeatureStore.open_for_write(path, FeatureStore.open(path).attrs) as store:
        stamp = get_method("trak")(store)._self_stamp()
        assert store.read_cache("self_influence/trak", stamp) is not None
        assert store.read_cache("self_influence/trak", "0" * 64) is None  # other checkpoints or another λ: stale
        # a write killed before its switch leaves an orphan generation beside the live one: never read
        live = store.matrix_key("self_influence/trak")
        store.group.create_array("self_influence/trak.deadbeef", shape=want.shape, dtype=want.dtype)[:] = want * 2
        assert store.matrix_key("self_influence/trak") == live
        np.testing.assert_allclose(store.read_cache("self_influence/trak", stamp), want, rtol=2e-4)


def test_cache_edited_in_place_is_refused_never_served(copy_store):
    path = copy_store()
    g = zarr.open_group(str(path), mode="r")
    arr = zarr.open_array(str(path / g.attrs["matrices"]["self_influence/trak"]), mode="r+")
    arr[:] = -1.0  # values no computation gives: the store's digests catch them
    with pytest.raises(StoreDamagedError):
        influence.Influence.open(path, trust_store=True).self_influence("trak")


def test_cache_follows_trak_lambda(digits, cnn_ckpts, copy_store):
    """A rebuild with another λ recomputes the cached self-influence with the new inverse."""
    path = copy_store()
    before = influence.Influence.open(path, trust_store=True).self_influence("trak")
    influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, path, proj_dim=PROJ_DIM, lr_weights=cnn_ckpts.lrs,
                    batch_size=BATCH, rows_per_chunk=CHUNK, trak_lambda=100.0, progress=False)
    after = influence.Influence.open(path, trust_store=True).self_influence("trak")
    assert not np.allclose(before, after, rtol=1e-2)
    np.testing.assert_allclose(after, _oracle_self_influence(path, "trak"), rtol=2e-4)


def test_gradcos_self_influence_is_refused(session):
    with pytest.raises(BadSpecError, match="self-influence under gradcos is 1"):
        session.self_influence("gradcos")
