"""One image in, one map and the facts about it out: what the ``influence attribute`` command calls."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from influence._inputs import as_batch
from influence.attribution._base import AttributionMethod, evaluating, get_method, logits_of, resolve_target
from influence.attribution._var import VAR
from influence.errors import BadDataError, BadSpecError


def build_method(model: nn.Module, method: str) -> AttributionMethod:
    """The method registered as ``method`` with its defaults; ``var:<base>`` picks VAR's base (default IG)."""
    name, _, base = method.partition(":")
    cls = get_method(name)
    if not base:
        return cls.from_model(model)
    if cls is not VAR:
        raise BadSpecError(f"only VAR takes a base method ('var:<base>'); got {method!r}")
    return VAR.from_model(model, base=base)


def run_attribute(
    model: nn.Module, image: torch.Tensor, method: str = "integrated_gradients", target: int | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Map (C, H, W) for ``target`` (None: the predicted class) and a JSON-ready info dict."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise BadDataError(f"image must be a tensor shaped (C, H, W); got {shape}")
    explainer = build_method(model, method)
    x = as_batch(image.unsqueeze(0))
    with evaluating(model), torch.no_grad():
        probs = logits_of(model, x).softmax(dim=1)[0]
        t = int(resolve_target(model, x, target)[0])
    attribution = explainer.attribute(x, target=t)[0]
    predicted = int(probs.argmax())
    info = {
        "method": method,
        "predicted": predicted,
        "predicted_probability": float(probs[predicted]),
        "target": t,
        "probability": float(probs[t]),
    }
    return attribution, info
