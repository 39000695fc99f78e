"""WAM: attribute the prediction to wavelet coefficients, answering "which scale matters where".

The model is explained as a function of z = DWT(x) through x̂ = IDWT(z) (ptwt's
differentiable 2-D transform). Coefficients are packed in the standard dyadic layout
(approximation top-left; at each level the vertical, horizontal and diagonal details
top-right, bottom-left and bottom-right, exactly as ``pywt.coeffs_to_array``), which for a Haar transform of an
image whose sides are divisible by 2**levels has the image's shape. The path core then
runs on z like on an image, so every sampler works here too.

Modes: ``gradient`` (one gradient), ``smooth`` (noise with σ = 0.25·pixel range, n = 25;
for an orthonormal wavelet white noise on z is white noise on x, so this is SmoothGrad in
pixel space) and ``integrated`` (z₀ = 0 → z, n = 50).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import ptwt
import pywt
import torch
import torch.nn.functional as F
from torch import nn

from influence._inputs import TargetLike, as_batch
from influence.attribution._base import AttributionMethod, Forward, evaluating, gradient, resolve_target
from influence.attribution._path import LinearPathSampler, NoiseSampler, Sampler, get_sampler, integrate
from influence.errors import BadDataError, BadSpecError

if TYPE_CHECKING:
    from ptwt.constants import WaveletCoeff2d


class WamMode(str, Enum):
    GRADIENT = "gradient"
    SMOOTH = "smooth"
    INTEGRATED = "integrated"


@dataclass(frozen=True)
class WaveletScales:
    """``coefficients``: (B, C, H, W) dyadic map; ``scales``: (B, levels + 1, C, H, W) pixel maps,
    index j − 1 = |details| of level j (1 finest), last = |approximation|, each upsampled
    (nearest, the support of a Haar coefficient) to the input size; ``mass``: (B, levels + 1)
    share of Σ|coefficients| per scale in the same order."""

    coefficients: torch.Tensor
    scales: torch.Tensor
    mass: torch.Tensor


class WaveletTransform:
    """DWT/IDWT between images (B, C, H, W) and dyadic-layout coefficient maps of the same shape."""

    def __init__(self, wavelet: str = "haar", levels: int = 3) -> None:
        try:
            self.wavelet = pywt.Wavelet(wavelet)
        except (ValueError, TypeError):
            raise BadSpecError(f"unknown wavelet {wavelet!r}; e.g. haar, db2 (pywt.wavelist(kind='discrete'))") from None
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise BadSpecError(f"levels must be an int >= 1; got {levels!r}")
        self.levels = levels

    def check(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        step = 2**self.levels
        if h % step or w % step or self.wavelet.dec_len != 2:
            raise BadDataError(
                f"WAM's dyadic layout needs a length-2 wavelet (haar) and sides divisible by 2**levels = {step}; "
                f"got {self.wavelet.name} on {h}x{w} (pad or crop the image, or lower levels)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image → dyadic coefficient map."""
        self.check(x)
        # ptwt's __init__ re-exports without __all__, so strict mypy sees no public wavedec2/waverec2 there
        coeffs = ptwt.wavedec2(x, self.wavelet, level=self.levels, mode="reflect")  # type: ignore[attr-defined]
        out = coeffs[0]
        for detail in coeffs[1:]:
            horizontal, vertical, diagonal = detail
            out = torch.cat([torch.cat([out, vertical], -1), torch.cat([horizontal, diagonal], -1)], -2)
        return out

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Dyadic map → (approximation, details from coarsest to finest)."""
        h, w = z.shape[-2:]
        details = []
        for j in range(1, self.levels + 1):
            hh, ww = h >> j, w >> j
            block = z[..., : 2 * hh, : 2 * ww]
            details.append((block[..., hh:, :ww], block[..., :hh, ww:], block[..., hh:, ww:]))
        hh, ww = h >> self.levels, w >> self.levels
        return z[..., :hh, :ww], details[::-1]

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Dyadic coefficient map → image."""
        self.check(z)
        approx, details = self.split(z)
        # ptwt's __init__ re-exports without __all__ (as in forward); ptwt.constants has the real types
        coeffs: WaveletCoeff2d = (approx, *(ptwt.WaveletDetailTuple2d(*d) for d in details))  # type: ignore[attr-defined]
        return ptwt.waverec2(coeffs, self.wavelet)  # type: ignore[attr-defined]

    def scales(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-scale pixel maps (B, levels + 1, C, H, W) and mass shares (B, levels + 1); finest first."""
        size = z.shape[-2:]
        approx, details = self.split(z.abs())
        parts = [horizontal + vertical + diagonal for horizontal, vertical, diagonal in details[::-1]] + [approx]
        maps = torch.stack([F.interpolate(p, size=size, mode="nearest") for p in parts], dim=1)
        mass = torch.stack([p.flatten(1).sum(1) for p in parts], dim=1)
        return maps, mass / mass.sum(1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


class WAM(AttributionMethod, name="wam"):
    """Wavelet attribution (Kasmi et al. 2025): ``attribute`` gives the dyadic coefficient map,
    ``attribute_scales`` adds per-scale pixel maps. Sides must be divisible by 2**levels."""

    def __init__(self, model: nn.Module | Forward, wavelet: str = "haar", levels: int = 3, mode: str = "smooth") -> None:
        super().__init__(model)
        try:
            self.mode = WamMode(mode)
        except ValueError:
            raise BadSpecError(f"unknown WAM mode {mode!r}; choose one of: {', '.join(m.value for m in WamMode)}") from None
        self.transform = WaveletTransform(wavelet, levels)

    def attribute(
        self,
        inputs: Any,
        target: TargetLike = None,
        *,
        sampler: str | Sampler | None = None,
        n: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        **sampler_options: Any,
    ) -> torch.Tensor:
        """Dyadic coefficient attribution shaped like ``inputs``; ``sampler`` overrides the mode's."""
        x = as_batch(inputs)
        self.transform.check(x)
        with evaluating(self.model):
            t = resolve_target(self.model, x, target)
            z = self.transform.forward(x).detach()

            def through_inverse(coeffs: torch.Tensor) -> torch.Tensor:
                return self.model(self.transform.inverse(coeffs))

            if sampler is None and self.mode is WamMode.GRADIENT:
                if sampler_options or n not in (None, 1):
                    raise BadSpecError("WAM mode 'gradient' takes no sampler options and n=1; use mode='smooth' or 'integrated'")
                return gradient(through_inverse, z, t).detach()
            if sampler is None:
                sampler = self._default_sampler(x, **sampler_options)
            else:
                sampler = get_sampler(sampler, **sampler_options)
            default_n = 25 if self.mode is WamMode.SMOOTH else 50
            return integrate(through_inverse, z, t, sampler, n or default_n, seed, batch_size)

    def _default_sampler(self, x: torch.Tensor, **options: Any) -> Sampler:
        if self.mode is WamMode.SMOOTH:
            spread = options.pop("sigma_fraction", 0.25)
            if options:
                raise BadSpecError(f"WAM mode 'smooth' takes sigma_fraction only; got {sorted(options)}")
            flat = x.flatten(1)
            return NoiseSampler(sigma=spread * (flat.amax(1) - flat.amin(1)))
        return get_sampler(LinearPathSampler.name, **options)

    def attribute_scales(self, inputs: Any, target: TargetLike = None, **options: Any) -> WaveletScales:
        """The coefficient map plus which scale matters where (see ``WaveletScales``)."""
        z = self.attribute(inputs, target, **options)
        maps, mass = self.transform.scales(z)
        return WaveletScales(z, maps, mass)
