"""`influence index-check` and the build's stage breakdown: recall against exact search, re-ranked scores."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM, trusted
from index.search import ExactScan
from influence.cli import main
from influence.errors import BadSpecError
from influence.index_check import compare, score_error
from influence.pipeline import StageTimer

APPROX = "IVF4,PQ16x4"  # trains on the 160 tiny rows; PQ scores are approximate, so re-rank visibly matters


class _Fixed:
    """A stand-in approximate index that answers with given hits (to check the recall arithmetic)."""

    def __init__(self, pro: tuple[np.ndarray, np.ndarray], opp: tuple[np.ndarray, np.ndarray]) -> None:
        self.pro, self.opp = pro, opp

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.pro[0][:, :k], self.pro[1][:, :k]

    def opponents(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.opp[0][:, :k], self.opp[1][:, :k]


def _scan(x: np.ndarray) -> ExactScan:
    return ExactScan.of_rows(lambda: [(s, x[s : s + 7]) for s in range(0, len(x), 7)], x.shape[1], len(x))


def test_compare_counts_misses_for_each_side_and_cut_off() -> None:
    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((60, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    s = q @ x.T
    top = np.argsort(-s, axis=1)[:, :20]  # brute-force oracle
    bottom = np.argsort(s, axis=1)[:, :20]
    wrong = top.copy()
    wrong[:, 5:10] = bottom[:, :5]  # 5 of the top-10 replaced by rows far outside the top-20
    pro = (np.take_along_axis(s, wrong, 1), wrong)
    opp = (np.take_along_axis(s, bottom, 1), bottom)
    r_pro, r_opp, err = compare(_Fixed(pro, opp), _scan(x), q, ks=(10, 20))  # type: ignore[arg-type]
    assert r_pro == {10: 0.5, 20: 0.75}
    assert r_opp == {10: 1.0, 20: 1.0}
    assert err < 1e-6


def test_score_error_sees_a_shifted_score() -> None:
    ids = np.array([[3, 1, 2]])
    exact = (np.array([[4.0, 2.0, 1.0]], np.float32), ids)
    approx = (np.array([[4.0, 2.0, 1.5]], np.float32), ids[:, [0, 1, 2]])
    assert score_error(approx, exact) == pytest.approx(0.5 / 4.0)
    assert score_error(exact, exact) == 0.0


def test_compare_rejects_bad_cut_offs() -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(BadSpecError):
        compare(_scan(x), _scan(x), x, ks=(0, 10))


def test_stage_timer_charges_each_lap_to_its_stage() -> None:
    t = StageTimer()
    time.sleep(0.02)
    t.lap("a")
    t.reset()
    t.lap("b")
    time.sleep(0.01)
    t.lap("a")
    assert list(t.seconds) == ["a", "b"]
    assert t.seconds["a"] >= 0.03
    assert t.seconds["b"] < t.seconds["a"]


def _build_args(out, digits, cnn_ckpts, *extra: str) -> list[str]:
    args = ["build", "--model", CNN_SPEC, "--data", str(digits.train_npz), "--out", str(out), "--proj-dim", str(PROJ_DIM),
            "--batch-size", str(BATCH), "--chunk-rows", str(CHUNK), "--json", *extra]
    for p in cnn_ckpts.paths:
        args += ["--checkpoint", str(p)]
    return args + ["--lr-weights", ",".join(map(str, cnn_ckpts.lrs))]


def _build(out, digits, cnn_ckpts, capsys, *extra: str) -> dict:
    assert main(_build_args(out, digits, cnn_ckpts, *extra)) == 0
    return json.loads(capsys.readouterr().out)


def test_build_json_has_the_stage_breakdown(copy_store, digits, cnn_ckpts, capsys) -> None:
    info = _build(copy_store(), digits, cnn_ckpts, capsys, "--index", APPROX)
    stages = info["stages"]
    # the copy is fully featurized, so this run only reloads, solves and builds the three indexes
    assert {"startup", "library_import", "model_and_data_load", "trak_solve", "self_influence", "indexes"} <= set(stages)
    assert all(v >= 0 for v in stages.values())
    assert sum(v for k, v in stages.items() if k != "startup") <= info["seconds"] + 0.05
    assert stages["indexes"] > 0


def test_index_check_recall_and_rerank(copy_store, digits, cnn_ckpts, capsys) -> None:
    out = copy_store()
    info = _build(out, digits, cnn_ckpts, capsys, "--index", APPROX, "--rerank", "0", "--method", "tracin")
    store = info["path"]
    assert main(trusted(["index-check", store, "--data", str(digits.test_npz), "--queries", "8", "--json"])) == 0
    plain = json.loads(capsys.readouterr().out)["indexes"]
    assert [r["method"] for r in plain] == ["tracin"] and plain[0]["rerank"] == 0 and plain[0]["queries"] == 8
    for side in ("proponents", "opponents"):
        assert set(plain[0][side]) == {"recall@10", "recall@50"}
        assert all(0.0 <= v <= 1.0 for v in plain[0][side].values())
    assert plain[0]["score_error"] > 1e-3  # 4-bit PQ codes: scores are approximations

    _build(out, digits, cnn_ckpts, capsys, "--index", APPROX, "--rerank", "100", "--method", "tracin")
    assert main(trusted(["index-check", store, "--data", str(digits.test_npz), "--queries", "8", "--json"])) == 0
    reranked = json.loads(capsys.readouterr().out)["indexes"][0]
    assert reranked["rerank"] == 100
    assert reranked["score_error"] < 1e-5  # the shortlist's scores are exact
    assert reranked["proponents"]["recall@10"] >= plain[0]["proponents"]["recall@10"]


def test_index_check_on_an_exact_store_says_so(store, capsys) -> None:
    assert main(trusted(["index-check", str(store), "--queries", "4"])) == 0
    assert "exact" in capsys.readouterr().out


def test_build_rejects_a_negative_rerank(copy_store, digits, cnn_ckpts, capsys) -> None:
    assert main(_build_args(copy_store(), digits, cnn_ckpts, "--rerank", "-1")) == 2
    err = capsys.readouterr().err
    assert "--rerank" in err and ">= 0, got '-1'" in err  # refused while parsing, before the store is touched
