"""TracIn, Grad-Cos and TRAK through the public API against an independent float64 oracle.

The oracle shares nothing with the library's featurizer or scorers: one ``torch.autograd.grad`` call per
example on a float64 copy of each checkpoint, then the published formulas with dense numpy:

- TracIn (Pruthi et al. 2020, TracInCP): S(i, t) = Σ_c η_c ⟨∇ℓ_c(i), ∇ℓ_c(t)⟩ on cross-entropy gradients;
- Grad-Cos: the cosine of the checkpoint-concatenated, √η_c-weighted loss gradients;
- TRAK (Park et al. 2023): the mean over checkpoints of φ_c(t)ᵀ(Φ_cᵀΦ_c + λ_c I)⁻¹φ_c(i)·(1 − p_c(i)),
  with φ the gradient of the margin m = logit_y − logsumexp_{j≠y} logit_j and
  λ_c = lam_rel · trace(Φ_cᵀΦ_c)/min(N, k), the mean nonzero eigenvalue (one λ per checkpoint; here N < k).

The store is built with ``projector="none"`` (exact gradients) and ``dtype="float32"``, so the only gap
left is float32 arithmetic (features, the stored k×k inverse, the scores): RTOL below is measured slack
over that, relative to the largest |score|.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import influence
from conftest import BATCH, CHUNK, CNN_SPEC

# BatchNorm (in eval mode, on running statistics) plus the output layer: 8 + 650 exact gradient coordinates.
PARAMS = "features.1,head.3"
LR_WEIGHTS = [0.5, 0.2, 0.05]  # distinct, so a missing or misplaced η shows
LAM_REL = 0.1  # not the default, so the test also sees that trak_lambda reaches the solve
# float32 against float64: the largest gap measured here was 4e-7 of max|S| for TracIn and Grad-Cos and 2e-6
# for TRAK (the condition number of ΦᵀΦ + λI is at most 1 + trace/λ = 1 + N/lam_rel = 1601); 2e-5 leaves 10× room.
RTOL = 2e-5


@dataclass(frozen=True)
class Oracle:
    """Per-checkpoint float64 gradients of the selected parameters, stacked per example."""

    loss_train: list[np.ndarray]  # per checkpoint, (N, p) gradients of the cross-entropy
    margin_train: list[np.ndarray]  # per checkpoint, (N, p) gradients of the margin
    prob_train: list[np.ndarray]  # per checkpoint, (N,) softmax probability of the label
    loss_test: list[np.ndarray]
    margin_test: list[np.ndarray]


def _selected(model: nn.Module) -> list[nn.Parameter]:
    prefixes = PARAMS.split(",")
    return [p for n, p in model.named_parameters() if any(n.startswith(w + ".") for w in prefixes)]


def _margin(logits: torch.Tensor, y: int) -> torch.Tensor:
    others = torch.cat([logits[:y], logits[y + 1:]])
    return logits[y] - torch.logsumexp(others, dim=0)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss grads, margin grads, p_y) with one backward pass per example and per quantity."""
    params = _selected(model)
    loss_g, margin_g, prob = [], [], []
    for xi, yi in zip(x.double(), y.tolist()):
        logits = model(xi[None])[0]
        loss = nn.functional.cross_entropy(logits[None], torch.tensor([yi]))
        loss_g.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]))
        margin_g.append(torch.cat([g.flatten() for g in torch.autograd.grad(_margin(logits, yi), params)]))
        prob.append(torch.softmax(logits.detach(), 0)[yi])
    return torch.stack(loss_g).numpy(), torch.stack(margin_g).numpy(), torch.stack(prob).numpy()


def _load(path: Path) -> nn.Module:
    import tiny_models

    model = tiny_models.tiny_cnn()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.double().eval()


@pytest.fixture(scope="module")
def exact_store(digits, cnn_ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oracle") / "store"
    return influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, out, projector="none", dtype="float32",
                           params=PARAMS, lr_weights=LR_WEIGHTS, trak_lambda=LAM_REL, batch_size=BATCH,
                           rows_per_chunk=CHUNK, progress=False)


@pytest.fixture(scope="module")
def exact(exact_store) -> influence.Influence:
    return influence.Influence.open(exact_store, trust_store=True)


