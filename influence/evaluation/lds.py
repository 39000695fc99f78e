"""Linear datamodeling score (LDS; Park et al. 2023, "TRAK"): do attribution scores predict retraining outcomes?

Draw M random half-subsets S_j of the training set, retrain on each and record each test point's margin. An
attribution predicts the margin of t after training on S_j as Σ_{i∈S_j} S(i, t); LDS is the Spearman correlation,
over the M subsets, between predicted and actual margins, averaged over test points, with a bootstrap 95% interval
over test points.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import rankdata

from influence.errors import BadDataError
from influence.features import ClassificationTask
from influence.scoring import trak_lambda

if TYPE_CHECKING:
    from influence.query import Influence

M_SUBSETS = 100
SUBSET_SEED = 12345


def subset_masks(n: int, m: int = M_SUBSETS, seed: int = SUBSET_SEED) -> np.ndarray:
    """(m, n) boolean masks, each selecting n // 2 of the n training examples at random (seeded)."""
    if n < 2 or m < 1:
        raise BadDataError(f"need n >= 2 training examples and m >= 1 subsets; got n={n}, m={m}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n, n // 2, replace=False)] = True
    return masks


def margins(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Margins of the true label, logit_y − logsumexp_{j≠y} logit_j, of ``net`` in eval mode (float32)."""
    net.eval()
    with torch.no_grad():
        return ClassificationTask().output(net(x), y).numpy().astype(np.float32)


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """LDS of an (n_train, n_test) score matrix against (M, n_train) subset masks and (M, n_test) actual margins.

    Returns {"lds": mean Spearman over test points, "ci": [2.5, 97.5] bootstrap percentiles, "n_test": ...}. A test
    point whose predicted or actual margins are constant over the subsets counts as 0.
    """
    s = np.asarray(scores, dtype=np.float64)
    mk = np.asarray(masks, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if s.ndim != 2 or mk.ndim != 2 or a.ndim != 2 or mk.shape[1] != s.shape[0] or a.shape != (mk.shape[0], s.shape[1]):
        raise BadDataError(f"need scores (n_train, n_test), masks (M, n_train), actual (M, n_test); got {s.shape}, "
                           f"{mk.shape}, {a.shape}")
    rp = rankdata(mk @ s, axis=0)
    ra = rankdata(a, axis=0)
    rp -= rp.mean(0)
    ra -= ra.mean(0)
    den = np.sqrt((rp ** 2).sum(0) * (ra ** 2).sum(0))
    rho = np.where(den > 0, (rp * ra).sum(0) / np.where(den > 0, den, 1), 0.0)
    rng = np.random.default_rng(seed)
    boots = rho[rng.integers(0, len(rho), (n_boot, len(rho)))].mean(1)
    return {"lds": float(rho.mean()), "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "n_test": int(len(rho))}


def trak_scores_dual(phi: list[np.ndarray], q: list[np.ndarray], phi_test: list[np.ndarray], rel: float) -> np.ndarray:
    """TRAK scores (n_train, n_test) at λ = rel·trace(ΦᵀΦ)/min(N, k) (``influence.scoring.trak_lambda``, the rule of
    the store's own inverses), averaged over checkpoints, via the N×N dual form.

    Φ(ΦᵀΦ + λI)⁻¹φ_t = (ΦΦᵀ + λI)⁻¹Φφ_t, so one eigendecomposition of ΦΦᵀ per checkpoint serves every λ of a sweep
    (the library's TRAK solves the k×k form once per store). ``phi``: per checkpoint (N, k) training features;
    ``q``: per checkpoint (N,) weights 1 − p; ``phi_test``: per checkpoint (T, k) test features.
    """
    if not phi or not len(phi) == len(q) == len(phi_test):
        raise BadDataError(f"need one phi, q and phi_test per checkpoint; got {len(phi)}, {len(q)}, {len(phi_test)}")
    out: np.ndarray | float = 0.0
    for P, Q, T in zip(phi, q, phi_test):
        K = P @ P.T
        w, V = np.linalg.eigh(K)
        lam = trak_lambda(rel, float(np.trace(K)), *P.shape)
        B = V.T @ (P @ T.T)
        out = out + Q[:, None] * (V @ (B / (w + lam)[:, None]))
    return np.asarray(out) / len(phi)


def dual_form_inputs(session: "Influence", x: torch.Tensor, y: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """What :func:`trak_scores_dual` takes, from a store: per checkpoint the stored training features Φ_c, TRAK's
    weights Q_c = −dℓ/dm = 1 − p, and the test features of ``x`` (labels ``y``) by the store's own projector;
    float64."""
    st = session.store
    phi = [st.read_features(c).astype(np.float64) for c in st.checkpoint_ids]
    q = [-st.column("loss_weight", c).astype(np.float64) for c in st.checkpoint_ids]
    test = [session.projector.featurize(session.model_at(i), session.task, session.names, x, y).detach().double().numpy()
            for i in range(len(phi))]
    return phi, q, test
