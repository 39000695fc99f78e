"""Act on the flags: drop or relabel likely mislabels, mask shortcut regions, in your own training arrays.

The pieces are plain functions on arrays so the same repair fits any training loop.
``influence repair`` (``influence.demo.retrain.run_repair``) applies them to a finished
``influence demo`` run, retrains and measures the result against the demo's ground truth.

Recipe for your own training loop
---------------------------------
1. Get the flags as JSON (stdout is one JSON document)::

       influence flag STORE --kind mislabel --top 150 --json > mislabels.json
       influence flag STORE --test failing.npz --kind shortcut --json > shortcuts.json

   ``mislabel`` is a list of ``{"train_id", "score", "label", "model_prob_of_label"}`` by
   descending self-influence; ``shortcuts`` a list of ``{"class", "box": [x0, y0, x1, y1],
   "train_ids", "score"}`` (pixel box, x1/y1 exclusive). Review the top of each list before
   acting: self-influence is also large for rare but correct examples.
2. Decide per flagged id: drop it, or relabel it (e.g. to your model's most likely class other
   than the given label, or by hand).
3. Mask each shortcut box on its supporting training images (``mask_scope="flagged"``) or on
   every training image of the shortcut's class (``"class"``, more robust when the detector
   found only some of the patched images), with the image's local background.
4. Apply all three to your arrays and retrain with your usual recipe::

       from influence.repair import apply_repair
       x2, y2, kept = apply_repair(x, y, drop=ids, relabel={i: new_label, ...},
                                   boxes=shortcuts["shortcuts"], mask_scope="class")
       train(model, x2, y2)          # kept[j] is the original row id of row j

   Then evaluate on clean test data and on test data carrying the suspected shortcut
   (e.g. :func:`influence.demo.digits.paste_patch` on other classes' images): a repaired model's
   accuracy on the latter should come back towards the clean accuracy.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from influence.errors import BadDataError, BadSpecError

ACTIONS = ("drop", "relabel")
MASK_SCOPES = ("flagged", "class")

__all__ = ["ACTIONS", "MASK_SCOPES", "apply_repair", "local_background", "mask_box", "relabel_targets"]


def _check_box(box: Sequence[int], shape: tuple[int, int]) -> list[int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise BadSpecError(f"a box must be [x0, y0, x1, y1] integers, got {box!r}") from None
    h, w = shape
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise BadSpecError(f"box {[x0, y0, x1, y1]} does not fit images of size {h}x{w} (need 0 <= x0 < x1 <= {w}, 0 <= y0 < y1 <= {h})")
    return [x0, y0, x1, y1]


def local_background(x: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """Per image and channel, the median of the one-pixel ring just outside ``box`` (the image border where the box touches it).

    ``x`` is (N, C, H, W); returns (N, C, 1, 1). For digits this is 0 (black), for natural
    images the surrounding colour, so a masked patch blends in instead of becoming a new shortcut.
    """
    x0, y0, x1, y1 = _check_box(box, (x.shape[-2], x.shape[-1]))
    h, w = x.shape[-2:]
    r0, c0, r1, c1 = max(0, y0 - 1), max(0, x0 - 1), min(h, y1 + 1), min(w, x1 + 1)
    ring = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool)
    ring[y0 - r0:y1 - r0, x0 - c0:x1 - c0] = False
    if not ring.any():  # the box is the whole image
        return torch.zeros(*x.shape[:2], 1, 1, dtype=x.dtype)
    pixels = x[..., r0:r1, c0:c1][..., ring]  # (N, C, ring)
    return pixels.median(dim=-1).values[..., None, None]


def mask_box(x: torch.Tensor, ids: Iterable[int], box: Sequence[int], value: float | str = "local") -> torch.Tensor:
    """A copy of ``x`` (N, C, H, W) with ``box`` on rows ``ids`` set to ``value`` (a number, or "local" background)."""
    out = x.clone()
    ids = torch.as_tensor(sorted(set(int(i) for i in ids)), dtype=torch.long)
    if len(ids) == 0:
        return out
    if int(ids.min()) < 0 or int(ids.max()) >= len(x):
        raise BadDataError(f"ids to mask must lie in [0, {len(x)}), got {int(ids.min())}..{int(ids.max())}")
    x0, y0, x1, y1 = _check_box(box, (x.shape[-2], x.shape[-1]))
    fill = local_background(x[ids], box) if value == "local" else torch.as_tensor(float(value), dtype=x.dtype)
    region = out[ids, :, y0:y1, x0:x1]
    out[ids, :, y0:y1, x0:x1] = torch.zeros_like(region) + fill
    return out


def relabel_targets(probs: torch.Tensor | np.ndarray, labels: Sequence[int], ids: Iterable[int]) -> dict[int, int]:
    """New labels for flagged ``ids``: the model's most likely class, or its runner-up where that is the given label.

    A flagged example is suspected of carrying a wrong label, so keeping the same label is never the
    answer: a model that memorised the flipped label still ranks the true class second most often.
    """
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    out = {}
    for i in ids:
        top2 = torch.topk(p[int(i)], 2).indices.tolist()
        out[int(i)] = int(top2[1] if top2[0] == int(labels[int(i)]) else top2[0])
    return out


def _shortcut_records(boxes: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Normalise shortcut boxes: flags.json records, or bare [x0, y0, x1, y1] lists (then ``class``/``train_ids`` are unknown)."""
    recs = []
    for b in boxes or []:
        if isinstance(b, Mapping):
            if "box" not in b:
                raise BadSpecError(f"a shortcut record needs a 'box', got keys {sorted(b)}")
            recs.append({"box": list(b["box"]), "class": b.get("class"), "train_ids": list(b.get("train_ids", []))})
        else:
            recs.append({"box": list(b), "class": None, "train_ids": []})
    return recs


