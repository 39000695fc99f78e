"""Per-example gradients with torch.func: ``vmap(grad(...))`` over a batch, model in eval mode."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influence.features.task import Task


def split_params(
    model: nn.Module, names: list[str], dtype: torch.dtype | None = None, state: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached (differentiated, frozen) tensors for ``functional_call``; floating ones cast to ``dtype`` if given.

    ``state`` (tensors by name, e.g. one checkpoint's) takes precedence over the module's own tensors.
    """
    chosen = set(names)
    state = state or {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    params = {n: cast(state.get(n, p).detach()) for n, p in model.named_parameters() if n in chosen}
    frozen = {n: cast(state.get(n, p).detach()) for n, p in model.named_parameters() if n not in chosen}
    frozen.update({n: cast(state.get(n, b)) for n, b in model.named_buffers()})
    return params, frozen


def per_example_grads(
    model: nn.Module, task: Task, names: list[str], x: torch.Tensor, y: torch.Tensor, of: str = "output",
    state: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Flattened per-example gradients (B, p) of ``task.output`` (or ``task.loss``) over ``names``.

    The model must be in eval mode (BatchNorm on running statistics, no dropout),
    so examples do not interact and each row is the gradient of that example alone.
    ``state`` replaces the module's parameters and buffers (one checkpoint's tensors by name).
    """
    params, frozen = split_params(model, names, state=state)
    fn = task.output if of == "output" else task.loss

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = functional_call(model, (p, frozen), (xi[None],))
        return fn(logits, yi[None]).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


def num_parameters(model: nn.Module, names: list[str]) -> int:
    chosen = set(names)
    return sum(p.numel() for n, p in model.named_parameters() if n in chosen)
