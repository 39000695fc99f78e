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

from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call

from influence.errors import BadSpecError
from influence.features.task import Task

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d)
Owners = dict[str, tuple[str, nn.Module, str]]  # parameter name -> (module name, module, 'weight'|'bias')


def unfold_input(mod: nn.Conv2d, inp: torch.Tensor) -> torch.Tensor:
    """A Conv2d's input patches (B, C_in·kh·kw, L), the ``a`` of its per-example gradient ``δ aᵀ``."""
    if isinstance(mod.padding, str):  # callers admit numeric padding only; 'same'/'valid' have no fixed unfold here
        raise BadSpecError(f"conv padding {mod.padding!r} has no closed-form per-example gradient; use --projector sparse")
    return torch.nn.functional.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride)


def _owner_map(model: nn.Module, names: list[str]) -> Owners | None:
    """Parameter name → (module name, module, 'weight'|'bias') when every selected parameter has a closed form."""
    owners: Owners = {}
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


def _running_stats(
    mod: nn.Module, mname: str, state: Mapping[str, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A BatchNorm's running (mean, var): from ``state`` when given (the module's own may be another checkpoint's).

    None for other modules, and for a BatchNorm without running statistics (``_owner_map`` never admits one).
    """
    if not isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return None
    mean, var = mod.running_mean, mod.running_var
    if state is not None:
        prefix = f"{mname}." if mname else ""
        mean, var = state.get(prefix + "running_mean", mean), state.get(prefix + "running_var", var)
    if mean is None or var is None:
        return None
    return mean, var


def _blocks(
    mod: nn.Module, inp: torch.Tensor, delta: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Per-example gradients of one module's weight and bias from its input and output gradient."""
    b = inp.shape[0]
    if isinstance(mod, nn.Conv2d):
        a = unfold_input(mod, inp)  # (B, D_in, L)
        d = delta.reshape(b, delta.shape[1], -1)  # (B, C_out, L)
        return {"weight": torch.bmm(d, a.transpose(1, 2)), "bias": d.sum(-1)}
    if isinstance(mod, nn.Linear):
        a = inp.reshape(b, -1, inp.shape[-1])
        d = delta.reshape(b, -1, delta.shape[-1])
        return {"weight": torch.bmm(d.transpose(1, 2), a), "bias": d.sum(1)}
    if not isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) or stats is None:  # _owner_map admits no other module
        raise TypeError(f"no closed-form per-example gradient for {type(mod).__name__}")
    # BatchNorm in eval mode: y = γ·x̂ + β with running statistics.
    shape = (1, -1) + (1,) * (inp.ndim - 2)
    mean, var = stats
    xhat = (inp - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + mod.eps)
    dims = tuple(range(2, inp.ndim))
    return {"weight": (delta * xhat).sum(dims) if dims else delta * xhat, "bias": delta.sum(dims) if dims else delta}


class LayerReuseError(Exception):
    """A hooked layer ran other than exactly once in one forward (no per-example closed form); ``runs`` says how often."""

    def __init__(self, runs: dict[str, int]) -> None:
        super().__init__(", ".join(f"{m} ran {n} times" for m, n in runs.items()))
        self.runs = runs


def forward(model: nn.Module, x: torch.Tensor, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``model(x)``, or with the parameters and buffers of ``state`` swapped in (``functional_call``).

    Swapped-in parameters track gradients like the module's own (same ``requires_grad``), so hooks see the same graph.
    """
    if state is None:
        logits: torch.Tensor = model(x)
        return logits
    own = dict(model.named_parameters())
    swapped = {k: v.detach().requires_grad_(own[k].requires_grad) if k in own else v for k, v in state.items()}
    swapped_logits: torch.Tensor = functional_call(model, swapped, (x,))
    return swapped_logits


def capture_layer_grads(
    model: nn.Module, modules: Mapping[str, nn.Module], x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
    state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each module's input and the gradient of ``objective(logits)`` w.r.t. its output, from one forward/backward.

    The one hook-capture used by the layer fast path and the factorized projector. Raises
    :class:`LayerReuseError` when a module runs other than once (shared layers have no closed form).
    """
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
    handles = [mod.register_forward_hook(lambda _m, inp, out, key=m: captured[key].append((inp[0].detach(), out)))
               for m, mod in modules.items()]
    try:
        with torch.enable_grad():
            logits = forward(model, x, state)
            runs = {m: len(v) for m, v in captured.items() if len(v) != 1}
            if runs:
                raise LayerReuseError(runs)
            order = list(modules)
            deltas = torch.autograd.grad(objective(logits), [captured[m][0][1] for m in order])
    finally:
        for h in handles:
            h.remove()
    return {m: captured[m][0][0] for m in order}, dict(zip(order, deltas))


def layer_grad_blocks(
    model: nn.Module, task: Task, names: list[str], x: torch.Tensor, y: torch.Tensor, of: str = "output",
    state: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]] | None:
    """Yield ``(param name, (B, numel) per-example gradient)`` in ``names`` order, or None if unsupported.

    Blocks are produced one parameter at a time so a caller can project and
    drop each before the next is formed (peak memory: one layer's gradients).
    ``state`` (parameter and buffer tensors by name) replaces the module's own, as in ``functional_call``.
    """
    owners = _owner_map(model, names)
    if owners is None:
        return None
    modules = {mname: mod for mname, mod, _ in owners.values()}
    fn = task.output if of == "output" else task.loss
    try:
        inputs, deltas = capture_layer_grads(model, modules, x, lambda logits: fn(logits, y).sum(), state)
    except LayerReuseError:
        return None
    return _iter_blocks(names, owners, inputs, deltas, x.shape[0], state)


def _iter_blocks(
    names: list[str], owners: Owners, inputs: Mapping[str, torch.Tensor], delta_of: Mapping[str, torch.Tensor], b: int,
    state: Mapping[str, torch.Tensor] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    cache: dict[str, dict[str, torch.Tensor]] = {}
    for full in names:
        mname, mod, pname = owners[full]
        if mname not in cache:
            cache.clear()  # keep only the current module's blocks alive
            cache[mname] = _blocks(mod, inputs[mname], delta_of[mname], _running_stats(mod, mname, state))
        yield full, cache[mname][pname].reshape(b, -1)
