"""Start-up of the CLI: what is refused or printed before any work loads none of torch, numpy, zarr or FAISS.

A second writer is refused by the stdlib-only lock (``index.lock``) right after parsing; ``--help`` and usage
errors come from plain copies of the choices and defaults (``influence._cli_defaults``). Each case runs the real
entry point, ``python -X importtime -m influence ...``, in a subprocess and reads the modules it imported.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, slow_build_cmd, slow_build_env

HEAVY = ("torch", "numpy", "zarr", "faiss", "PIL", "matplotlib", "sklearn", "scipy")


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _cli(args: list[str], cwd: Path, importtime: bool = True) -> tuple[int, str, str, set[str], float]:
    """Run ``python -X importtime -m influence ARGS``: exit code, stdout, stderr without the import lines, the
    top-level packages imported, and the wall time (``importtime=False``: a plain run, nothing recorded)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "influence", *args], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    imported, rest = set(), []
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
        else:
            rest.append(line)
    return done.returncode, done.stdout, "\n".join(rest), imported, wall


def _assert_refused_light(args: list[str], cwd: Path, holder: int) -> float:
    code, out, err, imported, wall = _cli(args, cwd)
    assert code == 2, (code, err)
    assert out == "" and err.splitlines() == [err.strip()] and err.startswith("error: "), err
    assert f"locked by pid {holder}" in err, err
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    return wall


def _build_args(digits, ckpts, out: Path) -> list[str]:
    return [str(a) for a in slow_build_cmd(digits.train_npz, ckpts, out, proj_dim=32)[3:]]


def test_second_writer_on_an_existing_store_is_refused_before_torch(copy_store, digits, cnn_ckpts, tmp_path):
    out = copy_store()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom index.lock import writer_lock\nwith writer_lock(sys.argv[1]):\n"
                               "    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        wall = _assert_refused_light(_build_args(digits, cnn_ckpts.paths, out), tmp_path, holder.pid)
        print(f"second writer on an existing store refused in {wall:.2f} s wall (python -X importtime, under load)")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]


def test_second_writer_on_a_store_being_created_is_refused_before_torch(digits, cnn_ckpts, tmp_path):
    out = tmp_path / "new"
    first = subprocess.Popen(slow_build_cmd(digits.train_npz, cnn_ckpts.paths[:1], out, proj_dim=32), env=slow_build_env(0.05),
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "zarr.json").exists():  # the first build has created the store and is writing it
            assert first.poll() is None, first.stderr.read().decode() if first.stderr else first.returncode
            assert time.monotonic() < deadline
            time.sleep(0.002)
        wall = _assert_refused_light(_build_args(digits, cnn_ckpts.paths[:1], out), tmp_path, first.pid)
        print(f"second writer on a store being built refused in {wall:.2f} s wall (python -X importtime, under load)")
        assert first.poll() is None  # the refusal left the first build running
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        first.stderr.close()  # type: ignore[union-attr]


def test_help_and_usage_errors_import_nothing_heavy(tmp_path):
    code, out, err, imported, _ = _cli(["--help"], tmp_path)
    assert code == 0 and "COMMAND" in out and not imported & set(HEAVY), (err, sorted(imported & set(HEAVY)))
    probe = (
        "import contextlib, io, json, sys\n"
        "from influence.cli import COMMANDS, main\n"
        "codes = {}\n"
        "for name in COMMANDS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            main([name, '--help'])\n"
        "        except SystemExit as e:\n"
        "            codes[name] = (e.code, len(out.getvalue()))\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        "    codes['bad'] = (main(['build', '--model', 'm', '--data', 'd', '--checkpoint', 'c', '--out', 'o', '--proj-dim', '0']), 0)\n"
        f"print(json.dumps({{'codes': codes, 'heavy': sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    doc = json.loads(done.stdout)
    assert doc["heavy"] == []
    assert len(doc["codes"]) == 14  # the 13 commands (add included) and the bad value
    assert all(code == 0 and size > 100 for name, (code, size) in doc["codes"].items() if name != "bad"), doc["codes"]
    assert doc["codes"]["bad"][0] == 2


@pytest.mark.slow
def test_query_image_wall(store, digits, tmp_path):
    """``influence query --image`` from outside, start-up included: median of 3 (target 2 s on an idle machine)."""
    image = tmp_path / "x.npy"
    np.save(image, digits.x_test[0].numpy())
    args = ["query", str(store), "--image", str(image), "--trust-store"]
    code, out, err, imported, _ = _cli(args, tmp_path)
    assert code == 0 and "proponents" in out, err
    assert not imported & {"faiss", "matplotlib", "sklearn", "scipy", "PIL"}, sorted(imported)  # exact search, a .npy
    walls = []
    for _ in range(3):
        code, out, err, _, wall = _cli(args, tmp_path, importtime=False)
        assert code == 0 and "proponents" in out, err
        walls.append(wall)
    median = statistics.median(walls)
    print(f"influence query --image wall: median {median:.2f} s of {[round(w, 2) for w in walls]}")
    assert median < 20, walls  # loose: a shared CI machine; the figure is the report


def test_small_store_decodes_without_faiss_to_the_same_bits():
    """Below ``_FAISS_DECODE_MIN`` stored values numpy casts float16 rows (no FAISS import): every one of the 65,536
    float16 bit patterns decodes to the same float32 bits as through FAISS's decoder."""
    from index.store import _FAISS_DECODE_MIN, _as_float32

    rows = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    small, large = _as_float32(rows, 0), _as_float32(rows, _FAISS_DECODE_MIN)
    assert small.dtype == large.dtype == np.float32
    np.testing.assert_array_equal(small.view(np.uint32), large.view(np.uint32))
    probe = "import sys\nimport numpy as np\nfrom index.store import _as_float32\n" \
            "_as_float32(np.ones((4, 8), np.float16), 32)\nprint('faiss' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