def apply_repair(
    x: torch.Tensor, y: torch.Tensor, *, drop: Iterable[int] = (), relabel: Mapping[int, int] | None = None,
    boxes: Iterable[Any] | None = None, mask_scope: str = "flagged", mask_value: float | str = "local",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Repaired training arrays ``(x, y, kept_ids)``: boxes masked, labels replaced, dropped rows removed.

    ``boxes``: shortcut records (``{"box", "class", "train_ids"}`` as in ``influence flag``'s JSON) or
    bare boxes. ``mask_scope="flagged"`` masks a box on its ``train_ids``; ``"class"`` masks it on every
    image whose (repaired) label is the shortcut's class, plus its ``train_ids``; a bare box without
    ids or class is masked on every image. Masking and relabelling use original row ids; dropping
    happens last, and ``kept_ids[j]`` is the original id of output row ``j``.
    """
    if mask_scope not in MASK_SCOPES:
        raise BadSpecError(f"mask_scope must be one of {', '.join(MASK_SCOPES)}, got {mask_scope!r}")
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).clone()
    n = len(y)
    if x.ndim != 4 or len(x) != n:
        raise BadDataError(f"x must be (N, C, H, W) with N = len(y) = {n}, got {tuple(x.shape)}")
    for i, new in (relabel or {}).items():
        if not 0 <= int(i) < n:
            raise BadDataError(f"relabel id {i} out of range [0, {n})")
        y[int(i)] = int(new)
    for rec in _shortcut_records(boxes):
        ids = set(rec["train_ids"])
        if mask_scope == "class" and rec["class"] is not None:
            ids |= set(np.flatnonzero(y.numpy() == int(rec["class"])).tolist())
        if not ids and rec["class"] is None and not rec["train_ids"]:
            ids = set(range(n))
        x = mask_box(x, ids, rec["box"], mask_value)
    dropped = {int(i) for i in drop}
    bad = [i for i in dropped if not 0 <= i < n]
    if bad:
        raise BadDataError(f"drop ids {bad[:5]} out of range [0, {n})")
    kept = np.array([i for i in range(n) if i not in dropped], dtype=np.int64)
    idx = torch.as_tensor(kept)
    return x[idx], y[idx], kept

