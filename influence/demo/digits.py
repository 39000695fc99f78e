"""The demo's data: scikit-learn's digits, and the label noise and patch shortcut injected into it.

``digits`` / ``digits-train`` / ``digits-test`` are also built-in DATA SPECs; the
injections come with their ground truth so the demo and the evaluations can score
what the flags found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import torch

from influence.data import ArrayDataset

DIGITS_SIZE = 16


def _upsample(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def load_digits_split(size: int = DIGITS_SIZE, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's digits upsampled to ``size``×``size`` in [0, 1], fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=seed, stratify=d.target)
    x = _upsample(d.images, size)
    y = torch.as_tensor(d.target, dtype=torch.long)
    return ArrayDataset(x[idx_train], y[idx_train], "digits-train"), ArrayDataset(x[idx_test], y[idx_test], "digits-test")


class InjectionsRecord(TypedDict):
    """:class:`Injections` as written to ``injections.json``."""

    flipped: list[int]
    original_labels: list[int]
    patched: list[int]
    patch_class: int
    patch_box: list[int]
    patch_value: float
    test_patched_from: list[int]


@dataclass
class Injections:
    """Ground truth of what the demo corrupted: flipped labels and a pasted patch."""

    flipped: list[int]
    original_labels: list[int]
    patched: list[int]
    patch_class: int
    patch_box: list[int]  # [x0, y0, x1, y1], pixel coordinates, x1/y1 exclusive
    patch_value: float = 1.0
    test_patched_from: list[int] = field(default_factory=list)

    def to_json(self) -> InjectionsRecord:
        return InjectionsRecord(
            flipped=self.flipped, original_labels=self.original_labels, patched=self.patched, patch_class=self.patch_class,
            patch_box=self.patch_box, patch_value=self.patch_value, test_patched_from=self.test_patched_from,
        )


def paste_patch(x: torch.Tensor, box: list[int], value: float = 1.0) -> torch.Tensor:
    """A copy of images ``x`` (N, C, H, W) with the box set to ``value``."""
    x0, y0, x1, y1 = box
    out = x.clone()
    out[..., y0:y1, x0:x1] = value
    return out


def inject(
    train: ArrayDataset,
    test: ArrayDataset,
    *,
    flip_fraction: float = 0.10,
    patch_class: int = 7,
    patch_fraction: float = 0.5,
    patch_box: tuple[int, int, int, int] = (12, 12, 15, 15),
    seed: int = 0,
) -> tuple[ArrayDataset, ArrayDataset, Injections]:
    """Flip ``flip_fraction`` of training labels and paste a bright patch on part of one class.

    Returns the corrupted training set, a patched test set (test images of the
    other classes with the patch pasted on, keeping their true labels) and the
    ground truth of both injections.
    """
    rng = np.random.default_rng(seed)
    n = len(train)
    y = train.y.clone()
    x = train.x.clone()
    in_class = np.flatnonzero(y.numpy() == patch_class)
    patched = np.sort(rng.choice(in_class, size=int(round(patch_fraction * len(in_class))), replace=False))
    x[patched] = paste_patch(x[patched], list(patch_box))
    candidates = np.setdiff1d(np.arange(n), patched)
    flipped = np.sort(rng.choice(candidates, size=int(round(flip_fraction * n)), replace=False))
    original = y[flipped].clone()
    shift = torch.as_tensor(rng.integers(1, 10, size=len(flipped)), dtype=torch.long)
    y[flipped] = (original + shift) % 10
    other = np.flatnonzero(test.y.numpy() != patch_class)
    test_patched = ArrayDataset(paste_patch(test.x[other], list(patch_box)), test.y[other], "digits-test-patched")
    truth = Injections(
        flipped=flipped.tolist(), original_labels=original.tolist(), patched=patched.tolist(),
        patch_class=patch_class, patch_box=list(patch_box), test_patched_from=other.tolist(),
    )
    return ArrayDataset(x, y, "demo-train"), test_patched, truth
