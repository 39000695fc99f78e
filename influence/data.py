"""Datasets as the pipeline sees them, and the embedded digits data with its injections.

Everything downstream reads examples through :func:`batch_of`, so a dataset can
be an in-memory array pair, an image folder read lazily, or any torch
``Dataset`` of ``(image_tensor, label)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from influence.errors import BadDataError

DIGITS_SIZE = 16


class ArrayDataset(Dataset):
    """Images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64 held in memory."""

    def __init__(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, name: str = "arrays") -> None:
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
            if x.dtype.kind not in "biufc":  # strings, objects... torch.as_tensor raises TypeError on them
                raise BadDataError(f"{name}: images must be a numeric array, got dtype {x.dtype}")
        if not isinstance(y, torch.Tensor):
            y = np.asarray(y)
            if y.dtype.kind not in "biufc":
                raise BadDataError(f"{name}: labels must be a numeric (integer) array, got dtype {y.dtype}")
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.ndim == 3:  # (N, H, W): one channel
            x = x[:, None]
        if x.ndim != 4:
            raise BadDataError(f"{name}: images must have shape (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
        if not (x.is_floating_point() or x.dtype == torch.uint8):
            raise BadDataError(f"{name}: images must be float or uint8, got dtype {x.dtype}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise BadDataError(f"{name}: labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise BadDataError(f"{name}: labels must be integers, got dtype {y.dtype}")
        self.x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        self.y = y.long()
        self.name = name

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def batch_of(dataset: Dataset, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start:stop`` of any dataset as one ``(x, y)`` batch, validated."""
    if isinstance(dataset, ArrayDataset):
        return dataset.x[start:stop], dataset.y[start:stop]
    xs, ys = [], []
    for i in range(start, stop):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise BadDataError(f"dataset item {i} must be (image_tensor, label), got {type(item).__name__}")
        x, y = item[0], item[1]
        if not isinstance(x, torch.Tensor):
            raise BadDataError(f"dataset item {i}: image must be a torch.Tensor, got {type(x).__name__}")
        xs.append(x.float())
        ys.append(int(y))
    try:
        x = torch.stack(xs)
    except RuntimeError as e:
        raise BadDataError(f"dataset items {start}..{stop - 1} have different shapes: {e}") from None
    return x, torch.tensor(ys, dtype=torch.long)


def index_subset(dataset: Dataset, ids: list[int]) -> Dataset:
    """The examples ``ids`` of ``dataset``, in that order, checked against its length."""
    n = len(dataset)
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise BadDataError(f"ids {bad[:5]} are out of range for a data set of {n} examples (valid: 0..{n - 1})")
    if isinstance(dataset, ArrayDataset):
        idx = torch.as_tensor(ids, dtype=torch.long)
        return ArrayDataset(dataset.x[idx], dataset.y[idx], name=dataset.name)
    return torch.utils.data.Subset(dataset, ids)


def fingerprint_dataset(dataset: Dataset) -> str:
    """A short content hash, so a store can tell whether it was built on this data."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    if isinstance(dataset, ArrayDataset):
        h.update(dataset.x.numpy().tobytes())
        h.update(dataset.y.numpy().tobytes())
    else:
        n = len(dataset)
        for i in sorted({0, n // 2, n - 1} if n else set()):
            x, y = batch_of(dataset, i, i + 1)
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- digits

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

    def to_json(self) -> dict:
        return self.__dict__.copy()


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
