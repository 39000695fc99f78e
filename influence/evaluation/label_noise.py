"""Class-dependent label noise: flips along fixed pairs of confusable classes, not to a uniformly random class.

Real label noise falls between classes people (and models) confuse, where the model half-agrees with the wrong
label; uniform flips to any other class are the easy case for a loss- or influence-based detector. The pairs below
follow the asymmetric-noise benchmark of Patrini et al. (2017, "Making deep neural networks robust to label noise:
a loss correction approach"): a flipped label always moves to one fixed, visually similar class.

numpy only, so ``scripts/cifar10_data.py`` writes these sets on a machine without the package's other dependencies.
"""

from __future__ import annotations

import numpy as np

CIFAR10_CONFUSABLE: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
"""Patrini et al.'s CIFAR-10 pairs: truck → automobile, bird → airplane, deer → horse, cat ↔ dog (label indices in
``influence.evaluation.cifar10.CLASSES`` order)."""

DIGITS_CONFUSABLE: dict[int, int] = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
"""Patrini et al.'s MNIST pairs, used for scikit-learn's digits: 2 → 7, 3 → 8, 5 ↔ 6, 7 → 1."""


def flip_confusable(y: np.ndarray, rate: float, pairs: dict[int, int], seed: int = 0,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``rate`` of *all* labels, each to its class's confusable partner; returns (noisy labels, flipped ids).

    The flipped rows are drawn uniformly from the rows whose class has a partner (``pairs``' keys), minus
    ``exclude``; so with 5 of 10 classes as sources a 10% overall rate flips about 20% of each source class.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(np.isin(y, list(pairs)))
    if exclude is not None:
        pool = np.setdiff1d(pool, exclude)
    count = int(round(rate * len(y)))
    if count > len(pool):
        raise ValueError(f"{count} flips asked but only {len(pool)} rows belong to a class with a confusable partner")
    ids = np.sort(rng.choice(pool, count, replace=False))
    noisy = y.copy()
    noisy[ids] = [pairs[int(c)] for c in y[ids]]
    return noisy, ids
