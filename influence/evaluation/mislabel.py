"""Mislabel detection quality: how well a score (self-influence, loss) ranks the truly flipped labels first."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import roc_auc_score

from influence.errors import BadDataError

if TYPE_CHECKING:
    from influence.query import Influence


def _check(scores: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, m = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(flipped, dtype=bool).ravel()
    if s.shape != m.shape:
        raise BadDataError(f"need one score per example: {s.size} scores for {m.size} flags")
    if not m.any() or m.all():
        raise BadDataError(f"need both flipped and clean examples; got {int(m.sum())} flipped of {m.size}")
    return s, m


def mislabel_auc(scores: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of ``scores`` (higher = more suspect) against the boolean ``flipped`` mask: 1 perfect, 0.5 chance."""
    s, m = _check(scores, flipped)
    return float(roc_auc_score(m, s))


def recall_at_fraction(scores: np.ndarray, flipped: np.ndarray, fraction: float) -> float:
    """Share of the flipped examples found among the top ``fraction`` of examples by score (ties: lower id first)."""
    s, m = _check(scores, flipped)
    if not 0 < fraction <= 1:
        raise BadDataError(f"fraction must lie in (0, 1]; got {fraction}")
    top = np.argsort(-s, kind="stable")[: int(round(fraction * s.size))]
    return float(m[top].sum() / m.sum())


def mislabel_metrics(scores: np.ndarray, flipped: np.ndarray, fractions: tuple[float, ...] = (0.1, 0.2)) -> dict[str, float]:
    """{"auc": ..., "recall@10%": ..., ...}: the mislabel rows of the benchmarks page."""
    out = {"auc": mislabel_auc(scores, flipped)}
    for f in fractions:
        out[f"recall@{round(100 * f)}%"] = recall_at_fraction(scores, flipped, f)
    return out


def candidate_rankings(session: "Influence") -> dict[str, np.ndarray]:
    """Every mislabel ranking measured for ``influence flag``'s default, by name, from one store.

    The tool's own rankings (``influence.mislabel_rank.RANKINGS``, under their CLI names) and, for comparison only,
    self-influence at the final checkpoint alone and TRAK's leverage times the final loss.
    """
    from influence.mislabel_rank import RANKINGS, mislabel_scores
    from influence.scoring import TRAK, get_method

    out = {m: mislabel_scores(session, m) for m in RANKINGS if m not in ("trak", "tracin") or m in session.methods}
    final = session.store.checkpoint_ids[-1]
    if len(session.store.checkpoint_ids) > 1:
        for m in ("tracin", "trak"):
            if m in session.methods:
                out[f"{m} (final checkpoint only)"] = get_method(m)(session.store, checkpoints=[final]).self_influence()
    if "trak" in session.methods:
        out["leverage x loss (final checkpoint)"] = TRAK(session.store).leverage(final) * out["loss"]
    return out
