"""Shortcut evaluation: are the patched training images ranked first, and did the detector find the patch?

Sample level: average precision of "patched" over all training examples ranked by a method's score, one query at
a time, averaged over queries. Detector level: a report counts as found when it names the patch's class and its box
overlaps the true patch with IoU >= 0.5; any other report is a false alarm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score

from influence.errors import BadDataError
from influence.shortcut import box_iou

MIN_IOU = 0.5


def _columns(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    m = np.asarray(positive, dtype=bool).ravel()
    if s.ndim != 2 or s.shape[0] != m.size:
        raise BadDataError(f"scores must be (n_train, n_queries) with n_train = {m.size}; got shape {s.shape}")
    if s.shape[1] == 0:
        raise BadDataError("scores has no query columns")
    return s, m


def sample_auprc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mean over query columns of ``scores`` (n_train, n_queries) of the average precision of ``positive``."""
    s, m = _columns(scores, positive)
    if not m.any():
        raise BadDataError("no positive training example: average precision is undefined")
    return float(np.mean([average_precision_score(m, s[:, j]) for j in range(s.shape[1])]))


def top_k_share(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Share of ``positive`` examples among each query's top ``k`` by score, averaged over queries."""
    s, m = _columns(scores, positive)
    if not 1 <= k <= s.shape[0]:
        raise BadDataError(f"k must lie in [1, {s.shape[0]}]; got {k}")
    top = np.argsort(-s, axis=0, kind="stable")[:k]
    return float(m[top].mean())


def match_shortcuts(reports: Sequence[Mapping[str, Any]], cls: int, box: Sequence[int], min_iou: float = MIN_IOU) -> dict[str, Any]:
    """Score ``influence flag`` shortcut reports ({"class", "box", "train_ids", "score"}) against the true patch.

    Returns found (a report of class ``cls`` with IoU >= ``min_iou``), false_alarms (every other report),
    best_iou (among reports of class ``cls``, 0 if none) and hit (the best such report, or None).
    """
    same = [r for r in reports if int(r["class"]) == int(cls)]
    ious = [box_iou(r["box"], box) for r in same]
    hits = [r for r, iou in zip(same, ious) if iou >= min_iou]
    best = max(range(len(same)), key=lambda j: ious[j], default=None)
    return {
        "found": bool(hits),
        "false_alarms": len(reports) - len(hits),
        "best_iou": float(ious[best]) if best is not None else 0.0,
        "hit": dict(same[best]) if best is not None and ious[best] >= min_iou else None,
    }
