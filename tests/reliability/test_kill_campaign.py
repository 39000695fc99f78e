"""Kill campaign: a build SIGKILLed at its k-th file-mutating event (or at a random moment) and then run again
with the same command ends byte-identical to a build never interrupted; in between, a reader gets one line
and exit 2, or the answers of a complete state, never anything else.

Three writers are attacked: a first build (a new store of one checkpoint), an extension (a second checkpoint
added to that complete store, whose readers must keep the old answers) and an ``influence add`` of new training
rows to it (readers keep the old answers too). Events are counted by an audit hook (``killpoint``).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import slow_build_cmd
from index.store import FeatureStore
from fingerprint import fingerprint
from killpoint import KillAt, Runner

CI = {"first": (8, 2), "extend": (3, 1), "add": (3, 1)}  # (sampled k, random times) per build
SLOW = {"first": (50, 10), "extend": (20, 5), "add": (20, 5)}


@dataclass
class Build:
    """One build command, its uninterrupted result, and the answers a reader gets from it and from before it."""

    argv: list[str]
    out: Path
    events: list[str]
    seconds: float
    final: dict[str, str]
    answers_after: np.ndarray
    answers_before: np.ndarray | None  # the complete store it extends, if any
    before: Path | None


class Campaign:
    def __init__(self, runner: Runner, digits, ckpts, root: Path) -> None:
        self.runner, self.digits, self.ckpts, self.root = runner, digits, ckpts, root
        self.n = 0

    def tag(self) -> str:
        self.n += 1
        return str(self.root / f"run{self.n}")

    def argv(self, out: Path, n_ckpts: int) -> list[str]:
        if n_ckpts == 0:  # an add of the test images as new training rows to the store at ``out``
            return ["add", str(out), "--data", str(self.digits.test_npz), "--trust-store"]
        return slow_build_cmd(self.digits.train_npz, self.ckpts.paths[:n_ckpts], out, proj_dim=32)[3:]

    def build(self, argv: list[str], out: Path, kill_at: KillAt = 0) -> tuple[int, str]:
        tag = self.tag()
        code = self.runner.run(argv, str(out), tag, kill_at=kill_at)
        return code, tag

    def read(self, out: Path) -> tuple[int, str, np.ndarray | None]:
        """A reader: ``score`` of three training examples by TracIn; exit code, stderr, scores."""
        tag = self.tag()
        argv = ["score", str(out), "--data", str(self.digits.train_npz), "--ids", "0,1,2", "--method", "tracin",
                "--out", tag + ".npy", "--trust-store"]
        code = self.runner.run(argv, tag + ".none", tag)
        scores = np.load(tag + ".npy") if code == 0 else None
        return code, Path(tag + ".err").read_text(), scores

    def reference(self, name: str, n_ckpts: int, base: Path | None, runs: int) -> Build:
        """The uninterrupted build (``runs`` > 1: the fingerprint must not depend on the run)."""
        results = []
        for i in range(runs):
            out = self.root / f"{name}-ref{i}"
            if base is not None:
                shutil.copytree(base, out)
            argv = self.argv(out, n_ckpts)
            start = time.monotonic()
            code, tag = self.build(argv, out)
            seconds = time.monotonic() - start
            assert code == 0, Path(tag + ".err").read_text()
            FeatureStore.open(out)
            results.append((out, argv, tag, seconds))
        out, argv, tag, _ = results[0]
        seconds = min(r[3] for r in results)  # the first run may include the fork server's start
        final = fingerprint(out)
        assert all(fingerprint(r[0]) == final for r in results[1:])
        code, err, after = self.read(out)
        assert code == 0 and after is not None, err
        before = None
        if base is not None:
            code, err, before = self.read(base)
            assert code == 0, err
        # zarr writes from a thread pool: the count and order of events vary a little from run to run
        events = min((Path(r[2] + ".events").read_text().splitlines() for r in results), key=len)
        return Build(argv, out, events, seconds, final, after, before, base)


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


# Moments named by event, not by number (zarr writes from a thread pool, so numbers shift a little between
# runs): the group header's rename and the two events after it, the manifest's rename, the final zarr.json one.
MOMENTS: list[KillAt] = [("os.rename zarr.json", 1), ("os.rename zarr.json", 2), ("os.rename zarr.json", 3),
                         ("os.rename .influence-manifest", 1), ("os.rename .influence-manifest", 4)]


def _picks(events: list[str], n: int, seed: int) -> list[KillAt]:
    """The named moments, then seeded samples of k among the reference build's events."""
    return [*MOMENTS, *random.Random(seed).sample(range(1, len(events) + 1), max(0, n - len(MOMENTS)))][:n]


