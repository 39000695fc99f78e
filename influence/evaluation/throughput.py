"""Training throughput of ResNet-9, the yardstick the build benchmarks divide by (one timer, so both scripts agree)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from influence.models import ResNet9


def train_epoch_seconds(x: torch.Tensor, y: torch.Tensor, batch: int, reps: int) -> list[float]:
    """Seconds of each of ``reps`` training epochs of ResNet-9 over (x, y) (forward + backward + SGD step with Nesterov
    momentum), after one warm-up epoch that the allocators and kernels need."""
    torch.manual_seed(0)
    model = ResNet9().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        for b in range(0, len(x), batch):
            loss = F.cross_entropy(model(x[b:b + batch]), y[b:b + batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            opt.step()
        times.append(time.perf_counter() - start)
    return times[1:]
