"""``influence demo``: digits with injected label noise and a patch shortcut, end to end.

Trains the digits CNN on corrupted data (ground truth saved beside the run),
saves checkpoints, builds the store and indexes, prints the proponents and
opponents of the misclassified test images, then flags, reports and says how
much of the ground truth the flags found.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from index.atomic import atomic_write
from influence.data import ArrayDataset
from influence.demo.digits import InjectionsRecord, inject, load_digits_split
from influence.demo.training import DEMO_CHECKPOINTS, DEMO_EPOCHS, predict, train_classifier
from influence.errors import BadDataError
from influence.loading import load_data
from influence.models import DigitsCNN
from influence.pipeline import build
from influence.query import Influence
from influence.shortcut import box_iou


def prepare_data(out: Path, seed: int = 0) -> InjectionsRecord:
    """Write train.npz, test.npz, test_patched.npz and injections.json into ``out``."""
    train, test = load_digits_split(seed=0)
    noisy, test_patched, truth = inject(train, test, seed=seed)
    for name, ds in (("train", noisy), ("test", test), ("test_patched", test_patched)):
        with atomic_write(out / f"{name}.npz") as f:
            np.savez(f, x=ds.x.numpy(), y=ds.y.numpy())
    write_json(out / "injections.json", truth.to_json())
    return truth.to_json()


def load_arrays(path: Path) -> ArrayDataset:
    """One of the demo's ``.npz`` data sets, as the arrays the demo computes on."""
    dataset = load_data(str(path))
    if not isinstance(dataset, ArrayDataset):  # an .npz always loads as one
        raise BadDataError(f"{path} did not load as an in-memory array data set ({type(dataset).__name__})")
    return dataset


def write_json(path: Path, doc: Any) -> None:
    """The demo's JSON files, written whole (a reader never sees half a file)."""
    with atomic_write(path) as f:
        f.write(json.dumps(doc, indent=1).encode())


def run_demo(
    out: str | Path = "runs/demo", *, seed: int = 0, k: int = 5, progress: bool = True, log: TextIO = sys.stderr,
    listing: TextIO | None = None,
) -> dict[str, Any]:
    """Run the whole demo into ``out``; returns a summary (also written to summary.json).

    Progress goes to ``log``; the influencers of each misclassified image go to ``listing`` (default stdout).
    """
    listing = listing or sys.stdout
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    truth = prepare_data(out, seed)
    train, test = load_arrays(out / "train.npz"), load_arrays(out / "test.npz")
    ckpt_dir = out / "checkpoints"
    torch.manual_seed(seed)
    model = DigitsCNN()
    print(f"[demo] training digits-cnn on {len(train)} images ({len(truth['flipped'])} flipped labels, "
          f"{len(truth['patched'])} patched images of class {truth['patch_class']})", file=log)
    saved = train_classifier(model, train, epochs=DEMO_EPOCHS, seed=seed, checkpoint_dir=ckpt_dir, checkpoints=DEMO_CHECKPOINTS,
                             progress=progress)
    preds = predict(model, test)
    acc = float((preds == test.y).float().mean())
    patched = load_arrays(out / "test_patched.npz")
    patched_acc = float((predict(model, patched) == patched.y).float().mean())
    print(f"[demo] clean test accuracy {acc:.3f}; accuracy on patched test images {patched_acc:.3f}", file=log)
    t1 = time.perf_counter()
    store_path = out / "store"
    if (store_path / "zarr.json").is_file():  # the demo's own store from an earlier run: rebuilt from scratch
        shutil.rmtree(store_path)
    build("digits-cnn", str(out / "train.npz"), [str(p) for p, _ in saved], store_path,
          lr_weights=[lr for _, lr in saved], progress=progress)
    t2 = time.perf_counter()
    session = Influence.open(store_path)
    wrong = torch.nonzero(preds != test.y).flatten().tolist()
    flipped, patched_ids = set(truth["flipped"]), set(truth["patched"])
    results = session.query(test.x[wrong], k=k, labels=test.y[wrong].tolist(), test_ids=wrong) if wrong else []

    def tag(i: int) -> str:
        return ("*flipped" if i in flipped else "") + ("*patched" if i in patched_ids else "")

    print(f"\n{len(wrong)} misclassified test images; top {k} TracInCP proponents of the predicted class (+) "
          "and opponents of the true class (-):", file=listing)
    for r in results:
        pro = ", ".join(f"#{p.train_id}(y={p.label}{tag(p.train_id)})" for p in r.proponents)
        opp = ", ".join(f"#{p.train_id}(y={p.label}{tag(p.train_id)})" for p in r.opponents)
        print(f"test {r.test_id}: true {r.label}, predicted {r.predicted} (p={r.probability:.2f})\n  + {pro}\n  - {opp}", file=listing)
    report_info = _report_and_flags(session, out, test, patched, wrong, truth, k=k, log=log, progress=progress)
    summary = {
        "out": str(out), "train": len(train), "test": len(test), "clean_accuracy": acc, "patched_accuracy": patched_acc,
        "misclassified": len(wrong), "checkpoints": [str(p) for p, _ in saved], "store": str(store_path),
        "seconds": {"train": round(t1 - t0, 1), "build": round(t2 - t1, 1), "total": round(time.perf_counter() - t0, 1)},
        "results": [r.to_json() for r in results], **report_info,
    }
    write_json(out / "summary.json", summary)
    print(f"\n[demo] done in {summary['seconds']['total']} s; store at {store_path}, summary in {out / 'summary.json'}", file=log)
    return summary


