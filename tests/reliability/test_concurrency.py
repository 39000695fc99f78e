"""Readers keep the last complete state: API sessions and CLI queries running while a writer rewrites a FAISS index
again and again, or rebuilds TRAK with another λ, answer exactly as one complete state does; never "incomplete",
never a traceback, and one session never mixes two states.

The reference answers of every state are computed first, on the same store, by the same builds the writer then
repeats (builds are deterministic: the same factory or λ gives the same index and matrices, so the same answers).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import influence
from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM, REPO, slow_build_env, trusted
from index.errors import InfluenceError
from influence.cli import main

IDS = [0, 3, 7]
K = 5
INDEX_STEPS = [{"methods": ["tracin"], "index_factory": f, "rerank": 0} for f in ("SQ8", "SQ4", "Flat")]
LAMBDA_STEPS = [{"methods": ["trak"], "trak_lambda": lam} for lam in (0.01, 1.0)]
MIXED_STEPS = [INDEX_STEPS[0], LAMBDA_STEPS[0], INDEX_STEPS[1], LAMBDA_STEPS[1], INDEX_STEPS[2]]

WRITER = """
import json, sys, time
import influence, influence.loading, influence.pipeline
cfg = json.loads(sys.argv[1])
influence.loading.load_model(cfg["model"])  # start-up (torch, the model's module) before the readers start
print("ready", flush=True)
sys.stdin.readline()  # go: the readers are running
for i in range(cfg["rounds"]):
    step = cfg["steps"][i % len(cfg["steps"])]
    influence.build(cfg["model"], cfg["data"], cfg["checkpoints"], cfg["out"], projector="sparse", proj_dim=cfg["proj_dim"],
                    lr_weights=cfg["lrs"], batch_size=cfg["batch"], rows_per_chunk=cfg["chunk"], progress=False, **step)
    print(i, flush=True)
    time.sleep(cfg["pause"])
"""


def _build(root: Path, digits, ckpts, step: dict[str, Any]) -> None:
    influence.build(CNN_SPEC, str(digits.train_npz), ckpts.paths, root, projector="sparse", proj_dim=PROJ_DIM,
                    lr_weights=ckpts.lrs, batch_size=BATCH, rows_per_chunk=CHUNK, progress=False, **step)


def _key(results: list[dict[str, Any]]) -> tuple:
    """What an answer is: for each test image, the proponents and opponents with their scores, in order."""
    return tuple(tuple((p["train_id"], p["score"]) for p in r["proponents"]) +
                 tuple((p["train_id"], p["score"]) for p in r["opponents"]) for r in results)


def _api_answer(session: influence.Influence, test_npz: Path, method: str, data: Any = None) -> tuple:
    data = data if data is not None else session.test_data(str(test_npz), ids=IDS)
    return _key([r.to_json() for r in session.query(data.x, data.y, k=K, method=method)])


def _cli_argv(root: Path, test_npz: Path, method: str) -> list[str]:
    return trusted(["query", str(root), "--data", str(test_npz), "--ids", ",".join(map(str, IDS)), "--k", str(K),
                    "--method", method, "--json"])


def _cli_answer_in_process(root: Path, test_npz: Path, method: str) -> tuple:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(_cli_argv(root, test_npz, method)) == 0
    return _key(json.loads(out.getvalue())["results"])


@dataclass
class Tally:
    """What the readers saw; ``failures`` holds every answer that is not a complete state's, and every error."""

    sessions: int = 0
    sessions_mid_build: int = 0  # opened while the store said "building": served its last complete state
    answers: int = 0
    during: int = 0  # answers given between the writer's first and last rewrite
    writing: threading.Event = field(default_factory=threading.Event)
    cli_answers: int = 0
    per_state: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _api_reader(root: Path, test_npz: Path, method: str, refs: dict[tuple, str], stop: threading.Event,
                tally: Tally, per_session: int) -> None:
    """Open a session, ask ``per_session`` times (a writer switches states meanwhile), check, repeat."""
    while not stop.is_set():
        try:
            session = influence.Influence.open(root, trust_store=True)
            mid = session.store.group.attrs.get("status") == "building"
            data = session.test_data(str(test_npz), ids=IDS)
            seen, during = [], 0
            for _ in range(per_session):
                seen.append(_api_answer(session, test_npz, method, data))
                during += tally.writing.is_set()
                time.sleep(0.002)
        except InfluenceError as e:
            with tally.lock:
                tally.refusals[type(e).__name__] += 1
                tally.failures.append(f"refused: {e}")
            continue
        except Exception:
            with tally.lock:
                tally.failures.append(traceback.format_exc())
            continue
        with tally.lock:
            tally.sessions += 1
            tally.sessions_mid_build += mid
            tally.answers += len(seen)
            tally.during += during
            states = {refs.get(a, "NONE") for a in seen}
            if len(states) != 1 or "NONE" in states:
                tally.failures.append(f"a {method} session answered as {sorted(states)} (one complete state expected)")
            tally.per_state.update(f"{method} {refs.get(a, 'NONE')}" for a in seen)


