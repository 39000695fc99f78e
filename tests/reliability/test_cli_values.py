"""Bad CLI values are refused while parsing (exit 2, one stderr line, no traceback, nothing written), and a full disk
or a file-size limit anywhere in a command is exit 2 with one line naming the path and what to do."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from influence.cli import main

BUILD = ["build", "--model", "digits-cnn", "--data", "digits", "--checkpoint", "none.pt", "--out", "{tmp}/out"]
QUERY = ["query", "{tmp}/store", "--data", "digits"]

BAD = [
    # (argv, the option the message must name)
    (BUILD + ["--trak-lambda", "-1"], "--trak-lambda"),
    (BUILD + ["--trak-lambda", "nan"], "--trak-lambda"),
    (BUILD + ["--trak-lambda", "inf"], "--trak-lambda"),
    (BUILD + ["--chunk-rows", "0"], "--chunk-rows"),
    (BUILD + ["--chunk-rows", "-64"], "--chunk-rows"),
    (BUILD + ["--proj-dim", "0"], "--proj-dim"),
    (BUILD + ["--batch-size", "-1"], "--batch-size"),
    (BUILD + ["--rerank", "-5"], "--rerank"),
    (BUILD + ["--seed", "-1"], "--seed"),
    (BUILD + ["--lr-weights", "0.1,nan"], "--lr-weights"),
    (BUILD + ["--std", "0.3,inf,0.3"], "--std"),
    (BUILD + ["--size", "0,16"], "--size"),
    (["flag", "{tmp}/store", "--top", "-1"], "--top"),
    (["flag", "{tmp}/store", "--top", "0"], "--top"),
    (QUERY + ["--k", "0"], "--k"),
    (QUERY + ["--ids", "-1"], "--ids"),
    (QUERY + ["--ids", "1,x"], "--ids"),
    (["explain", "{tmp}/store", "--data", "digits", "--k", "-3"], "--k"),
    (["index-check", "{tmp}/store", "--queries", "0"], "--queries"),
    (["repair", "{tmp}/store", "--fraction", "0"], "--fraction"),
    (["repair", "{tmp}/store", "--fraction", "1.5"], "--fraction"),
    (["repair", "{tmp}/store", "--fraction", "nan"], "--fraction"),
    (["attribute", "--model", "digits-cnn", "--checkpoint", "c.pt", "--image", "i.npy", "--out", "{tmp}/o.png",
      "--target", "-2"], "--target"),
    (["demo", "--out", "{tmp}/demo", "--k", "0"], "--k"),
]


@pytest.mark.parametrize("argv,option", BAD, ids=[" ".join(a[0][:1] + a[0][-2:]) for a in BAD])
def test_bad_value_is_one_line_exit_2(argv, option, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert option in err[0] and argv[-1] in err[0]
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_good_edge_values_parse(tmp_path, capsys):
    """λ = 0, fraction = 1 and seed 0 are valid: the refusal above is not a blanket one (fails later, at the data)."""
    code = main([a.format(tmp=tmp_path) for a in BUILD] + ["--trak-lambda", "0", "--seed", "0", "--rerank", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--trak-lambda" not in err and "none.pt" in err


@pytest.mark.parametrize("code,named,fix", [
    (errno.ENOSPC, True, "free some space"),
    (errno.EFBIG, False, "raise the file-size limit"),
])
def test_full_disk_is_one_line_exit_2(store, tmp_path, monkeypatch, capsys, code, named, fix):
    target = tmp_path / "self.npy"

    def full(file, *args, **kwargs):
        raise OSError(code, "simulated", str(tmp_path / ".self.npy.tmp") if named else None)  # write() names none

    monkeypatch.setattr(np, "save", full)
    rc = main(["self-influence", str(store), "--trust-store", "--method", "tracin", "--out", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert fix in err[0] and "re-run the same command" in err[0]
    # the file the OS names, else the command's output path
    assert str(tmp_path / ".self.npy.tmp") in err[0] if named else str(target) in err[0]
    assert not target.exists()


def test_other_os_errors_stay_bugs(store, tmp_path, monkeypatch):
    """Only ENOSPC/EFBIG are mapped: any other OSError is not hidden behind exit 2."""

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError, match="simulated I/O"):
        main(["self-influence", str(store), "--trust-store", "--method", "tracin", "--out", str(tmp_path / "s.npy")])


def test_full_disk_during_build_then_same_command_resumes(digits, tmp_path, monkeypatch, capsys):
    """A build stopped by ENOSPC mid-store is exit 2, one line naming the store; the same command then completes it."""
    import torch

    from index.store import FeatureStore
    from influence.models import DigitsMLP

    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(DigitsMLP(hidden=8).state_dict(), ckpt)
    out = tmp_path / "store"
    argv = ["build", "--model", "digits-mlp", "--model-arg", "hidden=8", "--data", str(digits.train_npz),
            "--checkpoint", str(ckpt), "--out", str(out), "--proj-dim", "32", "--method", "tracin",
            "--batch-size", "32", "--chunk-rows", "64"]
    write_chunk = FeatureStore.write_chunk
    calls = []

    def fills_up(self, *args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_chunk(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", fills_up)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[-1], err
    assert str(out) in err[0] and "free some space" in err[0]
    monkeypatch.setattr(FeatureStore, "write_chunk", write_chunk)
    assert main(argv) == 0
    capsys.readouterr()
    capsys.readouterr()
    whole = tmp_path / "whole"
    assert main([a if a != str(out) else str(whole) for a in argv]) == 0  # the same build, never interrupted
    resumed, fresh = FeatureStore.open(out), FeatureStore.open(whole)
    assert resumed.checkpoint_ids == fresh.checkpoint_ids
    for ckpt_id in fresh.checkpoint_ids:
        np.testing.assert_array_equal(resumed.read_features(ckpt_id), fresh.read_features(ckpt_id))
    np.testing.assert_array_equal(resumed.labels(), fresh.labels())
