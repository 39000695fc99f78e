"""The ground truth exact mode is judged by: the same-seed small-drop linear datamodeling score.

Protocol (Ilyas & Engstrom 2025, "MAGIC"): drop a random 1–5% subset S of the
training set, retrain with the *same* recipe, seed and data order (the dropped
examples get loss weight 0, so every batch keeps its composition and divisor),
and record the change of each test margin. A score predicts the change as
``−Σ_{i∈S} s_i`` (removing proponents lowers the margin); the LDS is the Spearman
correlation between predicted and actual changes over the retrains, averaged over
test points. Any score matrix (exact mode, TRAK, TracIn, Grad-Cos) is judged the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from influence.data import SizedDataset
from influence.features.task import ClassificationTask
from influence.recipe import Recipe


def drop_masks(n: int, m: int, low: float = 0.01, high: float = 0.05, seed: int = 0) -> np.ndarray:
    """``m`` random drop sets as an (m, n) bool array (True = dropped), each of size ``U[low, high]·n`` (at least 1)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        size = max(1, int(round(rng.uniform(low, high) * n)))
        masks[j, rng.choice(n, size, replace=False)] = True
    return masks


def final_margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Margins ``logit_y − logsumexp_{j≠y} logit_j`` of a trained model (eval mode), float64."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return ClassificationTask().output(model.eval()(x.to(dtype)), y).double().numpy()


def retrain_margins(
    recipe: Recipe,
    data: SizedDataset,
    x: torch.Tensor,
    y: torch.Tensor,
    masks: np.ndarray,
    on_done: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Test margins after retraining with each drop set's examples weighted 0: shape (m, n_test)."""
    out = np.empty((len(masks), len(x)))
    for j, mask in enumerate(masks):
        out[j] = final_margins(recipe.train(data, weights=(~mask).astype(np.float64)), x, y)
        if on_done is not None:
            on_done(j, out[j])
    return out


def spearman_per_column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (0 where either is constant)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    return np.where(den > 0, (ra * rb).sum(0) / np.where(den > 0, den, 1), 0.0)


def drop_lds(scores: np.ndarray, masks: np.ndarray, actual_change: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Small-drop LDS of an (n_train, n_test) score matrix against (m, n_test) actual margin changes.

    Returns the mean Spearman over test points with a bootstrap 95% interval over test points,
    and the mean Pearson correlation (which also rewards getting the size of each change right).
    """
    predicted = -(masks.astype(np.float64) @ scores.astype(np.float64))  # (m, n_test)
    rho = spearman_per_column(predicted, actual_change)
    pc, ac = predicted - predicted.mean(0), actual_change - actual_change.mean(0)
    den = np.sqrt((pc ** 2).sum(0) * (ac ** 2).sum(0))
    pearson = np.where(den > 0, (pc * ac).sum(0) / np.where(den > 0, den, 1), 0.0)
    rng = np.random.default_rng(seed)
    boots = rho[rng.integers(0, len(rho), (n_boot, len(rho)))].mean(1)
    return {
        "lds": float(rho.mean()), "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "pearson": float(pearson.mean()), "n_test": int(len(rho)), "n_retrains": int(len(masks)),
    }