def _cli_reader(root: Path, test_npz: Path, method: str, refs: dict[tuple, str], stop: threading.Event,
                tally: Tally) -> None:
    """``python -m influence query`` in a subprocess, again and again until told to stop."""
    while not stop.is_set():
        proc = subprocess.run([sys.executable, "-m", "influence", *_cli_argv(root, test_npz, method)],
                              env=slow_build_env(0.0), cwd=REPO, capture_output=True, text=True)
        with tally.lock:
            if proc.returncode != 0 or "Traceback" in proc.stderr:
                tally.failures.append(f"CLI exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
                continue
            tally.cli_answers += 1
            state = refs.get(_key(json.loads(proc.stdout)["results"]), "NONE")
            tally.per_state[f"cli {method} {state}"] += 1
            if state == "NONE":
                tally.failures.append("a CLI answer matches no complete state")


def _name(step: dict[str, Any]) -> str:
    return f"index {step['index_factory']}" if "index_factory" in step else f"lambda {step['trak_lambda']}"


def _run(root: Path, digits, ckpts, steps: list[dict[str, Any]], readers: list[str], rounds: int, per_session: int,
         cli: str | None = None, pause: float = 0.0) -> Tally:
    """References of every state first; then one API reader thread per entry of ``readers`` (the method it asks
    for), and a CLI loop asking for method ``cli``, while a writer process runs ``rounds`` builds cycling through
    ``steps``, pausing ``pause`` seconds after each. Readers go on for a second after the writer, so the last state
    is read too."""
    cfg = {"model": CNN_SPEC, "data": str(digits.train_npz), "checkpoints": [str(p) for p in ckpts.paths],
           "out": str(root), "proj_dim": PROJ_DIM, "lrs": ckpts.lrs, "batch": BATCH, "chunk": CHUNK,
           "steps": steps, "rounds": rounds, "pause": pause}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(cfg)], env=slow_build_env(0.0), cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the writer starts up (imports, model) while the references are computed
        return _read_while_writing(root, digits, ckpts, steps, readers, rounds, per_session, cli, writer)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        for pipe in (writer.stdin, writer.stdout, writer.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _read_while_writing(root: Path, digits, ckpts, steps: list[dict[str, Any]], readers: list[str], rounds: int,
                        per_session: int, cli: str | None, writer: subprocess.Popen) -> Tally:
    methods = sorted(set(readers) | ({cli} if cli else set()))
    refs: dict[str, dict[tuple, str]] = {m: {} for m in methods}
    cli_refs: dict[tuple, str] = {}
    for name, step in [("start", None)] + [(_name(s), s) for s in steps]:
        if step is not None:
            _build(root, digits, ckpts, step)
        session = influence.Influence.open(root, trust_store=True)
        for m in methods:
            refs[m].setdefault(_api_answer(session, digits.test_npz, m), name)
        if cli:
            cli_refs.setdefault(_cli_answer_in_process(root, digits.test_npz, cli), name)
    # the start (the fixture: Flat, λ = 1) is one of the steps' states; the steps' states all answer differently
    distinct = {"tracin": len({s.get("index_factory") for s in steps} - {None}), "trak": len({s.get("trak_lambda") for s in steps} - {None})}
    assert all(len(refs[m]) == distinct[m] for m in methods), "two states answer alike: the test checks nothing"
    assert not cli or len(cli_refs) == distinct[cli]
    stop, tally = threading.Event(), Tally()
    threads = [threading.Thread(target=_api_reader, args=(root, digits.test_npz, m, refs[m], stop, tally, per_session))
               for m in readers]
    if cli:
        threads.append(threading.Thread(target=_cli_reader, args=(root, digits.test_npz, cli, cli_refs, stop, tally)))
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "ready"  # started up: the rewrites begin as soon as it is told
        for t in threads:
            t.start()
        time.sleep(0.3 if not cli else 4.0)  # readers are running (a CLI reader has started up) before the first rewrite
        tally.writing.set()
        writer.stdin.write("go\n")
        writer.stdin.flush()
        out, err = writer.communicate(timeout=600)
        tally.writing.clear()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert writer.returncode == 0 and out.split() == [str(i) for i in range(rounds)], err[-2000:]
    return tally


def _report(what: str, tally: Tally) -> None:
    print(f"{what}: {tally.sessions} sessions ({tally.sessions_mid_build} opened mid-build), {tally.answers} API answers ({tally.during} during the writes), "
          f"{tally.cli_answers} CLI answers, per state {dict(sorted(tally.per_state.items()))}, "
          f"refusals {dict(tally.refusals)}, failures {len(tally.failures)}")


def _check(tally: Tally, min_answers: int, min_states: int) -> None:
    assert tally.failures == [], tally.failures[:3]
    assert tally.refusals == Counter() and tally.during >= min_answers, tally
    assert len([s for s in tally.per_state if not s.startswith("cli ")]) >= min_states, f"too few states read: {tally}"


def test_readers_during_index_rewrites_and_lambda_rebuilds_answer_as_a_complete_state(copy_store, digits, cnn_ckpts):
    """8 builds alternating a tracin index rewrite (SQ8, SQ4, Flat; no re-rank) and a TRAK λ rebuild (0.01, 1)."""
    tally = _run(copy_store(), digits, cnn_ckpts, MIXED_STEPS, ["tracin", "trak"], rounds=8, per_session=4)
    _report("8 index rewrites and lambda rebuilds", tally)
    _check(tally, min_answers=20, min_states=3)


@pytest.mark.slow
@pytest.mark.parametrize("label,steps,method,rounds,pause,min_states", [
    ("50 index rewrites", "index", "tracin", 50, 0.3, 3),
    ("31 lambda rebuilds", "lambda", "trak", 31, 0.5, 2),
])
def test_a_thousand_reads_during_rewrites(copy_store, digits, cnn_ckpts, label, steps, method, rounds, pause, min_states):
    tally = _run(copy_store(), digits, cnn_ckpts, {"index": INDEX_STEPS, "lambda": LAMBDA_STEPS}[steps], [method, method],
                 rounds=rounds, per_session=40, cli=method, pause=pause)
    _report(label, tally)
    _check(tally, min_answers=1000, min_states=min_states)
    assert tally.sessions_mid_build > 0 and tally.cli_answers > 0, tally
