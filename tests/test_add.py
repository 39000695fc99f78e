"""``influence add``: appending rows gives the store a build of all the data would have made.

build(A) + add(B) against build(A ∪ B): the same feature bytes and columns, the same exact top-k, TRAK scores
within 1e-5 relative (its ΦᵀΦ is updated by B's rows, not recomputed); an image folder's classes are mapped by
name and its paths recorded; an unknown class is refused; a killed add leaves the old state readable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

import influence
from conftest import CNN_SPEC, MODELS_FILE, REPO
from index.store import FeatureStore
from influence.cli import main
from influence.scoring import TRAK

N_A = 96  # a multiple of the batch size (see test_add_equals...), not of the chunk: the add completes a short chunk
BATCH, CHUNK, K = 32, 64, 128


def _npz(path: Path, x, y) -> Path:
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def _build(data: Path, ckpts, out: Path, model: str = CNN_SPEC, **kw) -> Path:
    return influence.build(model, str(data), ckpts.paths, out, proj_dim=K, lr_weights=ckpts.lrs, batch_size=BATCH,
                           rows_per_chunk=CHUNK, progress=False, **kw)


@pytest.fixture(scope="module")
def stores(digits, cnn_ckpts, tmp_path_factory):
    """build(A) then add(B), and build(A ∪ B), of the same rows."""
    d = tmp_path_factory.mktemp("add")
    a = _npz(d / "a.npz", digits.x[:N_A], digits.y[:N_A])
    b = _npz(d / "b.npz", digits.x[N_A:], digits.y[N_A:])
    both = _npz(d / "ab.npz", digits.x, digits.y)
    added = _build(a, cnn_ckpts, d / "added")
    gram_reads: list[tuple[int, int | None]] = []
    spied = FeatureStore.read_features

    def spy(self, ckpt, start=0, stop=None):
        gram_reads.append((start, stop))
        return spied(self, ckpt, start, stop)

    gram = TRAK._gram.__func__

    def watched(cls, store, ckpt):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(FeatureStore, "read_features", spy)
            return gram(cls, store, ckpt)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(TRAK, "_gram", classmethod(watched))
        influence.add(added, str(b), trust_store=True, progress=False)
    assert gram_reads and all(start >= N_A for start, _ in gram_reads), gram_reads  # ΦᵀΦ of A is read back, not redone
    return added, _build(both, cnn_ckpts, d / "whole")


def test_add_equals_a_build_of_all_rows(stores, digits):
    """Bit-identical when A's row count is a multiple of the batch size: a short last batch of A was computed by
    build(A) as a short batch, and torch's vectorised kernels (sigmoid of the loss weight) can round its rows
    differently in the last place than in build(A ∪ B)'s full batch; an add keeps the values build(A) wrote."""
    added, whole = (FeatureStore.open(p) for p in stores)
    assert added.n == whole.n == len(digits.y)
    for c in whole.checkpoint_ids:
        assert added.column("features", c).tobytes() == whole.column("features", c).tobytes()
        for name in ("loss", "margin", "prob", "loss_weight"):
            assert np.array_equal(added.column(name, c), whole.column(name, c))
    assert np.array_equal(added.labels(), digits.y.numpy())
    s_add, s_all = (influence.Influence.open(p, trust_store=True) for p in stores)
    x, y = digits.x_test, digits.y_test
    for method in ("tracin", "gradcos", "trak"):
        r_add, r_all = s_add.query(x, y, k=10, method=method), s_all.query(x, y, k=10, method=method)
        for a, w in zip(r_add, r_all):
            assert [p.train_id for p in a.proponents] == [p.train_id for p in w.proponents]
            assert [p.train_id for p in a.opponents] == [p.train_id for p in w.opponents]
        ref = s_all.scores(x, y, method=method, progress=False)
        np.testing.assert_allclose(s_add.scores(x, y, method=method, progress=False), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        if method != "gradcos":
            ref = s_all.self_influence(method, progress=False)
            np.testing.assert_allclose(s_add.self_influence(method, progress=False), ref, rtol=1e-5)
    ids = [0, N_A - 1, N_A, len(digits.y) - 1]  # the session reads training images from both data sets
    xs, ys = s_add.training_examples(ids)
    assert np.array_equal(xs.numpy(), digits.x[ids].numpy()) and ys.tolist() == digits.y[ids].tolist()
    assert s_add.store.attrs["added"][0]["n"] == len(digits.y) - N_A
    assert main(["verify", str(stores[0])]) == 0  # the manifest covers the new state
    from index import integrity

    recorded = integrity.load_manifest(Path(stores[0]), s_add.store.attrs)["files"]
    assert not [f for f in recorded if f.startswith(("features/c0/", "labels/"))]  # not the generation before the add
    assert (Path(stores[0]) / "features" / "c0").is_dir()  # which stays for sessions opened before it


def test_build_with_a_new_checkpoint_covers_the_added_rows(stores, cnn_ckpts, digits, tmp_path):
    """`influence build` with one more checkpoint on an added-to store featurizes every row, the added ones too."""
    import shutil

    out = shutil.copytree(stores[0], tmp_path / "s")
    extra = cnn_ckpts.paths + [cnn_ckpts.paths[0]]  # the first checkpoint again: its rows must come out the same
    influence.build(CNN_SPEC, str(Path(stores[0]).parent / "a.npz"), extra, out, proj_dim=K, lr_weights=cnn_ckpts.lrs + [0.05],
                    batch_size=BATCH, rows_per_chunk=CHUNK, progress=False)
    store = FeatureStore.open(out)
    assert store.checkpoint_ids == ["c0", "c1", "c2", "c3"] and store.n == len(digits.y)
    assert store.column("features", "c3").tobytes() == store.column("features", "c0").tobytes()
    assert np.array_equal(store.labels(), digits.y.numpy())


def test_trak_gram_is_updated_from_the_new_rows_only(stores):
    """The add reads back the stored ΦᵀΦ of A and only B's features: the Gram equals all rows' within rounding."""
    added, whole = (FeatureStore.open(p) for p in stores)
    for c in whole.checkpoint_ids:
        np.testing.assert_allclose(added.read_matrix(f"trak_gram/{c}"), whole.read_matrix(f"trak_gram/{c}"), rtol=1e-12)
        assert added.matrix_attrs(f"trak_gram/{c}")["rows"] == whole.n


def _folder(root: Path, x, y, names: dict[int, str]) -> Path:
    for i, (img, label) in enumerate(zip(x, y)):
        if int(label) in names:
            (root / names[int(label)]).mkdir(parents=True, exist_ok=True)
            Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(root / names[int(label)] / f"i{i:03d}.png")
    return root


def test_image_folder_add_maps_names_and_records_paths(digits, cnn_ckpts, tmp_path, capsys):
    names = {c: f"digit{c}" for c in range(10)}
    a = _npz(tmp_path / "a.npz", digits.x[:N_A], digits.y[:N_A])
    out = _build(a, cnn_ckpts, tmp_path / "s", classes=list(names.values()))
    new = _folder(tmp_path / "new", digits.x[N_A:], digits.y[N_A:], {7: "digit7", 3: "digit3"})
    count = sum(1 for _ in new.rglob("*.png"))
    assert main(["add", str(out), "--data", str(new), "--trust-store", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == N_A + count and info["added"][0]["n"] == count
    session = influence.Influence.open(out, trust_store=True)
    labels = session.training_labels()[N_A:]
    got = [session.train_path(N_A + j) for j in range(count)]
    assert sorted(got) == sorted(p.as_posix() for p in new.rglob("*.png"))  # with the folder given to --data
    assert [session.class_name(int(c)) for c in labels] == [p.split("/")[-2] for p in got]
    assert session.train_path(0) is None  # rows from the .npz have no file

    bad = _folder(tmp_path / "bad", digits.x[N_A:N_A + 8], digits.y[N_A:N_A + 8], {int(c): "zebra" for c in range(10)})
    before = (out / "zarr.json").read_bytes()
    assert main(["add", str(out), "--data", str(bad), "--trust-store"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'zebra' is not one of the store's classes" in err and len(err.splitlines()) == 1
    assert (out / "zarr.json").read_bytes() == before

    big = tmp_path / "big" / "digit3"
    big.mkdir(parents=True)
    Image.new("L", (32, 32)).save(big / "x.png")  # the store's images are 16×16; add has no --size to resize
    assert main(["add", str(out), "--data", str(big.parent), "--trust-store"]) == 2
    err = capsys.readouterr().err.strip()
    assert "32×32 but the store's images are 16×16" in err and "--size" not in err.split(";")[1].split("or build")[0], err
    assert len(err.splitlines()) == 1 and (out / "zarr.json").read_bytes() == before


def test_killed_add_serves_the_old_state_and_a_rerun_completes(digits, cnn_ckpts, tmp_path):
    a = _npz(tmp_path / "a.npz", digits.x[:N_A], digits.y[:N_A])
    b = _npz(tmp_path / "b.npz", digits.x[N_A:], digits.y[N_A:])
    out = _build(a, cnn_ckpts, tmp_path / "s", methods=["tracin"], model=f"{MODELS_FILE}:slow_cnn")
    old = FeatureStore.open(out)
    old_feats = old.column("features", "c0")
    cmd = [sys.executable, "-m", "influence", "add", str(out), "--data", str(b), "--trust-store"]
    env = os.environ | {"INFLUENCE_TEST_DELAY": "0.3", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not json.loads((out / "zarr.json").read_text())["attributes"].get("adding", {}).get("created"):
        time.sleep(0.05)
    time.sleep(0.5)  # into the featurization of the new rows (six forward passes of 0.3 s at least)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attrs["status"] == "building" and attrs["adding"]["created"]
    during = influence.Influence.open(out, trust_store=True)  # the last complete state, whole
    assert during.n_train == N_A and during.store.column("features", "c0").tobytes() == old_feats.tobytes()
    assert len(during.query(digits.x_test[:2], k=3)[0].proponents) == 3
    influence.add(out, str(b), trust_store=True, progress=False)  # the same add again, here (no delay) to save a start-up
    done = FeatureStore.open(out)
    assert done.status == "complete" and done.n == len(digits.y) and "adding" not in done.attrs
    assert done.column("features", "c0")[:N_A].tobytes() == old_feats.tobytes()
    assert during.store.column("features", "c0").tobytes() == old_feats.tobytes()  # a session opened before still reads

    # a second add: its generations switch in, the ones of states readers may still hold stay (swept by a later
    # writer once no kept state names them), nothing else is left behind, and the store verifies
    more = _npz(tmp_path / "c.npz", digits.x_test[:8], digits.y_test[:8])
    influence.add(out, str(more), trust_store=True, progress=False)
    final = FeatureStore.open(out)
    assert final.n == len(digits.y) + 8
    on_disk = sorted(p.name for p in (out / "features").glob("c0*"))
    live = final.matrix_key("features/c0").split("/")[1]
    assert live in on_disk and len(on_disk) == 3, on_disk  # the first generation, the first add's, the second's
    assert main(["verify", str(out)]) == 0


def test_an_approximate_index_is_extended_by_the_new_rows(digits, cnn_ckpts, tmp_path):
    """The add appends the new rows' vectors to each live HNSW index (its graph over A kept, not rebuilt): the index
    holds every row, its vectors of A are the ones build(A) stored, and re-ranked answers equal exact search."""
    a = _npz(tmp_path / "a.npz", digits.x[:N_A], digits.y[:N_A])
    b = _npz(tmp_path / "b.npz", digits.x[N_A:], digits.y[N_A:])
    out = _build(a, cnn_ckpts, tmp_path / "s", index_factory="HNSW32", rerank=64, methods=["tracin", "trak"])
    before = {m: influence.Influence.open(out, trust_store=True).index(m).index.reconstruct_n(0, N_A) for m in ("tracin", "trak")}
    import influence.pipeline as pipeline

    def no_rebuild(*args, **kwargs):
        raise AssertionError("an add rebuilt an approximate index instead of extending it")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "build_method_index", no_rebuild)
        influence.add(out, str(b), trust_store=True, progress=False)
    session = influence.Influence.open(out, trust_store=True)
    for m in ("tracin", "trak"):
        index = session.index(m)
        assert index.index.ntotal == len(digits.y) and index.spec.ntotal == len(digits.y)
        assert np.array_equal(index.index.reconstruct_n(0, N_A), before[m])  # A's vectors kept, not rebuilt
        q = session.query_vectors(digits.x_test[:6], torch.as_tensor(digits.y_test[:6]), m)
        (s_ann, i_ann), (s_ex, i_ex) = index.search(q, 5), session.exact_scan(m).search(q, 5)
        assert np.array_equal(i_ann, i_ex) and np.allclose(s_ann, s_ex, rtol=1e-5, atol=1e-6)
    assert main(["verify", str(out)]) == 0
