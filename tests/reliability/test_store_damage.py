"""A damaged complete store is refused with one named error, never answered: deleted chunks, edited or
bit-flipped metadata, a matrix rewritten under an open session, and ``influence verify``'s verdicts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import influence
from conftest import BATCH, CHUNK, CNN_SPEC, PROJ_DIM, trusted
from index.errors import InfluenceError, StoreDamagedError
from index.store import FeatureStore
from influence.cli import main

COLUMNS = ("loss", "margin", "prob", "loss_weight")


def _chunk_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and "/c/" in p.relative_to(root).as_posix())


def _read_everything(path: Path) -> None:
    """Every read the query engine makes, over every row."""
    store = FeatureStore.open(path)
    store.labels()
    for c in store.checkpoint_ids:
        store.done(c)
        store.read_features(c)
        store.read_rows(c, np.arange(store.n))
        for col in COLUMNS:
            store.column(col, c)
        store.read_matrix(f"trak/{c}")
        store.read_matrix(f"trak_gram/{c}")  # read by the next add
    for method in ("tracin", "trak"):  # the self-influence caches written at build time
        store.read_matrix(f"self_influence/{method}")


def _refused(capsys, argv: list, *needles: str) -> str:
    code = main(trusted([str(a) for a in argv]))
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_every_deleted_chunk_file_is_an_error_never_a_fill_value(copy_store):
    root = copy_store()
    _read_everything(root)  # intact: every read works
    files = _chunk_files(root)
    # 3 checkpoints × (features + 4 columns + done flag) × 3 row chunks, labels × 3, trak and its ΦᵀΦ × 3, self-influence × 2
    assert len(files) == 3 * 6 * 3 + 3 + 3 + 3 + 2, files
    refused = []
    for rel in files:
        aside = root / "aside"
        shutil.move(root / rel, aside)
        try:
            with pytest.raises(StoreDamagedError) as e:
                _read_everything(root)
            assert rel in str(e.value) and str(root) in str(e.value), (rel, str(e.value))
            refused.append(rel)
        finally:
            shutil.move(aside, root / rel)
    assert refused == files


def _answers(stdout: str) -> list:
    doc = json.loads(stdout)
    return [{k: v for k, v in r.items() if k != "search_ms"} for r in doc["results"]]


@pytest.mark.parametrize("rel,method", [("features/c0/c/1/0", "tracin"), ("labels/c/2", "tracin"),
                                        ("loss_weight/c2/c/0", "tracin"), ("loss_weight/c1/c/0", "trak")])
def test_cli_query_and_score_refuse_a_deleted_chunk(store, copy_store, digits, tmp_path, capsys, rel, method):
    """``score`` reads every chunk: refused. ``query`` searches the (verified) FAISS index: it is refused when it
    needs the missing file, and otherwise must give exactly the intact store's answer."""
    query = ["query", None, "--data", digits.test_npz, "--ids", "0,1,2", "--method", method, "--json"]
    assert main(trusted([str(a) for a in [query[0], store, *query[2:]]])) == 0
    intact = _answers(capsys.readouterr().out)
    root = copy_store()
    (root / rel).unlink()
    code = main(trusted([str(a) for a in [query[0], root, *query[2:]]]))
    out, err = capsys.readouterr()
    if code == 2:
        assert out == "" and len(err.strip().splitlines()) == 1 and rel in err and "damaged" in err, err
    else:
        assert code == 0 and _answers(out) == intact, (code, err)
    if rel.startswith("labels"):  # scores never read labels: the intact answer
        assert main(trusted(["score", str(root), "--data", str(digits.test_npz), "--method", method, "--out", str(tmp_path / "s.npy")])) == 0
        assert main(trusted(["score", str(store), "--data", str(digits.test_npz), "--method", method, "--out", str(tmp_path / "t.npy")])) == 0
        np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.load(tmp_path / "t.npy"))
    else:
        _refused(capsys, ["score", root, "--data", digits.test_npz, "--method", method, "--out", tmp_path / "s.npy"], rel)
        assert not (tmp_path / "s.npy").exists()


