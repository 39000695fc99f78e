"""The one path-integration core: average gradients over samples drawn by a sampler.

Integrated Gradients, SmoothGrad and WAM are the same computation with different
sample sets: ``integrate`` evaluates Σ_i w_i ∇f(x_i) and lets the sampler finish the
map (multiply by x − x₀ for a path, by x for suppression, nothing for noise). Any path
method therefore accepts any sampler, and a new sampler is one small class. f is a
score (``_base.Score``): the target logit by default, or any per-example scalar, such
as the gradient cosine that training feature attribution differentiates.

Stochastic samplers draw each sample from a local generator seeded with ``seed`` and
share the draw across the batch (scaled per example), so an example's map does not
depend on which other examples are in its batch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from influence._inputs import TargetLike, as_batch
from influence._registry import Registry
from influence.attribution._base import (
    AttributionMethod,
    Forward,
    Score,
    class_logit,
    evaluating,
    resolve_target,
    score_gradient,
)
from influence.errors import BadSpecError

RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")

SAMPLERS: Registry[type["Sampler"]] = Registry("sampler")
"""Sampler name → class; filled by each sampler's class statement."""


def quadrature(rule: str, n: int) -> tuple[list[float], list[float]]:
    """Points α_i ∈ [0, 1] and weights w_i (Σ w_i = 1) for ∫₀¹ g(α) dα."""
    if rule not in RULES:
        raise BadSpecError(f"unknown integration rule {rule!r}; choose one of: {', '.join(RULES)}")
    if rule == "gausslegendre":
        nodes, gauss_weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (nodes + 1)).tolist(), (0.5 * gauss_weights).tolist()
    if rule == "riemann_trapezoid":
        if n < 2:
            raise BadSpecError(f"the trapezoid rule needs n >= 2 steps; got n={n}")
        weights = [1.0 / (n - 1)] * n
        weights[0] = weights[-1] = 0.5 / (n - 1)
        return [i / (n - 1) for i in range(n)], weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
    return [(i + offset) / n for i in range(n)], [1.0 / n] * n


