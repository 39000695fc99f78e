"""The digits demo pieces the benchmarks train on, imported in this one place.

Every benchmark uses the demo's data (scikit-learn digits, the fixed split, injected flips and patch) and its
training recipe; when those pieces move, only the imports below change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from influence.data import ArrayDataset, index_subset
from influence.demo.digits import inject, load_digits_split
from influence.demo.training import DEMO_CHECKPOINTS, DEMO_EPOCHS, predict, train_classifier
from influence.models import DigitsCNN
from influence.pipeline import build
from influence.query import Influence

TDA_METHODS = ("tracin", "gradcos", "trak")


def demo_store(train: ArrayDataset, seed: int, work: str | os.PathLike[str], methods: Sequence[str] = TDA_METHODS) -> Influence:
    """Train the digits CNN on ``train`` with the demo recipe and build a store in ``work``/store; reuse it if built.

    The store is built from ``work``/train.npz, as ``influence build`` would build it from a file, so the training
    images stay reachable (``influence flag`` maps them). The same seed gives the same model and store, so a
    ``work`` folder from an earlier run with that seed saves the training and the build.
    """
    work = Path(work)
    if not (work / "store" / "zarr.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        np.savez(work / "train.npz", x=train.x.numpy(), y=train.y.numpy())
        torch.manual_seed(seed)
        saved = train_classifier(DigitsCNN(), train, epochs=DEMO_EPOCHS, seed=seed, checkpoint_dir=work / "ckpt",
                                 checkpoints=DEMO_CHECKPOINTS)
        build("digits-cnn", str(work / "train.npz"), [str(p) for p, _ in saved], work / "store",
              lr_weights=[lr for _, lr in saved], methods=tuple(methods), progress=False)
    return Influence.open(work / "store")


def accuracy(session: Influence, data: ArrayDataset) -> float:
    """Accuracy of the store's final checkpoint on ``data``."""
    return float((predict(session.model_at(-1), data) == data.y).float().mean())


__all__ = [
    "DEMO_CHECKPOINTS", "DEMO_EPOCHS", "TDA_METHODS", "ArrayDataset", "accuracy", "demo_store", "index_subset", "inject",
    "load_digits_split", "predict", "train_classifier",
]