def _report_and_flags(
    session: Influence, out: Path, test: ArrayDataset, patched: ArrayDataset, wrong: list[int], truth: InjectionsRecord, *,
    k: int, log: TextIO, progress: bool = False,
) -> dict[str, Any]:
    """Flag mislabels, harmful examples and the shortcut; write the report; say how much ground truth was found."""
    from influence.explain import explain
    from influence.flag import flag_harmful, flag_mislabels, flag_shortcuts, mislabel_method
    from influence.report import write_report

    n = session.n_train
    flipped = set(truth["flipped"])
    top = len(flipped)
    ranking = mislabel_method(session)  # what `influence flag` ranks by, so the demo shows what users get
    mislabels = flag_mislabels(session, method=ranking, top=n, progress=progress)
    order = [m.train_id for m in mislabels]
    found_at = {p: sum(1 for i in order[: int(p * n)] if i in flipped) / len(flipped) for p in (0.1, 0.2)}
    harmful = flag_harmful(session, test.x, test.y, top=20, progress=progress)
    shortcuts = flag_shortcuts(session, patched.x, patched.y, progress=progress)
    box = truth["patch_box"]
    hit = None
    for s in shortcuts:
        if s.cls == truth["patch_class"] and box_iou(s.box, box) >= 0.5:
            hit = s
            break
    flags = {"mislabel": [f.to_json() for f in mislabels[:top]], "harmful": [f.to_json() for f in harmful],
             "shortcuts": [s.to_json() for s in shortcuts]}
    write_json(out / "flags.json", flags)
    explanations = (explain(session, test.x[wrong[:8]], labels=test.y[wrong[:8]].tolist(), test_ids=wrong[:8], k=k, progress=progress)
                    if wrong else [])
    images = {j: session.training_examples(s.train_ids[:8])[0] for j, s in enumerate(shortcuts)}
    top_ids = [m.train_id for m in mislabels[:8]]
    mislabel_images = dict(zip(top_ids, session.training_examples(top_ids)[0]))
    notes = [
        f"Label noise: {len(flipped)} training labels flipped; the mislabel ranking ({ranking}) puts {found_at[0.1]:.0%} of them in its "
        f"top 10% and {found_at[0.2]:.0%} in its top 20%.",
        f"Patch shortcut: injected on {len(truth['patched'])} class-{truth['patch_class']} training images at box {box}; "
        + (f"detected at {hit.box} with {len(hit.train_ids)} supporting images." if hit else "not detected."),
    ]
    report = write_report(out / "report", explanations, flags=flags, shortcut_images=images, title="influence demo report", notes=notes,
                          mislabel_images=mislabel_images)
    print("\n[demo] ground truth found:", file=log)
    for line in notes:
        print(f"  {line}", file=log)
    print(f"[demo] report: {report}", file=log)
    return {"report": str(report), "mislabel_recall_top10": found_at[0.1], "mislabel_recall_top20": found_at[0.2],
            "shortcut_found": hit is not None, "shortcuts": flags["shortcuts"]}