class Sampler:
    """Draws the points a path method averages gradients over, and finishes the map.

    ``class Foo(Sampler, name="foo")`` registers ``Foo`` in ``SAMPLERS``.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            SAMPLERS.register(name, cls)

    def points(self, x: torch.Tensor, n: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        """Yield (sample shaped like x, weight); weights sum to one."""
        raise NotImplementedError

    def finish(self, x: torch.Tensor, integral: torch.Tensor) -> torch.Tensor:
        """Turn the weighted mean gradient into the map."""
        return integral

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _per_example(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value shaped (B, 1, 1, 1) to scale each example of x."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return t.reshape(-1, 1, 1, 1) if t.dim() else t


class NoiseSampler(Sampler, name="noise"):
    """x + N(0, σ²) with σ = sigma_fraction·(max x − min x) per example (SmoothGrad), or a fixed ``sigma``."""

    def __init__(self, sigma_fraction: float = 0.15, sigma: float | torch.Tensor | None = None) -> None:
        if sigma_fraction < 0:
            raise BadSpecError(f"sigma_fraction must be >= 0; got {sigma_fraction}")
        self.sigma_fraction = sigma_fraction
        self.sigma = sigma

    def points(self, x: torch.Tensor, n: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        if self.sigma is None:
            flat = x.flatten(1)
            sigma = (self.sigma_fraction * (flat.amax(1) - flat.amin(1))).reshape(-1, 1, 1, 1)
        else:
            sigma = _per_example(self.sigma, x)
        for _ in range(n):
            eps = torch.randn(x.shape[1:], generator=generator, device=x.device, dtype=x.dtype)
            yield x + sigma * eps, 1.0 / n


class LinearPathSampler(Sampler, name="linear_path"):
    """x₀ + α(x − x₀) on a quadrature grid (Integrated Gradients); finished by (x − x₀) ⊙ ·."""

    def __init__(self, baseline: float | torch.Tensor = 0.0, rule: str = "gausslegendre") -> None:
        quadrature(rule, 2)  # validates the rule name early
        self.baseline = baseline
        self.rule = rule

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device).expand_as(x)

    def points(self, x: torch.Tensor, n: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        x0 = self.start(x)
        alphas, weights = quadrature(self.rule, n)
        for alpha, weight in zip(alphas, weights):
            yield x0 + alpha * (x - x0), weight

    def finish(self, x: torch.Tensor, integral: torch.Tensor) -> torch.Tensor:
        return (x - self.start(x)) * integral


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur per channel, edges replicated; the kernel reaches ``truncate``·σ."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(truncate * sigma))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


class BlurPathSampler(LinearPathSampler, name="blur_path"):
    """The straight path from a Gaussian-blurred x to x: a baseline with the same low frequencies.

    ``sigma`` defaults to a quarter of the shorter image side.
    """

    def __init__(self, sigma: float | None = None, rule: str = "gausslegendre") -> None:
        super().__init__(0.0, rule)
        if sigma is not None and sigma < 0:
            raise BadSpecError(f"blur sigma must be >= 0; got {sigma}")
        self.sigma = sigma

    def start(self, x: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma if self.sigma is not None else min(x.shape[-2:]) / 4
        return gaussian_blur(x, sigma)


class SuppressionSampler(Sampler, name="suppression"):
    """x ⊙ m with m ~ U(0, 1) per pixel (or per ``cell``×``cell`` super-pixel), shared across channels.

    Samples only ever dim features towards zero, so they stay nearer the data than additive
    noise; the mean gradient is finished by ⊙ x like Input×Gradient.
    """

    def __init__(self, cell: int = 1) -> None:
        if not isinstance(cell, int) or cell < 1:
            raise BadSpecError(f"suppression cell must be a positive int; got {cell!r}")
        self.cell = cell

    def masks(self, x: torch.Tensor, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        h, w = x.shape[-2:]
        coarse = (1, 1, -(-h // self.cell), -(-w // self.cell))
        for _ in range(n):
            m = torch.rand(coarse, generator=generator, device=x.device, dtype=x.dtype)
            if self.cell > 1:
                m = m.repeat_interleave(self.cell, -2).repeat_interleave(self.cell, -1)[..., :h, :w]
            yield m

    def points(self, x: torch.Tensor, n: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        for m in self.masks(x, n, generator):
            yield x * m, 1.0 / n

    def finish(self, x: torch.Tensor, integral: torch.Tensor) -> torch.Tensor:
        return x * integral


def get_sampler(sampler: str | Sampler, **options: Any) -> Sampler:
    """A sampler instance from a name (with constructor options) or an instance (no options)."""
    if isinstance(sampler, Sampler):
        if options:
            raise BadSpecError(f"options {sorted(options)} given with a sampler instance; set them on the instance")
        return sampler
    cls = SAMPLERS.get(sampler)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BadSpecError(f"sampler {sampler!r} does not take {unknown}; it accepts {accepted}")
    return cls(**options)


def _check_count(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise BadSpecError(f"{name} must be an int >= {minimum}; got {value!r}")


def integrate(
    model: Forward,
    inputs: Any,
    target: TargetLike = None,
    sampler: str | Sampler = "linear_path",
    n: int = 50,
    seed: int = 0,
    batch_size: int | None = None,
    *,
    score: Score | None = None,
) -> torch.Tensor:
    """``sampler.finish(x, Σ_i w_i ∇f(x_i))`` for the samples x_i the sampler draws; shaped like inputs.

    ``model`` may be any callable returning logits (WAM passes "IDWT then the model"); it resolves
    ``target`` (None: the predicted class) and runs in eval mode. f is ``score`` (see ``_base.Score``),
    by default the target class's logit of ``model``. At most ``batch_size`` (512) inputs per pass.
    """
    _check_count("n", n)
    _check_count("batch_size", batch_size)
    draw = get_sampler(sampler)
    x = as_batch(inputs)
    rows = batch_size or 512
    with evaluating(model):
        t = resolve_target(model, x, target)
        f = class_logit(model) if score is None else score
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
        per_pass = max(1, rows // x.shape[0])
        total = torch.zeros_like(x)
        chunk: list[tuple[torch.Tensor, float]] = []
        for point in draw.points(x, n, generator):
            chunk.append(point)
            if len(chunk) == per_pass:
                total += _weighted_gradients(f, chunk, t, rows)
                chunk = []
        if chunk:
            total += _weighted_gradients(f, chunk, t, rows)
        return draw.finish(x, total).detach()


def _weighted_gradients(score: Score, chunk: list[tuple[torch.Tensor, float]], target: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ w_i ∇f(x_i) over one chunk of samples, in passes of at most ``rows`` inputs."""
    samples = torch.stack([s for s, _ in chunk])  # (k, B, C, H, W)
    k, b = samples.shape[:2]
    grads = score_gradient(score, samples.reshape(k * b, *samples.shape[2:]), target.repeat(k), rows)
    weights = torch.tensor([w for _, w in chunk], dtype=grads.dtype, device=grads.device)
    return torch.einsum("k,kb...->b...", weights, grads.reshape(k, b, *grads.shape[1:]))


class _PathMethod(AttributionMethod):
    """A path method is the core with a default sampler and sample count."""

    default_sampler: ClassVar[str] = "linear_path"
    default_n: ClassVar[int] = 50

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
        """Map shaped like ``inputs``; ``sampler_options`` go to the sampler named by ``sampler``."""
        draw = get_sampler(sampler or self.default_sampler, **sampler_options)
        return integrate(self.model, inputs, target, draw, n or self.default_n, seed, batch_size)


class IntegratedGradients(_PathMethod, name="integrated_gradients"):
    """(x − x₀) ⊙ ∫₀¹ ∇f_c(x₀ + α(x − x₀)) dα (Sundararajan et al. 2017); x₀ = ``baseline`` (0).

    Default rule ``gausslegendre`` with n = 50, as Captum's default. The trapezoid rule here
    uses weights summing to one; Captum's ``riemann_trapezoid`` sums to 1 − 1/n.
    """

    default_sampler = "linear_path"
    default_n = 50


class SmoothGrad(_PathMethod, name="smoothgrad"):
    """Mean gradient at x + N(0, σ²), σ = 0.15·(max x − min x), n = 25 (Smilkov et al. 2017)."""

    default_sampler = "noise"
    default_n = 25
