"""Shared tiny fixtures: a small digits CNN, ~160 training images as .npz, three checkpoints and a built store.

Everything here is session-scoped and built once (a few seconds on 2 cores);
tests that change a store work on a copy (:func:`copy_store`).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
import threadpoolctl
import torch

import influence
from influence.data import ArrayDataset
from influence.demo.digits import load_digits_split
from influence.demo.training import train_classifier

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MODELS_FILE = TESTS / "tiny_models.py"
CNN_SPEC = f"{MODELS_FILE}:tiny_cnn"
MLP_SPEC = f"{MODELS_FILE}:tiny_mlp"
SLOW_SPEC = f"{MODELS_FILE}:slow_cnn"


def slow_build_cmd(data: Path, ckpts: list[Path], out: Path, proj_dim: int = 64) -> list[str]:
    """``influence build`` in a subprocess on the slowed CNN (tracin only, 32-row chunks): for kill/lock tests."""
    cmd = [sys.executable, "-m", "influence", "build", "--model", SLOW_SPEC, "--data", str(data), "--out", str(out),
           "--chunk-rows", "32", "--batch-size", "16", "--proj-dim", str(proj_dim), "--method", "tracin"]
    for c in ckpts:
        cmd += ["--checkpoint", str(c)]
    return cmd


def slow_build_env(delay: float) -> dict[str, str]:
    """The environment of a ``slow_build_cmd`` subprocess: ``delay`` seconds per batch, one thread, this checkout."""
    return os.environ | {"INFLUENCE_TEST_DELAY": str(delay), "OMP_NUM_THREADS": "1",
                         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

# One thread: the machine is shared and small; oversubscribed OpenMP threads make tiny convolutions 50× slower.
torch.set_num_threads(1)
faiss.omp_set_num_threads(1)
# numpy's BLAS too (threadpoolctl comes with scikit-learn): the subprocess builds tests compare bytes with run with
# OMP_NUM_THREADS=1, and a two-thread BLAS sums TRAK's φᵀMφ in another order (last-bit differences).
threadpoolctl.threadpool_limits(1)

N_TRAIN = 160  # not a multiple of the chunk size: the last chunk is short
N_TEST = 12
LRS = [0.05, 0.03, 0.01]
PROJ_DIM = 256
BATCH = 32
CHUNK = 64


@dataclass(frozen=True)
class Digits:
    x: torch.Tensor  # (N, 1, 16, 16) float32
    y: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_npz: Path
    test_npz: Path


@dataclass(frozen=True)
class Checkpoints:
    paths: list[Path]
    lrs: list[float]


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Digits:
    train, test = load_digits_split()
    d = tmp_path_factory.mktemp("data")
    x, y = train.x[:N_TRAIN].clone(), train.y[:N_TRAIN].clone()
    xt, yt = test.x[:N_TEST].clone(), test.y[:N_TEST].clone()
    np.savez(d / "train.npz", x=x.numpy(), y=y.numpy())
    np.savez(d / "test.npz", x=xt.numpy(), y=yt.numpy())
    return Digits(x, y, xt, yt, d / "train.npz", d / "test.npz")


def _train(factory, digits: Digits, out: Path, seed: int = 0) -> Checkpoints:
    torch.manual_seed(seed)
    model = factory()
    saved = train_classifier(model, ArrayDataset(digits.x, digits.y), epochs=6, lr=0.05, batch_size=32, seed=seed,
                             checkpoint_dir=out, checkpoints=3)
    assert len(saved) == 3
    return Checkpoints([p for p, _ in saved], LRS)


@pytest.fixture(scope="session")
def cnn_ckpts(digits, tmp_path_factory) -> Checkpoints:
    """Three checkpoints of tiny_cnn along a short training run (BatchNorm has real running statistics)."""
    import tiny_models

    return _train(tiny_models.tiny_cnn, digits, tmp_path_factory.mktemp("ckpt_cnn"))


@pytest.fixture(scope="session")
def mlp_ckpts(digits, tmp_path_factory) -> Checkpoints:
    import tiny_models

    return _train(tiny_models.tiny_mlp, digits, tmp_path_factory.mktemp("ckpt_mlp"), seed=1)


@pytest.fixture(scope="session")
def store(digits, cnn_ckpts, tmp_path_factory) -> Path:
    """A complete store (sparse k=256, float16, all three methods) of tiny_cnn over N_TRAIN digits."""
    out = tmp_path_factory.mktemp("stores") / "main"
    influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, out, projector="sparse", proj_dim=PROJ_DIM,
                    lr_weights=cnn_ckpts.lrs, batch_size=BATCH, rows_per_chunk=CHUNK, progress=False)
    return out


@pytest.fixture(scope="session")
def session(store) -> influence.Influence:
    return influence.Influence.open(store, trust_store=True)


@pytest.fixture
def copy_store(store, tmp_path):
    """A private copy of the session store, for tests that extend or damage it."""

    def make(name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(store, dst)
        return dst

    return make


# Commands that open a store. The test stores record this folder's tiny_models.py as their model spec, which is
# code: the tests opt in for each call, as a user would for a store they built themselves.
STORE_COMMANDS = {"query", "score", "self-influence", "explain", "flag", "repair", "index-check"}


def trusted(argv: list[str]) -> list[str]:
    """``argv`` with ``--trust-store`` added when its command opens a store."""
    return [*argv, "--trust-store"] if argv and argv[0] in STORE_COMMANDS else argv
