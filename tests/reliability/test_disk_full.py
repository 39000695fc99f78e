"""A full disk or a file-size limit stops a build with exit 2 and one line that names what was being written and
what to do, never a traceback or a signal; with space restored, the same command ends byte-identical to a build
that never ran out.

Three ways to run out: ENOSPC raised at the k-th file-mutating event (an audit hook in a forked child running
``influence.cli.main``), a real ``RLIMIT_FSIZE`` (the kernel's EFBIG; Python ignores SIGXFSZ, so it is an
error, not a death), and a real tmpfs too small for the store, where this machine lets a mount namespace be made.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import slow_build_cmd, slow_build_env
from fingerprint import fingerprint
from index.store import FeatureStore
from killpoint import KillAt, Runner

# where ENOSPC strikes: the lock file, the group header, the first chunk, the manifest, the final zarr.json
MOMENTS: list[KillAt] = [1, ("os.rename zarr.json", 1), ("features/c0/c/", 1), ("os.rename .influence-manifest", 1),
                         ("os.rename .influence-manifest", 4)]
CI_CASES = 8
SLOW_CASES = 40


def _argv(digits, ckpts, out: Path) -> list[str]:
    return slow_build_cmd(digits.train_npz, ckpts.paths[:1], out, proj_dim=32)


def _one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def reference(digits, cnn_ckpts, tmp_path_factory) -> tuple[Runner, dict[str, str], list[str]]:
    """The uninterrupted build's fingerprint and events."""
    runner, root = Runner(), tmp_path_factory.mktemp("full")
    out = root / "ref"
    code = runner.run(_argv(digits, cnn_ckpts, out)[3:], str(out), str(root / "ref"))
    assert code == 0, (root / "ref.err").read_text()
    return runner, fingerprint(out), (root / "ref.events").read_text().splitlines()


def _enospc_cases(reference, digits, cnn_ckpts, tmp_path, n: int, seed: int) -> int:
    runner, final, events = reference
    picks = [*MOMENTS, *random.Random(seed).sample(range(2, len(events) + 1), n - len(MOMENTS))][:n]
    for i, k in enumerate(picks):
        out, tag = tmp_path / f"s{i}", str(tmp_path / f"r{i}")
        argv = _argv(digits, cnn_ckpts, out)[3:]
        code = runner.run(argv, str(out), tag, kill_at=k, fail=errno.ENOSPC)
        assert code == 2, (k, code, Path(tag + ".err").read_text())
        line = _one_line(Path(tag + ".err").read_text(), "no space left on device", "free some space",
                         "re-run the same command")
        assert str(out) in line, (k, line)  # the file the OS named lies in the store (or is the store)
        code = runner.run(argv, str(out), tag + "b")
        assert code == 0, (k, Path(tag + "b.err").read_text())
        FeatureStore.open(out)
        got = fingerprint(out)
        assert got == final, (k, sorted(f for f in set(got) | set(final) if got.get(f) != final.get(f)))
    return len(picks)


def test_enospc_at_sampled_writes(reference, digits, cnn_ckpts, tmp_path):
    assert _enospc_cases(reference, digits, cnn_ckpts, tmp_path, CI_CASES, seed=5) == CI_CASES


@pytest.mark.slow
def test_enospc_at_many_writes(reference, digits, cnn_ckpts, tmp_path):
    assert _enospc_cases(reference, digits, cnn_ckpts, tmp_path, SLOW_CASES, seed=6) == SLOW_CASES


def test_file_size_limit_is_exit_2_then_resumes(reference, digits, cnn_ckpts, tmp_path):
    """A real ``ulimit -f`` below the size of a chunk file: the kernel refuses the write with EFBIG."""
    _, final, _ = reference
    out = tmp_path / "store"
    cmd = _argv(digits, cnn_ckpts, out)
    limit = 1024  # bytes: the group header fits, a 32-row feature chunk (2 kB) does not

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    run = subprocess.run(cmd, env=slow_build_env(0.0), cwd=tmp_path, capture_output=True, text=True, preexec_fn=capped)
    assert run.returncode == 2, (run.returncode, run.stderr)  # not -SIGXFSZ: an error, not a death
    line = _one_line(run.stderr, "file too large", "ulimit -f", "re-run the same command", str(out))
    assert (out / "zarr.json").is_file(), line  # it stopped part-way, not before starting
    rerun = subprocess.run(cmd, env=slow_build_env(0.0), cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert fingerprint(out) == final


def _namespace() -> list[str] | None:
    """A command prefix that runs in a private mount namespace where a tmpfs may be mounted, or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m", "--propagation", "private"], ["unshare", "-rm", "--propagation", "private"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_small_tmpfs_is_exit_2_then_resumes(reference, digits, cnn_ckpts, tmp_path):
    """A real full file system: a 96 kB tmpfs (the store needs about 300 kB), then the same command once it is
    grown to 64 MB. The mount lives in a private namespace, so nothing on the machine changes."""
    prefix = _namespace()
    if prefix is None:
        pytest.skip("this machine allows no private mount namespace (unshare -m / -rm), so no tmpfs can be mounted")
    _, final, _ = reference
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join(f"'{a}'" for a in _argv(digits, cnn_ckpts, mnt / "store"))
    script = (f"mount -t tmpfs -o size=96k tmpfs {mnt} || exit 99; "
              f"{cmd} 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1; "
              f"mount -o remount,size=64m {mnt} || exit 98; "
              f"{cmd} 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2; cp -a {mnt}/store {tmp_path}/store")
    done = subprocess.run([*prefix, "sh", "-c", script], env=slow_build_env(0.0), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    err1 = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "2", err1
    _one_line(err1, "no space left on device", "free some space", str(mnt / "store"))
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert fingerprint(tmp_path / "store") == final
    assert not os.path.ismount(mnt)  # the mount never left its namespace
