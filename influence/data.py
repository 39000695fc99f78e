"""Datasets as the pipeline sees them.

Everything downstream reads examples through :func:`batch_of`, so a dataset can
be an in-memory array pair, an image folder read lazily, or any torch
``Dataset`` of ``(image_tensor, label)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from influence.errors import BadDataError, BadSpecError


@runtime_checkable
class SizedDataset(Protocol):
    """What the pipeline needs of a data set: a length and examples by position (a map-style torch ``Dataset``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> object: ...


# ITU-R 601 luma, the weights PIL uses for its "L" mode: RGB → gray here matches converting the file.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    """How every image becomes a model input, recorded in the store so queries repeat the build exactly.

    Images are first floats in [0, 1] (files) or the arrays as given; then converted to ``channels``
    (1: luminance, 3: gray repeated), resized to ``size`` (bilinear), and normalised ``(x - mean) / std``
    per channel. ``None`` everywhere (the default) changes nothing.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    size: tuple[int, int] | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise BadSpecError("give --mean and --std together (one value per channel each)")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                raise BadSpecError(f"--mean has {len(self.mean)} values and --std {len(self.std)}; give one per channel each")
            if any(not np.isfinite(v) for v in (*self.mean, *self.std)) or any(s <= 0 for s in self.std):
                raise BadSpecError(f"--std must be positive and --mean/--std finite, got mean={list(self.mean)} std={list(self.std)}")
            if self.channels is not None and len(self.mean) != self.channels:
                raise BadSpecError(f"--mean has {len(self.mean)} values for --channels {self.channels}; give one per channel")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise BadSpecError(f"--size must be two positive integers H,W, got {self.size}")
        if self.channels is not None and self.channels not in (1, 3):
            raise BadSpecError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")

    @property
    def is_identity(self) -> bool:
        return self.mean is None and self.size is None and self.channels is None

    def to_attrs(self) -> dict[str, Any]:
        return {"mean": None if self.mean is None else list(self.mean), "std": None if self.std is None else list(self.std),
                "size": None if self.size is None else list(self.size), "channels": self.channels}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None) -> "Preprocessing":
        """The recorded spec; a store from before preprocessing was recorded gets the identity."""
        a = attrs or {}

        def floats(v: Any) -> tuple[float, ...] | None:
            return None if v is None else tuple(float(t) for t in v)

        size = a.get("size")
        return cls(mean=floats(a.get("mean")), std=floats(a.get("std")),
                   size=None if size is None else (int(size[0]), int(size[1])), channels=a.get("channels"))

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs back to [0, 1] pixels for display: ``x · std + mean`` per channel (identity without --mean)."""
        if self.mean is None or x.shape[-3] != len(self.mean):
            return x
        mean, std = self._stats(x)
        return x * std + mean

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """--mean and --std as (C, 1, 1) tensors like ``x`` (they broadcast over a batch too)."""
        mean, std = self.mean or (), self.std or ()  # both set when used (__post_init__ refuses one alone)
        return (torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1),
                torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1))

    def replace(self, *, size: tuple[int, int] | None = None, channels: int | None = None) -> "Preprocessing":
        """This spec with a query's own ``--size`` / ``--channels`` (None keeps the recorded value)."""
        return Preprocessing(self.mean, self.std, size or self.size, channels or self.channels)


def preprocess(x: torch.Tensor, spec: Preprocessing, what: str = "images") -> torch.Tensor:
    """The one preprocessing function, build and query alike: channels, then size, then normalisation.

    ``x`` is one image (C, H, W) or a batch (N, C, H, W) of floats.
    """
    if spec.is_identity:
        return x
    single = x.ndim == 3
    b = x[None] if single else x
    if b.ndim != 4:
        raise BadDataError(f"{what}: expected (C, H, W) images, got shape {tuple(x.shape[1:] if not single else x.shape)}")
    b = b.float()
    if spec.channels is not None and b.shape[1] != spec.channels:
        if b.shape[1] == 3 and spec.channels == 1:
            w = torch.tensor(_LUMA, dtype=b.dtype).view(1, 3, 1, 1)
            b = (b * w).sum(1, keepdim=True)
        elif b.shape[1] == 1:
            b = b.expand(-1, spec.channels, -1, -1)
        else:
            raise BadDataError(f"{what} have {b.shape[1]} channels; cannot convert them to --channels {spec.channels}")
    if spec.size is not None and tuple(b.shape[-2:]) != tuple(spec.size):
        b = torch.nn.functional.interpolate(b, size=tuple(spec.size), mode="bilinear", align_corners=False, antialias=True)
    if spec.mean is not None and spec.std is not None:
        if len(spec.mean) != b.shape[1]:
            raise BadDataError(f"{what} have {b.shape[1]} channels but --mean/--std give {len(spec.mean)} values; give one per channel")
        mean, std = spec._stats(b)
        b = (b - mean) / std
    b = b.contiguous()
    return b[0] if single else b


class ArrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64 held in memory."""

    def __init__(
        self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, name: str = "arrays", classes: Sequence[str] | None = None,
    ) -> None:
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
        self.classes: list[str] | None = None if classes is None else [str(c) for c in classes]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


class PreprocessedDataset(Dataset[tuple[torch.Tensor, int]]):
    """Any data set's images passed through :func:`preprocess` as they are read (labels unchanged)."""

    def __init__(self, dataset: SizedDataset, spec: Preprocessing) -> None:
        self.dataset, self.spec = dataset, spec
        self.classes: list[str] | None = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = batch_of(self.dataset, i, i + 1)
        return preprocess(x[0], self.spec, f"example {i}"), int(y[0])


class ConcatRows(Dataset[tuple[torch.Tensor, int]]):
    """Data sets one after another, as a store holds them after ``influence add`` (the first one's class names;
    file paths when every part has them)."""

    def __init__(self, parts: Sequence[SizedDataset]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.classes: list[str] | None = getattr(self.parts[0], "classes", None)
        paths = [getattr(p, "paths", None) for p in self.parts]
        self.paths: list[str] | None = (
            [str(x) for ps in paths for x in ps] if all(isinstance(ps, list) for ps in paths) else None)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        x, y = batch_of(self.parts[part], i - int(self.starts[part]), i - int(self.starts[part]) + 1)
        return x[0], int(y[0])


def with_preprocessing(dataset: SizedDataset, spec: Preprocessing) -> SizedDataset:
    """``dataset`` with ``spec`` applied: in one pass for arrays, lazily for anything else."""
    if spec.is_identity:
        return dataset
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(preprocess(dataset.x, spec, dataset.name), dataset.y, name=dataset.name, classes=dataset.classes)
    return PreprocessedDataset(dataset, spec)


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
        return ArrayDataset(dataset.x[idx], dataset.y[idx], name=dataset.name, classes=dataset.classes)
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
