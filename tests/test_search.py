"""index/search.py against brute force and damaged files on disk; the index package standing alone."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.errors import BadDataError, BadSpecError, IndexFileError, StoreDamagedError, StoreIncompleteError
from index.search import ExactScan, IndexSpec, SearchIndex, build_index, load_index, recall_at_k, save_index


REPO = Path(__file__).resolve().parents[1]


def structured(n: int, d: int, seed: int = 0, eff_dim: int = 12) -> np.ndarray:
    """Gradient-like rows: low effective rank and heavy-tailed norms (not i.i.d. Gaussian)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scale = np.exp(-np.arange(d) / eff_dim)
    x = (rng.standard_normal((n, d)) * scale) @ basis.T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= rng.lognormal(0.0, 1.1, size=(n, 1))
    return x.astype(np.float32)


def brute(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = structured(4000, 48, seed=1)
    q = structured(40, 48, seed=2)
    return x, q


def test_exact_matches_brute_force(data):
    x, q = data
    idx = build_index((x[i : i + 700] for i in range(0, len(x), 700)), 48)
    assert idx.spec == IndexSpec("Flat", "ip", 48, 4000, None, None, 0)
    s, i = idx.search(q, 10)
    bs, bi = brute(x, q, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (40, 10)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, rtol=1e-4, atol=1e-4)
    os_, oi = idx.opponents(q, 10)
    bs, bi = brute(x, -q, 10)
    np.testing.assert_array_equal(oi, bi)
    np.testing.assert_allclose(os_, -bs, rtol=1e-4, atol=1e-4)
    assert (np.diff(os_, axis=1) >= 0).all()  # most negative first
    _, i1 = idx.search(q[0], 5)  # a single 1-D query is one row
    np.testing.assert_array_equal(i1, i[:1, :5])


@pytest.mark.parametrize(
    "factory, params, floor",
    [("IVF16,Flat", {"nprobe": 8}, 0.8), ("HNSW32", {"efSearch": 64}, 0.9), ("SQ8", {}, 0.9)],
)
def test_approximate_recall(data, factory, params, floor, record_property):
    x, q = data
    idx = build_index(x, 48, factory, train_sample=x[:2000], **params)
    exact = build_index(x, 48)
    for k in (10, 50):
        _, ai = idx.search(q, k)
        _, ei = exact.search(q, k)
        r = recall_at_k(ai, ei, k)
        record_property(f"recall@{k}", r)
        print(f"{factory} {params} recall@{k} = {r:.3f}")
        assert r >= floor, (factory, k, r)


def test_rerank_returns_exact_scores(data):
    x, q = data
    reads = []

    def read(ids: np.ndarray) -> np.ndarray:
        assert ids.dtype == np.int64 and (np.diff(ids) > 0).all()
        reads.append(len(ids))
        return x[ids]

    pq = build_index(x, 48, "IVF16,PQ16x4", train_sample=x, nprobe=16, rerank=100)
    _, plain_ids = pq.search(q, 10)  # no reader: approximate scores only
    s, i = pq.with_vectors(read).search(q, 10)
    assert reads
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[i]), rtol=1e-5, atol=1e-5)
    assert (np.diff(s, axis=1) <= 0).all()
    _, ei = build_index(x, 48).search(q, 10)
    r_plain, r_rerank = recall_at_k(plain_ids, ei, 10), recall_at_k(i, ei, 10)
    print(f"IVF16,PQ16x4 recall@10 plain {r_plain:.3f}, re-ranked from 100: {r_rerank:.3f}")
    assert r_rerank >= max(r_plain, 0.9)
    os_, oi = pq.with_vectors(read).opponents(q, 10)
    np.testing.assert_allclose(os_, np.einsum("qd,qkd->qk", q, x[oi]), rtol=1e-5, atol=1e-5)
    assert (np.diff(os_, axis=1) >= 0).all()


def _scan(x: np.ndarray, block: int, dtype: type = np.float32) -> ExactScan:
    """An ExactScan over ``x`` stored as ``dtype``, read back ``block`` rows at a time like store chunks."""
    stored = x.astype(dtype)
    return ExactScan.of_rows(lambda: ((s, stored[s : s + block].astype(np.float32)) for s in range(0, len(x), block)), x.shape[1], len(x))