@pytest.fixture(scope="module")
def models(cnn_ckpts) -> list[nn.Module]:
    return [_load(p) for p in cnn_ckpts.paths]


def _oracle(models: list[nn.Module], digits, y_test: torch.Tensor) -> Oracle:
    train = [_grads(m, digits.x, digits.y) for m in models]
    test = [_grads(m, digits.x_test, y_test) for m in models]
    return Oracle([g[0] for g in train], [g[1] for g in train], [g[2] for g in train],
                  [g[0] for g in test], [g[1] for g in test])


@pytest.fixture(scope="module")
def oracle(models, digits) -> Oracle:
    return _oracle(models, digits, digits.y_test)


def tracin(o: Oracle) -> np.ndarray:
    return sum(eta * gi @ gt.T for eta, gi, gt in zip(LR_WEIGHTS, o.loss_train, o.loss_test))


def gradcos(o: Oracle) -> np.ndarray:
    gi = np.concatenate([np.sqrt(eta) * g for eta, g in zip(LR_WEIGHTS, o.loss_train)], axis=1)
    gt = np.concatenate([np.sqrt(eta) * g for eta, g in zip(LR_WEIGHTS, o.loss_test)], axis=1)
    return (gi / np.linalg.norm(gi, axis=1, keepdims=True)) @ (gt / np.linalg.norm(gt, axis=1, keepdims=True)).T


def trak(o: Oracle, lam_rel: float = LAM_REL, old_unit: bool = False) -> np.ndarray:
    """``old_unit``: λ = lam_rel · trace/k, the rule before trace/min(N, k) (a variant the library must not match)."""
    total = 0.0
    for phi, phi_t, p in zip(o.margin_train, o.margin_test, o.prob_train):
        gram = phi.T @ phi
        n, k = phi.shape
        lam = lam_rel * np.trace(gram) / (k if old_unit else min(n, k))
        solved = np.linalg.solve(gram + lam * np.eye(k), phi_t.T)  # (k, n_test) = (ΦᵀΦ + λI)⁻¹ φ(t)
        total = total + (phi @ solved) * (1.0 - p)[:, None]
    return total / len(o.margin_train)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_oracle_inputs_are_not_degenerate(exact_store, oracle):
    """Guard: exact gradients (k = p) with fewer rows than k (so trace/min(N, k) ≠ trace/k), three distinct
    checkpoints, and labels the models do not all fit."""
    assert influence.describe_store(exact_store)["k"] == oracle.margin_train[0].shape[1] == 658
    assert oracle.margin_train[0].shape[0] < 658
    assert not np.allclose(oracle.margin_train[0], oracle.margin_train[-1])
    assert 0.05 < (1 - oracle.prob_train[-1]).mean() < 0.95


@pytest.mark.parametrize("method, formula", [("tracin", tracin), ("gradcos", gradcos), ("trak", trak)])
def test_scores_equal_float64_oracle(exact, oracle, digits, method, formula):
    _close(exact.scores(digits.x_test, digits.y_test, method=method), formula(oracle))


def test_default_target_is_the_final_checkpoint_prediction(exact, models, digits):
    with torch.no_grad():
        predicted = models[-1](digits.x_test.double()).argmax(-1)
    assert (predicted != digits.y_test).any(), "guard: some test image is misclassified, so the target matters"
    o = _oracle(models, digits, predicted)
    for method, formula in (("tracin", tracin), ("trak", trak)):
        _close(exact.scores(digits.x_test, method=method), formula(o))


def test_trak_oracle_tells_plausible_variants_apart(exact, oracle, digits):
    """Guard: a sum over checkpoints instead of the mean, the default λ instead of the one asked for, or λ in the old
    unit trace/k instead of trace/min(N, k), would fail."""
    got = exact.scores(digits.x_test, digits.y_test, method="trak")
    want = trak(oracle)
    assert not np.allclose(got, want * len(LR_WEIGHTS), atol=RTOL * np.abs(want).max() * 10)
    assert not np.allclose(got, trak(oracle, lam_rel=1.0), atol=RTOL * np.abs(want).max() * 10)
    assert not np.allclose(got, trak(oracle, old_unit=True), atol=RTOL * np.abs(want).max() * 10)


