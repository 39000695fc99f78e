"""The CLI in-process: outputs of info / self-influence / score / query, and exit 2 with one line on bad input."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CNN_SPEC, N_TRAIN, PROJ_DIM, trusted
from index.store import LOCK_NAME
from influence.cli import main


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main(trusted([str(a) for a in args]))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, args: list, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one ``error: ...`` line on stderr naming the problem, no traceback."""
    code, out, err = run(capsys, *args)
    assert code == 2, (code, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- outputs

def test_info_json(store, cnn_ckpts, capsys):
    code, out, err = run(capsys, "info", store, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["status"] == "complete"
    assert info["n"] == N_TRAIN
    assert info["projector"] == {"kind": "sparse", "k": PROJ_DIM, "seed": 0}
    assert info["k"] == PROJ_DIM
    assert info["trak"]["lambda_rel"] == 1.0 and info["trak"]["lambda_unit"] == "trace/min(n,k)"
    assert sorted(info["trak"]["lambda"]) == [c["id"] for c in info["checkpoints"]]
    assert [c["path"] for c in info["checkpoints"]] == [str(p.resolve()) for p in cnn_ckpts.paths]
    assert [c["lr_weight"] for c in info["checkpoints"]] == cnn_ckpts.lrs
    assert set(info["indexes"]) == {"tracin", "gradcos", "trak"}
    code, out, _ = run(capsys, "info", store)
    assert code == 0 and "status: \"complete\"" in out


def test_self_influence_writes_one_value_per_training_example(store, session, digits, tmp_path, capsys):
    out_path = tmp_path / "self.npy"
    code, out, err = run(capsys, "self-influence", store, "--method", "tracin", "--out", out_path)
    assert code == 0, err
    values = np.load(out_path)
    assert values.shape == (N_TRAIN,)
    assert np.isfinite(values).all() and (values >= 0).all()
    # TracIn self-influence is the score of each training example on itself
    ids = [0, 5, 17, 90]
    diag = session.scores(digits.x[ids], digits.y[ids])[ids, np.arange(len(ids))]
    np.testing.assert_allclose(values[ids], diag, rtol=2e-2)
    code, _, err = run(capsys, "self-influence", store, "--method", "trak", "--out", tmp_path / "trak.npy")
    assert code == 0, err
    assert np.load(tmp_path / "trak.npy").shape == (N_TRAIN,)


def test_self_influence_defaults_to_the_mislabel_ranking_of_flag(store, tmp_path, capsys):
    """Without --method, self-influence writes the score `flag --kind mislabel` ranks by (the final training loss)."""
    code, _, err = run(capsys, "self-influence", store, "--out", tmp_path / "default.npy")
    assert code == 0, err
    assert "(loss)" in err
    code, out, err = run(capsys, "flag", store, "--kind", "mislabel", "--top", "10", "--json")
    assert code == 0, err
    values = np.load(tmp_path / "default.npy")
    top = [f["train_id"] for f in json.loads(out)["mislabel"]]
    assert top == np.argsort(-values, kind="stable")[:10].tolist()
    np.testing.assert_allclose([f["score"] for f in json.loads(out)["mislabel"]], values[top], rtol=1e-6)


# ----------------------------------------------------------------------------- choices and defaults come from the API

def test_every_registered_method_is_a_cli_choice(capsys):
    from influence.attribution import METHODS as ATTRIBUTION
    from influence.cli import _parser
    from influence.flag import KINDS
    from influence.scoring import METHOD_NAMES
    from influence.tfa import TFA_METHODS

    p = _parser()
    for name in METHOD_NAMES:
        assert p.parse_args(["query", "S", "--image", "i.png", "--method", name]).method == name
        assert p.parse_args(["self-influence", "S", "--out", "o.npy", "--method", name]).method == name
        assert p.parse_args(["repair", "--method", name]).method == name
    for name in TFA_METHODS:
        assert p.parse_args(["explain", "S", "--image", "i.png", "--tfa", name]).tfa == name
    for kind in KINDS:
        assert p.parse_args(["flag", "S", "--kind", kind]).kind == kind
    with pytest.raises(SystemExit):
        main(["attribute", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in ATTRIBUTION)


def test_cli_defaults_are_the_api_defaults():
    import inspect

    from influence.cli import _parser
    from influence.demo.retrain import run_repair
    from influence.explain import explain
    from influence.pipeline import build
    from influence.query import Influence

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    p = _parser()
    repair = p.parse_args(["repair"])
    assert repair.method is default(run_repair, "method") is None  # resolved as flag resolves it, in one place
    assert (repair.action, repair.fraction, repair.mask_scope) == (
        default(run_repair, "action"), default(run_repair, "mislabel_fraction"), default(run_repair, "mask_scope"))
    built = p.parse_args(["build", "--model", "m", "--data", "d", "--checkpoint", "c", "--out", "o"])
    assert (built.projector, built.proj_dim, built.dtype, built.chunk_rows, built.trak_lambda, built.index) == (
        default(build, "projector"), default(build, "proj_dim"), default(build, "dtype"), default(build, "rows_per_chunk"),
        default(build, "trak_lambda"), default(build, "index_factory"))
    assert p.parse_args(["query", "S", "--image", "i.png"]).k == default(Influence.query, "k")
    ex = p.parse_args(["explain", "S", "--image", "i.png"])
    assert (ex.k, ex.method, ex.attribution) == (default(explain, "k"), default(explain, "method"), default(explain, "attribution"))


def test_score_writes_train_by_test_matrix(store, session, digits, tmp_path, capsys):
    out_path = tmp_path / "scores.npy"
    code, _, err = run(capsys, "score", store, "--data", digits.test_npz, "--out", out_path, "--target", "label")
    assert code == 0, err
    scores = np.load(out_path)
    assert scores.shape == (N_TRAIN, len(digits.x_test))
    np.testing.assert_allclose(scores, session.scores(digits.x_test, digits.y_test), rtol=1e-5, atol=1e-6)
    code, _, err = run(capsys, "score", store, "--data", digits.test_npz, "--ids", "0,3", "--method", "trak",
                       "--out", out_path)
    assert code == 0, err
    assert np.load(out_path).shape == (N_TRAIN, 2)


def test_query_json_is_one_document(store, session, digits, capsys):
    code, out, err = run(capsys, "query", store, "--data", digits.test_npz, "--ids", "2,4", "--k", "4", "--json",
                         "--target", "label")
    assert code == 0, err
    doc = json.loads(out)  # the whole of stdout is one JSON document
    assert doc["method"] == "tracin"
    assert [r["test_id"] for r in doc["results"]] == [2, 4]
    labels = session.store.labels()
    for r, t in zip(doc["results"], (2, 4)):
        assert r["target"] == r["label"] == int(digits.y_test[t])
        for side in ("proponents", "opponents"):
            assert len(r[side]) == 4
            for item in r[side]:
                assert set(item) == {"train_id", "score", "label", "label_name", "path"}
                assert 0 <= item["train_id"] < N_TRAIN and item["label"] == labels[item["train_id"]]
                # an .npz without a 'classes' array: the names are the indices, and rows have no file
                assert item["label_name"] == str(item["label"]) and item["path"] is None
        assert r["target_name"] == r["label_name"] == str(r["label"]) and r["test_path"] is None
        pro = [p["score"] for p in r["proponents"]]
        opp = [p["score"] for p in r["opponents"]]
        assert pro == sorted(pro, reverse=True) and opp == sorted(opp)
    api = session.query(digits.x_test[[2]], digits.y_test[[2]], k=4)[0]
    assert [p["train_id"] for p in doc["results"][0]["proponents"]] == [p.train_id for p in api.proponents]


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_query_image(store, digits, tmp_path, capsys, suffix):
    from PIL import Image

    img = tmp_path / f"test{suffix}"
    arr = digits.x_test[0, 0].numpy()
    if suffix == ".png":
        Image.fromarray((arr * 255).round().astype(np.uint8), mode="L").save(img)
    else:
        np.save(img, arr)
    code, out, err = run(capsys, "query", store, "--image", img, "--k", "3", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    assert len(result["proponents"]) == 3 and result["test_id"] is None


def test_plain_query_output(store, digits, capsys):
    code, out, err = run(capsys, "query", store, "--data", digits.test_npz, "--ids", "1", "--k", "2")
    assert code == 0, err
    assert out.startswith("test 1: predicted") and "proponents:" in out and "opponents of " in out


# ----------------------------------------------------------------------------- bad input → exit 2, one line

@pytest.fixture
def build_args(digits, cnn_ckpts, tmp_path):
    """``build`` argv for a tiny run into a fresh folder, with data / checkpoint overridable."""

    def make(data: object = None, checkpoint: object = None, model: str = CNN_SPEC, *extra: str) -> list:
        return ["build", "--model", model, "--data", data or digits.train_npz,
                "--checkpoint", checkpoint or cnn_ckpts.paths[-1], "--out", tmp_path / "out",
                "--proj-dim", "32", "--batch-size", "32", "--method", "tracin", *extra]

    return make


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_missing_checkpoint(build_args, tmp_path, capsys):
    assert_refused(capsys, build_args(checkpoint=tmp_path / "nope.pt"), "nope.pt", "does not exist")
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoints(build_args, cnn_ckpts, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_refused(capsys, build_args(checkpoint=garbage), "garbage.pt", "corrupt")
    truncated = tmp_path / "truncated.pt"
    blob = cnn_ckpts.paths[-1].read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    assert_refused(capsys, build_args(checkpoint=truncated), "truncated.pt", "corrupt")
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_refused(capsys, build_args(checkpoint=bad_st), "garbage.safetensors", "corrupt")
    not_state = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_state)
    assert_refused(capsys, build_args(checkpoint=not_state), "list.pt", "state dict")


def test_checkpoint_of_another_architecture(build_args, mlp_ckpts, capsys):
    assert_refused(capsys, build_args(checkpoint=mlp_ckpts.paths[-1]), "does not match the model's architecture")


def test_checkpoint_with_nan_weights(build_args, cnn_ckpts, tmp_path, capsys):
    state = torch.load(cnn_ckpts.paths[-1], weights_only=True)
    state["head.3.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    assert_refused(capsys, build_args(checkpoint=path), "nan")


@pytest.mark.parametrize(
    "case, needles",
    [
        ("flat-x", ["images must have shape"]),
        ("string-x", ["numeric"]),
        ("object-x", ["unreadable"]),
        ("float-labels", ["labels must be integers"]),
        ("label-range", ["must lie in [0, 10)"]),
        ("nan-x", ["nan"]),
        ("empty", ["empty"]),
        ("no-y", ["'x' and 'y'"]),
        ("wrong-image-size", ["shape"]),
        ("not-npz", ["unreadable"]),
    ],
)
def test_bad_data(case, needles, build_args, digits, tmp_path, capsys):
    x, y = digits.x.numpy(), digits.y.numpy()
    path = tmp_path / f"{case}.npz"
    if case == "flat-x":
        _npz(path, x=np.arange(len(y), dtype=np.float32), y=y)
    elif case == "string-x":
        _npz(path, x=np.array(["a", "b", "c"]), y=np.array([0, 1, 2]))
    elif case == "object-x":
        _npz(path, x=np.array([np.zeros(3), "a"], dtype=object), y=np.array([0, 1]))
    elif case == "float-labels":
        _npz(path, x=x, y=y.astype(np.float32))
    elif case == "label-range":
        _npz(path, x=x, y=np.where(np.arange(len(y)) == 40, 12, y))
    elif case == "nan-x":
        bad = x.copy()
        bad[37, 0, 3, 3] = np.nan
        _npz(path, x=bad, y=y)
    elif case == "empty":
        _npz(path, x=np.zeros((0, 1, 16, 16), np.float32), y=np.zeros(0, np.int64))
    elif case == "no-y":
        _npz(path, x=x)
    elif case == "wrong-image-size":
        _npz(path, x=np.zeros((8, 1, 12, 12), np.float32), y=np.zeros(8, np.int64))
    else:
        path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    assert_refused(capsys, build_args(data=path), *needles)
    assert not (tmp_path / "out" / "zarr.json").exists() or json.loads(
        (tmp_path / "out" / "zarr.json").read_text())["attributes"]["status"] == "building"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model", "no-such-model"], ["unknown model spec 'no-such-model'"]),
        (["--model", "no_such_package.mod:factory"], ["cannot import"]),
        (["--data", "no-such-data"], ["unknown data spec 'no-such-data'"]),
        (["--method", "shapley"], ["unknown method", "tracin"]),
        (["--projector", "dense"], ["invalid choice", "sparse"]),
        (["--params", "last:99"], ["--params"]),
        (["--proj-dim", "0"], ["--proj-dim"]),
        (["--lr-weights", "0.1,0.2"], ["--lr-weights"]),
    ],
)
def test_bad_specs(args, needles, build_args, capsys):
    argv = build_args()
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert_refused(capsys, argv, *needles)


def test_bad_query_inputs(store, digits, tmp_path, capsys):
    bad_png = tmp_path / "broken.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert_refused(capsys, ["query", store, "--image", bad_png], "broken.png", "unreadable")
    assert_refused(capsys, ["query", store, "--image", tmp_path / "missing.png"], "missing.png", "does not exist")
    assert_refused(capsys, ["query", store, "--data", digits.test_npz, "--ids", "0", "--method", "shapley"],
                   "invalid choice")
    assert_refused(capsys, ["query", store, "--data", digits.test_npz, "--ids", "0,99"], "out of range")
    assert_refused(capsys, ["query", store, "--data", digits.test_npz, "--ids", "0", "--k", "0"], "--k")
    assert_refused(capsys, ["query", store, "--data", digits.test_npz, "--ids", "0", "--target", "11"], "--target", "11", "index 0..9")
    assert_refused(capsys, ["query", tmp_path, "--data", digits.test_npz], "not an influence store")
    assert_refused(capsys, ["self-influence", store, "--method", "gradcos", "--out", tmp_path / "x.npy"],
                   "gradcos", "constant", "use --method loss or combined or trak or tracin")
    assert_refused(capsys, ["self-influence", store, "--method", "shapley", "--out", tmp_path / "x.npy"],
                   "invalid choice")
    assert_refused(capsys, ["frobnicate"], "invalid choice")


def test_second_writer_is_refused(build_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        assert_refused(capsys, build_args(), f"locked by pid {os.getpid()}")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    code, _, err = run(capsys, *build_args())  # once released, the same command works
    assert code == 0, err


class _Payload:
    """A pickle that runs code on load: ``os.mkdir(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_in_checkpoint_is_refused_and_never_runs(build_args, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(marker)}, evil)
    # the payload is live: an unsafe load would run it
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.rmdir()

    assert_refused(capsys, build_args(checkpoint=evil), "evil.pt")
    assert not marker.exists()
    # an environment variable that turns off torch's *default* weights_only must not matter
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert_refused(capsys, build_args(checkpoint=evil), "evil.pt")
    assert not marker.exists()

    with_function = tmp_path / "function.pt"
    torch.save({"weight": torch.zeros(3), "hook": os.getcwd}, with_function)
    assert_refused(capsys, build_args(checkpoint=with_function), "function.pt")
