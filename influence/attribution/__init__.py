"""Pixel attribution: where in the test image the model looked.

Every method: ``Method(model).attribute(inputs, target=None, **options) -> Tensor`` shaped
like ``inputs``; see ``_base`` for the shared argument vocabulary. ``METHODS`` and ``SAMPLERS``
are registries (``.names()`` for CLI choices) filled by the classes themselves.
"""

from influence.attribution._base import METHODS, AttributionMethod, get_method
from influence.attribution._gradcam import GradCAM
from influence.attribution._gradients import InputXGradient, Saliency
from influence.attribution._path import (
    SAMPLERS,
    BlurPathSampler,
    IntegratedGradients,
    LinearPathSampler,
    NoiseSampler,
    Sampler,
    SmoothGrad,
    SuppressionSampler,
    get_sampler,
    integrate,
)
from influence.attribution._render import save_overlay, summarize
from influence.attribution._run import build_method, run_attribute
from influence.attribution._var import VAR, ClassShares
from influence.attribution._wam import WAM, WaveletScales, WaveletTransform

__all__ = [
    "METHODS",
    "SAMPLERS",
    "VAR",
    "WAM",
    "AttributionMethod",
    "BlurPathSampler",
    "ClassShares",
    "GradCAM",
    "InputXGradient",
    "IntegratedGradients",
    "LinearPathSampler",
    "NoiseSampler",
    "Saliency",
    "Sampler",
    "SmoothGrad",
    "SuppressionSampler",
    "WaveletScales",
    "WaveletTransform",
    "build_method",
    "get_method",
    "get_sampler",
    "integrate",
    "run_attribute",
    "save_overlay",
    "summarize",
]
