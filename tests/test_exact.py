"""Exact mode: Recipe runs deterministically and exact_scores is the true derivative d margin / d w_i.

The oracle is retraining: reweight one example by 1 ± ε with the same recipe and take
the central difference of the test margin (float64, so ε = 1e-5 leaves ~1e-8 of
rounding in the quotient, far below the 1e-3 tolerance).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from influence import BadDataError, BadSpecError
from influence.data import ArrayDataset
from influence.demo.digits import load_digits_split
from influence.exact import exact_scores, metagradient
from influence.features.task import ClassificationTask
from influence.models import DigitsCNN, DigitsMLP
from influence.recipe import Recipe
from influence.demo.training import train_classifier

TESTS = Path(__file__).resolve().parent
TINY_MLP = f"{TESTS / 'tiny_models.py'}:tiny_mlp"  # DigitsMLP(hidden=16): ReLU, 256 → 16 → 16 → 10
N = 30
EPS = 1e-5


@pytest.fixture(scope="module")
def tiny():
    """30 digits (16×16) for training and two test images, as plain tensors."""
    train, test = load_digits_split()
    return ArrayDataset(train.x[:N], train.y[:N], "tiny"), test.x[:2], test.y[:2]


def margin_after(recipe: Recipe, data, weights, x, y) -> float:
    net = recipe.train(data, weights)
    with torch.no_grad():
        return float(ClassificationTask().output(net(x[None].to(torch.float64)), torch.tensor([y]))[0])


def finite_difference(recipe: Recipe, data, i: int, x, y) -> float:
    w = np.ones(len(data))
    w[i] = 1 + EPS
    up = margin_after(recipe, data, w, x, y)
    w[i] = 1 - EPS
    down = margin_after(recipe, data, w, x, y)
    return (up - down) / (2 * EPS)


RECIPES = {
    "sgd-momentum-wd": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, schedule="linear"),
    "adam-wd": dict(optimizer="adam", lr=0.01, weight_decay=0.01, schedule="cosine"),
    "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=0.05, schedule="constant"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_scores_match_finite_differences_of_retraining(tiny, name):
    data, xt, yt = tiny
    recipe = Recipe(model=TINY_MLP, epochs=3, batch_size=8, seed=3, dtype="float64", **RECIPES[name])
    target = int(yt[0])
    s = exact_scores(recipe, data, xt[0], target)
    assert s.shape == (N,) and np.isfinite(s).all()
    ids = [int(i) for i in np.argsort(-np.abs(s))[:3]] + [7]  # the largest, and one arbitrary example
    fd = np.array([finite_difference(recipe, data, i, xt[0], target) for i in ids])
    np.testing.assert_allclose(s[ids], fd, rtol=1e-3, atol=1e-3 * np.abs(s).max())
    assert np.abs(s).max() > 1e-3  # not a vacuous agreement of near-zeros


def tiny_bn_cnn() -> nn.Module:
    """Conv → BatchNorm2d → ReLU, then Linear → BatchNorm1d (cumulative average: momentum=None) → GELU → Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
        nn.Linear(64, 16), nn.BatchNorm1d(16, momentum=None), nn.GELU(), nn.Linear(16, 10),
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batchnorm_scores_match_finite_differences_of_retraining(tiny, optimizer):
    """Train-mode batch statistics and the running statistics (which only the final eval-mode model reads) are replayed."""
    data, xt, yt = tiny
    recipe = Recipe(model=tiny_bn_cnn, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01, weight_decay=0.01,
                    epochs=3, batch_size=8, seed=3, dtype="float64")
    target = int(yt[1])
    s = exact_scores(recipe, data, xt[1], target)
    ids = [int(i) for i in np.argsort(-np.abs(s))[:3]] + [7]
    fd = np.array([finite_difference(recipe, data, i, xt[1], target) for i in ids])
    np.testing.assert_allclose(s[ids], fd, rtol=1e-3, atol=1e-3 * np.abs(s).max())
    assert np.abs(s).max() > 1e-3