@pytest.mark.parametrize("block", [1, 700, 4000, 5000])
def test_exact_scan_equals_faiss_flat(data, block):
    """Scanning row blocks gives the ids and scores of a FAISS IndexFlatIP over the same (float16-stored) rows."""
    x, q = data
    x16 = x.astype(np.float16).astype(np.float32)  # the store keeps float16; both sides see the same values
    flat = build_index(x16, 48)
    scan = _scan(x, block, np.float16)
    assert scan.spec == IndexSpec("Flat", "ip", 48, 4000)
    for k in (1, 10, 64):
        fs, fi = flat.search(q, k)
        ss, si = scan.search(q, k)
        assert ss.dtype == np.float32 and si.dtype == np.int64 and si.shape == (40, k)
        np.testing.assert_array_equal(si, fi)
        np.testing.assert_allclose(ss, fs, rtol=1e-5, atol=1e-6)
        fo, foi = flat.opponents(q, k)
        so, soi = scan.opponents(q, k)
        np.testing.assert_array_equal(soi, foi)
        np.testing.assert_allclose(so, fo, rtol=1e-5, atol=1e-6)
        (bs, bi), (bo, boi) = scan.search_both(q, q[::-1], k)  # one pass, two query sets
        np.testing.assert_array_equal(bi, si)
        np.testing.assert_array_equal(boi, soi[::-1])
        np.testing.assert_allclose(bo, so[::-1], rtol=1e-6)
    assert not np.array_equal(_scan(x, block).search(q, 10)[1], _scan(-x, block).search(q, 10)[1])


def test_exact_scan_ties_go_to_the_smaller_id_and_k_may_exceed_n():
    x = np.ones((9, 4), np.float32)
    x[[2, 6]] *= 2  # two rows tie for the top, seven tie behind them
    s, i = _scan(x, 4).search(np.ones((1, 4)), 5)
    assert i.tolist() == [[2, 6, 0, 1, 3]]
    np.testing.assert_array_equal(s, [[8, 8, 4, 4, 4]])
    s, i = _scan(x, 4).search(np.ones((2, 4)), 20)
    assert i.shape == (2, 9) and sorted(i[0]) == list(range(9))
    assert _scan(np.zeros((0, 4), np.float32), 4).search(np.ones((1, 4)), 3)[1].shape == (1, 0)


def test_exact_scan_refuses_bad_queries_and_bad_blocks(data):
    x, q = data
    scan = _scan(x, 700)
    for k in (0, -1, 2.5, True):
        with pytest.raises(BadSpecError, match="k must be a positive integer"):
            scan.search(q, k)
    with pytest.raises(BadDataError, match=r"queries must have shape \(n, 48\)"):
        scan.search(q[:, :5], 3)
    with pytest.raises(BadDataError, match="NaN or inf"):
        scan.search(np.full((1, 48), np.nan), 3)
    short = ExactScan.of_rows(lambda: iter([(0, x[:700])]), 48, 4000)
    with pytest.raises(BadDataError, match="covered 700 rows; the store has 4000"):
        short.search(q, 3)
    gap = ExactScan.of_rows(lambda: iter([(0, x[:700]), (800, x[800:1500])]), 48, 4000)
    with pytest.raises(BadDataError, match="after row 700"):
        gap.search(q, 3)
    with pytest.raises(BadDataError, match=r"shape \(700, 5\) at row 0"):
        ExactScan.of_rows(lambda: iter([(0, x[:700, :5])]), 48, 700).search(q, 3)
    wrong_nq = ExactScan(lambda qq: iter([(0, np.zeros((len(qq) + 1, 700)))]), 48, 700)
    with pytest.raises(BadDataError, match=r"scores of shape \(41, 700\)"):
        wrong_nq.search(q, 3)
    bad = x[:700].copy()
    bad[5, 0] = np.inf
    with pytest.raises(BadDataError, match=r"rows 0\.\.700 are NaN or inf"):
        ExactScan.of_rows(lambda: iter([(0, bad)]), 48, 700).search(q, 3)


