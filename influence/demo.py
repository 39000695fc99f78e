"""The embedded default: digits with injected label noise and a patch shortcut, end to end.

Trains the digits CNN on corrupted data (ground truth saved beside the run),
saves checkpoints, builds the store and indexes, and prints the proponents
and opponents of the misclassified test images.
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

from influence.build import build
from influence.data import inject, load_digits_split
from influence.models import DigitsCNN
from influence.query import Influence
from influence.training import predict, train_classifier

DEMO_EPOCHS = 12
DEMO_CHECKPOINTS = 3


def prepare_data(out: Path, seed: int = 0) -> dict[str, Any]:
    """Write train.npz, test.npz, test_patched.npz and injections.json into ``out``."""
    train, test = load_digits_split(seed=0)
    noisy, test_patched, truth = inject(train, test, seed=seed)
    np.savez(out / "train.npz", x=noisy.x.numpy(), y=noisy.y.numpy())
    np.savez(out / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    np.savez(out / "test_patched.npz", x=test_patched.x.numpy(), y=test_patched.y.numpy())
    (out / "injections.json").write_text(json.dumps(truth.to_json(), indent=1))
    return truth.to_json()


def run_demo(out: str | Path = "runs/demo", *, seed: int = 0, k: int = 5, progress: bool = True, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Run the whole demo into ``out``; returns a summary (also written to summary.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    truth = prepare_data(out, seed)
    from influence.loading import load_data

    train, test = load_data(str(out / "train.npz")), load_data(str(out / "test.npz"))
    ckpt_dir = out / "checkpoints"
    torch.manual_seed(seed)
    model = DigitsCNN()
    print(f"[demo] training digits-cnn on {len(train)} images ({len(truth['flipped'])} flipped labels, "
          f"{len(truth['patched'])} patched images of class {truth['patch_class']})", file=log)
    saved = train_classifier(model, train, epochs=DEMO_EPOCHS, seed=seed, checkpoint_dir=ckpt_dir, checkpoints=DEMO_CHECKPOINTS)
    preds = predict(model, test)
    acc = float((preds == test.y).float().mean())
    patched = load_data(str(out / "test_patched.npz"))
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

    print(f"\n{len(wrong)} misclassified test images; top {k} proponents (+) and opponents (-) by TracInCP:")
    for r in results:
        pro = ", ".join(f"#{p.train_id}(y={p.label}{tag(p.train_id)})" for p in r.proponents)
        opp = ", ".join(f"#{p.train_id}(y={p.label}{tag(p.train_id)})" for p in r.opponents)
        print(f"test {r.test_id}: true {r.label}, predicted {r.predicted} (p={r.probability:.2f})\n  + {pro}\n  - {opp}")
    summary = {
        "out": str(out), "train": len(train), "test": len(test), "clean_accuracy": acc, "patched_accuracy": patched_acc,
        "misclassified": len(wrong), "checkpoints": [str(p) for p, _ in saved], "store": str(store_path),
        "seconds": {"train": round(t1 - t0, 1), "build": round(t2 - t1, 1), "total": round(time.perf_counter() - t0, 1)},
        "results": [r.to_json() for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n[demo] done in {summary['seconds']['total']} s; store at {store_path}, summary in {out / 'summary.json'}", file=log)
    return summary
