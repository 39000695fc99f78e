"""Turn a map into something a person can look at (PNG overlay) or a program can read (JSON summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from index.atomic import atomic_write
from influence.errors import BadDataError


def _check_pair(image: torch.Tensor, attribution: torch.Tensor) -> None:
    if image.dim() != 3 or attribution.dim() != 3 or image.shape[-2:] != attribution.shape[-2:]:
        raise BadDataError(
            f"image and attribution must be (C, H, W) with the same H, W; got {tuple(image.shape)} and {tuple(attribution.shape)}"
        )


def save_overlay(image: torch.Tensor, attribution: torch.Tensor, path: str | Path, signed: bool | None = None,
                 title: str = "attribution") -> Path:
    """Save the image beside the map overlaid on it (under ``title``). ``signed=None`` decides from the map's
    values: signed maps use 'bwr' centred at 0, non-negative ones 'inferno'."""
    from matplotlib.figure import Figure  # a plain Figure: no pyplot, no change to the host program's backend

    _check_pair(image, attribution)
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    heat = attribution.detach().float().cpu().sum(0)
    if signed is None:
        signed = bool((heat < 0).any())
    if signed:
        bound = float(heat.abs().max()) or 1.0
        style: dict[str, Any] = {"cmap": "bwr", "vmin": -bound, "vmax": bound}
    else:
        style = {"cmap": "inferno", "vmin": 0.0, "vmax": float(heat.max()) or 1.0}
    shown = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    cmap = "gray" if img.shape[0] == 1 else None
    fig = Figure(figsize=(6, 3))
    axes = fig.subplots(1, 2)
    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title("input")
    axes[1].imshow(shown, cmap=cmap)
    mappable = axes[1].imshow(heat, alpha=0.6, **style)
    axes[1].set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(mappable, ax=axes[1], fraction=0.046)
    out = Path(path)
    with atomic_write(out) as f:  # a whole file or none, like every other file the toolkit writes
        fig.savefig(f, format=out.suffix.lstrip(".").lower() or "png", bbox_inches="tight", dpi=100)
    return out


def summarize(attribution: torch.Tensor, top: int = 5) -> dict[str, Any]:
    """JSON-ready facts about a (C, H, W) map: signed masses and the ``top`` pixels (channels summed)."""
    if attribution.dim() != 3:
        raise BadDataError(f"attribution must be (C, H, W); got shape {tuple(attribution.shape)}")
    heat = attribution.detach().double().cpu().sum(0)
    w = heat.shape[1]
    order = heat.flatten().argsort(descending=True)[:top]
    return {
        "shape": list(attribution.shape),
        "positive_mass": float(heat.clamp_min(0).sum()),
        "negative_mass": float(heat.clamp_max(0).sum()),
        "top_pixels": [{"row": int(i) // w, "col": int(i) % w, "value": float(heat.flatten()[i])} for i in order],
    }