def test_k_larger_than_ntotal_has_no_padding():
    x = structured(5, 8)
    for idx in (build_index(x, 8), build_index(x, 8, rerank=3).with_vectors(lambda ids: x[ids])):
        s, i = idx.search(x[:2], 10)
        assert i.shape == (2, 5) and (i >= 0).all()
        assert sorted(i[0]) == list(range(5))
    s, i = build_index(np.zeros((0, 8), np.float32), 8).search(x[:2], 3)
    assert i.shape == (2, 0) and s.shape == (2, 0)


def test_bad_arguments_are_refused(data):
    x, q = data
    idx = build_index(x, 48)
    for k in (0, -1, 2.5, True):
        with pytest.raises(BadSpecError):
            idx.search(q, k)
    with pytest.raises(BadDataError):
        idx.search(q[:, :10], 5)
    with pytest.raises(BadDataError):
        idx.search(np.full((1, 48), np.nan), 5)
    with pytest.raises(BadSpecError, match="invalid FAISS factory"):
        build_index(x, 48, "NoSuchIndex")
    with pytest.raises(BadSpecError, match="needs training"):
        build_index(x, 48, "IVF16,Flat")
    with pytest.raises(BadSpecError, match="cannot train"):
        build_index(x, 48, "IVF64,Flat", train_sample=x[:10])
    with pytest.raises(BadSpecError, match="nprobe"):
        build_index(x, 48, "Flat", nprobe=4)
    with pytest.raises(BadDataError):
        build_index([x[:, :10]], 48)


def test_threads_setting_is_restored(data):
    x, q = data
    before = faiss.omp_get_max_threads()
    build_index(x, 48, threads=1).search(q, 3)
    assert faiss.omp_get_max_threads() == before


def test_out_of_range_ids_are_refused():
    x = structured(50, 8)
    for bad in (50, 10**9, -7):
        raw = faiss.IndexIDMap(faiss.IndexFlatIP(8))
        ids = np.arange(50, dtype=np.int64)
        ids[3] = bad
        raw.add_with_ids(x, ids)
        idx = SearchIndex(raw, IndexSpec("IDMap,Flat", "ip", 8, 50))
        with pytest.raises(IndexFileError, match="corrupt"):
            idx.search(x[3:4], 5)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW16", "SQfp16", "IVF8,PQ4x4"])
