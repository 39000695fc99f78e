"""Pixel-map quality measures: where a map's mass and peak lie, how faithful and how model-dependent it is.

- ``mass_in_box`` / ``peak_in_box``: share of positive mass inside a known region, and whether the argmax lies in
  it (peak-in-patch for shortcut maps; with the target's cell as the region, the grid pointing game's share);
- ``insertion_deletion``: probability of the target along a curve that reveals (insertion) or removes (deletion)
  features in the map's order; the area is the mean over the curve (Petsiuk et al. 2018, RISE);
- ``spearman``: rank correlation of two maps, the similarity used by model-parameter randomisation (MPRT,
  Adebayo et al. 2018): a map that does not change when the model is randomised does not explain the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from influence.errors import BadDataError


def _plane(m: torch.Tensor) -> torch.Tensor:
    """(H, W) map: channels summed when given (C, H, W)."""
    m = torch.as_tensor(m).detach()
    if m.dim() == 3:
        m = m.sum(0)
    if m.dim() != 2:
        raise BadDataError(f"a map must be (H, W) or (C, H, W); got shape {tuple(m.shape)}")
    return m.double()


def _box_mask(shape: Sequence[int], box: Sequence[int]) -> torch.Tensor:
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = shape
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise BadDataError(f"box {list(box)} ([x0, y0, x1, y1], x1/y1 exclusive) does not fit a {h}×{w} map")
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def mass_in_region(m: torch.Tensor, region: torch.Tensor) -> float:
    """Share of the map's positive mass inside the boolean ``region`` (H, W); 0 for a map with no positive mass."""
    pos = _plane(m).clamp(min=0)
    region = torch.as_tensor(region, dtype=torch.bool)
    if region.shape != pos.shape:
        raise BadDataError(f"region {tuple(region.shape)} does not match the map {tuple(pos.shape)}")
    total = float(pos.sum())
    return float(pos[region].sum()) / total if total > 0 else 0.0


def mass_in_box(m: torch.Tensor, box: Sequence[int]) -> float:
    """Share of the map's positive mass inside ``box`` [x0, y0, x1, y1] (x1/y1 exclusive)."""
    plane = _plane(m)
    return mass_in_region(plane, _box_mask(plane.shape, box))


def peak_in_box(m: torch.Tensor, box: Sequence[int]) -> bool:
    """Whether the map's largest value (first in row-major order on ties) lies inside ``box``."""
    plane = _plane(m)
    r, c = divmod(int(plane.flatten().argmax()), plane.shape[1])
    return bool(_box_mask(plane.shape, box)[r, c])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two flattened maps (average ranks for ties); 0 when either is constant."""
    ra = rankdata(torch.as_tensor(a).detach().flatten().double().numpy())
    rb = rankdata(torch.as_tensor(b).detach().flatten().double().numpy())
    if ra.size != rb.size:
        raise BadDataError(f"maps to compare must have the same number of values; got {ra.size} and {rb.size}")
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def insertion_deletion(
    prob: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, order: torch.Tensor, steps: int,
    baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(insertion, deletion) areas per example: mean target probability over ``steps + 1`` points of each curve.

    ``features`` (B, F) are the (flattened) inputs, ``order`` (B, F) each example's feature indices from most to
    least important, ``prob`` maps a (B, F) batch to the target's probability (B,). Deletion sets the first j·F/steps
    features to ``baseline`` (default 0); insertion starts from ``baseline`` and reveals them.
    """
    x = torch.as_tensor(features).detach()
    if x.dim() != 2 or order.shape != x.shape:
        raise BadDataError(f"features and order must both be (B, F); got {tuple(x.shape)} and {tuple(order.shape)}")
    if steps < 1:
        raise BadDataError(f"steps must be >= 1; got {steps}")
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    n_feat = x.shape[1]
    ins, dele = [], []
    for j in range(steps + 1):
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep.scatter_(1, order[:, : round(j * n_feat / steps)], True)
        ins.append(prob(torch.where(keep, x, base)))
        dele.append(prob(torch.where(keep, base, x)))
    return torch.stack(ins).mean(0), torch.stack(dele).mean(0)


def pointing_share(maps: torch.Tensor, regions: torch.Tensor) -> tuple[float, int]:
    """Grid pointing game: mean share of positive mass inside each map's own region, and how many maps were empty.

    ``maps`` (B, H, W) and boolean ``regions`` (B, H, W) (the target's cell). Maps with no positive mass are left
    out of the mean and counted; the mean is NaN when every map is empty.
    """
    pos = torch.as_tensor(maps).detach().clamp(min=0)
    regions = torch.as_tensor(regions, dtype=torch.bool)
    if pos.dim() != 3 or regions.shape != pos.shape:
        raise BadDataError(f"maps and regions must both be (B, H, W); got {tuple(pos.shape)} and {tuple(regions.shape)}")
    total = pos.flatten(1).sum(1)
    ok = total > 0
    share = (pos * regions).flatten(1).sum(1)[ok] / total[ok]
    return (float(share.mean()) if ok.any() else float("nan")), int((~ok).sum())


def mu_fidelity(
    prob: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, attribution: torch.Tensor, seed: int,
    subsets: int = 32, fraction: float = 0.2,
) -> float:
    """μ-fidelity (Bhatt et al. 2020): Pearson, over random feature subsets S, between Σ_S attribution and the drop
    in target probability when S is set to 0; mean over examples.

    ``features`` and ``attribution`` are (B, F); ``prob`` maps a (B, F) batch to the target's probability (B,).
    Each subset keeps a feature with probability ``fraction`` (seeded draws).
    """
    x = torch.as_tensor(features).detach()
    if x.dim() != 2 or attribution.shape != x.shape:
        raise BadDataError(f"features and attribution must both be (B, F); got {tuple(x.shape)} and {tuple(attribution.shape)}")
    gen = torch.Generator().manual_seed(seed)
    b, d = x.shape
    p0 = prob(x)
    sums, drops = [], []
    for _ in range(subsets):
        s = torch.rand(b, d, generator=gen) < fraction
        sums.append((attribution * s).sum(1))
        drops.append(p0 - prob(x * ~s))
    a, c = torch.stack(sums, 1).double(), torch.stack(drops, 1).double()
    a, c = a - a.mean(1, keepdim=True), c - c.mean(1, keepdim=True)
    r = (a * c).sum(1) / (a.norm(dim=1) * c.norm(dim=1)).clamp_min(1e-12)
    return float(r.mean())