def test_batchnorm_recipe_reproduces_train_classifier(tiny):
    """The digits CNN trained by the recipe matches torch.optim.SGD + nn.BatchNorm2d's own running-statistics update."""
    data, _, _ = tiny
    net = Recipe(model="digits-cnn", epochs=3, batch_size=8, seed=2).train(data)
    torch.manual_seed(2)
    ref = DigitsCNN()
    train_classifier(ref, data, epochs=3, batch_size=8, seed=2)
    moved = 0
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=1e-4, atol=1e-5)
        if "running" in k:
            moved += int(not torch.equal(v, torch.zeros_like(v) if "mean" in k else torch.ones_like(v)))
    assert moved == 4  # both layers' means and variances left their initial values
    assert int(net.state_dict()["features.1.num_batches_tracked"]) == 12  # 3 epochs × 4 batches


class DeadUnitMLP(nn.Module):
    """One hidden unit is dead for every input, so its weights' gradient (and Adam's v) stays exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, 10))
        with torch.no_grad():
            self.net[1].weight[0].zero_()
            self.net[1].bias[0] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_adam_with_zero_second_moment_gives_finite_correct_scores(tiny):
    data, xt, yt = tiny
    recipe = Recipe(model=DeadUnitMLP, optimizer="adam", lr=0.01, weight_decay=0.0, epochs=2, batch_size=10, dtype="float64")
    s = exact_scores(recipe, data, xt[1], int(yt[1]))
    assert np.isfinite(s).all()  # √v at v = 0 has an infinite derivative; the replay must not turn 0·∞ into NaN
    i = int(np.argmax(np.abs(s)))
    assert s[i] == pytest.approx(finite_difference(recipe, data, i, xt[1], int(yt[1])), rel=1e-3)


def test_training_is_deterministic_and_leaves_the_global_rng_alone(tiny):
    data, _, _ = tiny
    recipe = Recipe(model=TINY_MLP, epochs=2, batch_size=8, seed=5)
    rng = torch.get_rng_state()
    a, b = recipe.train(data), recipe.train(data)
    assert torch.equal(torch.get_rng_state(), rng)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert va.numpy().tobytes() == vb.numpy().tobytes(), k
    c = Recipe(model=TINY_MLP, epochs=2, batch_size=8, seed=6).train(data)
    assert not torch.equal(a.state_dict()["net.1.weight"], c.state_dict()["net.1.weight"])


def test_recipe_reproduces_train_classifier(tiny):
    """The default SGD recipe is the toolkit's training loop (torch.optim.SGD), up to float rounding."""
    data, _, _ = tiny
    net = Recipe(model=DigitsMLP, epochs=3, batch_size=8, seed=2).train(data)
    torch.manual_seed(2)
    ref = DigitsMLP()
    train_classifier(ref, data, epochs=3, batch_size=8, seed=2)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_weights_enter_the_loss(tiny):
    data, _, _ = tiny
    recipe = Recipe(model=TINY_MLP, epochs=1, batch_size=8)
    w = np.ones(N)
    w[3] = 0.0
    a, b = recipe.train(data), recipe.train(data, w)
    assert not torch.equal(a.state_dict()["net.1.weight"], b.state_dict()["net.1.weight"])
    with pytest.raises(BadDataError, match=r"shape \(30,\)"):
        recipe.train(data, np.ones(N + 1))
    with pytest.raises(BadDataError, match="NaN"):
        recipe.train(data, np.full(N, np.nan))


def test_checkpointing_changes_nothing(tiny):
    data, xt, yt = tiny
    recipe = Recipe(model=TINY_MLP, optimizer="adam", lr=0.01, epochs=3, batch_size=8, seed=1)
    full = metagradient(recipe, data, xt[0], int(yt[0]), checkpoint_every=1)
    for k in (None, 2, 5):
        r = metagradient(recipe, data, xt[0], int(yt[0]), checkpoint_every=k)
        assert np.array_equal(r.scores, full.scores), k
    assert full.step_evals == full.steps  # nothing recomputed when every state is kept


