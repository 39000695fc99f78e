"""Patch-shortcut detection from TFA maps.

A shortcut is a small region that (1) holds the peak of the TFA map on many influential training images of one
class, in the same place, and (2) looks the same in all of them (a pasted patch, a watermark, a tag).
Natural class evidence (a digit's stroke) can satisfy (1), so (2) is what separates the two.

For each class c among the given maps:

1. *Peak region*: each map (channels summed, positive part) is box-filtered with a ``window``×``window``
   mean; its argmax is the map's peak window. Steps 1-3 run once per window size (``default_windows``: 2 px up to
   a sixth of the image side), since a window much larger than the patch compares natural background around it in
   step 3 and a window much smaller than the patch lets the peak wander inside it; each class keeps its best-scoring
   window.
2. *Location cluster*: the peak position with the most distinct training images of class c whose peaks lie within
   ``tolerance`` pixels (Chebyshev distance); ``support`` = that count / the number of distinct class-c images
   (an image that recurs for several queries counts once, and only its first map is used below).
3. *Content*: each clustered image's RMS deviation, in the cluster's window, from the clustered images' median
   patch, divided by the pixel standard deviation of all the given images; ``dispersion`` is the median of these
   (0 for an identical patch, about 0.4-1 for digit strokes). The supporting images are the clustered ones whose
   own deviation is at most ``max_dispersion`` (stray peaks that fell near by chance drop out), and
   ``support`` = their number / the number of distinct class-c images.
4. *Box*: from the peak pixel (largest mean normalised map in the peak window), the 8-connected region, within the
   largest window size of it, of pixels that are identical across the supporting images (std <= 0.1 pixel std) and
   have the peak pixel's value (8-connected so that one colour of a checkerboard patch spans the whole board); when
   the peak pixel itself varies (a textured patch), the half-maximum region of the mean normalised supporting map
   instead.

A class is reported when ``count >= min_count``, ``support >= min_support`` and ``dispersion <= max_dispersion``,
with ``score = support * (1 - dispersion / max_dispersion)`` in (0, 1]. Thresholds (defaults below) were calibrated
on clean runs of the digits demo with one 3 px window, and re-checked with the default windows [2, 3]: no alarm, the
closest clean cluster at dispersion 0.16 (2 px window; a smaller window compares fewer pixels, so the margin
shrinks). Random peak positions give support of about 0.15 for 30 maps of a class on a 16×16 image
(docs/BENCHMARKS.md, "shortcut detector")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from influence.errors import BadDataError

MIN_SUPPORT = 0.4
MIN_COUNT = 5
MAX_DISPERSION = 0.1


@dataclass
class Shortcut:
    """One detected shortcut: its class, box [x0, y0, x1, y1] (x1/y1 exclusive), supporting training ids, score."""

    cls: int
    box: list[int]
    train_ids: list[int]
    score: float
    support: float = 0.0
    dispersion: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"class": self.cls, "box": list(self.box), "train_ids": list(self.train_ids), "score": self.score}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_maps(maps: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(maps).detach().double()
    if m.dim() == 4:
        m = m.sum(1)
    if m.dim() != 3:
        raise BadDataError(f"maps must be (n, C, H, W) or (n, H, W); got {tuple(m.shape)}")
    return m


def default_windows(side: int) -> list[int]:
    """Peak-window sizes tried by default: 2 px up to a sixth of the image side, rounded ([2, 3] at 16 px, [2..5] at 32).

    The largest is the single window of earlier versions, so whatever that found is still among the candidates.
    """
    return list(range(2, max(2, round(side / 6)) + 1))


def _window_list(window: int | Sequence[int] | None, side: int) -> list[int]:
    if window is None:
        wins = [v for v in default_windows(side) if v <= side] or [side]
    elif isinstance(window, int):
        wins = [int(window)]
    else:
        wins = sorted({int(v) for v in window})
    if not wins or not all(1 <= v <= side for v in wins):
        raise BadDataError(f"window={window!r}: need one size or a non-empty list of sizes in [1, {side}]")
    return wins


def detect_shortcuts(
    maps: torch.Tensor,
    images: torch.Tensor,
    train_ids: Sequence[int],
    labels: Sequence[int],
    *,
    window: int | Sequence[int] | None = None,
    min_support: float = MIN_SUPPORT,
    min_count: int = MIN_COUNT,
    max_dispersion: float = MAX_DISPERSION,
    tolerance: int = 1,
) -> list[Shortcut]:
    """Shortcut patches among TFA maps of influential training images; ``[]`` when there is none.

    ``maps[j]`` is a TFA map on training image ``images[j]`` (id ``train_ids[j]``, label ``labels[j]``); the same
    training image may appear several times (once per test query). ``window`` is the peak-region size in pixels, or
    a list of sizes to try (default: ``default_windows`` of the shorter image side); each class reports at most
    one shortcut, from its best-scoring window. Returned shortcuts are sorted by score, best first.
    """
    m = _as_maps(maps).clamp(min=0)
    x = torch.as_tensor(images).detach().double()
    if x.dim() == 3:
        x = x[:, None]
    n, h, w = m.shape
    if x.shape[0] != n or tuple(x.shape[-2:]) != (h, w):
        raise BadDataError(f"images {tuple(x.shape)} do not match maps {tuple(m.shape)}: need one image per map, same H, W")
    ids, labs = list(map(int, train_ids)), list(map(int, labels))
    if len(ids) != n or len(labs) != n:
        raise BadDataError(f"need one train id and label per map; got {len(ids)} ids, {len(labs)} labels for {n} maps")
    wins = _window_list(window, min(h, w))
    has_peak = m.flatten(1).amax(1) > 0
    peaks = {win: _peak_windows(m, win) for win in wins}
    pixel_std = float(x.std()) or 1.0

    found: list[Shortcut] = []
    for cls in sorted(set(labs)):
        members = [j for j in range(n) if labs[j] == cls and bool(has_peak[j])]
        if len({ids[j] for j in members}) < min_count:
            continue
        best: Shortcut | None = None
        for win in wins:
            pr, pc = peaks[win]
            s = _class_shortcut(cls, members, ids, m, x, pr, pc, win, max(wins), pixel_std,
                                min_count=min_count, min_support=min_support, max_dispersion=max_dispersion,
                                tolerance=tolerance)
            if s is not None and (best is None or s.score > best.score):
                best = s
        if best is not None:
            found.append(best)
    return sorted(found, key=lambda s: -s.score)


def _peak_windows(m: torch.Tensor, win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each map's ``win``×``win`` window with the largest mean."""
    pooled = torch.nn.functional.avg_pool2d(m[:, None], win, stride=1)[:, 0]
    peak = pooled.flatten(1).argmax(1)
    return peak // pooled.shape[-1], peak % pooled.shape[-1]


