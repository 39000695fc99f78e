"""Single-gradient maps: the cheapest answers to "which pixels move the class score"."""

from __future__ import annotations

import torch

from influence.attribution._base import AttributionMethod, gradient


class Saliency(AttributionMethod, name="saliency"):
    """|∂f_c/∂x|: sensitivity, sign dropped (Simonyan et al. 2014)."""

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gradient(self.model, x, target).abs()


class InputXGradient(AttributionMethod, name="input_x_gradient"):
    """x ⊙ ∂f_c/∂x: a first-order estimate of each pixel's contribution against a zero image."""

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return x * gradient(self.model, x, target)