def test_cli_query_refuses_a_deleted_label_chunk(copy_store, digits, capsys):
    root = copy_store()
    (root / "labels/c/0").unlink()  # every query reports its influencers' labels
    _refused(capsys, ["query", root, "--data", digits.test_npz, "--ids", "0"], "labels/c/0", "damaged")


def test_a_corrupted_chunk_is_refused_with_one_line(copy_store, digits, tmp_path, capsys):
    root = copy_store()
    chunk = root / "features/c1/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))  # same size: only the crc32c codec can tell
    _refused(capsys, ["score", root, "--data", digits.test_npz, "--out", tmp_path / "s.npy"], "features/c1", "damaged")


def _edit_attrs(root: Path, edit) -> None:
    doc = json.loads((root / "zarr.json").read_text())
    edit(doc["attributes"])
    (root / "zarr.json").write_text(json.dumps(doc, indent=2))


EDITS = {
    "projection seed 0 -> 1": lambda a: a["projector"].__setitem__("seed", a["projector"]["seed"] + 1),
    "lr_weight key renamed": lambda a: a["checkpoints"][1].__setitem__("lr_veight", a["checkpoints"][1].pop("lr_weight")),
    "lr_weight changed": lambda a: a["checkpoints"][0].__setitem__("lr_weight", 1.0),
    "num_classes": lambda a: a.__setitem__("num_classes", 9),
    "index record": lambda a: a["indexes"]["tracin"].__setitem__("factory", "IVF1,Flat"),
    "params": lambda a: a.__setitem__("params", "last:1"),
    "integrity record dropped": lambda a: a.pop("integrity"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edited_answer_changing_attributes_are_refused(copy_store, digits, capsys, name):
    root = copy_store()
    _edit_attrs(root, EDITS[name])
    with pytest.raises(StoreDamagedError, match="damaged"):
        influence.Influence.open(root, trust_store=True)
    _refused(capsys, ["query", root, "--data", digits.test_npz, "--ids", "0"], str(root))


def test_edited_trak_lambda_in_an_array_header_is_refused(copy_store):
    root = copy_store()
    header = root / FeatureStore.open(root).matrix_key("trak/c0") / "zarr.json"
    doc = json.loads(header.read_text())
    doc["attributes"]["lambda_rel"] = 0.5
    header.write_text(json.dumps(doc, indent=2))
    with pytest.raises(StoreDamagedError, match=r"trak/c0\.[0-9a-f]+/zarr.json"):
        FeatureStore.open(root)


def _flip_trial(root: Path, original: bytes, attrs: dict, bit: int) -> str:
    """Flip one bit of the root zarr.json: 'unparsed, refused', 'refused', 'same' (the store serves exactly the
    original attributes) or 'ACCEPTED-CHANGED' (it serves others: answers could change silently)."""
    data = bytearray(original)
    data[bit // 8] ^= 1 << (bit % 8)
    (root / "zarr.json").write_bytes(bytes(data))
    try:
        json.loads(bytes(data))
        parsed = True
    except ValueError:
        parsed = False
    try:
        served = FeatureStore.open(root).attrs  # anything but an InfluenceError (exit 2) fails the test
    except InfluenceError:
        return "refused" if parsed else "unparsed, refused"
    strip = lambda a: {k: v for k, v in a.items() if k != "integrity"}  # noqa: E731
    return "same" if strip(served) == strip(attrs) else "ACCEPTED-CHANGED"


def _flips(root: Path, bits: list[int]) -> dict[str, int]:
    original = (root / "zarr.json").read_bytes()
    attrs = json.loads(original)["attributes"]
    counts: dict[str, int] = {}
    try:
        for bit in bits:
            outcome = _flip_trial(root, original, attrs, bit)
            counts[outcome] = counts.get(outcome, 0) + 1
    finally:
        (root / "zarr.json").write_bytes(original)
    return counts


def test_single_bit_flips_in_root_metadata_never_change_answers_silently(copy_store):
    root = copy_store()
    size = (root / "zarr.json").stat().st_size
    bits = random.Random(0).sample(range(size * 8), 300)
    counts = _flips(root, bits)
    assert counts.get("ACCEPTED-CHANGED", 0) == 0, counts
    assert counts.get("refused", 0) > 0, counts  # some flips parse: the check is exercised


@pytest.mark.slow
def test_every_single_bit_flip_in_root_metadata(copy_store):
    root = copy_store()
    counts = _flips(root, list(range((root / "zarr.json").stat().st_size * 8)))
    print("root zarr.json single-bit flips:", counts)
    assert counts.get("ACCEPTED-CHANGED", 0) == 0, counts


def test_sessions_opened_before_a_lambda_rebuild_keep_the_old_lambda_whole(copy_store, digits, cnn_ckpts):
    root = copy_store()
    x, y = digits.x_test[:4], digits.y_test[:4]
    before = influence.Influence.open(root, trust_store=True)
    old = before.scores(x, y, method="trak")
    query_old = [[p.train_id for p in r.proponents] for r in before.query(x, y, method="trak")]
    untouched = influence.Influence.open(root, trust_store=True)  # opened before, first TRAK read after the rebuild
    influence.build(CNN_SPEC, str(digits.train_npz), cnn_ckpts.paths, root, projector="sparse", proj_dim=PROJ_DIM,
                    lr_weights=cnn_ckpts.lrs, batch_size=BATCH, rows_per_chunk=CHUNK, trak_lambda=0.01, progress=False)
    new = influence.Influence.open(root, trust_store=True).scores(x, y, method="trak")
    assert not np.allclose(new, old, rtol=1e-3), "the rebuild did not change TRAK scores: the test checks nothing"
    # the session that had read its matrices keeps answering with the old λ, whole
    np.testing.assert_array_equal(before.scores(x, y, method="trak"), old)
    assert [[p.train_id for p in r.proponents] for r in before.query(x, y, method="trak")] == query_old
    # one that had not read them yet reads the old generation, still beside the new one
    np.testing.assert_array_equal(untouched.scores(x, y, method="trak"), old)


def _verify(capsys, root: Path) -> tuple[int, list[str], str]:
    code = main(trusted(["verify", str(root)]))
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def test_verify_prints_one_verdict_per_artifact(copy_store, capsys, cnn_ckpts):
    root = copy_store()
    code, lines, err = _verify(capsys, root)
    assert code == 0 and err == "", err
    artifacts = [ln.split(" ", 1)[1].split(":")[0].strip() for ln in lines]
    for want in ["metadata", "features/c0", "features/c2", "labels", FeatureStore.open(root).matrix_key("trak/c1"), "done/c0",
                 "index tracin", "index trak", "checkpoint c0", "checkpoint c2"]:  # exact indexes: the verified rows
        assert want in artifacts, (want, artifacts)
    assert all(ln.startswith("ok") for ln in lines), lines

    chunk = root / "done/c1/c/0"  # a flag flipped on the same size: no codec guards it, the manifest does
    chunk.write_bytes(bytes(b ^ 1 for b in chunk.read_bytes()))
    code, lines, err = _verify(capsys, root)
    assert code == 2
    assert [ln for ln in lines if ln.startswith("FAIL")] == [next(ln for ln in lines if ln.startswith("FAIL metadata"))], lines
    assert len(err.strip().splitlines()) == 1 and "fails verification" in err

    (root / "done/c1/c/0").write_bytes(bytes(b ^ 1 for b in chunk.read_bytes()))  # restore the flag
    feat = root / "features/c2/c/2/0"
    data = bytearray(feat.read_bytes())
    data[7] ^= 4
    feat.write_bytes(bytes(data))
    code, lines, _ = _verify(capsys, root)
    failed = sorted(ln.split(":")[0] for ln in lines if ln.startswith("FAIL"))
    assert code == 2 and failed == ["FAIL features/c2"], lines


def test_verify_refuses_an_incomplete_store(copy_store, capsys):
    root = copy_store()
    zarr.open_group(str(root), mode="r+").attrs["status"] = "building"
    code, lines, _ = _verify(capsys, root)
    assert code == 2 and lines == ["FAIL metadata: status is 'building', not 'complete': re-run the build to finish it"]


@pytest.mark.slow
def test_every_deleted_chunk_through_the_cli(store, copy_store, digits, tmp_path, capsys):
    """Each chunk file deleted in turn; ``query`` and ``score`` for every method: exit 2 with one line naming the
    file, or exit 0 with exactly the intact store's answer. Prints the counts quoted in docs/RELIABILITY.md."""
    import contextlib
    import io

    def run(root: Path, argv: list) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(trusted([str(a) for a in [argv[0], root, *argv[1:]]]))
        return code, out.getvalue(), err.getvalue()

    commands = []
    for method in ("tracin", "gradcos", "trak"):
        commands.append(["query", "--data", digits.test_npz, "--ids", "0,3,7", "--method", method, "--json"])
        commands.append(["score", "--data", digits.test_npz, "--ids", "0,3,7", "--method", method, "--out", tmp_path / "s.npy"])
    intact = []
    for cmd in commands:
        code, out, _ = run(store, cmd)
        assert code == 0
        intact.append(_answers(out) if cmd[0] == "query" else np.load(tmp_path / "s.npy"))
    root = copy_store()
    counts = {"cases": 0, "exit 2, one line naming the file": 0, "exit 0, intact answer": 0}
    for rel in _chunk_files(root):
        shutil.move(root / rel, root / "aside")
        try:
            for cmd, want in zip(commands, intact):
                (tmp_path / "s.npy").unlink(missing_ok=True)
                code, out, err = run(root, cmd)
                counts["cases"] += 1
                if code == 2:
                    assert out == "" and err.count("\n") == 1 and rel in err and "Traceback" not in err, (rel, cmd, err)
                    counts["exit 2, one line naming the file"] += 1
                else:
                    assert code == 0, (rel, cmd, code, err)
                    got = _answers(out) if cmd[0] == "query" else np.load(tmp_path / "s.npy")
                    assert (got == want) if cmd[0] == "query" else np.array_equal(got, want), (rel, cmd)
                    counts["exit 0, intact answer"] += 1
        finally:
            shutil.move(root / "aside", root / rel)
    print("deleted chunk files through the CLI:", counts)
    assert counts["exit 2, one line naming the file"] > 0


def test_a_store_being_extended_serves_its_last_complete_state(store, copy_store, digits, cnn_ckpts, capsys):
    """A writer part-way through adding a checkpoint (status building, a new record, indexes cleared): readers
    opening now get the three-checkpoint store whole, with exactly its answers, not "incomplete"."""
    x, y = digits.x_test[:5], digits.y_test[:5]
    intact = influence.Influence.open(store, trust_store=True)
    want_scores = intact.scores(x, y, method="trak")
    want_query = [r.to_json() | {"search_ms": 0} for r in intact.query(x, y, method="tracin")]
    root = copy_store()
    attrs = FeatureStore.open(root).attrs
    labels = FeatureStore.open(root).labels()
    manifest = {k: attrs[k] for k in ("model_fingerprint", "task", "params", "projector", "dataset_fingerprint",
                                      "rows_per_chunk", "n", "k", "dtype")}
    with FeatureStore.open_for_write(root, manifest) as writer:
        ckpt = writer.add_checkpoint({"path": str(cnn_ckpts.paths[0]), "sha256": "0" * 64, "size": 1, "lr_weight": 1.0})
        writer.set_attrs(indexes={})
        writer.write_chunk(ckpt, 0, np.ones((CHUNK, writer.k), np.float32), labels[:CHUNK])  # labels rewritten as they are
        session = influence.Influence.open(root, trust_store=True)
        assert session.checkpoint_count == 3 and session.store.status == "complete"
        np.testing.assert_array_equal(session.scores(x, y, method="trak"), want_scores)
        assert [r.to_json() | {"search_ms": 0} for r in session.query(x, y, method="tracin")] == want_query
        assert main(trusted(["info", str(root), "--json"])) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "building"  # `info` tells the truth
        # what a writer changes in place is refused, never mixed in, even at the same size with a valid crc32c
        writer.write_chunk(ckpt, 1, np.ones((CHUNK, writer.k), np.float32), labels[CHUNK:2 * CHUNK][::-1].copy())
        with pytest.raises(StoreDamagedError, match="labels/c/1"):
            influence.Influence.open(root, trust_store=True).training_labels()
        # the session opened before had read its labels already: it keeps answering from the old state, whole
        assert [r.to_json() | {"search_ms": 0} for r in session.query(x, y, method="tracin")] == want_query
