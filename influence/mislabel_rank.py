"""Mislabel rankings from a store: one suspicion score per training example, higher = more likely mislabelled.

Every ranking is read from what a build stored (per-checkpoint loss and margin columns, self-influence); nothing
is retrained. The names are ``influence flag --method``'s choices for ``--kind mislabel``:

- ``trak`` / ``tracin``: self-influence S(i, i) over the store's checkpoints (``Influence.self_influence``);
- ``loss``: the final checkpoint's training loss;
- ``loss-sum``: the training loss summed over the store's checkpoints;
- ``margin``: minus the margin ``logit_y − logsumexp(other logits)`` summed over the store's checkpoints (an
  area-under-the-margin ranking, Pleiss et al., 2020, from saved checkpoints; the margin with ``max`` in place of
  ``logsumexp`` is not stored). At one checkpoint it ranks exactly as the loss: cross-entropy is softplus(−margin);
- ``loss-margin``: the mean of the normalised ranks of ``loss`` and ``margin``: the final model's view and the
  whole saved trajectory's, each of which wins where the other loses (uniform vs class-dependent flips);
- ``combined``: the mean of the normalised ranks of ``loss`` and self-influence (TRAK when the store has it, else
  TracIn): rank-averaging puts the two signals on one scale without calibrating either.

The default is ``loss`` (``DEFAULT_RANKING``), measured best over digits and CIFAR-10 with uniform and
class-dependent flips (``influence.flag.mislabel_method`` gives the figures).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from influence.errors import BadSpecError

if TYPE_CHECKING:
    from influence.query import Influence

SELF_INFLUENCE = ("trak", "tracin")
RANKINGS = ("loss", "combined", "trak", "tracin", "loss-sum", "margin", "loss-margin")
"""Every mislabel ranking by name (``influence flag --kind mislabel --method``)."""
DEFAULT_RANKING = "loss"
"""The ranking ``influence flag`` uses when none is named (``influence.flag.mislabel_method``): see its docstring."""
DEFAULT_HELP = "loss, the final checkpoint's training loss, the measured best"
"""``DEFAULT_RANKING`` in words, as the CLI's help says it."""


def normalised_rank(score: np.ndarray) -> np.ndarray:
    """Each value's rank scaled to [0, 1] (0 = lowest, 1 = highest; ties share their average rank); float64."""
    from scipy.stats import rankdata  # scipy comes with scikit-learn

    s = np.asarray(score, dtype=np.float64)
    if s.size < 2:
        return np.zeros(s.shape)
    ranks: np.ndarray = (rankdata(s, method="average") - 1.0) / (s.size - 1)
    return ranks


def rank_mean(*scores: np.ndarray) -> np.ndarray:
    """The mean of the scores' normalised ranks: a combination insensitive to each score's scale."""
    mean: np.ndarray = np.mean([normalised_rank(s) for s in scores], axis=0)
    return mean


def self_influence_method(session: "Influence") -> str:
    """TRAK's self-influence when the store has TRAK, else TracIn's (Grad-Cos self-influence is constant)."""
    return "trak" if "trak" in session.methods else "tracin"


def _summed(session: "Influence", column: str) -> np.ndarray:
    store = session.store
    total: np.ndarray = np.sum([store.column(column, c).astype(np.float64) for c in store.checkpoint_ids], axis=0)
    return total


def check_ranking(method: str) -> None:
    """Refuse a name that is not one of ``RANKINGS``, saying why for gradcos (a scoring method, not a ranking)."""
    if method == "gradcos":
        raise BadSpecError("mislabel ranking needs self-influence, which is constant under gradcos; "
                           f"use --method {' or '.join(RANKINGS)}")
    if method not in RANKINGS:
        raise BadSpecError(f"unknown mislabel ranking {method!r}; choose from {', '.join(RANKINGS)}")


def mislabel_scores(session: "Influence", method: str, *, progress: bool = False) -> np.ndarray:
    """The (N,) float64 suspicion score of ranking ``method`` (one of ``RANKINGS``) for every training row."""
    check_ranking(method)
    store = session.store
    if method in SELF_INFLUENCE:
        return np.asarray(session.self_influence(method, progress=progress), dtype=np.float64)
    if method == "loss":
        return np.asarray(store.column("loss", store.checkpoint_ids[-1]), dtype=np.float64)
    if method == "loss-sum":
        return _summed(session, "loss")
    if method == "margin":
        return -_summed(session, "margin")
    if method == "loss-margin":
        return rank_mean(mislabel_scores(session, "loss"), mislabel_scores(session, "margin"))
    return rank_mean(mislabel_scores(session, "loss"),  # combined
                     mislabel_scores(session, self_influence_method(session), progress=progress))
