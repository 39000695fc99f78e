"""build → store → query: Captum's TracInCP as oracle, brute-force search, kill-and-resume, fingerprints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import TensorDataset

import influence
import tiny_models
from conftest import BATCH, CHUNK, CNN_SPEC, MLP_SPEC, N_TRAIN, PROJ_DIM, SLOW_SPEC, slow_build_cmd, slow_build_env, trusted
from influence.cli import main
from influence.errors import StoreIncompleteError, StoreMismatchError

SCORE_ATOL = 1e-5  # float32 features and float32 scores against Captum's float32 per-example loop


def _status(store: Path) -> str:
    return json.loads((store / "zarr.json").read_text())["attributes"]["status"]


# ----------------------------------------------------------------------------- oracle: Captum TracInCP

@pytest.fixture(scope="module")
def exact_store(digits, cnn_ckpts, tmp_path_factory) -> Path:
    """No projection, float32 features: the store's TracIn must equal Captum's to float tolerance."""
    out = tmp_path_factory.mktemp("exact") / "store"
    influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, out, projector="none", dtype="float32",
                    methods=["tracin"], lr_weights=cnn_ckpts.lrs, batch_size=BATCH, rows_per_chunk=CHUNK, progress=False)
    return out


def test_tracin_equals_captum_tracincp(exact_store, digits, cnn_ckpts):
    from captum.influence import TracInCP

    paths = [str(p) for p in cnn_ckpts.paths]
    lr_of = dict(zip(paths, cnn_ckpts.lrs))

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return lr_of[path]

    oracle = TracInCP(tiny_models.tiny_cnn(), TensorDataset(digits.x, digits.y), checkpoints=paths,
                      checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=BATCH,
                      sample_wise_grads_per_batch=False)  # all layers (layers=None)
    want = oracle.influence((digits.x_test, digits.y_test)).numpy().T  # (n_train, n_test)

    got = influence.Influence.open(exact_store, trust_store=True).scores(digits.x_test, digits.y_test, method="tracin")
    assert got.shape == (N_TRAIN, len(digits.x_test))
    np.testing.assert_allclose(got, want, atol=SCORE_ATOL * np.abs(want).max(), rtol=1e-4)
    # the learning-rate weights matter: unweighted scores would not match
    assert not np.allclose(got, want / cnn_ckpts.lrs[0], atol=SCORE_ATOL * np.abs(want).max())


# ----------------------------------------------------------------------------- search = brute force

@pytest.mark.parametrize("method", ["tracin", "gradcos", "trak"])
def test_query_top_k_equals_brute_force(session, digits, method):
    k = 7
    scores = session.scores(digits.x_test, digits.y_test, method=method)  # streamed over the store, no index
    results = session.query(digits.x_test, digits.y_test, k=k, method=method)
    labels = np.asarray(zarr.open_group(str(session.store.root), mode="r")["labels"][:])
    for t, r in enumerate(results):
        col = scores[:, t]
        tol = 1e-5 * np.abs(col).max()
        for side, found, order in (("proponents", r.proponents, np.argsort(-col, kind="stable")),
                                   ("opponents", r.opponents, np.argsort(col, kind="stable"))):
            ids = np.array([f.train_id for f in found])
            got_scores = np.array([f.score for f in found])
            assert len(found) == k, side
            np.testing.assert_allclose(got_scores, col[order[:k]], atol=tol, err_msg=f"{method} {side} test {t}")
            np.testing.assert_allclose(col[ids], got_scores, atol=tol)
            # ids equal brute force except where two scores tie within float tolerance
            for rank, (i, j) in enumerate(zip(ids, order[:k])):
                assert i == j or abs(col[i] - col[j]) <= tol, (method, side, t, rank)
            assert [f.label for f in found] == labels[ids].tolist()
        assert r.proponents[0].score >= r.proponents[-1].score
        assert r.opponents[0].score <= r.opponents[-1].score


# ----------------------------------------------------------------------------- kill and resume

def test_killed_build_resumes_byte_identical(digits, cnn_ckpts, tmp_path, capsys):
    n = 256  # 8 chunks of 32 rows per checkpoint
    data = tmp_path / "train256.npz"
    reps = -(-n // len(digits.x))
    np.savez(data, x=digits.x.repeat(reps, 1, 1, 1)[:n].numpy(), y=digits.y.repeat(reps)[:n].numpy())
    ckpts = cnn_ckpts.paths[:2]
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    proc = subprocess.Popen(slow_build_cmd(data, ckpts, killed), env=slow_build_env(0.05), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_flag = killed / "done" / "c0" / "c" / "0"  # written only after a whole chunk is
    deadline = time.monotonic() + 120
    while not first_flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "build never wrote a chunk"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    # what a kill leaves behind: a building store, some chunks done, maybe a zarr temp file
    assert _status(killed) == "building"
    done = np.asarray(zarr.open_group(str(killed), mode="r")["done/c0"][:])
    assert 0 < done.sum() < len(done), done
    stale = killed / "features" / "c0" / "c" / "7" / "0.0123456789abcdef.partial"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a chunk")

    # a building store is never served
    with pytest.raises(StoreIncompleteError, match="store incomplete"):
        influence.Influence.open(killed, trust_store=True)
    code = main(trusted(["query", str(killed), "--data", str(digits.test_npz), "--ids", "0", "--json"]))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert "incomplete" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(trusted(["info", str(killed), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "building"

    kept = killed / "features" / "c0" / "c" / "0" / "0"
    kept_inode = kept.stat().st_ino  # zarr replaces a chunk file on every write: same inode = not rewritten

    # same command again: resumes (the OS released the dead writer's lock) and finishes
    rerun = subprocess.run(slow_build_cmd(data, ckpts, killed), env=slow_build_env(0.0), cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _status(killed) == "complete"
    assert not stale.exists()
    assert kept.stat().st_ino == kept_inode, "a chunk flagged done was recomputed instead of resumed"

    influence.build(SLOW_SPEC, str(data), ckpts, clean, proj_dim=64, methods=["tracin"], batch_size=16, rows_per_chunk=32,
                    progress=False)
    a, b = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(clean), mode="r")
    for ckpt in ("c0", "c1"):
        fa, fb = np.asarray(a[f"features/{ckpt}"][:]), np.asarray(b[f"features/{ckpt}"][:])
        assert fa.dtype == np.float16 and fa.shape == (n, 64)
        assert np.array_equal(fa.view(np.uint16), fb.view(np.uint16)), ckpt
        for col in ("loss", "margin", "prob", "loss_weight"):
            assert np.array_equal(np.asarray(a[f"{col}/{ckpt}"][:]), np.asarray(b[f"{col}/{ckpt}"][:])), (ckpt, col)
        files = sorted(p.relative_to(killed) for p in (killed / "features" / ckpt).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(clean) for p in (clean / "features" / ckpt).rglob("*") if p.is_file())
        for f in files:
            assert (killed / f).read_bytes() == (clean / f).read_bytes(), f
    assert np.array_equal(np.asarray(a["labels"][:]), np.asarray(b["labels"][:]))


def test_store_marked_building_is_refused(copy_store, digits, capsys):
    store = copy_store()
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["status"] = "building"
    del g.attrs["integrity"]  # a first build: no earlier complete state to serve meanwhile
    with pytest.raises(StoreIncompleteError, match=r"store incomplete: 9/9 chunks written, status building"):
        influence.Influence.open(store, trust_store=True)
    for cmd in (["query", str(store), "--data", str(digits.test_npz), "--ids", "1"],
                ["score", str(store), "--data", str(digits.test_npz), "--out", str(store.parent / "s.npy")],
                ["self-influence", str(store), "--out", str(store.parent / "si.npy")]):
        assert main(trusted(cmd)) == 2
        out, err = capsys.readouterr()
        assert "incomplete" in err and len(err.strip().splitlines()) == 1, err
    assert not (store.parent / "s.npy").exists()


# ----------------------------------------------------------------------------- fingerprints

def _build_args(spec: str, data: Path, ckpts, out: Path, *extra: str) -> list[str]:
    args = ["build", "--model", spec, "--data", str(data), "--out", str(out), "--proj-dim", str(PROJ_DIM),
            "--batch-size", str(BATCH), "--chunk-rows", str(CHUNK)]
    for c in ckpts:
        args += ["--checkpoint", str(c)]
    return args + list(extra)


@pytest.mark.parametrize(
    "change, needle",
    [("model", "model_fingerprint"), ("projector", "projector"), ("proj-dim", "projector"), ("seed", "projector"),
     ("params", "params"), ("data", "dataset_fingerprint")],
)
def test_store_refuses_other_model_or_projector(change, needle, copy_store, digits, cnn_ckpts, mlp_ckpts, capsys):
    store = copy_store()
    before = (store / "zarr.json").read_bytes()
    spec, ckpts, extra, data = CNN_SPEC, list(cnn_ckpts.paths), [], digits.train_npz
    if change == "model":
        spec, ckpts = MLP_SPEC, list(mlp_ckpts.paths)
    elif change == "projector":
        extra = ["--projector", "gaussian"]
    elif change == "proj-dim":
        extra = ["--proj-dim", str(PROJ_DIM * 2)]
    elif change == "seed":
        extra = ["--seed", "1"]
    elif change == "params":
        extra = ["--params", "last:2"]
    else:
        data = store.parent / "other.npz"
        x, y = digits.x.clone(), digits.y.clone()
        x[0, 0, 0, 0] += 0.5  # one pixel
        np.savez(data, x=x.numpy(), y=y.numpy())
    args = _build_args(spec, data, ckpts, store, *extra)
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "was built with" in lines[0] and needle in lines[0] and "new --out" in lines[0], lines[0]
    # refused before writing anything: the store is untouched and still served
    assert (store / "zarr.json").read_bytes() == before
    assert _status(store) == "complete"


def test_open_with_other_architecture_is_refused(store):
    for other in (tiny_models.tiny_mlp(), influence.models.DigitsCNN(width=8)):
        with pytest.raises(StoreMismatchError, match="does not match the store's model"):
            influence.Influence.open(store, model=other)
    assert influence.Influence.open(store, model=tiny_models.tiny_cnn()).checkpoint_count == 3


def test_extra_checkpoint_extends_a_complete_store(copy_store, digits, cnn_ckpts, tmp_path, capsys):
    store = copy_store()
    state = torch.load(cnn_ckpts.paths[-1], weights_only=True)
    torch.manual_seed(0)
    extra = tmp_path / "extra.pt"
    torch.save({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}, extra)
    old = zarr.open_group(str(store), mode="r")
    old_feats = {c: np.asarray(old[f"features/{c}"][:]) for c in ("c0", "c1", "c2")}

    lrs = ",".join(str(w) for w in cnn_ckpts.lrs + [0.005])
    args = _build_args(CNN_SPEC, digits.train_npz, list(cnn_ckpts.paths) + [extra], store, "--lr-weights", lrs, "--json")
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "complete"
    assert [c["id"] for c in info["checkpoints"]] == ["c0", "c1", "c2", "c3"]
    assert info["checkpoints"][3]["lr_weight"] == 0.005

    session = influence.Influence.open(store, trust_store=True)
    assert session.checkpoint_count == 4
    assert session.index("tracin").spec.dim == 4 * PROJ_DIM
    new = zarr.open_group(str(store), mode="r")
    for c, f in old_feats.items():
        assert np.array_equal(np.asarray(new[f"features/{c}"][:]), f), c  # old features kept, not recomputed
    assert np.abs(np.asarray(new["features/c3"][:])).sum() > 0
    r = session.query(digits.x_test[:2], digits.y_test[:2], k=3)
    assert len(r[0].proponents) == 3


def test_changed_checkpoint_file_is_refused(digits, cnn_ckpts, tmp_path, capsys):
    """A checkpoint whose bytes changed since the build no longer explains the stored features."""
    moved = [tmp_path / f"c{i}.pt" for i in range(3)]
    for src, dst in zip(cnn_ckpts.paths, moved):
        dst.write_bytes(src.read_bytes())
    args = _build_args(CNN_SPEC, digits.train_npz, moved, tmp_path / "s2")
    assert main(args) == 0
    capsys.readouterr()
    state = torch.load(moved[1], weights_only=True)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, moved[1])
    with pytest.raises(influence.BadCheckpointError, match="has changed since the store was built"):
        influence.Influence.open(tmp_path / "s2", trust_store=True)


def test_approximate_index_reranked_from_store_matches_exact(digits, cnn_ckpts, tmp_path):
    """An IVF index's shortlist is re-ranked exactly from the store: same top-k and scores as Flat here."""
    import influence
    from conftest import CNN_SPEC

    results = {}
    for factory in ("Flat", "IVF4,Flat"):
        out = tmp_path / factory.replace(",", "_")
        influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, out, proj_dim=64, lr_weights=cnn_ckpts.lrs,
                        methods=["tracin"], index_factory=factory, progress=False)
        [r] = influence.Influence.open(out, trust_store=True).query(digits.x_test[:1], k=5)
        results[factory] = ([p.train_id for p in r.proponents], [p.score for p in r.proponents])
    assert results["Flat"][0] == results["IVF4,Flat"][0]
    np.testing.assert_allclose(results["Flat"][1], results["IVF4,Flat"][1], rtol=1e-4)