@dataclass
class Tally:
    cases: int = 0
    killed: int = 0
    reader_exit2: int = 0
    reader_old: int = 0
    reader_new: int = 0
    resumed_identical: int = 0


def _attack(c: Campaign, ref: Build, name: str, kill_at: KillAt | None, delay: float, tally: Tally) -> None:
    """One case: kill (at event ``kill_at``, else after ``delay`` seconds), read, rerun, compare."""
    out = c.root / f"{name}-{c.n}"
    if ref.before is not None:
        shutil.copytree(ref.before, out)
    argv = [out.as_posix() if a == ref.out.as_posix() else a for a in ref.argv]
    if kill_at is not None:
        code, tag = c.build(argv, out, kill_at=kill_at)
    else:
        proc = c.runner.start(argv, str(out), c.tag())
        proc.join(delay)
        proc.kill()
        proc.join()
        code = proc.exitcode
    tally.cases += 1
    where = f"{name}: kill at {f'{delay:.2f} s' if kill_at is None else kill_at}"
    assert code in (-9, 0), (where, code)
    assert code == -9 or not isinstance(kill_at, tuple), (where, "the named moment never came")
    tally.killed += code == -9
    # a reader between the kill and the rerun
    rc, err, scores = c.read(out)
    assert "Traceback" not in err and rc in (0, 2), (where, rc, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (where, err)
        # a killed build is unfinished, never damaged: the line says so (and to re-run the build)
        assert "incomplete" in lines[0] or "not an influence store" in lines[0], (where, lines[0])
        tally.reader_exit2 += 1
    else:
        assert scores is not None
        old = ref.answers_before is not None and np.array_equal(scores, ref.answers_before)
        new = np.array_equal(scores, ref.answers_after)
        assert old or new, (where, "a reader got answers of neither complete state")
        tally.reader_old += old and not new
        tally.reader_new += new and not old
    # the same command again
    code, tag = c.build(argv, out)
    assert code == 0, (where, Path(tag + ".err").read_text())
    FeatureStore.open(out)
    got = fingerprint(out)
    diff = sorted(k for k in set(got) | set(ref.final) if got.get(k) != ref.final.get(k))
    assert not diff, (where, diff)
    tally.resumed_identical += 1


def _campaign(runner, digits, cnn_ckpts, tmp_path, counts: dict[str, tuple[int, int]], seed: int) -> dict[str, Tally]:
    c = Campaign(runner, digits, cnn_ckpts, tmp_path)
    first = c.reference("first", 1, None, runs=2)  # a new store of one checkpoint
    refs = {"first": first, "extend": c.reference("extend", 2, first.out, runs=1),  # the same, a second one added
            "add": c.reference("add", 0, first.out, runs=1)}  # the first store, with rows appended
    tallies = {}
    rng = random.Random(seed)
    for name, (n_k, n_random) in counts.items():
        ref, tally = refs[name], Tally()
        for k in _picks(ref.events, n_k, seed):
            _attack(c, ref, name, k, 0.0, tally)
        for _ in range(n_random):
            _attack(c, ref, name, None, rng.uniform(0.0, ref.seconds), tally)
        tallies[name] = tally
        print(f"\n{name}: {len(ref.events)} events, {tally}")
    return tallies


def test_kill_campaign(runner, digits, cnn_ckpts, tmp_path):
    tallies = _campaign(runner, digits, cnn_ckpts, tmp_path, CI, seed=11)
    assert all(tallies[name].cases == sum(CI[name]) for name in CI)
    assert tallies["first"].reader_old == 0  # a first build has no earlier state
    assert tallies["add"].reader_exit2 == 0  # an add always has one: readers get it, or the new one


@pytest.mark.slow
def test_kill_campaign_large(runner, digits, cnn_ckpts, tmp_path):
    tallies = _campaign(runner, digits, cnn_ckpts, tmp_path, SLOW, seed=12)
    assert all(tallies[name].cases == sum(SLOW[name]) for name in SLOW)
    assert tallies["add"].reader_exit2 == 0
