"""Exact mode where users ask: ``Influence.exact_scores``, ``explain(exact_recipe=...)`` and ``explain --exact``.

The store is built from the checkpoints that ``Recipe.train`` saved, so the recipe is the run that made them.
The oracle is :func:`influence.exact.exact_scores` called directly on the same rows (its own correctness
against retraining is tests/test_exact.py's job): the session must give the same numbers and rank by them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import influence
from influence import BadSpecError
from influence.cli import main
from influence.data import ArrayDataset
from influence.demo.digits import load_digits_split
from influence.exact import exact_scores
from influence.recipe import Recipe

TESTS = Path(__file__).resolve().parent
TINY_MLP = f"{TESTS / 'tiny_models.py'}:tiny_mlp"
TINY_CNN = f"{TESTS / 'tiny_models.py'}:tiny_cnn"
N = 40
K = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """40 digits as .npz, a 2-epoch recipe trained with 2 checkpoints, and a store built from them."""
    root = tmp_path_factory.mktemp("exact_cli")
    train, test = load_digits_split()
    x, y = train.x[:N].clone(), train.y[:N].clone()
    np.savez(root / "train.npz", x=x.numpy(), y=y.numpy())
    np.savez(root / "test.npz", x=test.x[:6].numpy(), y=test.y[:6].numpy())
    recipe = Recipe(TINY_MLP, lr=0.1, epochs=2, batch_size=10, seed=3)
    recipe.train(ArrayDataset(x, y), checkpoint_dir=root / "ckpt", checkpoints=2)
    ckpts = sorted((root / "ckpt").glob("epoch_*.pt"))
    assert len(ckpts) == 2
    influence.build(TINY_MLP, str(root / "train.npz"), ckpts, root / "store", proj_dim=64, batch_size=20,
                    progress=False)
    return root, recipe, ArrayDataset(x, y), test.x[:6], test.y[:6]


def direct(recipe: Recipe, data, x, target: int) -> np.ndarray:
    return exact_scores(recipe, data, x, target)


def test_session_exact_scores_equal_direct_call(built, capsys):
    root, recipe, data, xt, _ = built
    session = influence.Influence.open(root / "store", trust_store=True)  # the test's own model file
    targets = [3, 7]
    got = session.exact_scores(xt[:2], targets, recipe=recipe, progress=False)
    assert got.shape == (N, 2) and got.dtype == np.float32
    want = np.stack([direct(recipe, data, xt[j], t) for j, t in enumerate(targets)], axis=1)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    err = capsys.readouterr().err
    assert "expected about" in err and "steps" in err  # the estimate comes before the replay


def test_recipe_of_another_model_is_refused(built):
    root, recipe, _, xt, _ = built
    session = influence.Influence.open(root / "store", trust_store=True)  # the test's own model file
    other = Recipe(TINY_CNN, lr=0.1, epochs=2, batch_size=10, seed=3)
    with pytest.raises(BadSpecError, match="not the store's model"):
        session.exact_scores(xt[:1], [0], recipe=other, progress=False)


def test_explain_exact_json_and_report(built, capsys):
    root, recipe, data, xt, _ = built
    out = root / "report"
    code = main(["explain", "--trust-store", str(root / "store"), "--data", str(root / "test.npz"), "--ids", "0,1,2", "--k", str(K),
                 "--exact", "--recipe", str(root / "ckpt" / "recipe.json"), "--json", "--out", str(out)])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["explanations"]) == 3
    for e, j in zip(doc["explanations"], (0, 1, 2)):
        assert e["exact"] is True and e["method"] == "exact"
        pro = direct(recipe, data, xt[j], e["target"])
        opp = pro if e["opponents_target"] == e["target"] else direct(recipe, data, xt[j], e["opponents_target"])
        assert [p["train_id"] for p in e["proponents"]] == np.argsort(-pro, kind="stable")[:K].tolist()
        assert [p["train_id"] for p in e["opponents"]] == np.argsort(opp, kind="stable")[:K].tolist()
        np.testing.assert_allclose([p["score"] for p in e["proponents"]], np.sort(pro)[::-1][:K], rtol=1e-4, atol=1e-7)
        assert all(p["score"] < 0 for p in e["opponents"])
    assert "exact (replayed training)" in Path(doc["report"]).read_text()


def test_fast_explain_is_not_marked_exact(built, capsys):
    root, *_ = built
    out = root / "fast_report"
    assert main(["explain", "--trust-store", str(root / "store"), "--data", str(root / "test.npz"), "--ids", "0", "--k", str(K),
                 "--json", "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["explanations"][0]["exact"] is False and doc["explanations"][0]["method"] != "exact"
    assert "exact (replayed training)" not in Path(doc["report"]).read_text()


def test_exact_without_recipe_is_a_usage_error(built, capsys):
    root, *_ = built
    code = main(["explain", "--trust-store", str(root / "store"), "--data", str(root / "test.npz"), "--ids", "0", "--exact"])
    err = capsys.readouterr().err
    assert code == 2 and "--recipe" in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_recipe_of_another_model(built, tmp_path, capsys):
    root, *_ = built
    path = Recipe(TINY_CNN, epochs=1, batch_size=10).save(tmp_path / "recipe.json")
    code = main(["explain", "--trust-store", str(root / "store"), "--data", str(root / "test.npz"), "--ids", "0", "--exact",
                 "--recipe", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "not the store's model" in err and len(err.strip().splitlines()) == 1
