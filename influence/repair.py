"""The repair loop: act on the flags (drop or relabel likely mislabels, mask shortcut regions), retrain, compare.

``run_repair(demo_dir)`` does this on a finished ``influence demo`` folder and measures the
result against the demo's ground truth. The pieces are plain functions on arrays so the same
repair fits any training loop.

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
   (e.g. :func:`influence.data.paste_patch` on other classes' images): a repaired model's
   accuracy on the latter should come back towards the clean accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import numpy as np
import torch

from influence.errors import BadDataError, BadSpecError

ACTIONS = ("drop", "relabel")
MASK_SCOPES = ("flagged", "class")

__all__ = ["ACTIONS", "MASK_SCOPES", "apply_repair", "local_background", "mask_box", "relabel_targets", "run_repair"]


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
    x0, y0, x1, y1 = _check_box(box, tuple(x.shape[-2:]))
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
    x0, y0, x1, y1 = _check_box(box, tuple(x.shape[-2:]))
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


def _accuracy(model: torch.nn.Module, ds) -> float:
    from influence.training import predict

    return float((predict(model, ds) == ds.y).float().mean())


def run_repair(
    demo_dir: str | Path = "runs/demo", *, mislabel_fraction: float = 0.1, action: str = "drop", seed: int = 0,
    boxes: Sequence[Any] | None = None, mask_scope: str = "class", method: str = "tracin", oracle: bool = False,
    log: TextIO = sys.stderr,
) -> dict[str, Any]:
    """Repair a finished demo run, retrain with the demo recipe and report before/after; writes ``repair.json``.

    - mislabels: the top ``mislabel_fraction`` of training examples by self-influence (``method``,
      from the run's store) are dropped (``action="drop"``) or relabelled to the final model's most
      likely other class (``"relabel"``, see :func:`relabel_targets`);
    - shortcuts: the boxes in ``flags.json["shortcuts"]`` (or ``boxes=``, which overrides them:
      flags-style records or bare ``[x0, y0, x1, y1]``) are masked with the local background, on the
      flagged images (``mask_scope="flagged"``) or on all training images of the shortcut's class
      (``"class"``); with no shortcut found only mislabels are repaired;
    - retrains the run's model from scratch with ``influence.demo.DEMO_EPOCHS`` and the
      ``train_classifier`` defaults (seed ``seed``), and reports clean and patched-test accuracy
      before (the run's final checkpoint) and after, plus how many flags were true (injections.json).
      ``oracle=True`` also retrains on the ground-truth-clean data (true labels, no patches) as the
      ceiling.
    """
    from influence.data import ArrayDataset
    from influence.demo import DEMO_EPOCHS
    from influence.loading import load_data, load_model
    from influence.query import Influence
    from influence.training import train_classifier

    if action not in ACTIONS:
        raise BadSpecError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if not 0 <= mislabel_fraction < 1:
        raise BadSpecError(f"mislabel_fraction must lie in [0, 1), got {mislabel_fraction}")
    root = Path(demo_dir)
    for name in ("train.npz", "test.npz", "store"):
        if not (root / name).exists():
            raise BadDataError(f"{root} is not a finished demo run: {name} is missing; run `influence demo --out {root}` first")
    t0 = time.perf_counter()
    train = load_data(str(root / "train.npz"))
    test = load_data(str(root / "test.npz"))
    patched = load_data(str(root / "test_patched.npz")) if (root / "test_patched.npz").is_file() else None
    truth = json.loads((root / "injections.json").read_text()) if (root / "injections.json").is_file() else None
    flags = json.loads((root / "flags.json").read_text()) if (root / "flags.json").is_file() else {}

    session = Influence.open(root / "store")
    final = session.model_at(-1)
    before = {"clean_accuracy": _accuracy(final, test)}
    if patched is not None:
        before["patched_accuracy"] = _accuracy(final, patched)
    n = len(train)
    n_flag = int(round(mislabel_fraction * n))
    self_inf = session.self_influence(method)
    flagged = np.argsort(-self_inf, kind="stable")[:n_flag].tolist()
    relabel: dict[int, int] = {}
    drop: list[int] = []
    if action == "drop":
        drop = flagged
    else:
        with torch.no_grad():
            probs = torch.softmax(final.eval()(train.x), -1)
        relabel = relabel_targets(probs, train.y.tolist(), flagged)
    shortcuts = _shortcut_records(boxes if boxes is not None else flags.get("shortcuts", []))
    print(f"[repair] {action} {len(flagged)} flagged mislabels (top {mislabel_fraction:.0%} by {method} self-influence); "
          f"masking {len(shortcuts)} shortcut box(es) ({mask_scope} scope)" + ("" if shortcuts else ": no shortcut found"), file=log)
    x2, y2, kept = apply_repair(train.x, train.y, drop=drop, relabel=relabel, boxes=shortcuts, mask_scope=mask_scope)
    masked = np.flatnonzero((x2 != train.x[torch.as_tensor(kept)]).flatten(1).any(1).numpy())
    masked_ids = kept[masked].tolist()

    spec = session.model_spec or "digits-cnn"
    torch.manual_seed(seed)
    model = load_model(spec)
    print(f"[repair] retraining {spec} on {len(y2)} images for {DEMO_EPOCHS} epochs", file=log)
    train_classifier(model, ArrayDataset(x2, y2, "repaired-train"), epochs=DEMO_EPOCHS, seed=seed)
    after = {"clean_accuracy": _accuracy(model, test)}
    if patched is not None:
        after["patched_accuracy"] = _accuracy(model, patched)

    result: dict[str, Any] = {
        "demo_dir": str(root), "action": action, "mislabel_fraction": mislabel_fraction, "method": method, "seed": seed,
        "mask_scope": mask_scope, "epochs": DEMO_EPOCHS, "n_train_before": n, "n_train_after": int(len(y2)),
        "flagged_mislabels": len(flagged), "shortcuts": shortcuts, "masked_images": len(masked_ids),
        "before": before, "after": after,
    }
    if truth is not None:
        flipped = set(truth.get("flipped", []))
        original = dict(zip(truth.get("flipped", []), truth.get("original_labels", [])))
        patched_ids = set(truth.get("patched", []))
        hits = [i for i in flagged if i in flipped]
        result["truth"] = {
            "flipped": len(flipped), "flagged_truly_flipped": len(hits),
            "flag_precision": len(hits) / max(1, len(flagged)), "flip_recall": len(hits) / max(1, len(flipped)),
            "patched": len(patched_ids), "masked_truly_patched": len(patched_ids & set(masked_ids)),
        }
        if action == "relabel":
            result["truth"]["relabelled_to_true_label"] = sum(1 for i in hits if relabel[i] == original[i])
            result["truth"]["correct_labels_changed"] = sum(1 for i in flagged if i not in flipped)
        if oracle:
            x_clean, y_clean = train.x.clone(), train.y.clone()
            for i, lab in original.items():
                y_clean[int(i)] = int(lab)
            if patched_ids and truth.get("patch_box"):
                x_clean = mask_box(x_clean, patched_ids, truth["patch_box"], "local")
            torch.manual_seed(seed)
            ref = load_model(spec)
            train_classifier(ref, ArrayDataset(x_clean, y_clean, "oracle-train"), epochs=DEMO_EPOCHS, seed=seed)
            result["oracle"] = {"clean_accuracy": _accuracy(ref, test)}
            if patched is not None:
                result["oracle"]["patched_accuracy"] = _accuracy(ref, patched)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (root / "repair.json").write_text(json.dumps(result, indent=1))
    b, a = before, after
    print(f"[repair] clean accuracy {b['clean_accuracy']:.3f} -> {a['clean_accuracy']:.3f}"
          + (f"; patched-test accuracy {b['patched_accuracy']:.3f} -> {a['patched_accuracy']:.3f}" if patched is not None else "")
          + f"; wrote {root / 'repair.json'}", file=log)
    return result