def test_stored_states_grow_like_sqrt_steps(tiny):
    data, xt, yt = tiny
    peaks = {}
    for epochs in (16, 64):  # one full batch per epoch: T = epochs
        recipe = Recipe(model=TINY_MLP, epochs=epochs, batch_size=N, schedule="constant")
        r = metagradient(recipe, data, xt[0], int(yt[0]))
        assert r.steps == epochs and r.checkpoint_every == round(math.sqrt(epochs))
        assert r.peak_states <= 2 * math.sqrt(epochs) + 2
        peaks[epochs] = r.peak_states
        if epochs == 16:
            assert metagradient(recipe, data, xt[0], int(yt[0]), checkpoint_every=1).peak_states == epochs + 1
    assert 1.5 <= peaks[64] / peaks[16] <= 2.5  # 4× the steps, about 2× the states


def test_batch_of_queries_equals_one_at_a_time(tiny):
    data, xt, yt = tiny
    recipe = Recipe(model=TINY_MLP, epochs=2, batch_size=8, dtype="float64")
    both = metagradient(recipe, data, xt, yt).scores
    for j in range(2):
        np.testing.assert_allclose(both[:, j], exact_scores(recipe, data, xt[j], int(yt[j])), rtol=1e-10, atol=1e-12)
    with pytest.raises(BadDataError, match="one test point"):
        exact_scores(recipe, data, xt, yt)


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + 0.01 * torch.randn(len(x), 10)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 10)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add_(len(x))
        return self.fc(x.flatten(1))


def with_dropout() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.Dropout(0.5), nn.Linear(16, 10))


def with_instance_norm_stats() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), nn.Flatten(), nn.Linear(784, 10))


