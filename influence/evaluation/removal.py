"""Remove-and-retrain counterfactuals: does removing a prediction's top proponents change it more than chance?

For each test point, remove its top-k training examples by attribution score (or k random ones, the control),
retrain, and record whether the prediction flips and how much the true-label margin drops (Hammoudeh & Lowd 2024
survey this protocol; Ilyas et al. 2022 use it for datamodels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from influence.errors import BadDataError

# retrain(keep_ids, test_id) -> (margin of the true label after retraining, whether the prediction is still right)
Retrain = Callable[[np.ndarray, int], tuple[float, bool]]


def removal_trials(
    scores: np.ndarray, test_ids: Sequence[int], margins_before: Sequence[float], ks: Sequence[int], retrain: Retrain,
    rng: np.random.Generator, progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (test point, k, "top" | "random"): remove, retrain through ``retrain``, record flip and margins.

    ``scores`` is (n_train, len(test_ids)), higher = stronger proponent; ``margins_before`` the margin of each test
    point under the model trained on everything. Random removals draw from ``rng`` in a fixed order (top then random,
    k ascending, per test point), so a seed reproduces them.
    """
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[1] != len(test_ids) or len(margins_before) != len(test_ids):
        raise BadDataError(f"scores must be (n_train, {len(test_ids)}) with one margin per test id; got {s.shape}, "
                           f"{len(margins_before)} margins")
    n = s.shape[0]
    if any(not 0 < k < n for k in ks):
        raise BadDataError(f"every k must lie in (0, {n}); got {list(ks)}")
    rows = []
    for j, t in enumerate(test_ids):
        order = np.argsort(-s[:, j], kind="stable")
        for k in ks:
            for how in ("top", "random"):
                removed = order[:k] if how == "top" else rng.choice(n, k, replace=False)
                margin, correct = retrain(np.setdiff1d(np.arange(n), removed), int(t))
                rows.append({"test_id": int(t), "k": int(k), "how": how, "flipped": not correct,
                             "margin_before": float(margins_before[j]), "margin_after": float(margin)})
        if progress is not None:
            progress(j + 1, len(test_ids))
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"top10": {"flips", "n", "flip_rate", "mean_margin_drop"}, "random10": ...} over the rows of each (how, k)."""
    out = {}
    for how, k in sorted({(r["how"], r["k"]) for r in rows}, key=lambda t: (t[1], t[0] != "top")):
        sel = [r for r in rows if r["how"] == how and r["k"] == k]
        flips = sum(bool(r["flipped"]) for r in sel)
        out[f"{how}{k}"] = {"flip_rate": flips / len(sel), "flips": flips, "n": len(sel),
                            "mean_margin_drop": float(np.mean([r["margin_before"] - r["margin_after"] for r in sel]))}
    return out
