"""One writer, taken first: the lock survives store creation, is checked before any loading, frees when its
holder dies; a build killed right after creating the store resumes; stale temp files are swept."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import zarr

import influence
from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM, slow_build_cmd, slow_build_env
from index.store import LOCK_NAME, FeatureStore
from influence.cli import main


def _cmd(digits, ckpts, out: Path) -> list[str]:
    return slow_build_cmd(digits.train_npz, ckpts, out, proj_dim=32)


def _rerun_completes(digits, ckpts, out: Path, cwd: Path) -> None:
    """The same command, run again at full speed, finishes the store."""
    rerun = subprocess.run(_cmd(digits, ckpts.paths[:1], out), env=slow_build_env(0.0), cwd=cwd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _status(out) == "complete"


def _status(out: Path) -> object:
    return json.loads((out / "zarr.json").read_text())["attributes"].get("status")


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


def test_lock_is_checked_before_the_model_is_loaded(tmp_path, digits, cnn_ckpts, capsys):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242", 0)
        # the model spec does not exist: a build that loaded before locking would report that instead
        code = main(["build", "--model", "no_such_module_xyz:net", "--data", str(digits.train_npz),
                     "--checkpoint", str(cnn_ckpts.paths[0]), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().splitlines() == [err.strip()] and "locked by pid 4242" in err, err
    finally:
        os.close(fd)


def test_second_build_on_a_new_store_is_refused_and_a_killed_holder_frees_it(tmp_path, digits, cnn_ckpts, capsys):
    out = tmp_path / "new"
    first = subprocess.Popen(_cmd(digits, cnn_ckpts.paths[:1], out), env=slow_build_env(0.05), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(out / "done" / "c0" / "zarr.json", first)  # the group and its arrays exist: creation is over
        argv = [str(a) for a in _cmd(digits, cnn_ckpts.paths[:1], out)[3:]]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"locked by pid {first.pid}" in err and len(err.strip().splitlines()) == 1, err
        assert (out / LOCK_NAME).exists()
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        first.stderr.close()
    # the OS dropped the dead holder's lock: the same command runs at once and resumes
    _rerun_completes(digits, cnn_ckpts, out, tmp_path)


def test_build_killed_as_the_store_appears_resumes(tmp_path, digits, cnn_ckpts):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(digits, cnn_ckpts.paths[:1], out), env=slow_build_env(0.05), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(out / "zarr.json", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    _rerun_completes(digits, cnn_ckpts, out, tmp_path)
    FeatureStore.open(out)


def test_store_left_with_a_bare_group_header_resumes(tmp_path, digits, cnn_ckpts, capsys):
    """What the former ``open_group(mode="w")`` then ``attrs.update`` left when killed in between."""
    out = tmp_path / "bare"
    out.mkdir()
    (out / LOCK_NAME).touch()
    zarr.create_group(str(out))
    assert json.loads((out / "zarr.json").read_text()).get("attributes", {}) == {}
    code = main(["build", "--model", CNN_SPEC, "--data", str(digits.train_npz), "--checkpoint", str(cnn_ckpts.paths[0]),
                 "--out", str(out), "--proj-dim", "32", "--method", "tracin"])
    assert code == 0, capsys.readouterr().err
    assert _status(out) == "complete"


def test_refused_build_leaves_no_folder_and_no_lock(tmp_path, digits, capsys):
    out = tmp_path / "never"
    code = main(["build", "--model", CNN_SPEC, "--data", str(digits.train_npz), "--checkpoint", str(tmp_path / "nope.pt"),
                 "--out", str(out)])
    assert code == 2 and not out.exists(), capsys.readouterr().err


def test_resume_sweeps_stale_temp_files(copy_store, digits, cnn_ckpts):
    root = copy_store()
    zarr.open_group(str(root), mode="r+").attrs["status"] = "building"  # as after a kill during the index stage
    stale = [root / "faiss" / ".tracin.index.0123456789ab.tmp", root / "features" / "c0" / "c" / "0" / "0.abcdef.partial",
             root / ".zarr.json.0123456789ab.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)  # an exact-only store has no faiss/ folder until an index is written
        p.write_bytes(b"half written")
    influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, root, projector="sparse", proj_dim=PROJ_DIM,
                    lr_weights=cnn_ckpts.lrs, batch_size=BATCH, rows_per_chunk=CHUNK, progress=False)
    assert [p for p in stale if p.exists()] == []
    FeatureStore.open(root)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_kill_at_creation_resumes_repeatedly(tmp_path, digits, cnn_ckpts, trial):
    (tmp_path / str(trial)).mkdir()
    test_build_killed_as_the_store_appears_resumes(tmp_path / str(trial), digits, cnn_ckpts)


def test_completion_is_one_zarr_json_write(copy_store, monkeypatch):
    """Status and integrity record switch together: ``attrs.update`` would write zarr.json once per key, and a
    kill in between left a store marked complete with no record (refused as damaged, though merely unfinished)."""
    from zarr.storage import LocalStore

    root = copy_store()
    store = FeatureStore(root, zarr.open_group(str(root), mode="r+"))
    writes: list[str] = []
    put = LocalStore.set

    async def counted(self, key, value):
        writes.append(key)
        await put(self, key, value)

    monkeypatch.setattr(LocalStore, "set", counted)
    store.mark_complete()
    assert writes.count("zarr.json") == 1, writes
    FeatureStore.open(root)
