"""Normalise user inputs once, at the boundary: one batch normaliser and one target normaliser.

Public functions accept a tensor or an array, one image (C, H, W) or a batch (B, C, H, W), and
targets as an int, a sequence or a tensor; everything past the boundary sees a checked float
batch and a LongTensor (B,).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch

from influence.errors import BadDataError, BadSpecError

TargetLike: TypeAlias = int | Sequence[int] | torch.Tensor | None


def as_batch(inputs: Any, shape: Sequence[int] | None = None, *, single: bool = False) -> torch.Tensor:
    """A detached, finite, floating (B, C, H, W) tensor.

    ``single=True`` also accepts one (C, H, W) image. ``shape`` (C, H, W), when given, must match.
    """
    if isinstance(inputs, torch.Tensor):
        x = inputs
    else:
        try:
            x = torch.as_tensor(inputs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadDataError(f"inputs must be a tensor or array shaped (B, C, H, W); got {type(inputs).__name__}") from exc
    if single and x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise BadDataError(
            f"inputs must be a batch shaped (B, C, H, W); got shape {tuple(x.shape)} "
            "(add a batch dimension with inputs.unsqueeze(0) for one image)"
        )
    if x.shape[0] == 0:
        raise BadDataError("inputs is an empty batch (B = 0)")
    if not x.is_floating_point():
        raise BadDataError(f"inputs must be floating point; got dtype {x.dtype} (convert with .float())")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise BadDataError(f"inputs have shape {tuple(x.shape[1:])}; this model takes {tuple(shape)}")
    if not torch.isfinite(x).all():
        raise BadDataError("inputs contain NaN or inf")
    return x.detach()


def as_targets(target: TargetLike, batch: int, num_classes: int | None = None, *, what: str = "target") -> torch.Tensor:
    """A LongTensor (B,) of class indices: an int or a one-element target is broadcast to the batch.

    ``None`` is not resolved here (callers that default to the predicted class do that first).
    """
    if target is None:
        raise BadSpecError(f"{what} is required: one class index per example")
    if isinstance(target, bool):
        raise BadSpecError(f"{what} must be an int class index; got {target!r}")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long)
    else:
        t = torch.as_tensor(target)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise BadSpecError(f"{what} must hold integer class indices; got dtype {t.dtype}")
        t = t.long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch).clone()
        if t.shape != (batch,):
            raise BadDataError(f"{t.numel()} {what}s for {batch} inputs; give an int or one class per example")
    if num_classes is not None and batch and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise BadSpecError(f"{what} class out of range for a model with {num_classes} classes: {t.tolist()}")
    return t
