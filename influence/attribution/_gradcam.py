"""Grad-CAM: where a conv layer's class-relevant features are, at that layer's resolution."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from influence.attribution._base import AttributionMethod, logits_of
from influence.errors import BadSpecError


def _last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BadSpecError(f"Grad-CAM needs a conv layer; {type(model).__name__} has no nn.Conv2d (pass layer=...)")
    return convs[-1]


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    if layer is None:
        return _last_conv(model)
    if isinstance(layer, str):
        named: dict[str, nn.Module] = dict(model.named_modules())
        if layer not in named:
            convs = [n for n, m in named.items() if isinstance(m, nn.Conv2d)]
            raise BadSpecError(f"no layer named {layer!r} in {type(model).__name__}; conv layers: {convs}")
        return named[layer]
    if not any(layer is m for m in model.modules()):
        raise BadSpecError(f"layer {type(layer).__name__} is not a submodule of {type(model).__name__}")
    return layer


class GradCAM(AttributionMethod, name="gradcam"):
    """ReLU(Σ_k mean_spatial(∂f_c/∂A_k)·A_k) at ``layer`` (default the last nn.Conv2d) (Selvaraju et al. 2017).

    Upsampled bilinearly to the input size and repeated over input channels, so the map is
    shaped like ``inputs`` as every other method's.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise BadSpecError(f"Grad-CAM needs a torch.nn.Module to find its layer; got {type(model).__name__}")
        super().__init__(model)
        self.layer = _resolve_layer(model, layer)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor, **options: Any) -> torch.Tensor:
        if options:
            raise BadSpecError(f"Grad-CAM takes no options; got {sorted(options)}")
        captured: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.enable_grad():
                out = logits_of(self.model, x.detach().requires_grad_(True))
                if len(captured) != 1 or not isinstance(captured[0], torch.Tensor) or captured[0].dim() != 4:
                    raise BadSpecError("the Grad-CAM layer must run once per forward pass and output (B, K, h, w)")
                (grads,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), captured[0])
        finally:
            handle.remove()
        acts = captured[0].detach()
        cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear")
        return cam.expand(-1, x.shape[1], -1, -1).contiguous()