def test_stored_trak_lambda_is_relative_to_the_mean_nonzero_eigenvalue(exact, oracle):
    """N < k here: λ_c = lam_rel · trace(Φ_cᵀΦ_c)/N, recorded with its unit beside the inverse."""
    from influence.scoring import TRAK, TRAK_LAMBDA_UNIT

    for c, phi in zip(exact.store.checkpoint_ids, oracle.margin_train):
        done = TRAK.stored_lambda(exact.store, c)
        assert done is not None and done.rel == LAM_REL
        assert done.value == pytest.approx(LAM_REL * (phi * phi).sum() / len(phi), rel=1e-5)  # float32 features
        assert done.unit == TRAK_LAMBDA_UNIT == "trace/min(n,k)"


def test_dual_form_from_a_store_equals_its_trak_scores(exact, digits):
    """``lds.dual_form_inputs`` + ``trak_scores_dual`` at the store's own λ (the λ sweeps' path) give the store's TRAK
    scores; ``StoredLambda.is_current`` says which rel that is."""
    from influence.evaluation.lds import dual_form_inputs, trak_scores_dual
    from influence.scoring import TRAK

    x, y = digits.x_test[:4], digits.y_test[:4]
    done = TRAK.stored_lambda(exact.store, exact.store.checkpoint_ids[0])
    assert done is not None and done.is_current(LAM_REL) and not done.is_current(1.0)
    want = exact.scores(x, y, method="trak")
    got = trak_scores_dual(*dual_form_inputs(exact, x, y), LAM_REL)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_self_influence_equals_float64_oracle(exact, oracle):
    want_tracin = sum(eta * (g * g).sum(1) for eta, g in zip(LR_WEIGHTS, oracle.loss_train))
    got = exact.self_influence("tracin")
    np.testing.assert_allclose(got, want_tracin, rtol=0, atol=RTOL * want_tracin.max())

    self_oracle = Oracle(oracle.loss_train, oracle.margin_train, oracle.prob_train, oracle.loss_train, oracle.margin_train)
    want_trak = np.diag(trak(self_oracle))
    np.testing.assert_allclose(exact.self_influence("trak"), want_trak, rtol=0, atol=RTOL * np.abs(want_trak).max())


def test_trak_inverse_by_cholesky_equals_numpy_inv_and_falls_back_on_an_indefinite_matrix():
    from influence.scoring import _spd_inverse, trak_inverse

    rng = np.random.default_rng(0)
    phi = rng.standard_normal((60, 40))
    gram = phi.T @ phi
    inv, lam = trak_inverse(gram, 1.0, n=60)
    assert lam == np.trace(gram) / 40  # N ≥ k: the mean nonzero eigenvalue is trace/k
    assert np.allclose(inv, np.linalg.inv(gram + lam * np.eye(40)), rtol=1e-12, atol=1e-15) and np.array_equal(inv, inv.T)
    indefinite = np.diag([1.0, -2.0, 3.0])  # Cholesky fails: LU's inverse instead
    assert np.allclose(_spd_inverse(indefinite), np.diag([1.0, -0.5, 1 / 3]))


@pytest.mark.parametrize("lam_rel", [1.0, 0.1])
def test_trak_lambda_with_fewer_rows_than_k_is_relative_to_the_mean_nonzero_eigenvalue(lam_rel):
    """N < k: ΦᵀΦ has N nonzero eigenvalues, so λ = lam_rel · trace/N (their mean), not trace/k."""
    from influence.scoring import trak_inverse, trak_lambda

    rng = np.random.default_rng(1)
    n, k = 30, 80
    phi = rng.standard_normal((n, k))
    gram = phi.T @ phi
    nonzero = np.linalg.eigvalsh(gram)[-n:]
    assert np.isclose(nonzero.mean(), np.trace(gram) / n) and np.allclose(np.linalg.eigvalsh(gram)[:-n], 0, atol=1e-9)
    inv, lam = trak_inverse(gram, lam_rel, n=n)
    assert lam == lam_rel * np.trace(gram) / n == trak_lambda(lam_rel, np.trace(gram), n, k)
    np.testing.assert_allclose(inv, np.linalg.inv(gram + lam * np.eye(k)), rtol=1e-10, atol=1e-14)
    assert trak_lambda(lam_rel, np.trace(gram), n=k + 5, k=k) == lam_rel * np.trace(gram) / k  # N ≥ k: unchanged
