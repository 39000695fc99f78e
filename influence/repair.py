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

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from influence.errors import BadDataError, BadSpecError

ACTIONS = ("drop", "relabel")
MASK_SCOPES = ("flagged", "class")

__all__ = ["ACTIONS", "MASK_SCOPES", "apply_repair", "local_background", "mask_box", "relabel_targets", "repair_store"]


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



RECIPE = """What `influence repair` wrote into {out}
{files}
Acted on: {acted}
Next, in your own training:
  1. Review changes.csv first: self-influence is also high for rare but correct examples.
  2. Train on the cleaned data instead of the original:
{train_line}
  3. Evaluate on your clean test set and on test images carrying the suspected shortcut
     (the box, in pixels of the model's input: x0, y0, x1, y1 with x1, y1 exclusive);
     accuracy on the latter should come back towards the clean accuracy.
  4. Rebuild the store on the retrained model and run `influence flag` again to check.
"""


def _box_for(box: Sequence[int], model_hw: tuple[int, int], image_hw: tuple[int, int]) -> list[int]:
    """A box in the model's input pixels, scaled to an image of another size (a store built with --size)."""
    (mh, mw), (ih, iw) = model_hw, image_hw
    if (mh, mw) == (ih, iw):
        return [int(v) for v in box]
    x0, y0, x1, y1 = box
    return [int(x0 * iw // mw), int(y0 * ih // mh), max(int(x0 * iw // mw) + 1, -(-x1 * iw // mw)),
            max(int(y0 * ih // mh) + 1, -(-y1 * ih // mh))]


def repair_store(
    session: Any, flags: Mapping[str, Any], out: str | Any, *, action: str = "drop", mask_scope: str = "flagged",
    top: int | None = None,
) -> dict[str, Any]:
    """Write what the user's own training needs to act on ``flags`` (``influence flag --json``) into ``out``.

    - ``changes.csv``: every dropped, relabelled or masked training row by id, class name and file path;
    - for an image-folder store, ``train_files.csv`` (path, label of every kept row; masked rows point at
      their copy under ``masked/``) and the masked images as PNG; otherwise ``train_cleaned.npz`` with ``x``,
      ``y``, ``ids`` (original row ids) and ``classes``;
    - ``RECIPE.txt``, the steps for the user's training loop, and ``repair.json``, the summary.

    Mislabel flags (the first ``top``, default all in the file) are dropped or relabelled to the final
    model's most likely other class (:func:`relabel_targets`); each shortcut box is masked with the local
    background on its supporting images (``mask_scope="flagged"``) or on its whole class (``"class"``).
    """
    from pathlib import Path

    from index.atomic import atomic_write

    if action not in ACTIONS:
        raise BadSpecError(f"--action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if mask_scope not in MASK_SCOPES:
        raise BadSpecError(f"--mask-scope must be one of {', '.join(MASK_SCOPES)}, got {mask_scope!r}")
    unknown = sorted(set(flags) - {"mislabel", "mislabel_method", "harmful", "shortcuts"})
    if unknown or not isinstance(flags.get("mislabel", []), list):
        raise BadDataError(f"flags must be `influence flag --json` output (keys mislabel, harmful, shortcuts), got keys {sorted(flags)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = session.n_train
    labels = session.training_labels()
    mislabels = [int(f["train_id"]) for f in flags.get("mislabel", [])][:top]
    bad = [i for i in mislabels if not 0 <= i < n]
    if bad:
        raise BadDataError(f"flagged ids {bad[:5]} are not rows of this store (N = {n}); were the flags made on another store?")
    shortcuts = _shortcut_records(flags.get("shortcuts", []))
    relabel: dict[int, int] = {}
    if action == "relabel" and mislabels:
        tx, _ = session.training_examples(mislabels)
        guess = relabel_targets(session.predict(tx).cpu(), [int(labels[i]) for i in mislabels], range(len(mislabels)))
        relabel = {i: guess[j] for j, i in enumerate(mislabels)}
    drop = mislabels if action == "drop" else []
    masked: dict[int, list[list[int]]] = {}
    for rec in shortcuts:
        ids = set(int(i) for i in rec["train_ids"])
        if mask_scope == "class" and rec["class"] is not None:
            new = labels.copy()
            for i, c in relabel.items():
                new[i] = c
            ids |= set(np.flatnonzero(new == int(rec["class"])).tolist())
        if not ids and rec["class"] is None:
            ids = set(range(n))
        for i in ids - set(drop):
            masked.setdefault(i, []).append(rec["box"])
    paths = [session.train_path(i) for i in range(n)] if session.train_path(0) is not None else None
    root = session.store.attrs.get("data_spec")
    written: list[str] = []

    rows = ["train_id,path,label,action,new_label"]
    for i in sorted(set(drop) | set(relabel) | set(masked)):
        what = "drop" if i in drop else "relabel" if i in relabel else "mask"
        if i in relabel and i in masked:
            what = "relabel+mask"
        new_label = session.class_name(relabel[i]) if i in relabel else ""
        rows.append(f"{i},{_csv(paths[i] if paths else '')},{_csv(session.class_name(int(labels[i])))},{what},{_csv(new_label)}")
    with atomic_write(out / "changes.csv") as f:
        f.write(("\n".join(rows) + "\n").encode())
    written.append("changes.csv   every dropped, relabelled or masked row: train_id, path, label, action, new_label")

    kept = [i for i in range(n) if i not in set(drop)]
    if paths is not None and root and Path(root).is_dir():
        from PIL import Image

        from influence.loading import read_image

        files = ["path,label"]
        hw = (int(session.input_shape[-2]), int(session.input_shape[-1]))
        for i in kept:
            rel = paths[i]
            if i in masked:
                img = read_image(Path(root) / rel)
                for box in masked[i]:
                    img = mask_box(img[None], [0], _box_for(box, hw, (img.shape[-2], img.shape[-1])))[0]
                target = out / "masked" / Path(rel).with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                a = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                with atomic_write(target) as f:
                    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(f, format="PNG")
                rel = str(target.relative_to(out))
            label = session.class_name(relabel.get(i, int(labels[i])))
            files.append(f"{_csv(rel)},{_csv(label)}")
        with atomic_write(out / "train_files.csv") as f:
            f.write(("\n".join(files) + "\n").encode())
        written.append(f"train_files.csv   the {len(kept)} kept training files (masked ones as masked/...) with their labels")
        if masked:
            written.append(f"masked/   {len(masked)} training images with the shortcut box painted over (local background)")
        train_line = ("       read train_files.csv (path relative to your image folder, or to this folder for masked/...)\n"
                      "       instead of listing the image folder; use its label column.")
    else:
        x, y = _raw_training_arrays(session, root)
        hw_model = (int(session.input_shape[-2]), int(session.input_shape[-1]))
        boxes = [{"box": _box_for(b, hw_model, (x.shape[-2], x.shape[-1])), "class": None, "train_ids": [i]}
                 for i, bs in masked.items() for b in bs]
        x2, y2, kept_arr = apply_repair(x, y, drop=drop, relabel=relabel, boxes=boxes, mask_scope="flagged")
        with atomic_write(out / "train_cleaned.npz") as f:
            np.savez(f, x=x2.numpy(), y=y2.numpy(), ids=kept_arr, classes=np.array(session.class_names))
        written.append(f"train_cleaned.npz   x, y of the {len(kept_arr)} kept rows (masked, relabelled), ids = original row ids, classes")
        train_line = ("       d = numpy.load('train_cleaned.npz'); train on d['x'], d['y']\n"
                      f"       (or `influence build --data {out / 'train_cleaned.npz'} ...` to index the cleaned set).")
    summary = {
        "store": str(session.store.root), "out": str(out), "action": action, "mask_scope": mask_scope, "n_train_before": n,
        "n_train_after": len(kept), "dropped": sorted(drop), "relabelled": {str(i): c for i, c in sorted(relabel.items())},
        "masked": sorted(masked), "shortcuts": shortcuts,
    }
    with atomic_write(out / "repair.json") as f:
        f.write(json.dumps(summary, indent=1).encode())
    written.append("repair.json   this summary as JSON")
    acted = (f"{len(mislabels)} flagged mislabels {'dropped' if action == 'drop' else 'relabelled'}; "
             + (", ".join(f"shortcut box {r['box']} (class {r['class']}) masked" for r in shortcuts) or "no shortcut box")
             + f" on {len(masked)} images ({mask_scope} scope)")
    recipe = RECIPE.format(out=out, acted=acted, files="\n".join(f"  {w}" for w in written + ["RECIPE.txt   this file"]), train_line=train_line)
    with atomic_write(out / "RECIPE.txt") as f:
        f.write(recipe.encode())
    summary["recipe"] = recipe
    return summary


def _csv(text: str | None) -> str:
    t = text or ""
    return '"' + t.replace('"', '""') + '"' if any(c in t for c in ',"\n') else t


def _raw_training_arrays(session: Any, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training arrays as the user stored them: an ``.npz``'s own x and y, else the store's model inputs."""
    if root and str(root).endswith(".npz"):
        with np.load(root, allow_pickle=False) as d:
            return torch.as_tensor(d["x"]), torch.as_tensor(d["y"]).long()
    x, y = session.training_examples(list(range(session.n_train)))
    return x, y
