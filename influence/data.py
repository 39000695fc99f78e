"""Datasets as the pipeline sees them.

Everything downstream reads examples through :func:`batch_of`, so a dataset can
be an in-memory array pair, an image folder read lazily, or any torch
``Dataset`` of ``(image_tensor, label)``.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from influence.errors import BadDataError


@runtime_checkable
class SizedDataset(Protocol):
    """What the pipeline needs of a data set: a length and examples by position (a map-style torch ``Dataset``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> object: ...


class ArrayDataset(Dataset[tuple[torch.Tensor, int]]):
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


def batch_of(dataset: SizedDataset, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def index_subset(dataset: SizedDataset, ids: list[int]) -> SizedDataset:
    """The examples ``ids`` of ``dataset``, in that order, checked against its length."""
    n = len(dataset)
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise BadDataError(f"ids {bad[:5]} are out of range for a data set of {n} examples (valid: 0..{n - 1})")
    if isinstance(dataset, ArrayDataset):
        idx = torch.as_tensor(ids, dtype=torch.long)
        return ArrayDataset(dataset.x[idx], dataset.y[idx], name=dataset.name)
    return torch.utils.data.Subset(dataset, ids)  # type: ignore[arg-type]  # torch types it for Dataset; it only indexes


def fingerprint_dataset(dataset: SizedDataset) -> str:
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