def test_changing_trak_lambda_recomputes_the_inverse_and_index(digits, cnn_ckpts, copy_store):
    """A re-run with another --trak-lambda must not serve the old (ΦᵀΦ + λI)⁻¹."""
    import influence
    from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM

    from influence.scoring import TRAK

    path = copy_store()
    first = influence.Influence.open(path, trust_store=True)
    before = first.scores(digits.x_test[:2], method="trak")
    lam_before = {c: TRAK.stored_lambda(first.store, c).value for c in first.store.checkpoint_ids}
    influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, path, proj_dim=PROJ_DIM, lr_weights=cnn_ckpts.lrs,
                    batch_size=BATCH, rows_per_chunk=CHUNK, trak_lambda=100.0, progress=False)
    session = influence.Influence.open(path, trust_store=True)
    after = session.scores(digits.x_test[:2], method="trak")
    assert not np.allclose(before, after)
    for c, lam in lam_before.items():  # λ is stored once, beside its inverse, and scales with lambda_rel
        assert TRAK.stored_lambda(session.store, c).rel == 100.0
        assert TRAK.stored_lambda(session.store, c).value == pytest.approx(100 * lam, rel=1e-9)
    assert not [k for k in session.store.attrs if "lambda" in k]
    [r] = session.query(digits.x_test[:1], k=3, method="trak")
    assert [p.train_id for p in r.proponents] == list(np.argsort(-after[:, 0], kind="stable")[:3])


