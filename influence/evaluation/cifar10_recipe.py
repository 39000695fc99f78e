"""The CIFAR trainer's recipe (``scripts/cifar10_train.py``): one plain-torch training run of the built-in ResNet-9 layout.

torch and ``influence.models`` only, so the trainer still runs on a machine with torch but none of the package's other
dependencies (``PYTHONPATH=.``); ``scripts/cifar2_lds_cpu.py`` trains its CPU-sized ground truth with the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from influence.models import ResNet9


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-px reflect-padded crops and horizontal flips, per example, on the tensor's device."""
    b = x.shape[0]
    xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (b,), generator=gen, device="cpu").to(x.device)
    dx = torch.randint(0, 9, (b,), generator=gen, device="cpu").to(x.device)
    ar = torch.arange(32, device=x.device)
    rows = (ar[None, :] + dy[:, None])[:, :, None]
    cols = (ar[None, :] + dx[:, None])[:, None, :]
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train(x: torch.Tensor, y: torch.Tensor, *, width: int, epochs: int, seed: int, lr: float = 0.05,
          batch: int = 128, keep: tuple[int, ...] = (), amp: bool = False,
          on_epoch: Callable[[int], None] | None = None) -> tuple[nn.Module, list[tuple[int, float, dict[str, torch.Tensor]]]]:
    """SGD (Nesterov, one-cycle linear schedule, wd 5e-4) on uint8 images; returns the model and kept checkpoints."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ResNet9(width=width).to(x.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          fused=x.device.type == "cuda")
    n = len(x)
    steps_per_epoch = n // batch  # drop the last partial batch (BatchNorm on tiny batches)
    total = max(1, steps_per_epoch * epochs)
    peak = total // 4

    def lr_at(step: int) -> float:
        return lr * (step / peak if step < peak else max(0.0, (total - step) / (total - peak)))

    kept: list[tuple[int, float, dict[str, torch.Tensor]]] = []
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen).to(x.device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = augment(x[idx].float().div_(255), gen).contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch)
        if epoch in keep:
            kept.append((epoch, lr_at(step), {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}))
    return model.eval(), kept
