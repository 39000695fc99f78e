"""Slow commands show a tqdm bar on stderr when it is a terminal, and nothing with --json or a piped stderr."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys

import pytest
import zarr

from conftest import trusted
from influence.cli import main


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(monkeypatch: pytest.MonkeyPatch, argv: list[str], tty: bool) -> tuple[int, str, str]:
    err = _Terminal() if tty else io.StringIO()
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with contextlib.redirect_stdout(out):
        code = main(trusted(argv))
    monkeypatch.undo()
    return code, out.getvalue(), err.getvalue()


def test_explain_bar_on_a_terminal_only(store, digits, monkeypatch):
    argv = ["explain", str(store), "--data", str(digits.test_npz), "--ids", "0,1", "--k", "2"]
    code, _, err = _run(monkeypatch, argv, tty=True)
    assert code == 0 and "explain: 100%" in err and "2/2" in err
    code, out, err = _run(monkeypatch, argv + ["--json"], tty=True)
    assert code == 0 and "%|" not in err and len(json.loads(out)["explanations"]) == 2
    code, _, err = _run(monkeypatch, argv, tty=False)
    assert code == 0 and "%|" not in err


def test_flag_and_self_influence_bars_when_computing(copy_store, digits, monkeypatch, tmp_path):
    """A store without the self-influence cache (built before it existed) computes it, with a bar."""
    from index import integrity

    path = copy_store()
    shutil.rmtree(path / "self_influence")
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["matrices"] = {k: v for k, v in group.attrs["matrices"].items() if not k.startswith("self_influence/")}
    group.attrs["integrity"] = integrity.write_manifest(path, dict(group.attrs))  # sealed: as if built that way
    code, _, err = _run(monkeypatch, ["self-influence", str(path), "--method", "trak", "--out", str(tmp_path / "s.npy")], tty=True)
    assert code == 0 and "self-influence (trak): 100%" in err
    code, _, err = _run(monkeypatch, ["flag", str(path), "--test", str(digits.test_npz), "--kind", "harmful"], tty=True)
    assert code == 0 and "scores (tracin): 100%" in err
    code, out, err = _run(monkeypatch, ["flag", str(path), "--kind", "mislabel", "--json"], tty=True)
    assert code == 0 and "%|" not in err and json.loads(out)["mislabel"]


def test_score_bar(store, digits, monkeypatch, tmp_path):
    argv = ["score", str(store), "--data", str(digits.test_npz), "--ids", "0,1", "--out", str(tmp_path / "s.npy")]
    code, _, err = _run(monkeypatch, argv, tty=True)
    assert code == 0 and "scores (tracin): 100%" in err
    code, _, err = _run(monkeypatch, argv, tty=False)
    assert code == 0 and "%|" not in err
