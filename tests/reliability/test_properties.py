"""Hypothesis properties over shapes, dtypes, NaN, ±inf and float16/float32 overflow, on the small functions
that take numbers in: the store's write path, the exact scan, Grad-Cos's norms, and ``read_image`` of ``.npy``.

Each property: the call either gives exactly the right answer (checked against a float64 reference) or raises
an ``InfluenceError`` saying what was wrong; it never stores inf, never answers with garbage, never raises
anything else.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.errors import BadDataError, InfluenceError, NonFiniteError
from index.search import ExactScan
from index.store import FeatureStore

PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
F16_MAX, F32_MAX = 65504.0, float(np.finfo(np.float32).max)

ROWS, K = 8, 6  # one chunk of the store below

REAL_DTYPES = st.one_of(hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.boolean_dtypes())
ODD_DTYPES = st.one_of(hnp.complex_number_dtypes(), hnp.unicode_string_dtypes(max_len=4), hnp.byte_string_dtypes(max_len=4),
                       hnp.datetime64_dtypes(), st.just(np.dtype([("a", "<f4"), ("b", "<i2")])))


def _values(dtype: np.dtype) -> st.SearchStrategy:
    """Elements with the awkward values in: NaN, ±inf, subnormals, and magnitudes around float16's and float32's limits."""
    if dtype.kind == "f":
        awkward = [np.nan, np.inf, -np.inf, 0.0, -0.0, F16_MAX, 65519.0, 65520.0, -65520.0, 1e5]
        if dtype.itemsize >= 4:
            awkward += [F32_MAX, -F32_MAX, 1e38]
        if dtype.itemsize >= 8:
            awkward += [1e39, -1e300, 5e-324]
        with np.errstate(over="ignore"):
            cast = sorted({float(dtype.type(v)) for v in awkward if not np.isfinite(v) or np.isfinite(dtype.type(v))}, key=repr)
        return st.one_of(st.sampled_from(cast).map(dtype.type), hnp.from_dtype(dtype, allow_nan=True, allow_infinity=True))
    return hnp.from_dtype(dtype)


@st.composite
def arrays_of(draw, shapes: st.SearchStrategy, dtypes: st.SearchStrategy = REAL_DTYPES) -> np.ndarray:
    dtype = draw(dtypes)
    shape = draw(shapes)
    if dtype.kind in "fiub":
        return draw(hnp.arrays(dtype, shape, elements=_values(dtype)))
    return draw(hnp.arrays(dtype, shape))


# --------------------------------------------------------------------------- the store's write path


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    """A float16 store of 2 chunks × 8 rows × 6 columns, one checkpoint, with chunk 1 written once."""
    manifest = {"model_fingerprint": "m", "task": "t", "params": "all", "projector": {}, "dataset_fingerprint": "d",
                "rows_per_chunk": ROWS, "n": 2 * ROWS, "k": K, "dtype": "float16"}
    with FeatureStore.open_for_write(tmp_path_factory.mktemp("props") / "store", manifest) as store:
        store.ensure_labels()
        ckpt = store.add_checkpoint({"path": "x.pt", "sha256": "0" * 64, "size": 1, "lr_weight": 1.0})
        store.write_chunk(ckpt, 1, np.ones((ROWS, K), np.float32), np.zeros(ROWS, np.int64))
        yield store, ckpt


@PROPERTY
@given(feats=arrays_of(st.sampled_from([(ROWS, K), (ROWS, K), (ROWS, K + 1), (ROWS - 1, K), (ROWS,), (ROWS, K, 1)]),
                       st.one_of(REAL_DTYPES, ODD_DTYPES)),
       weight=st.sampled_from([1.0, 0.5, np.nan, np.inf, -np.inf, 1e39]))
def test_write_chunk_stores_exactly_the_float16_rows_or_refuses(writer, feats, weight):
    store, ckpt = writer
    before = store.read_features(ckpt, 0, ROWS)
    labels = np.arange(ROWS, dtype=np.int64)
    columns = {"loss_weight": np.full(ROWS, weight, dtype=np.float64)}
    real = feats.dtype.kind in "biuf"
    with np.errstate(over="ignore", invalid="ignore"):
        cast = feats.astype(np.float16) if real else None
    ok = (feats.shape == (ROWS, K) and real and bool(np.isfinite(cast).all()) and math.isfinite(weight) and abs(weight) <= F32_MAX
          and (feats.dtype.kind != "f" or bool(np.isfinite(feats).all())))
    if ok:
        store.write_chunk(ckpt, 0, feats, labels, **columns)
        np.testing.assert_array_equal(store.read_features(ckpt, 0, ROWS), cast.astype(np.float32))
        assert np.isfinite(store.read_features(ckpt, 0, ROWS)).all()
        np.testing.assert_array_equal(store.column("loss_weight", ckpt, 0, ROWS), np.float32(weight))
    else:
        with pytest.raises((BadDataError, NonFiniteError)) as e:
            store.write_chunk(ckpt, 0, feats, labels, **columns)
        assert str(store.root) in str(e.value) and "\n" not in str(e.value)
        np.testing.assert_array_equal(store.read_features(ckpt, 0, ROWS), before)  # nothing written


@PROPERTY
@given(labels=arrays_of(st.sampled_from([(ROWS,), (ROWS + 1,), (ROWS, 1)]), st.one_of(REAL_DTYPES, ODD_DTYPES)))
def test_write_chunk_takes_only_integer_labels_of_one_chunk(writer, labels):
    store, ckpt = writer
    if labels.shape == (ROWS,) and labels.dtype.kind in "iu":
        store.write_chunk(ckpt, 0, np.zeros((ROWS, K), np.float32), labels)
        np.testing.assert_array_equal(store.labels()[:ROWS], labels.astype(np.int64))
    else:
        with pytest.raises(BadDataError, match="integer labels"):
            store.write_chunk(ckpt, 0, np.zeros((ROWS, K), np.float32), labels)


# --------------------------------------------------------------------------- exact search


def _check_top_k(scores: np.ndarray, ids: np.ndarray, ref: np.ndarray, mag: np.ndarray, k: int) -> None:
    """``scores``/``ids`` are a right top-k of ``ref`` (float64 inner products) within float32 rounding (``mag``)."""
    assert ids.shape == scores.shape == (len(ref), min(k, ref.shape[1]))
    assert np.isfinite(scores).all()
    for r in range(len(ref)):
        tol = 1e-5 * mag[r].max() + 1e-30
        np.testing.assert_allclose(scores[r], ref[r, ids[r]], rtol=0, atol=tol)
        assert (np.diff(scores[r]) <= 0).all()
        rest = np.setdiff1d(np.arange(ref.shape[1]), ids[r])
        if rest.size:
            assert ref[r, rest].max() <= scores[r].min() + 2 * tol


@PROPERTY
@given(q=arrays_of(st.sampled_from([(5,), (2, 5), (1, 5), (2, 4), (2, 5, 1), (0, 5)]), st.one_of(REAL_DTYPES, ODD_DTYPES)),
       rows=hnp.arrays(np.float32, (7, 5), elements=st.floats(-1e6, 1e6, width=32)), k=st.integers(1, 9))
def test_exact_scan_answers_right_or_refuses_the_query(q, rows, k):
    scan = ExactScan.of_rows(lambda: iter([(0, rows[:4]), (4, rows[4:])]), 5, 7)
    try:
        scores, ids = scan.search(q, k)
    except InfluenceError as e:
        assert "\n" not in str(e)
        q2 = q.reshape(1, -1) if q.ndim == 1 else q
        bad_kind = q.dtype.kind not in "iuf" or q2.ndim != 2 or q2.shape[-1] != 5
        if not bad_kind:  # a real query of the right shape is refused only for NaN, inf or float32 overflow
            with np.errstate(over="ignore", invalid="ignore"):
                q32 = q2.astype(np.float64)
                assert not np.isfinite(q32).all() or (np.abs(q32) > F32_MAX).any() or not np.isfinite(
                    q2.astype(np.float32) @ rows.T).all(), (q, str(e))
        return
    q64 = (q.reshape(1, -1) if q.ndim == 1 else q).astype(np.float32).astype(np.float64)
    _check_top_k(scores, ids, q64 @ rows.astype(np.float64).T, np.abs(q64) @ np.abs(rows.astype(np.float64)).T, k)
