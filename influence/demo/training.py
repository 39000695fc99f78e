"""The demo's training recipe: a plain, seeded loop that saves checkpoints (also used by the evaluations).

TracInCP needs checkpoints along training together with the learning rate in
force at each, so this returns both.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from index.atomic import atomic_write
from influence.data import ArrayDataset, SizedDataset, batch_of, index_subset

DEMO_EPOCHS = 12
DEMO_CHECKPOINTS = 3


def train_classifier(
    model: nn.Module,
    dataset: SizedDataset,
    *,
    epochs: int = DEMO_EPOCHS,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoints: int = DEMO_CHECKPOINTS,
    weight_decay: float = 5e-4,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[tuple[Path, float]]:
    """SGD with momentum and a linear learning-rate decay; saves ``checkpoints`` evenly spaced state dicts.

    ``progress``: a bar over epochs on stderr, shown only when stderr is a terminal.

    Returns ``[(path, lr_at_that_epoch), ...]`` (empty when ``checkpoint_dir`` is None).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = len(dataset)
    save_at = set(np.linspace(epochs / checkpoints, epochs, checkpoints).round().astype(int).tolist())
    saved: list[tuple[Path, float]] = []
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    for epoch in tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=None if progress else True):
        current_lr = lr * (1 - (epoch - 1) / epochs)
        for group in opt.param_groups:
            group["lr"] = current_lr
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            if isinstance(dataset, ArrayDataset):
                x, y = dataset.x[idx], dataset.y[idx]
            else:
                subset = index_subset(dataset, idx.tolist())
                x, y = batch_of(subset, 0, len(subset))
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            opt.step()
        if checkpoint_dir is not None and epoch in save_at:
            path = Path(checkpoint_dir) / f"epoch_{epoch:03d}.pt"
            with atomic_write(path) as f:
                torch.save(model.state_dict(), f)
            saved.append((path, current_lr))
    return saved


@torch.no_grad()
def predict(model: nn.Module, dataset: SizedDataset, batch_size: int = 512, device: str | torch.device = "cpu") -> torch.Tensor:
    """Predicted classes for a whole dataset, model in eval mode."""
    model.eval()
    preds = []
    for b in range(0, len(dataset), batch_size):
        x, _ = batch_of(dataset, b, min(len(dataset), b + batch_size))
        preds.append(model(x.to(device)).argmax(-1).cpu())
    return torch.cat(preds)