def _class_shortcut(cls: int, members: list[int], ids: list[int], m: torch.Tensor, x: torch.Tensor, pr: torch.Tensor,
                    pc: torch.Tensor, win: int, reach: int, pixel_std: float, *, min_count: int, min_support: float,
                    max_dispersion: float, tolerance: int) -> Shortcut | None:
    """Steps 2-4 of the module docstring for one class and one window size; None when it is not a shortcut."""
    idx = torch.as_tensor(members)
    r, c = pr[idx], pc[idx]
    near = ((r[:, None] - r[None]).abs() <= tolerance) & ((c[:, None] - c[None]).abs() <= tolerance)
    member_ids = [ids[j] for j in members]
    unique_near = [len({member_ids[k] for k in torch.nonzero(row).flatten().tolist()}) for row in near]
    best = max(range(len(members)), key=lambda b: (unique_near[b], int(near[b].sum())))
    first: dict[int, int] = {}
    for k in torch.nonzero(near[best]).flatten().tolist():
        first.setdefault(member_ids[k], members[k])
    cluster = torch.as_tensor(sorted(first.values()))  # one map per distinct training image
    in_cluster = torch.nonzero(near[best]).flatten()
    spots, freq = torch.unique(torch.stack([r[in_cluster], c[in_cluster]], 1), dim=0, return_counts=True)
    r0, c0 = (int(v) for v in spots[int(freq.argmax())])  # the cluster's most frequent peak window
    patch = x[cluster, :, r0:r0 + win, c0:c0 + win]
    dev = (patch - patch.median(0, keepdim=True).values).pow(2).flatten(1).mean(1).sqrt() / pixel_std
    dispersion = float(dev.median())
    support_idx = cluster[dev <= max_dispersion]
    count = len(support_idx)
    support = count / len(set(member_ids))
    if count < min_count or support < min_support or dispersion > max_dispersion:
        return None
    box = (_content_box(x[support_idx], m[support_idx], r0, c0, win, pixel_std, reach=reach)
           or _half_max_box(m[support_idx], r0, c0, win))
    score = support * (1 - dispersion / max_dispersion) if max_dispersion > 0 else support
    sids = sorted({ids[int(j)] for j in support_idx})
    return Shortcut(cls, box, sids, round(float(score), 4), round(support, 4), round(dispersion, 4))


