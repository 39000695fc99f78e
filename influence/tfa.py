"""Training feature attribution (TFA): where on a *training* image its influence on a test query lies.

Same calling convention as :mod:`influence.attribution`, on training images::

    maps = get_tfa("occlusion")(model).attribute(x_train, target=y_train, query=(x_test, y_test))

- ``inputs``: training images (B, C, H, W); ``target``: their training labels (B,) (an int or sequence works too).
- ``query``: the test side, ``(x_test, y_test)`` with ``x_test`` (C, H, W) or (1, C, H, W), or a precomputed flat
  test gradient (p,) of the *loss* over the selected parameters (``per_example_grads(..., of="loss")[0]``).
  ``y_test`` is the class whose loss is explained: the predicted class for "why did it predict ŷ?".
- The result is shaped like ``inputs`` (float32 unless the inputs are float64).

The model is run in eval mode (BatchNorm on running statistics) and left as it was: training flags restored,
no hooks, ``requires_grad`` untouched (parameters are detached copies; pixel gradients are taken w.r.t. the input
only, parameter gradients with ``torch.func``).

Methods; sign convention: positive = this region makes i a *proponent* of t:

- ``gradcos_two_step``: gradcos input×gradient × the image's own input×gradient (positive parts). Test-specific.
- ``gradcos``: ∇_{x_i} cos(g(x_i, y_i), g_t), g_t held constant (a mixed second-order product:
  ``grad`` of the cosine of an inner ``grad``, vmapped over the batch). Options: ``smooth=n`` (SmoothGrad, noise
  σ = ``sigma``·pixel range), ``steps=n`` (path-integrated from a black image, i.e. integrated gradients of the Grad-Cos score),
  ``input_x_gradient``, ``positive``, ``combine`` (× the training image's own attribution). Test-specific.
- ``occlusion``: ΔS_R = S(i, t) − S(i with window R replaced by a baseline, t), S = ⟨g_i, g_t⟩ or cosine; all
  masked copies of one image are one batched per-example-gradient call; a pixel gets the mean ΔS of the windows
  covering it. Baselines ``zero``, ``blur``, ``mean``. Option ``combine``. Test-specific.
- ``two_step`` (the default, by measurement): an ordinary attribution of x_i for its own label y_i (integrated
  gradients of the logit from a black image, 16 steps, by default; or input×gradient, or the plain gradient; of
  the logit or the margin). *Not* test-specific: ``query`` is accepted and ignored, so the map
  is the same for every test image.

Every map is computed with the one model given (callers pass the final checkpoint). The gradient maps are the
pixel-attribution core run on a training-side score (``influence.attribution.integrate`` with ``score=``):
``smooth`` is its noise sampler (one draw per sample shared by the batch, so a map does not depend on the
other images in its batch), ``steps`` and two_step's integrated gradients its straight path from black.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeAlias

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influence._inputs import TargetLike, as_batch
from influence._registry import Registry
from influence.attribution._base import Forward, Score, class_logit, evaluating, resolve_target, score_gradient
from influence.attribution._path import LinearPathSampler, NoiseSampler, Sampler, gaussian_blur, integrate
from influence.errors import BadDataError, BadSpecError
from influence.features import ClassificationTask, Task, per_example_grads, select_parameters
from influence.features.grads import split_params

TFA_METHODS: Registry[type["TFAMethod"]] = Registry("TFA method")
"""CLI name → class; filled by each method's class statement (``name=...``)."""

EPS = 1e-12
QueryLike: TypeAlias = tuple[torch.Tensor, int] | torch.Tensor
"""The test side: ``(x_test, y_test)`` or a precomputed flat test loss gradient (p,)."""
Params: TypeAlias = dict[str, torch.Tensor]
"""Parameter or buffer name → detached tensor, as ``functional_call`` takes them."""


def get_tfa(name: str) -> type["TFAMethod"]:
    """The TFA class registered under ``name``; unknown names list the choices."""
    return TFA_METHODS.get(name)