def test_save_load_round_trip(tmp_path, data, factory):
    x, q = data
    idx = build_index(x, 48, factory, train_sample=x, efSearch=32 if "HNSW" in factory else None)
    path = tmp_path / "index.faiss"
    rec = save_index(idx, path)
    assert rec["size"] == path.stat().st_size
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec["spec"] == idx.spec.to_dict()
    assert json.loads((tmp_path / "index.faiss.json").read_text()) == rec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.faiss.json"]
    rec = json.loads(json.dumps(rec))  # as read back from store attributes
    loaded = load_index(path, rec)
    assert loaded.spec == idx.spec
    for a, b in zip(idx.search(q, 7), loaded.search(q, 7)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture()
def saved(tmp_path, data) -> tuple[Path, dict]:
    x, _ = data
    path = tmp_path / "index.faiss"
    return path, save_index(build_index(x[:300], 48), path)


def test_flipped_byte_is_refused(saved):
    path, rec = saved
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x10
    path.write_bytes(bytes(b))
    with pytest.raises(IndexFileError, match="does not match its recorded checksum"):
        load_index(path, rec)


def test_wrong_size_missing_file_and_bad_record_are_refused(saved):
    path, rec = saved
    with pytest.raises(IndexFileError, match="checksum"):
        load_index(path, {**rec, "size": rec["size"] + 1})
    with pytest.raises(IndexFileError, match="vectors of dim"):
        load_index(path, {**rec, "spec": {**rec["spec"], "ntotal": 301}})
    with pytest.raises(StoreDamagedError, match="malformed"):
        load_index(path, {**rec, "spec": {"factory": "Flat"}})
    with pytest.raises(IndexFileError, match="no valid record"):
        load_index(path, {})
    path.unlink()
    with pytest.raises(IndexFileError, match="cannot be opened"):
        load_index(path, rec)


def test_corrupt_file_with_matching_checksum_neither_crashes_nor_allocates(tmp_path):
    """Bit flips that the checksum would not catch (record rewritten): FAISS must not blow up.

    Without the deserialization limits this loop grew to 20 GB here; with them it stays
    near the interpreter's own size. The child is capped at 4 GiB of address space so a
    regression fails this test (as an allocation error) instead of exhausting the machine.
    """
    script = textwrap.dedent(
        """
        import hashlib, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        import numpy as np
        from index.errors import IndexFileError
        from index.search import build_index, save_index, load_index
        from pathlib import Path
        rng = np.random.default_rng(0)
        x = rng.standard_normal((300, 16)).astype(np.float32)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        refused = loaded = 0
        alloc_errors = []
        for factory in ["Flat", "IVF4,PQ4x4", "HNSW8", "SQ8"]:
            p = Path(sys.argv[1]) / "i.faiss"
            rec = save_index(build_index(x, 16, factory, train_sample=x), p)
            good = p.read_bytes()
            for pos in range(0, len(good), max(1, len(good) // 150)):
                for bit in (0, 5, 7):
                    b = bytearray(good); b[pos] ^= 1 << bit; p.write_bytes(bytes(b))
                    r = {**rec, "sha256": hashlib.sha256(b).hexdigest()}
                    try:
                        load_index(p, r); loaded += 1
                    except IndexFileError as e:
                        refused += 1
                        if "alloc" in str(e) or "Memory" in str(e):
                            alloc_errors.append(str(e))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(refused, loaded, len(alloc_errors), grown // 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    refused, loaded, alloc_errors, grown_mb = map(int, out.stdout.split())
    print(f"refused {refused}, loaded {loaded}, peak RSS growth {grown_mb} MB")
    assert refused > 0 and alloc_errors == 0 and grown_mb < 300


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_failed_save_leaves_old_file_and_no_temp(saved, data, monkeypatch):
    path, rec = saved
    before = path.read_bytes(), _listing(path.parent)
    x, _ = data
    new = build_index(x, 48)

    real_write = faiss.write_index

    def half_then_fail(index, writer):
        real_write(faiss.IndexFlatIP(48), writer)  # some bytes reach the temp file
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_index(new, path)
    monkeypatch.undo()
    assert (path.read_bytes(), _listing(path.parent)) == before

    def no_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="replace failed"):
        save_index(new, path)
    monkeypatch.undo()
    assert (path.read_bytes(), _listing(path.parent)) == before
    load_index(path, rec)  # the old record still matches the old file


def test_recall_at_k():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    assert recall_at_k(exact, exact, 3) == 1.0
    assert recall_at_k(np.array([[2, 9, -1], [5, 4, 3]]), exact, 3) == pytest.approx(4 / 6)
    assert recall_at_k(np.array([[0], [9]]), exact, 1) == 0.5


def test_atomic_write_gives_open_permissions_and_replaces_whole(tmp_path):
    from index.atomic import atomic_write

    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    target = tmp_path / "target"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # readers see the old file until the replace
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode == plain.stat().st_mode  # not mkstemp's owner-only 0o600
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target) as f:
            f.write(b"half")
            1 / 0
    assert target.read_bytes() == b"new" and _listing(tmp_path) == ["plain", "target"]


def test_index_stands_alone_in_a_fresh_interpreter():
    """Importing and using `index` loads no `influence` module (the dependency points one way only)."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import index, index.atomic, index.errors, index.search, index.store
        from index import FeatureStore, build_index
        build_index(np.ones((3, 4), np.float32), 4).search(np.ones(4, np.float32), 2)
        print(sorted(m for m in sys.modules if m == "influence" or m.startswith("influence.")))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"


def test_influence_catches_index_errors_as_its_own(saved):
    import influence
    import index.errors

    assert influence.StoreIncompleteError is index.errors.StoreIncompleteError
    assert influence.InfluenceError is index.errors.InfluenceError
    path, rec = saved
    path.unlink()
    with pytest.raises(influence.InfluenceError, match="cannot be opened"):
        load_index(path, rec)
    with pytest.raises(influence.BadSpecError, match="k must be a positive integer"):
        build_index(np.ones((3, 4), np.float32), 4).search(np.ones(4, np.float32), 0)