def _content_box(x: torch.Tensor, maps: torch.Tensor, r0: int, c0: int, win: int, pixel_std: float,
                 tau: float = 0.1, reach: int | None = None) -> list[int] | None:
    """Box of the region that is identical across the supporting images and has the peak pixel's value.

    From the pixel of the peak window where the mean normalised map is largest, grow (8-connected, within ``reach``
    pixels of the peak window, default one window) over pixels whose across-image standard deviation and whose
    difference from the seed's mean value are both at most ``tau`` pixel standard deviations. None when the seed
    pixel itself varies.
    """
    h, w = x.shape[-2:]
    mean_img, std_img = x.mean(0), x.std(0, unbiased=False)
    mu = mean_img.norm(dim=0) / mean_img.shape[0] ** 0.5
    sd = std_img.norm(dim=0) / std_img.shape[0] ** 0.5
    norm = (maps / maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]).mean(0)
    local = norm[r0:r0 + win, c0:c0 + win]
    i, j = divmod(int(local.argmax()), local.shape[1])
    seed = (r0 + i, c0 + j)
    limit = tau * pixel_std
    if float(sd[seed]) > limit:
        return None
    value = float(mu[seed])
    d = win if reach is None else reach
    y_lo, y_hi, x_lo, x_hi = max(0, r0 - d), min(h, r0 + win + d), max(0, c0 - d), min(w, c0 + win + d)
    ok = (sd <= limit) & ((mu - value).abs() <= limit)
    comp = torch.zeros_like(ok)
    stack = [seed]
    while stack:
        a, b = stack.pop()
        if y_lo <= a < y_hi and x_lo <= b < x_hi and ok[a, b] and not comp[a, b]:
            comp[a, b] = True
            stack.extend((a + da, b + db) for da in (-1, 0, 1) for db in (-1, 0, 1) if da or db)
    rows = torch.nonzero(comp.any(1)).flatten()
    cols = torch.nonzero(comp.any(0)).flatten()
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _half_max_box(maps: torch.Tensor, r0: int, c0: int, win: int) -> list[int]:
    """[x0, y0, x1, y1] of the half-maximum component of the mean normalised map around the peak window."""
    h, w = maps.shape[-2:]
    norm = maps / maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    mean = norm.mean(0)
    y_lo, y_hi = max(0, r0 - win), min(h, r0 + 2 * win)
    x_lo, x_hi = max(0, c0 - win), min(w, c0 + 2 * win)
    local = mean[y_lo:y_hi, x_lo:x_hi]
    if float(local.max()) <= 0:
        return [c0, r0, c0 + win, r0 + win]
    keep = local >= 0.5 * local.max()
    seed = divmod(int(local.argmax()), local.shape[1])
    comp = torch.zeros_like(keep)
    stack = [seed]
    while stack:
        i, j = stack.pop()
        if 0 <= i < keep.shape[0] and 0 <= j < keep.shape[1] and keep[i, j] and not comp[i, j]:
            comp[i, j] = True
            stack.extend([(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)])
    rows = torch.nonzero(comp.any(1)).flatten()
    cols = torch.nonzero(comp.any(0)).flatten()
    return [x_lo + int(cols[0]), y_lo + int(rows[0]), x_lo + int(cols[-1]) + 1, y_lo + int(rows[-1]) + 1]


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (x1/y1 exclusive)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


__all__ = ["MAX_DISPERSION", "MIN_COUNT", "MIN_SUPPORT", "Shortcut", "box_iou", "default_windows", "detect_shortcuts"]
