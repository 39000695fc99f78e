"""What every pixel-attribution method shares: the registry, input checks and the model contract.

One calling convention (Captum's): ``Method(model).attribute(inputs, target=..., **options)``
returns a tensor shaped like ``inputs``. The base class owns the parts every method
must get right the same way: normalising ``inputs`` and ``target`` once, running the
model in eval mode and restoring each module's training flag afterwards, and never
touching parameters (gradients are taken with ``torch.autograd.grad`` w.r.t. the
input only, so no ``.grad`` is written and no ``requires_grad`` flag is changed).

Argument vocabulary, shared by every method:

- ``inputs``: a float tensor (B, C, H, W) (an array is converted); maps come back the same shape.
- ``target``: the class explained per example: an int, a sequence or LongTensor of B ints,
  or None for the predicted class.
- ``n``: number of samples or path steps; ``seed``: seeds a local generator (stochastic
  samplers only); ``batch_size``: most model inputs per forward pass.

What a gradient method differentiates is a *score*: ``score(x, target) -> (N,)``, one scalar
per example. Most methods explain the target class's logit (``class_logit``); training
feature attribution differentiates other scores (e.g. a gradient cosine) with the same core.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeAlias

import torch
from torch import nn

from influence._inputs import TargetLike, as_batch, as_targets
from influence._registry import Registry
from influence.errors import BadSpecError

Forward: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
Score: TypeAlias = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score(x (N, ...), target (N,)) -> (N,)``: the scalar per example that a gradient method differentiates.

Example n's score must depend on example n only (eval mode), so one backward pass of the sum gives every
example's own gradient."""

METHODS: Registry[type["AttributionMethod"]] = Registry("attribution method")
"""CLI name → class; filled by each method's class statement (``name=...``)."""


def get_method(name: str) -> type["AttributionMethod"]:
    """The class registered under ``name``; unknown names list the choices."""
    return METHODS.get(name)


def logits_of(forward: Forward, x: torch.Tensor) -> torch.Tensor:
    """Run the model and check it returns logits shaped (B, K)."""
    out = forward(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadSpecError(f"the model must return logits shaped (B, K) = ({x.shape[0]}, K); got {shape}")
    return out


def resolve_target(forward: Forward, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
    """A LongTensor (B,) on ``x.device``, checked against the model's class count; None means the predicted class."""
    with torch.no_grad():
        if target is None:
            return logits_of(forward, x).argmax(dim=1)
        k = logits_of(forward, x[:1]).shape[1]
    return as_targets(target, x.shape[0], k).to(x.device)


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Eval mode for the call; every module's own training flag restored afterwards."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def class_logit(forward: Forward) -> Score:
    """The score most methods explain: the target class's logit, f_c(x)."""

    def score(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits_of(forward, x).gather(1, target[:, None])[:, 0]

    return score


def score_gradient(score: Score, x: torch.Tensor, target: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """∂score_n/∂x_n per example, at most ``batch_size`` examples per pass, without writing ``.grad`` anywhere."""
    step = batch_size or x.shape[0]
    return torch.cat([_score_gradient(score, x[i : i + step], target[i : i + step]) for i in range(0, x.shape[0], step)])


def _score_gradient(score: Score, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        values = score(x, target)
        if not isinstance(values, torch.Tensor) or values.shape != (x.shape[0],):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise BadSpecError(f"a score must return one value per example, shape ({x.shape[0]},); got {shape}")
        (grad,) = torch.autograd.grad(values.sum(), x)
    return grad


def gradient(forward: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∂f_target/∂x per example, without writing ``.grad`` anywhere."""
    return score_gradient(class_logit(forward), x, target)


class AttributionMethod:
    """Base of every pixel-attribution method; subclasses implement ``_attribute``.

    ``class Foo(AttributionMethod, name="foo")`` registers ``Foo`` in ``METHODS`` (a name taken twice is an error).
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            METHODS.register(name, cls)

    def __init__(self, model: nn.Module | Forward) -> None:
        if not callable(model):
            raise BadSpecError(f"model must be a torch.nn.Module or callable; got {type(model).__name__}")
        self.model = model

    @classmethod
    def from_model(cls, model: nn.Module) -> "AttributionMethod":
        """The method with its defaults for ``model`` (what the CLI builds from a name)."""
        return cls(model)

    def attribute(self, inputs: Any, target: TargetLike = None, **options: Any) -> torch.Tensor:
        """Attribution map shaped like ``inputs`` (see the module docstring for the arguments)."""
        x = as_batch(inputs)
        with evaluating(self.model):
            t = resolve_target(self.model, x, target)
            return self._attribute(x, t, **options).detach()

    def _attribute(self, x: torch.Tensor, target: torch.Tensor, *args: Any, **options: Any) -> torch.Tensor:
        """The map for checked ``x`` and ``target``; each method declares the options it takes.

        ``*args: Any, **options: Any`` is the typing spec's ``...``: overrides name their own keywords.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"
