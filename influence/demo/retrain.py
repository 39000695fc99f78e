"""``influence repair``: act on a finished demo run's flags, retrain with the demo recipe, compare before and after.

The array steps (mask, relabel, drop) are :mod:`influence.repair`'s, the ones a user
applies in their own training loop; this module adds what only the demo has: a
training recipe to rerun and the ground truth of what was injected.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import torch

from influence.data import ArrayDataset
from influence.demo.run import load_arrays, write_json
from influence.demo.training import DEMO_EPOCHS, predict, train_classifier
from influence.errors import BadDataError, BadSpecError
from influence.flag import mislabel_method
from influence.loading import load_checkpoint, load_model
from influence.mislabel_rank import mislabel_scores
from influence.query import Influence
from influence.repair import ACTIONS, _shortcut_records, apply_repair, mask_box, relabel_targets

__all__ = ["run_repair"]


def _accuracy(model: torch.nn.Module, ds: ArrayDataset) -> float:
    return float((predict(model, ds) == ds.y).float().mean())


def run_repair(
    demo_dir: str | Path = "runs/demo", *, mislabel_fraction: float = 0.1, action: str = "drop", seed: int = 0,
    boxes: Sequence[Any] | None = None, mask_scope: str = "class", method: str | None = None, oracle: bool = False,
    log: TextIO = sys.stderr, progress: bool = True,
) -> dict[str, Any]:
    """Repair a finished demo run, retrain with the demo recipe and report before/after; writes ``repair.json``.

    - mislabels: the top ``mislabel_fraction`` of training examples by the mislabel ranking ``method``
      (``influence.mislabel_rank``, from the run's store; default as ``influence flag``: ``mislabel_method``)
      are dropped (``action="drop"``) or relabelled to the final model's most likely other class
      (``"relabel"``, see :func:`influence.repair.relabel_targets`);
    - shortcuts: the boxes in ``flags.json["shortcuts"]`` (or ``boxes=``, which overrides them:
      flags-style records or bare ``[x0, y0, x1, y1]``) are masked with the local background, on the
      flagged images (``mask_scope="flagged"``) or on all training images of the shortcut's class
      (``"class"``); with no shortcut found only mislabels are repaired;
    - retrains the run's model from scratch with ``DEMO_EPOCHS`` and the ``train_classifier``
      defaults (seed ``seed``), and reports clean and patched-test accuracy before (the run's final
      checkpoint) and after, plus how many flags were true (injections.json).
      ``oracle=True`` also retrains on the ground-truth-clean data (true labels, no patches) as the
      ceiling.
    """
    if action not in ACTIONS:
        raise BadSpecError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if not 0 <= mislabel_fraction < 1:
        raise BadSpecError(f"mislabel_fraction must lie in [0, 1), got {mislabel_fraction}")
    root = Path(demo_dir)
    for name in ("train.npz", "test.npz", "store"):
        if not (root / name).exists():
            raise BadDataError(f"{root} is not a finished demo run: {name} is missing; run `influence demo --out {root}` first")
    t0 = time.perf_counter()
    train = load_arrays(root / "train.npz")
    test = load_arrays(root / "test.npz")
    patched = load_arrays(root / "test_patched.npz") if (root / "test_patched.npz").is_file() else None
    truth = json.loads((root / "injections.json").read_text()) if (root / "injections.json").is_file() else None
    flags = json.loads((root / "flags.json").read_text()) if (root / "flags.json").is_file() else {}

    session = Influence.open(root / "store")
    method = method or mislabel_method(session)
    spec = session.store.attrs.get("model_spec") or "digits-cnn"
    last = session.store.checkpoints[-1]
    final = load_checkpoint(load_model(spec), last["path"], expected_sha256=last["sha256"])
    before = {"clean_accuracy": _accuracy(final, test)}
    if patched is not None:
        before["patched_accuracy"] = _accuracy(final, patched)
    n = len(train)
    n_flag = int(round(mislabel_fraction * n))
    self_inf = mislabel_scores(session, method, progress=progress)
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
    print(f"[repair] {action} {len(flagged)} flagged mislabels (top {mislabel_fraction:.0%} by {method}); "
          f"masking {len(shortcuts)} shortcut box(es) ({mask_scope} scope)" + ("" if shortcuts else ": no shortcut found"), file=log)
    x2, y2, kept = apply_repair(train.x, train.y, drop=drop, relabel=relabel, boxes=shortcuts, mask_scope=mask_scope)
    masked = np.flatnonzero((x2 != train.x[torch.as_tensor(kept)]).flatten(1).any(1).numpy())
    masked_ids = kept[masked].tolist()

    torch.manual_seed(seed)
    model = load_model(spec)
    print(f"[repair] retraining {spec} on {len(y2)} images for {DEMO_EPOCHS} epochs", file=log)
    train_classifier(model, ArrayDataset(x2, y2, "repaired-train"), epochs=DEMO_EPOCHS, seed=seed, progress=progress)
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
            train_classifier(ref, ArrayDataset(x_clean, y_clean, "oracle-train"), epochs=DEMO_EPOCHS, seed=seed, progress=progress)
            result["oracle"] = {"clean_accuracy": _accuracy(ref, test)}
            if patched is not None:
                result["oracle"]["patched_accuracy"] = _accuracy(ref, patched)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(root / "repair.json", result)
    b, a = before, after
    print(f"[repair] clean accuracy {b['clean_accuracy']:.3f} -> {a['clean_accuracy']:.3f}"
          + (f"; patched-test accuracy {b['patched_accuracy']:.3f} -> {a['patched_accuracy']:.3f}" if patched is not None else "")
          + f"; wrote {root / 'repair.json'}", file=log)
    return result
