"""Hypothesis properties over shapes, dtypes, NaN, ±inf and float16/float32 overflow, on the small functions
that take numbers in: the store's write path, the exact scan, Grad-Cos's norms, and ``read_image`` of ``.npy``.

Each property: the call either gives exactly the right answer (checked against a float64 reference) or raises
an ``InfluenceError`` saying what was wrong; it never stores inf, never answers with garbage, never raises
anything else.
"""

from __future__ import annotations

import math
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from index.errors import BadDataError, InfluenceError, NonFiniteError
from index.search import ExactScan
from index.store import FeatureStore
from influence.loading import read_image
from influence.scoring import GradCos

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


# --------------------------------------------------------------------------- Grad-Cos norms


class _Rows:
    """The store reads ``GradCos.train_scores`` makes: features and loss weights of one checkpoint."""

    def __init__(self, phi: np.ndarray, weights: np.ndarray) -> None:
        self.phi, self.weights = phi, weights
        self.k, self.n = phi.shape[1], phi.shape[0]
        self.checkpoint_ids = ["c0"]
        self.checkpoints = [{"id": "c0", "lr_weight": 1.0}]

    def read_features(self, ckpt: str, start: int, stop: int) -> np.ndarray:
        return self.phi[start:stop].astype(np.float32)

    def column(self, name: str, ckpt: str) -> np.ndarray:
        assert name == "loss_weight"
        return self.weights


MAGNITUDES = st.builds(lambda m, e: m * 10.0**e, st.floats(-9.99, 9.99), st.integers(-30, 38))


@PROPERTY
@given(phi=hnp.arrays(np.float16, (6, 4), elements=st.floats(-F16_MAX, F16_MAX, width=16)),
       weights=hnp.arrays(np.float32, (6,), elements=MAGNITUDES.filter(lambda v: abs(v) <= F32_MAX).map(np.float32)),
       q=hnp.arrays(np.float64, (2, 4), elements=st.floats(-1e3, 1e3)))
def test_gradcos_cosines_are_right_whatever_the_row_norms(phi, weights, q):
    """|v_i| = |w_i φ_i| up to 65504 · 3.4e38 · 2: its square overflows float32 (and float16's φ² overflows
    float16); the cosines must still be right, or the scan refuses with NonFiniteError, never 0 or NaN."""
    assume(np.linalg.norm(q, axis=1).min() > 1e-3)
    method = GradCos(_Rows(phi, weights))  # type: ignore[arg-type]
    qv = method._finish(q.astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(qv.astype(np.float64), axis=1), 1, rtol=1e-5)
    scan = ExactScan(lambda qq: iter([(0, method.train_scores(qq, 0, 3)), (3, method.train_scores(qq, 3, 6))]), 4, 6)
    v = phi.astype(np.float64) * weights.astype(np.float64)[:, None]
    norms = np.maximum(np.linalg.norm(v, axis=1), 1e-12)
    ref = (qv.astype(np.float64) @ v.T) / norms
    try:
        scores, ids = scan.search(qv, 6)
    except NonFiniteError:
        # only when ⟨v_i, q⟩ itself is beyond float32 before the division
        with np.errstate(over="ignore"):
            assert (np.abs(qv.astype(np.float64) @ v.T) > F32_MAX / 2).any()
        return
    _check_top_k(scores, ids, ref, np.abs(qv.astype(np.float64)) @ (np.abs(v) / norms[:, None]).T, 6)


def test_gradcos_norm_of_a_row_whose_square_overflows_float32():
    """The case the property is about, spelled out: |v| = 1e20 (|v|² = 1e40 > float32's 3.4e38)."""
    phi = np.array([[1.0, 0.0], [0.0, 1.0]], np.float16)
    method = GradCos(_Rows(phi, np.array([1e20, 1.0], np.float32)))  # type: ignore[arg-type]
    np.testing.assert_allclose(method.train_scores(np.array([[1.0, 0.0]], np.float32), 0, 2), [[1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(method._finish(np.array([[3e19, 4e19]], np.float32)), [[0.6, 0.8]], rtol=1e-6)


# --------------------------------------------------------------------------- read_image of .npy arrays


@pytest.fixture(scope="module")
def npy_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("npy") / "image.npy"


@PROPERTY
@given(arr=arrays_of(st.one_of(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)), st.one_of(REAL_DTYPES, ODD_DTYPES)))
def test_read_image_of_any_npy_is_its_float32_values_or_a_clear_error(npy_path, arr):
    np.save(npy_path, arr)
    real = arr.dtype.kind in "buif"
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = arr.astype(np.float32) if real else None
    ok = real and arr.ndim in (2, 3) and 0 not in arr.shape and bool(np.isfinite(as32).all())
    if ok:
        t = read_image(npy_path)
        want = as32[None] if arr.ndim == 2 else as32
        assert t.dtype.is_floating_point and tuple(t.shape) == want.shape
        np.testing.assert_array_equal(t.numpy(), want)
    else:
        with pytest.raises(BadDataError) as e:
            read_image(npy_path)
        assert str(npy_path) in str(e.value) and "\n" not in str(e.value)


def test_read_image_refuses_an_object_array(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([[1, "a"], [None, 2.0]], dtype=object), allow_pickle=True)
    with pytest.raises(BadDataError, match="unreadable"):
        read_image(path)
