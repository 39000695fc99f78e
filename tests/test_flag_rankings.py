"""Mislabel rankings (``influence.mislabel_rank``) through the public API: each is what its definition says, computed
here independently from the store's columns and self-influence, and the CLI's default is ``flag``'s default."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import N_TRAIN, trusted
from influence.cli import main
from influence.flag import flag_mislabels, mislabel_method, run_flags
from influence.mislabel_rank import RANKINGS, mislabel_scores, normalised_rank, rank_mean


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main(trusted([str(a) for a in args]))
    out, err = capsys.readouterr()
    return code, out, err


def _ranks(s: np.ndarray) -> np.ndarray:
    """Normalised ranks by sorting (the test's own; valid where the values are distinct)."""
    r = np.empty(len(s))
    r[np.argsort(s, kind="stable")] = np.arange(len(s))
    return r / (len(s) - 1)


def test_normalised_rank_scales_to_unit_interval_and_averages_ties():
    np.testing.assert_allclose(normalised_rank(np.array([3.0, -1.0, 10.0])), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(normalised_rank(np.array([2.0, 2.0, 5.0, 0.0])), [0.5, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(rank_mean(np.array([1.0, 2.0, 3.0]), np.array([30.0, 20.0, 10.0])), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(rank_mean(np.array([1.0, 2.0, 3.0]), np.array([1e-9, 5e9, 6e9])), [0.0, 0.5, 1.0])


def test_column_rankings_are_the_stored_columns(session):
    store = session.store
    ckpts = store.checkpoint_ids
    assert len(ckpts) > 1, "guard: sums over several checkpoints differ from the final one"
    loss = [np.asarray(store.column("loss", c), dtype=np.float64) for c in ckpts]
    margin = [np.asarray(store.column("margin", c), dtype=np.float64) for c in ckpts]
    np.testing.assert_allclose(mislabel_scores(session, "loss"), loss[-1])
    np.testing.assert_allclose(mislabel_scores(session, "loss-sum"), np.sum(loss, axis=0), rtol=1e-12)
    np.testing.assert_allclose(mislabel_scores(session, "margin"), -np.sum(margin, axis=0), rtol=1e-12)
    # cross-entropy is softplus(−margin): at one checkpoint loss and −margin rank alike
    np.testing.assert_allclose(loss[-1], np.logaddexp(0, -margin[-1]), rtol=1e-4, atol=1e-6)


def test_combined_is_the_rank_mean_of_loss_and_trak_self_influence(session):
    assert "trak" in session.methods
    loss = np.asarray(session.store.column("loss", session.store.checkpoint_ids[-1]), dtype=np.float64)
    trak = np.asarray(session.self_influence("trak"), dtype=np.float64)
    assert len(np.unique(loss)) == len(np.unique(trak)) == N_TRAIN, "guard: distinct values, so sorting ranks them"
    want = (_ranks(loss) + _ranks(trak)) / 2
    np.testing.assert_allclose(mislabel_scores(session, "combined"), want, atol=1e-12)
    flags = flag_mislabels(session, method="combined", top=N_TRAIN)
    assert [f.train_id for f in flags] == np.argsort(-want, kind="stable").tolist()
    assert [f.score for f in flags] == pytest.approx(np.sort(want)[::-1].tolist())


def test_loss_margin_is_the_rank_mean_of_final_loss_and_summed_margin(session):
    store = session.store
    loss = np.asarray(store.column("loss", store.checkpoint_ids[-1]), dtype=np.float64)
    margin = np.sum([np.asarray(store.column("margin", c), dtype=np.float64) for c in store.checkpoint_ids], axis=0)
    assert len(np.unique(loss)) == len(np.unique(margin)) == N_TRAIN, "guard: distinct values, so sorting ranks them"
    np.testing.assert_allclose(mislabel_scores(session, "loss-margin"), (_ranks(loss) + _ranks(-margin)) / 2, atol=1e-12)


@pytest.mark.parametrize("method", RANKINGS)
def test_every_ranking_flags_in_descending_order(session, method):
    flags = flag_mislabels(session, method=method, top=10)
    assert len(flags) == 10 and len({f.train_id for f in flags}) == 10
    scores = mislabel_scores(session, method)
    assert [f.train_id for f in flags] == np.argsort(-scores, kind="stable")[:10].tolist()
    prob = session.label_probability()
    assert [f.model_prob_of_label for f in flags] == [round(float(prob[f.train_id]), 4) for f in flags]


def test_flag_default_is_mislabel_method(session):
    default = mislabel_method(session)
    assert default in RANKINGS
    assert flag_mislabels(session, top=15) == flag_mislabels(session, method=default, top=15)
    assert run_flags(session, kinds=["mislabel"], top=15)["mislabel"] == [f.to_json() for f in flag_mislabels(session, top=15)]


def test_cli_self_influence_and_flag_follow_the_default(session, store, tmp_path, capsys):
    default = mislabel_method(session)
    code, _, err = _cli(capsys, "self-influence", store, "--out", tmp_path / "default.npy")
    assert code == 0, err
    assert f"({default})" in err
    values = np.load(tmp_path / "default.npy")
    np.testing.assert_allclose(values, mislabel_scores(session, default))
    code, out, err = _cli(capsys, "flag", store, "--kind", "mislabel", "--top", "10", "--json")
    assert code == 0, err
    assert [f["train_id"] for f in json.loads(out)["mislabel"]] == np.argsort(-values, kind="stable")[:10].tolist()
    for name in ("loss", "combined", "tracin"):
        code, out, err = _cli(capsys, "flag", store, "--kind", "mislabel", "--method", name, "--top", "5", "--json")
        assert code == 0, err
        want = np.argsort(-mislabel_scores(session, name), kind="stable")[:5].tolist()
        assert [f["train_id"] for f in json.loads(out)["mislabel"]] == want


def test_rankings_other_than_scoring_methods_are_refused_for_harmful(session, store, digits, capsys):
    code, out, err = _cli(capsys, "flag", store, "--test", digits.train_npz, "--kind", "harmful", "--method", "loss")
    assert code == 2 and out == "" and "ranks mislabels only" in err
    code, out, err = _cli(capsys, "flag", store, "--kind", "mislabel", "--method", "gradcos")
    assert code == 2 and out == "" and "constant under gradcos" in err


def test_every_ranking_is_a_cli_choice():
    from influence.cli import _parser

    p = _parser()
    for name in RANKINGS:
        assert p.parse_args(["self-influence", "S", "--out", "o.npy", "--method", name]).method == name
        assert p.parse_args(["flag", "S", "--method", name]).method == name
        assert p.parse_args(["repair", "--method", name]).method == name
