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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from influence.errors import BadDataError, BadSpecError

Forward = Callable[[torch.Tensor], torch.Tensor]
TargetLike = int | Sequence[int] | torch.Tensor | None

METHODS: dict[str, type["AttributionMethod"]] = {}
"""CLI name → class; filled by each method's class statement (``name=...``)."""


def get_method(name: str) -> type["AttributionMethod"]:
    """The class registered under ``name``; unknown names list the choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        choices = ", ".join(sorted(METHODS))
        raise BadSpecError(f"unknown attribution method {name!r}; choose one of: {choices}") from None


def as_batch(inputs: Any) -> torch.Tensor:
    """Normalise ``inputs`` to a detached, finite, floating (B, C, H, W) tensor."""
    if not isinstance(inputs, torch.Tensor):
        try:
            inputs = torch.as_tensor(inputs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadDataError(f"inputs must be a tensor or array shaped (B, C, H, W); got {type(inputs).__name__}") from exc
    if inputs.dim() != 4:
        raise BadDataError(
            f"inputs must be a batch shaped (B, C, H, W); got shape {tuple(inputs.shape)} "
            "(add a batch dimension with inputs.unsqueeze(0) for one image)"
        )
    if inputs.shape[0] == 0:
        raise BadDataError("inputs is an empty batch (B = 0)")
    if not inputs.is_floating_point():
        raise BadDataError(f"inputs must be floating point; got dtype {inputs.dtype} (convert with .float())")
    if not torch.isfinite(inputs).all():
        raise BadDataError("inputs contain NaN or inf")
    return inputs.detach()


def logits_of(forward: Forward, x: torch.Tensor) -> torch.Tensor:
    """Run the model and check it returns logits shaped (B, K)."""
    out = forward(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadSpecError(f"the model must return logits shaped (B, K) = ({x.shape[0]}, K); got {shape}")
    return out


def resolve_target(forward: Forward, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
    """A LongTensor (B,) on ``x.device``; None means each example's predicted class."""
    batch = x.shape[0]
    if target is None:
        with torch.no_grad():
            return logits_of(forward, x).argmax(dim=1)
    if isinstance(target, bool):
        raise BadSpecError(f"target must be an int class index; got {target!r}")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long, device=x.device)
    else:
        t = torch.as_tensor(target, device=x.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise BadSpecError(f"target must hold integer class indices; got dtype {t.dtype}")
        t = t.long().reshape(-1) if t.dim() == 0 else t.long()
        if t.numel() == 1:
            t = t.reshape(1).expand(batch).clone()
        if t.shape != (batch,):
            raise BadSpecError(f"target must be an int or hold one class per example ({batch}); got shape {tuple(t.shape)}")
    with torch.no_grad():
        k = logits_of(forward, x[:1]).shape[1]
    if (t < 0).any() or (t >= k).any():
        raise BadSpecError(f"target class out of range for a model with {k} classes: {t.tolist()}")
    return t


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


def gradient(forward: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∂f_target/∂x per example, without writing ``.grad`` anywhere."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = logits_of(forward, x)
        selected = out.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(selected, x)
    return grad


class AttributionMethod:
    """Base of every pixel-attribution method; subclasses implement ``_attribute``.

    ``class Foo(AttributionMethod, name="foo")`` registers ``Foo`` in ``METHODS``.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            if name in METHODS:
                raise BadSpecError(f"attribution method name {name!r} is already registered by {METHODS[name].__name__}")
            cls.name = name
            METHODS[name] = cls

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

    def _attribute(self, x: torch.Tensor, target: torch.Tensor, **options: Any) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"