class SharedNorm(nn.Module):
    """One BatchNorm applied at two call sites: torch would update its running statistics twice per step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(256, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.bn(self.fc(x.flatten(1)))))


@pytest.mark.parametrize("model, message", [
    (SharedNorm, "called twice in one forward"),
    (with_instance_norm_stats, "InstanceNorm2d, track_running_stats=True"),
    (with_dropout, r"Dropout, p=0\.5"),
    (Noisy, "non-deterministic"),
    (Counter, "buffers"),
])
def test_unreplayable_models_are_refused_with_the_reason(tiny, model, message):
    data, xt, yt = tiny
    recipe = Recipe(model=model, epochs=1, batch_size=8)
    with pytest.raises(BadSpecError, match=message):
        recipe.train(data)
    with pytest.raises(BadSpecError, match=message):
        exact_scores(recipe, data, xt[0], int(yt[0]))


def test_bad_recipes_are_refused():
    with pytest.raises(BadSpecError, match="choose one of: sgd, adam, adamw"):
        Recipe(model=TINY_MLP, optimizer="rmsprop")
    with pytest.raises(BadSpecError, match="schedule 'step'"):
        Recipe(model=TINY_MLP, schedule="step")
    with pytest.raises(BadSpecError, match="lr must be a positive"):
        Recipe(model=TINY_MLP, lr=-1.0)
    with pytest.raises(BadSpecError, match="factory"):
        Recipe(model=DigitsMLP())  # a built module cannot be re-created for a rerun


def test_recipe_json_round_trip_and_checkpoints(tiny, tmp_path):
    data, _, _ = tiny
    recipe = Recipe(model=DigitsMLP, optimizer="adam", lr=0.003, epochs=4, batch_size=16, seed=9, schedule="cosine")
    loaded = Recipe.load(recipe.save(tmp_path / "r.json"))
    assert loaded == Recipe(**{**recipe.__dict__, "model": "influence.models:DigitsMLP"})
    net = recipe.train(data, checkpoint_dir=tmp_path / "run", checkpoints=2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch_002.pt", "epoch_004.pt", "recipe.json"]
    assert Recipe.load(tmp_path / "run" / "recipe.json") == loaded
    last = torch.load(tmp_path / "run" / "epoch_004.pt", weights_only=True)
    assert all(torch.equal(last[k], v) for k, v in net.state_dict().items())
    with pytest.raises(BadSpecError, match="not importable"):
        Recipe(model=lambda: DigitsMLP()).save(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text('{"model": "digits-mlp", "lr_max": 1}')
    with pytest.raises(BadSpecError, match="unknown fields"):
        Recipe.load(tmp_path / "bad.json")


def test_data_the_model_cannot_take_is_refused():
    data = ArrayDataset(torch.rand(12, 1, 4, 4), torch.arange(12) % 10)
    with pytest.raises(BadDataError, match=r"images of shape \(1, 4, 4\)"):
        Recipe(model=TINY_MLP, epochs=1, batch_size=4).train(data)


def test_public_names():
    import influence

    assert influence.Recipe is Recipe and influence.exact_scores is exact_scores


def test_exact_scores_predict_small_drop_retraining(tiny):
    """The claim of exact mode, end to end: −Σ_{i∈S} s_i ranks the margin changes of retrains without S."""
    from influence.evaluation.exact_lds import drop_lds, drop_masks, final_margins, retrain_margins

    data, xt, yt = tiny
    recipe = Recipe(model=TINY_MLP, epochs=3, batch_size=8, seed=4, dtype="float64")
    s = metagradient(recipe, data, xt, yt).scores
    masks = drop_masks(N, 12, low=0.03, high=0.1, seed=0)  # 1–3 of 30 examples dropped per retrain
    assert 1 <= masks.sum(1).min() and masks.sum(1).max() <= 3
    base = final_margins(recipe.train(data), xt, yt)
    change = retrain_margins(recipe, data, xt, yt, masks) - base
    assert drop_lds(s, masks, change)["lds"] > 0.9
    assert drop_lds(-s, masks, change)["lds"] < -0.9  # the metric sees the sign


def test_bad_queries_are_refused_before_training(tiny):
    data, xt, _ = tiny
    recipe = Recipe(model=TINY_MLP, epochs=1, batch_size=8)
    with pytest.raises(BadDataError, match=r"test_x of shape \(1, 8, 8\)"):
        exact_scores(recipe, data, torch.rand(1, 8, 8), 0)
    with pytest.raises(BadSpecError, match="out of range"):
        exact_scores(recipe, data, xt[0], 12)
    with pytest.raises(BadSpecError, match="checkpoint_every"):
        exact_scores(recipe, data, xt[0], 1, checkpoint_every=0)


def test_learning_rate_schedules():
    lrs = {s: [Recipe(model=TINY_MLP, lr=0.1, epochs=4, schedule=s).lr_at(e) for e in range(4)]
           for s in ("constant", "linear", "cosine")}
    assert lrs["constant"] == [0.1] * 4
    np.testing.assert_allclose(lrs["linear"], [0.1, 0.075, 0.05, 0.025])  # train_classifier's per-epoch decay
    np.testing.assert_allclose(lrs["cosine"], [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 - math.cos(math.pi / 4)) / 2])


def test_exact_study_models_and_recipes() -> None:
    """Every model the exact study names builds and runs on its data's shape; the -lr0.01 variants train at lr 0.01."""
    from influence.evaluation.exact_study import MODELS, RECIPE, _data_of, recipe_of

    for name in MODELS:
        recipe = recipe_of(name)
        side = 28 if _data_of(name) == "fashion" else 16
        assert recipe.build_model()(torch.zeros(2, 1, side, side)).shape == (2, 10)
        assert recipe.lr == (0.01 if name.endswith("-lr0.01") else RECIPE.lr)
        assert dataclass_fields_equal(recipe, RECIPE, skip={"model", "lr"})


def dataclass_fields_equal(a: Recipe, b: Recipe, skip: set[str]) -> bool:
    import dataclasses

    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a) if f.name not in skip)
