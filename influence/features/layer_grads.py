"""Exact per-example gradients from one batched forward/backward with layer hooks.

``vmap(grad)`` is general but memory-bound on conv nets (it runs the backward
once per example). For the layers that hold nearly all parameters of image
classifiers (Linear, Conv2d, eval-mode BatchNorm) the per-example gradient has
a closed form in the layer's input and output gradient, both available from a
single batched backward: Linear/Conv2d ``δ aᵀ`` summed over positions,
BatchNorm ``Σ δ·x̂`` and ``Σ δ``. Models with other parameterised layers, or
layers called more than once per forward, fall back to vmap.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from influence.features.task import Task

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d)


def _owner_map(model: nn.Module, names: list[str]) -> dict[str, tuple[str, nn.Module, str]] | None:
    """Parameter name → (module name, module, 'weight'|'bias') when every selected parameter has a closed form."""
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if full in names:
                owners[full] = (mname, mod, pname)
    for full in names:
        if full not in owners:
            return None
        _, mod, _ = owners[full]
        if not isinstance(mod, SUPPORTED):
            return None
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or isinstance(mod.padding, str) or mod.padding_mode != "zeros"):
            return None
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and (mod.training or mod.running_mean is None):
            return None
    return owners


def _blocks(mod: nn.Module, inp: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of one module's weight and bias from its input and output gradient."""
    b = inp.shape[0]
    if isinstance(mod, nn.Conv2d):
        a = torch.nn.functional.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, D_in, L)
        d = delta.reshape(b, delta.shape[1], -1)  # (B, C_out, L)
        return {"weight": torch.bmm(d, a.transpose(1, 2)), "bias": d.sum(-1)}
    if isinstance(mod, nn.Linear):
        a = inp.reshape(b, -1, inp.shape[-1])
        d = delta.reshape(b, -1, delta.shape[-1])
        return {"weight": torch.bmm(d.transpose(1, 2), a), "bias": d.sum(1)}
    # BatchNorm in eval mode: y = γ·x̂ + β with running statistics.
    shape = (1, -1) + (1,) * (inp.ndim - 2)
    xhat = (inp - mod.running_mean.reshape(shape)) / torch.sqrt(mod.running_var.reshape(shape) + mod.eps)
    dims = tuple(range(2, inp.ndim))
    return {"weight": (delta * xhat).sum(dims) if dims else delta * xhat, "bias": delta.sum(dims) if dims else delta}


def layer_grad_blocks(
    model: nn.Module, task: Task, names: list[str], x: torch.Tensor, y: torch.Tensor, of: str = "output"
) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Yield ``(param name, (B, numel) per-example gradient)`` in ``names`` order, or None if unsupported.

    Blocks are produced one parameter at a time so a caller can project and
    drop each before the next is formed (peak memory: one layer's gradients).
    """
    owners = _owner_map(model, names)
    if owners is None:
        return None
    modules = {mname: mod for mname, mod, _ in owners.values()}
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
    handles = [mod.register_forward_hook(lambda _m, inp, out, key=m: captured[key].append((inp[0].detach(), out)))
               for m, mod in modules.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
            fn = task.output if of == "output" else task.loss
            if any(len(v) != 1 for v in captured.values()):
                return None
            order = list(modules)
            deltas = torch.autograd.grad(fn(logits, y).sum(), [captured[m][0][1] for m in order])
    finally:
        for h in handles:
            h.remove()
    delta_of = dict(zip(order, deltas))
    return _iter_blocks(names, owners, captured, delta_of, x.shape[0])


def _iter_blocks(names, owners, captured, delta_of, b) -> Iterator[tuple[str, torch.Tensor]]:
    cache: dict[str, dict[str, torch.Tensor]] = {}
    for full in names:
        mname, mod, pname = owners[full]
        if mname not in cache:
            cache.clear()  # keep only the current module's blocks alive
            cache[mname] = _blocks(mod, captured[mname][0][0], delta_of[mname])
        yield full, cache[mname][pname].reshape(b, -1)