def _write_old_unit_inverses(path: Path) -> dict[str, float]:
    """Turn a complete store into one as a build before ``lambda_unit`` made it: every TRAK inverse recomputed with
    λ = 1 · trace/k and written without the unit (through the writer, so the store stays intact); returns the λs."""
    from index.store import FeatureStore

    attrs = FeatureStore.open(path).attrs
    manifest = {k: attrs[k] for k in ("model_fingerprint", "task", "params", "projector", "dataset_fingerprint",
                                      "rows_per_chunk", "n", "k", "dtype")}
    lams = {}
    with FeatureStore.open_for_write(path, manifest) as w:
        for c in w.checkpoint_ids:
            gram = w.read_matrix(f"trak_gram/{c}").astype(np.float64)
            lams[c] = float(np.trace(gram) / w.k)
            inv = np.linalg.inv(gram + lams[c] * np.eye(w.k)).astype(np.float32)
            w.write_matrix(f"trak/{c}", inv, attrs={"lambda_rel": 1.0, "lambda": lams[c], "rows": w.n})
        w.mark_complete()
    return lams


def test_an_inverse_without_its_lambda_unit_is_recomputed_on_rebuild(digits, cnn_ckpts, copy_store):
    """A store whose TRAK inverses predate ``lambda_unit`` (λ = rel · trace/k) still answers queries with them, says
    so in ``info``, and the next build with the same --trak-lambda recomputes them as rel · trace/min(N, k)."""
    from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM

    from influence.scoring import TRAK, TRAK_LAMBDA_UNIT

    path = copy_store()
    fresh = influence.Influence.open(path, trust_store=True)
    new, new_self = fresh.scores(digits.x_test[:2], method="trak"), fresh.self_influence("trak")
    old_lams = _write_old_unit_inverses(path)
    old = influence.Influence.open(path, trust_store=True)
    assert N_TRAIN < PROJ_DIM  # the case where the two units differ, by k/N
    assert {c: TRAK.stored_lambda(old.store, c).unit for c in old_lams} == dict.fromkeys(old_lams, "trace/k")
    assert influence.describe_store(path)["trak"]["lambda_unit"] == "trace/k"
    before = old.scores(digits.x_test[:2], method="trak")  # read as stored: consistent with its own λ
    assert not np.allclose(before, new)
    influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, path, proj_dim=PROJ_DIM, lr_weights=cnn_ckpts.lrs,
                    batch_size=BATCH, rows_per_chunk=CHUNK, progress=False)  # the default --trak-lambda 1, as before
    session = influence.Influence.open(path, trust_store=True)
    for c, lam in old_lams.items():
        done = TRAK.stored_lambda(session.store, c)
        assert (done.rel, done.unit) == (1.0, TRAK_LAMBDA_UNIT)
        assert done.value == pytest.approx(lam * PROJ_DIM / N_TRAIN, rel=1e-9)
    assert influence.describe_store(path)["trak"]["lambda_unit"] == TRAK_LAMBDA_UNIT
    np.testing.assert_allclose(session.scores(digits.x_test[:2], method="trak"), new, rtol=1e-5, atol=1e-6 * np.abs(new).max())
    np.testing.assert_allclose(session.self_influence("trak"), new_self, rtol=1e-5)  # the cache follows the new λ


def test_opponents_answer_the_true_label_when_it_is_known(session, digits):
    """The default: proponents for the predicted class, opponents for the true label when given."""
    x = digits.x_test[:4]
    pred = session.predict(x).argmax(-1)
    labels = ((pred + 1) % 10).tolist()  # labels that disagree with every prediction
    results = session.query(x, labels=labels, k=3)
    by_pred = session.scores(x, pred, method="tracin")
    by_label = session.scores(x, labels, method="tracin")
    for j, r in enumerate(results):
        assert r.target == int(pred[j]) and r.opponents_target == labels[j]
        assert [p.train_id for p in r.proponents] == list(np.argsort(-by_pred[:, j], kind="stable")[:3])
        assert [p.train_id for p in r.opponents] == list(np.argsort(by_label[:, j], kind="stable")[:3])
    explicit = session.query(x, pred, labels=labels, k=3)  # an explicit target keeps both sides on it
    assert all(r.opponents_target == r.target for r in explicit)
