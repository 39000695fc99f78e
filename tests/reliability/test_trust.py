"""A store is data, never code: opening one imports the model spec it records only when that spec is built-in,
the user names the model (``--model``, ``model=``) or opts in for the call (``--trust-store``, ``trust_store=True``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import influence
from influence.cli import main
from influence.errors import BadSpecError
from influence.models import DigitsMLP

# Stands for a store from elsewhere whose recorded spec runs code: importing or calling it leaves a marker file.
HOSTILE = '''
from pathlib import Path
from influence.models import DigitsMLP

MARK = Path(__file__).with_suffix(".ran")
MARK.touch()


def make(hidden=16):
    MARK.touch()
    return DigitsMLP(hidden=hidden)
'''
HIDDEN = 8  # recorded as model_args: every way of opening must reuse it, or the fingerprint check refuses


def _build(digits, tmp_path: Path, spec: str, name: str) -> Path:
    torch.manual_seed(0)
    ckpt = tmp_path / f"{name}.pt"
    torch.save(DigitsMLP(hidden=HIDDEN).state_dict(), ckpt)
    out = tmp_path / name
    influence.build(spec, str(digits.train_npz), [ckpt], out, proj_dim=32, methods=("tracin",), batch_size=32,
                    rows_per_chunk=64, model_args={"hidden": HIDDEN}, progress=False)
    return out


@pytest.fixture
def hostile(digits, tmp_path) -> tuple[Path, str, Path]:
    code = tmp_path / "hostile.py"
    code.write_text(HOSTILE)
    spec = f"{code}:make"
    store = _build(digits, tmp_path, spec, "store")
    mark = code.with_suffix(".ran")
    mark.unlink()  # the build ran it (the user named it there); from now on only the store names it
    return store, spec, mark


def _query(store: Path, digits, *extra: str) -> list[str]:
    return ["query", str(store), "--data", str(digits.test_npz), "--ids", "0", "--k", "3", "--method", "tracin", *extra]


def test_recorded_code_spec_is_refused_without_running(hostile, digits, capsys):
    store, spec, mark = hostile
    assert main(_query(store, digits)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert spec in err[0] and str(store) in err[0] and "--model" in err[0] and "--trust-store" in err[0]
    assert "Traceback" not in err[0]
    assert not mark.exists()
    with pytest.raises(BadSpecError, match="trust_store=True"):
        influence.Influence.open(store)
    assert main(["info", str(store), "--json"]) == 0  # describing a store never needs its model
    assert spec in capsys.readouterr().out
    assert not mark.exists()


def test_trust_store_runs_the_recorded_spec(hostile, digits, capsys):
    store, _, mark = hostile
    assert main(_query(store, digits, "--trust-store", "--json")) == 0
    assert '"proponents"' in capsys.readouterr().out
    assert mark.exists()
    assert influence.Influence.open(store, trust_store=True).n_train == len(digits.x)


def test_user_named_model_is_used_with_the_recorded_args(hostile, digits, capsys):
    store, _, mark = hostile
    # a built-in name for the same architecture: the recorded hidden=8 must be reused to match the store
    assert main(_query(store, digits, "--model", "digits-mlp", "--json")) == 0
    assert '"proponents"' in capsys.readouterr().out
    assert not mark.exists()
    assert influence.Influence.open(store, model="digits-mlp").n_train == len(digits.x)
    # a file the user names runs: that is the user's choice, not the store's
    mine = store.parent / "mine.py"
    shutil.copy(store.parent / "hostile.py", mine)
    assert main(_query(store, digits, "--model", f"{mine}:make")) == 0
    assert mine.with_suffix(".ran").exists() and not mark.exists()


def test_builtin_spec_needs_no_flag(digits, tmp_path, capsys):
    store = _build(digits, tmp_path, "digits-mlp", "builtin")
    assert main(_query(store, digits, "--json")) == 0
    assert '"proponents"' in capsys.readouterr().out
    assert main(["self-influence", str(store), "--method", "tracin", "--out", str(tmp_path / "s.npy")]) == 0
    assert (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("command", [
    ["score", "--data", "{test}", "--out", "{tmp}/s.npy"], ["self-influence", "--out", "{tmp}/s.npy"],
    ["explain", "--data", "{test}", "--ids", "0"], ["flag", "--kind", "mislabel"], ["index-check"],
])
def test_every_store_command_refuses(hostile, digits, tmp_path, capsys, command):
    store, spec, mark = hostile
    argv = [command[0], str(store), *(a.format(test=digits.test_npz, tmp=tmp_path) for a in command[1:])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and spec in err[0] and "--trust-store" in err[0], err
    assert not mark.exists()


HOSTILE_DATA = '''
from pathlib import Path

import numpy as np
import torch

from influence.data import ArrayDataset

MARK = Path(__file__).with_suffix(".ran")


def make():
    MARK.touch()
    d = np.load({npz!r})
    return ArrayDataset(torch.from_numpy(d["x"]), torch.from_numpy(d["y"]))
'''


def test_recorded_code_data_spec_is_refused_without_running(digits, tmp_path, capsys):
    """The training-data spec is code too when it is ``module:function``: training images need --trust-store."""
    code = tmp_path / "hostile_data.py"
    code.write_text(HOSTILE_DATA.format(npz=str(digits.train_npz)))
    mark = code.with_suffix(".ran")
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(DigitsMLP(hidden=HIDDEN).state_dict(), ckpt)
    store = tmp_path / "store"
    influence.build("digits-mlp", f"{code}:make", [ckpt], store, proj_dim=32, methods=("tracin",), batch_size=32,
                    rows_per_chunk=64, model_args={"hidden": HIDDEN}, progress=False)
    mark.unlink()
    session = influence.Influence.open(store)  # built-in model: opens; queries need no training images
    with pytest.raises(BadSpecError, match="trust_store=True"):
        session.training_examples([0, 1])
    assert main(["index-check", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{code}:make" in err[0] and "--trust-store" in err[0], err
    assert not mark.exists()
    x, y = influence.Influence.open(store, trust_store=True).training_examples([0, 1])
    assert mark.exists() and torch.equal(y, digits.y[:2])