class TFAMethod:
    """Base class: ``class X(TFAMethod, name="x")`` registers X under its CLI name."""

    name: ClassVar[str]
    test_specific: ClassVar[bool] = True

    def __init_subclass__(cls, name: str, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.name = name
        TFA_METHODS.register(name, cls)

    def __init__(self, model: nn.Module, *, task: Task | None = None, params: str = "all") -> None:
        self.model = model
        self.task = task or ClassificationTask()
        self.names = select_parameters(model, params)

    # ------------------------------------------------------------------ shared plumbing
    def attribute(
        self, inputs: torch.Tensor, target: TargetLike = None, query: QueryLike | None = None, **options: Any
    ) -> torch.Tensor:
        x = as_batch(inputs, single=True)
        if target is None:
            raise BadSpecError("TFA needs target=: the training labels of the inputs")
        with evaluating(self.model):
            y = resolve_target(self.forward(x.dtype), x, target)
            out = self._attribute(x, y, query, **options)
        return out.detach().to(x.dtype)

    def _attribute(
        self, x: torch.Tensor, y: torch.Tensor, query: QueryLike | None, *args: Any, **options: Any
    ) -> torch.Tensor:
        """The maps for checked ``x`` and labels ``y``; each method declares the options it takes.

        ``*args: Any, **options: Any`` is the typing spec's ``...``: overrides name their own keywords.
        """
        raise NotImplementedError

    def _params(self, dtype: torch.dtype) -> tuple[Params, Params]:
        return split_params(self.model, self.names, dtype)

    def forward(self, dtype: torch.dtype) -> Forward:
        """The model on detached parameters cast to ``dtype``: gradients reach the input only."""
        params, frozen = self._params(dtype)
        model = self.model

        def run(x: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = functional_call(model, (params, frozen), (x,))
            return logits

        return run

    def test_gradient(self, query: QueryLike | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The flat test loss gradient g_t (p,) from ``query`` (computed, or checked when given)."""
        p = sum(q.numel() for n, q in self.model.named_parameters() if n in set(self.names))
        if query is None:
            raise BadSpecError(f"TFA method {self.name!r} needs query=(x_test, y_test) or a flat test gradient")
        if isinstance(query, torch.Tensor):
            g = query.detach().reshape(-1)
            if g.numel() != p:
                raise BadDataError(f"query gradient has {g.numel()} values; the selected parameters have {p}")
            return g.to(dtype)
        if not isinstance(query, (tuple, list)) or len(query) != 2:
            raise BadDataError(f"query must be (x_test, y_test) or a flat gradient tensor; got {type(query).__name__}")
        xt = torch.as_tensor(query[0]).detach().to(dtype)
        xt = xt[None] if xt.dim() == 3 else xt
        if xt.dim() != 4 or xt.shape[0] != 1:
            raise BadDataError(f"query image must be (C, H, W) or (1, C, H, W); got {tuple(xt.shape)}")
        yt = torch.as_tensor(query[1], dtype=torch.long).reshape(-1)[:1]
        with evaluating(self.model):
            params, frozen = self._params(dtype)
            return _flat_grad(self.model, self.task, self.names, params, frozen, xt[0], yt[0], "loss")

    def own_attribution(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Input×gradient of the training image's own logit, for ``combine``."""
        return TwoStepTFA(self.model, task=self.task, params="all")._attribute(x, y, None, method="input_x_gradient")


def _flat_grad(model: nn.Module, task: Task, names: list[str], params: Params, frozen: Params,
               xi: torch.Tensor, yi: torch.Tensor, of: str = "loss") -> torch.Tensor:
    """g(x_i, y_i) flattened over ``names``; differentiable w.r.t. ``xi`` under torch.func transforms."""
    fn = task.loss if of == "loss" else task.output

    def scalar(p: Params) -> torch.Tensor:
        logits: torch.Tensor = functional_call(model, (p, frozen), (xi[None],))
        return fn(logits, yi[None]).sum()

    g: Params = grad(scalar)(params)
    return torch.cat([g[n].reshape(-1) for n in names])


def _positive_normalised(m: torch.Tensor) -> torch.Tensor:
    m = m.clamp(min=0)
    return m / m.flatten(1).amax(1).clamp(min=EPS).view(-1, *([1] * (m.dim() - 1)))


class GradCosTFA(TFAMethod, name="gradcos"):
    """∇_{x_i} cos(g(x_i, y_i), g_t) (Bacha & George 2025), with SmoothGrad / path / ×input / positive options.

    ``smooth=n`` and ``steps=n`` hand the Grad-Cos score to the one path-integration core with the noise
    sampler (σ = ``sigma``·pixel range) and the straight path from a black image (midpoint rule).
    """

    def score(self, query: QueryLike | None, dtype: torch.dtype = torch.float32) -> Score:
        """The Grad-Cos score cos(g(x_i, y_i), g_t) per training example, g_t from ``query`` held constant."""
        gt = self.test_gradient(query, dtype)
        gt_unit = gt / gt.norm().clamp(min=EPS)
        params, frozen = self._params(dtype)
        model, task, names = self.model, self.task, self.names

        def one(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            g = _flat_grad(model, task, names, params, frozen, xi, yi, "loss")
            cosine: torch.Tensor = (g @ gt_unit.to(xi.device)) / g.norm().clamp(min=EPS)  # Tensor.__matmul__ is untyped
            return cosine

        return vmap(one)

    def _attribute(self, x: torch.Tensor, y: torch.Tensor, query: QueryLike | None, *,
                   smooth: int = 0, sigma: float = 0.15, steps: int = 0,
                   input_x_gradient: bool = False, positive: bool = False, combine: bool = False,
                   seed: int = 0, batch_size: int = 32) -> torch.Tensor:
        if smooth < 0 or steps < 0:
            raise BadSpecError(f"smooth and steps must be >= 0; got smooth={smooth}, steps={steps}")
        if smooth and steps:
            raise BadSpecError("choose one of smooth= (SmoothGrad) and steps= (path integration), not both")
        score = self.score(query, x.dtype)
        sampler: Sampler | None = None
        if smooth:
            sampler = NoiseSampler(sigma_fraction=sigma)
        elif steps:
            sampler = LinearPathSampler(0.0, rule="riemann_middle")
        if sampler is None:
            m = score_gradient(score, x, y, batch_size)
        else:
            m = integrate(self.forward(x.dtype), x, y, sampler, smooth or steps, seed, batch_size, score=score)
        if input_x_gradient and not steps:
            m = m * x
        if positive:
            m = m.clamp(min=0)
        if combine:
            m = _positive_normalised(m) * _positive_normalised(self.own_attribution(x, y))
        return m


class GradCosTwoStepTFA(GradCosTFA, name="gradcos_two_step"):
    """gradcos input×gradient × the image's own input×gradient (positive parts, each scaled to max 1).

    The test-specific factor says which pixels make i a proponent of *this* query; the second factor keeps the
    map on evidence the model uses for y_i, which is what localises (docs/BENCHMARKS.md). Options as gradcos.
    """

    def _attribute(self, x: torch.Tensor, y: torch.Tensor, query: QueryLike | None, **options: Any) -> torch.Tensor:
        options.setdefault("input_x_gradient", True)
        options.setdefault("combine", True)
        return super()._attribute(x, y, query, **options)


class TwoStepTFA(TFAMethod, name="two_step"):
    """Ordinary attribution of x_i for its own label y_i; the same map whatever the query (not test-specific).

    Integrated gradients here is the path core on the straight path from a black image, midpoint rule.
    """

    test_specific = False

    def score(self, dtype: torch.dtype = torch.float32, of: str = "logit") -> Score:
        """The logit of y_i, or the task's output (the margin for classification)."""
        if of not in ("logit", "margin"):
            raise BadSpecError(f"two_step of={of!r}; choose logit or margin")
        forward, task = self.forward(dtype), self.task
        if of == "logit":
            return class_logit(forward)
        return lambda x, y: task.output(forward(x), y)

    def _attribute(self, x: torch.Tensor, y: torch.Tensor, query: QueryLike | None = None, *,
                   of: str = "logit", method: str = "integrated_gradients",
                   steps: int = 16, batch_size: int = 32) -> torch.Tensor:
        if method not in ("input_x_gradient", "gradient", "integrated_gradients"):
            raise BadSpecError(f"two_step method={method!r}; choose input_x_gradient, gradient or integrated_gradients")
        score = self.score(x.dtype, of)
        if method == "gradient":
            return score_gradient(score, x, y, batch_size)
        if method == "input_x_gradient":
            return x * score_gradient(score, x, y, batch_size)
        path = LinearPathSampler(0.0, rule="riemann_middle")
        return integrate(self.forward(x.dtype), x, y, path, steps, batch_size=batch_size, score=score)


class OcclusionTFA(TFAMethod, name="occlusion"):
    """Region influence: drop in S(i, t) when a window of x_i is replaced by a baseline, averaged per pixel."""

    def _attribute(self, x: torch.Tensor, y: torch.Tensor, query: QueryLike | None, *,
                   window: int = 4, stride: int = 2, baseline: str = "zero",
                   score: str = "dot", blur_sigma: float = 2.0, combine: bool = False) -> torch.Tensor:
        if baseline not in ("zero", "blur", "mean"):
            raise BadSpecError(f"occlusion baseline={baseline!r}; choose zero, blur or mean")
        if score not in ("dot", "cos"):
            raise BadSpecError(f"occlusion score={score!r}; choose dot or cos")
        h, w = x.shape[-2:]
        if not 1 <= window <= min(h, w) or stride < 1:
            raise BadSpecError(f"occlusion window={window}, stride={stride}: need 1 <= window <= {min(h, w)} and stride >= 1")
        gt = self.test_gradient(query, x.dtype).to(x.device)
        if baseline == "zero":
            base = torch.zeros_like(x)
        elif baseline == "mean":
            base = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        else:
            base = gaussian_blur(x, blur_sigma, truncate=2.0)
        rows = _starts(h, window, stride)
        cols = _starts(w, window, stride)
        masks = torch.zeros(len(rows) * len(cols), h, w, dtype=x.dtype, device=x.device)
        for k, (r, c) in enumerate((r, c) for r in rows for c in cols):
            masks[k, r:r + window, c:c + window] = 1
        cover = masks.sum(0).clamp(min=1)
        maps = []
        for i in range(x.shape[0]):
            xi, bi = x[i], base[i]
            variants = torch.cat([xi[None], xi[None] * (1 - masks[:, None]) + bi[None] * masks[:, None]])
            g = per_example_grads(self.model, self.task, self.names, variants, y[i].repeat(len(variants)), of="loss")
            s = g @ gt
            if score == "cos":
                s = s / (g.norm(dim=1) * gt.norm()).clamp(min=EPS)
            delta = s[0] - s[1:]
            pixel = (delta[:, None, None] * masks).sum(0) / cover
            maps.append(pixel.expand_as(xi))
        m = torch.stack(maps)
        if combine:
            m = _positive_normalised(m) * _positive_normalised(self.own_attribution(x, y))
        return m


def _starts(size: int, window: int, stride: int) -> list[int]:
    s = list(range(0, size - window + 1, stride))
    if s[-1] != size - window:
        s.append(size - window)
    return s


DEFAULT_TFA = "two_step"
"""The default TFA method, chosen by the measured shortcut localisation (docs/BENCHMARKS.md)."""


__all__ = ["DEFAULT_TFA", "GradCosTFA", "GradCosTwoStepTFA", "OcclusionTFA", "TFAMethod", "TFA_METHODS", "TwoStepTFA", "get_tfa"]
