"""A real user's data and model: a PNG class folder (two resolutions, one grayscale), a model file importing its
sibling, checkpoints saved as ``{'net': sd}`` and with DataParallel's ``module.`` prefix.

Covers class names and file paths in every output, test folders mapped by class name, recorded preprocessing
(``--mean/--std/--size/--channels``), size and channel mismatches, checkpoint layouts and ``--model-arg``.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import trusted
from influence.cli import main
from influence.errors import BadCheckpointError, BadSpecError
from influence.loading import load_checkpoint, load_model, parse_model_args

CLASSES = ["one", "three", "two"]  # sorted folder names: label order of a store built without --classes
SIZE = 8
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

LAYERS_PY = """
from torch import nn


def block(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())
"""

MODEL_PY = """
from torch import nn

from userdata_layers import block  # a sibling module, imported as a script would import it


class Net(nn.Module):
    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.features = block(3, width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def make_model(width: int = 4, num_classes: int = 3) -> nn.Module:
    return Net(width, num_classes)
"""


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main(trusted([str(a) for a in args]))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args: object) -> str:
    """Exit 2 with exactly one ``error:`` line and nothing on stdout; returns the line."""
    code, out, err = run(capsys, *args)
    assert code == 2, (code, err)
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _pattern(c: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Class ``c``: a bright square in its own corner on noise, RGB uint8 (size, size, 3)."""
    img = rng.uniform(0, 60, (size, size, 3))
    q = size // 2
    r0, c0 = [(0, 0), (q, q), (0, q)][c]
    img[r0:r0 + q, c0:c0 + q, c] = 230
    return img.astype(np.uint8)


def _write_folder(root: Path, per_class: dict[str, int], rng: np.random.Generator, odd: bool) -> None:
    """PNGs per class; with ``odd`` the first ``three`` is 12×12 and the first ``two`` grayscale."""
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for j in range(count):
            size = 12 if odd and name == "three" and j == 0 else SIZE
            img = Image.fromarray(_pattern(CLASSES.index(name), rng, size))
            if odd and name == "two" and j == 0:
                img = img.convert("L")
            img.save(root / name / f"img_{j:02d}.png")


def _read_rgb(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A uniform (all 8×8 RGB) folder read by hand, sorted as folders are: x in [0, 1], y, relative paths."""
    xs, ys, paths = [], [], []
    for c, name in enumerate(sorted(p.name for p in folder.iterdir())):
        for f in sorted((folder / name).iterdir()):
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
            ys.append(CLASSES.index(name))
            paths.append(f"{name}/{f.name}")
    return np.stack(xs), np.array(ys), paths


@dataclass(frozen=True)
class UserSetup:
    root: Path
    model_spec: str  # path/to/mymodel.py:make_model
    train: Path  # mixed folder: one 12×12 image, one grayscale
    uniform: Path  # all 8×8 RGB
    test: Path  # all three classes
    test_missing: Path  # lacks "one"
    test_unknown: Path  # has "four"
    net_ckpt: Path  # {'net': sd}
    dp_ckpt: Path  # DataParallel keys: module.*
    state: dict[str, torch.Tensor]  # the weights saved in net_ckpt


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> UserSetup:
    root = tmp_path_factory.mktemp("user")
    code = root / "code"
    code.mkdir()
    (code / "userdata_layers.py").write_text(textwrap.dedent(LAYERS_PY))
    (code / "userdata_model.py").write_text(textwrap.dedent(MODEL_PY))
    rng = np.random.default_rng(0)
    _write_folder(root / "train", {n: 6 for n in CLASSES}, rng, odd=True)
    _write_folder(root / "uniform", {n: 6 for n in CLASSES}, rng, odd=False)
    _write_folder(root / "test", {n: 2 for n in CLASSES}, rng, odd=False)
    _write_folder(root / "test_missing", {"three": 3, "two": 1}, rng, odd=False)
    _write_folder(root / "test_unknown", {"three": 1}, rng, odd=False)
    Image.fromarray(_pattern(0, rng, SIZE)).save(root / "test_unknown" / "three" / "extra.png")
    (root / "test_unknown" / "four").mkdir()
    Image.fromarray(_pattern(0, rng, SIZE)).save(root / "test_unknown" / "four" / "x.png")

    spec = f"{code / 'userdata_model.py'}:make_model"
    model = load_model(spec)
    x, y, _ = _read_rgb(root / "uniform")
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"net": sd, "epoch": 30}, root / "net.pt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, root / "dp.pt")
    return UserSetup(root, spec, root / "train", root / "uniform", root / "test", root / "test_missing", root / "test_unknown",
                     root / "net.pt", root / "dp.pt", sd)


def _build(capsys, user: UserSetup, data: Path | str, out: Path, *extra: object) -> dict:
    code, stdout, err = run(capsys, "build", "--model", user.model_spec, "--data", data, "--checkpoint", user.net_ckpt,
                            "--checkpoint", user.dp_ckpt, "--out", out, "--proj-dim", 64, "--batch-size", 6, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


@pytest.fixture(scope="module")
def mixed_store(user, tmp_path_factory) -> Path:
    """The mixed folder built with --size 8,8 --channels 3 (the only way it builds)."""
    out = tmp_path_factory.mktemp("stores") / "mixed"
    assert main(["build", "--model", user.model_spec, "--data", str(user.train), "--checkpoint", str(user.net_ckpt),
                 "--checkpoint", str(user.dp_ckpt), "--out", str(out), "--proj-dim", "64", "--batch-size", "6",
                 "--size", "8,8", "--channels", "3"]) == 0
    return out


# ----------------------------------------------------------------------------- names and paths

def test_store_records_names_paths_and_preprocessing(mixed_store, capsys):
    code, out, err = run(capsys, "info", mixed_store, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["classes"] == CLASSES
    assert info["preprocessing"] == {"mean": None, "std": None, "size": [SIZE, SIZE], "channels": 3}
    assert info["paths"] == 18 and info["input_shape"] == [3, SIZE, SIZE]
    from influence.query import Influence

    s = Influence.open(mixed_store, trust_store=True)
    assert s.class_names == CLASSES and s.class_name(1) == "three"
    assert s.train_path(0) == "one/img_00.png" and s.train_path(6) == "three/img_00.png" and s.train_path(17) == "two/img_05.png"
    assert s.training_labels()[6] == 1  # a "three" is label 1 in sorted order


def test_query_outputs_show_names_and_paths(mixed_store, user, capsys):
    code, out, err = run(capsys, "query", mixed_store, "--data", user.test, "--k", 3, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["test_path"] for r in results] == [f"{n}/img_{j:02d}.png" for n in CLASSES for j in range(2)]
    assert [r["label_name"] for r in results] == [n for n in CLASSES for _ in range(2)]
    for r in results:
        assert r["predicted_name"] == CLASSES[r["predicted"]] and r["target_name"] == CLASSES[r["target"]]
        assert r["opponents_target_name"] == CLASSES[r["opponents_target"]]
        for item in r["proponents"] + r["opponents"]:
            assert item["label_name"] == CLASSES[item["label"]]
            assert item["path"].startswith(item["label_name"] + "/") and item["path"].endswith(".png")
    code, out, err = run(capsys, "query", mixed_store, "--data", user.test, "--ids", 2, "--k", 2)
    assert code == 0, err
    assert out.startswith("test 2 (three/img_00.png): predicted ")
    assert "true three" in out
    items = [w for line in out.splitlines()[1:] for w in line.split(": ", 1)[1].split(", ")]
    assert len(items) == 4  # two proponents, two opponents: "#id y=NAME NAME/file.png SCORE"
    for item in items:
        _, label, path, _ = item.split(" ")
        assert label[2:] in CLASSES and path.startswith(label[2:] + "/") and path.endswith(".png")


def test_target_and_label_take_names_or_indices(mixed_store, user, capsys):
    image = user.test / "two" / "img_01.png"
    by_name = run(capsys, "query", mixed_store, "--image", image, "--target", "three", "--label", "two", "--json")
    by_index = run(capsys, "query", mixed_store, "--image", image, "--target", 1, "--label", 2, "--json")
    assert by_name[0] == by_index[0] == 0, (by_name[2], by_index[2])
    a, b = json.loads(by_name[1])["results"][0], json.loads(by_index[1])["results"][0]
    assert a["target"] == 1 and a["target_name"] == "three" and a["label"] == 2 and a["label_name"] == "two"
    assert a["test_path"] == str(image)
    assert [p["train_id"] for p in a["proponents"]] == [p["train_id"] for p in b["proponents"]]
    line = refused(capsys, "query", mixed_store, "--image", image, "--target", "four")
    assert "'four'" in line and "one, three, two" in line


def test_explain_report_and_flags_show_names_and_paths(mixed_store, user, tmp_path, capsys):
    code, out, err = run(capsys, "explain", mixed_store, "--data", user.test, "--ids", "0,2", "--k", 2,
                         "--attribution", "saliency", "--out", tmp_path / "report")
    assert code == 0, err
    assert "test 0 (one/img_00.png)" in out and "test 2 (three/img_00.png)" in out
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Test 2 (three/img_00.png): predicted " in page and "true label three" in page
    assert "<td>three</td><td>three/img_" in page  # the influencer table: class name then file
    doc = json.loads((tmp_path / "report" / "explanations.json").read_text())
    assert doc["explanations"][1]["test_path"] == "three/img_00.png"
    code, out, err = run(capsys, "flag", mixed_store, "--kind", "mislabel", "--top", 3, "--json")
    assert code == 0, err
    for f in json.loads(out)["mislabel"]:
        assert f["label_name"] == CLASSES[f["label"]] and f["path"].startswith(f["label_name"] + "/")
        assert f["suggested_label_name"] == CLASSES[f["suggested_label"]] != f["label_name"]  # the model's other guess
    code, out, err = run(capsys, "flag", mixed_store, "--kind", "mislabel", "--top", 3)
    assert code == 0, err
    assert out.count("; model: ") == 3, out  # "#id (y=label path, score; model: name p)"


def test_report_draws_a_normalised_stores_images_as_photos(user, tmp_path, capsys, monkeypatch):
    """The report undoes --mean/--std before drawing: the test image and its influencers appear as their PNG pixels
    in [0, 1], not as normalised values clipped to [0, 1]."""
    import influence.report as report

    norm = ("--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)))
    _build(capsys, user, user.uniform, tmp_path / "s", *norm, "--method", "tracin,gradcos")
    drawn: list[torch.Tensor] = []
    overlay = report._overlay
    monkeypatch.setattr(report, "_overlay", lambda ax, image, *a, **kw: (drawn.append(image), overlay(ax, image, *a, **kw)))
    code, out, err = run(capsys, "explain", tmp_path / "s", "--data", user.test, "--ids", "2", "--k", 2,
                         "--attribution", "saliency", "--out", tmp_path / "report")
    assert code == 0, err
    x, _, paths = _read_rgb(user.test)
    train_x, _, _ = _read_rgb(user.uniform)
    np.testing.assert_allclose(drawn[0].numpy(), x[2], atol=1e-5)  # the test image, first panel
    for image in drawn[2:]:  # influencers: each is one of the training PNGs as read
        assert np.abs(train_x - image.numpy()[None]).reshape(len(train_x), -1).max(1).min() < 1e-5


def test_training_images_changed_after_the_build_are_refused_not_shown(user, tmp_path, capsys):
    import shutil

    from influence import Influence
    from influence.errors import StoreMismatchError

    train = tmp_path / "train"
    shutil.copytree(user.uniform, train)
    out = tmp_path / "store"
    _build(capsys, user, train, out)
    code, _, err = run(capsys, "explain", out, "--data", user.test, "--ids", "0", "--k", 1, "--attribution", "saliency",
                       "--out", tmp_path / "before")
    assert code == 0, err
    first = train / CLASSES[0] / "img_00.png"  # the folder's first image: what a user replaces when re-exporting
    Image.fromarray(np.full((SIZE, SIZE, 3), 7, dtype=np.uint8)).save(first)
    with pytest.raises(StoreMismatchError, match="has changed since store"):
        Influence.open(out, trust_store=True).training_examples([0])
    code, _, err = run(capsys, "explain", out, "--data", user.test, "--ids", "0", "--k", 1, "--attribution", "saliency",
                       "--out", tmp_path / "after")
    assert code == 2 and "has changed since store" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- test data mapped by name

def test_test_folder_missing_a_class_keeps_the_right_labels(mixed_store, user, capsys):
    code, out, err = run(capsys, "query", mixed_store, "--data", user.test_missing, "--k", 1, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    # sorted sub-folders of this folder are [three, two]: renumbering would make the threes 0 ("one")
    assert [r["label"] for r in results] == [1, 1, 1, 2]
    assert [r["label_name"] for r in results] == ["three", "three", "three", "two"]
    assert [r["opponents_target"] for r in results if r["predicted"] != r["label"]] == [
        r["label"] for r in results if r["predicted"] != r["label"]]


def test_unknown_test_class_is_refused(mixed_store, user, capsys):
    line = refused(capsys, "query", mixed_store, "--data", user.test_unknown, "--k", 1)
    assert "'four'" in line and "one, three, two" in line


def test_npz_classes_are_mapped_by_name(mixed_store, user, tmp_path, capsys):
    x, y, _ = _read_rgb(user.test)
    order = ["two", "one", "three"]  # the npz's own numbering differs from the store's
    np.savez(tmp_path / "t.npz", x=x, y=np.array([order.index(CLASSES[c]) for c in y]), classes=np.array(order))
    code, out, err = run(capsys, "query", mixed_store, "--data", tmp_path / "t.npz", "--k", 1, "--json")
    assert code == 0, err
    assert [r["label_name"] for r in json.loads(out)["results"]] == [CLASSES[c] for c in y]
    np.savez(tmp_path / "bad.npz", x=x, y=np.zeros(len(y), dtype=int), classes=np.array(["cat"]))
    assert "'cat'" in refused(capsys, "query", mixed_store, "--data", tmp_path / "bad.npz")


def test_classes_flag_names_outputs_and_orders_folders(user, tmp_path, capsys):
    info = _build(capsys, user, user.uniform, tmp_path / "s", "--classes", "one,three,two", "--method", "tracin")
    assert info["classes"] == CLASSES
    line = refused(capsys, "build", "--model", user.model_spec, "--data", user.uniform, "--checkpoint", user.net_ckpt,
                   "--out", tmp_path / "s2", "--classes", "one,two")
    assert "'three'" in line  # a folder whose name --classes lacks


# ----------------------------------------------------------------------------- preprocessing

def test_mixed_sizes_and_channels_need_flags(user, tmp_path, capsys):
    line = refused(capsys, "build", "--model", user.model_spec, "--data", user.train, "--checkpoint", user.net_ckpt,
                   "--out", tmp_path / "a", "--channels", "3")
    assert "three/img_00.png" in line and "12×12" in line and "--size 8,8" in line
    line = refused(capsys, "build", "--model", user.model_spec, "--data", user.train, "--checkpoint", user.net_ckpt,
                   "--out", tmp_path / "b", "--size", "8,8")
    assert "two/img_00.png" in line and "grayscale" in line and "--channels 3" in line


def test_normalisation_is_recorded_and_applied(user, tmp_path, capsys):
    """A store built from PNGs with --mean/--std scores exactly as one built from arrays normalised beforehand."""
    norm = ("--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)))
    info = _build(capsys, user, user.uniform, tmp_path / "png", *norm, "--method", "tracin")
    assert info["preprocessing"] == {"mean": list(MEAN), "std": list(STD), "size": None, "channels": None}
    m, s = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    x, y, _ = _read_rgb(user.uniform)
    np.savez(tmp_path / "train.npz", x=(x - m) / s, y=y)
    xt, yt, _ = _read_rgb(user.test)
    np.savez(tmp_path / "test.npz", x=(xt - m) / s, y=yt)
    _build(capsys, user, tmp_path / "train.npz", tmp_path / "arr", "--method", "tracin")

    for store, data in ((tmp_path / "png", user.test), (tmp_path / "arr", tmp_path / "test.npz")):
        code, _, err = run(capsys, "score", store, "--data", data, "--target", "label", "--out", store / "s.npy")
        assert code == 0, err
    from_png, from_arrays = np.load(tmp_path / "png" / "s.npy"), np.load(tmp_path / "arr" / "s.npy")
    assert np.abs(from_arrays).max() > 0
    np.testing.assert_allclose(from_png, from_arrays, rtol=1e-4, atol=1e-6 * np.abs(from_arrays).max())
    # --image gets the store's normalisation too, without repeating the flags
    code, _, err = run(capsys, "score", tmp_path / "png", "--image", user.test / "three" / "img_01.png", "--target", 1,
                       "--out", tmp_path / "one.npy")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "one.npy")[:, 0], from_arrays[:, 3], rtol=1e-4,
                               atol=1e-6 * np.abs(from_arrays).max())


def test_attribute_reads_an_image_as_the_store_does(user, tmp_path, capsys):
    """``attribute --store`` takes the model, final checkpoint, normalisation and class names from the store, and
    gives the same map as naming them all by hand; without the normalisation the model sees another input."""
    norm = ("--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)))
    _build(capsys, user, user.uniform, tmp_path / "s", *norm, "--method", "tracin")
    img = user.test / "three" / "img_01.png"
    code, out, err = run(capsys, "attribute", "--store", tmp_path / "s", "--trust-store", "--image", img, "--target", "three",
                         "--method", "saliency", "--out", tmp_path / "store.png", "--json")
    assert code == 0, err
    via_store = json.loads(out)
    assert via_store["target_name"] == "three" and via_store["target"] == 1 and via_store["predicted_name"] in CLASSES
    by_hand = ("attribute", "--model", user.model_spec, "--checkpoint", user.dp_ckpt, "--image", img, "--target", "three",
               "--method", "saliency", "--classes", ",".join(CLASSES), "--json")
    code, out, err = run(capsys, *by_hand, *norm, "--out", tmp_path / "hand.png")
    assert code == 0, err
    assert json.loads(out)["probability"] == pytest.approx(via_store["probability"], rel=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "hand.npy"), np.load(tmp_path / "store.npy"), rtol=1e-5, atol=1e-8)
    code, out, err = run(capsys, *by_hand, "--out", tmp_path / "raw.png")  # no --mean/--std: another input
    assert code == 0, err
    assert json.loads(out)["probability"] != pytest.approx(via_store["probability"], rel=1e-3)
    assert (tmp_path / "store.png").stat().st_size > 0


def test_attribute_refuses_what_it_cannot_honour(user, tmp_path, capsys):
    _build(capsys, user, user.uniform, tmp_path / "s", "--method", "tracin")
    img, big = user.test / "three" / "img_01.png", user.train / "three" / "img_00.png"
    out = ("--out", tmp_path / "m.png")
    assert "--mean" in refused(capsys, "attribute", "--store", tmp_path / "s", "--trust-store", "--image", img,
                               "--mean", "0.5,0.5,0.5", "--std", "1,1,1", *out)
    assert "--model and --checkpoint" in refused(capsys, "attribute", "--image", img, *out)
    line = refused(capsys, "attribute", "--store", tmp_path / "s", "--trust-store", "--image", img, "--target", "four", *out)
    assert "'four'" in line and "one, three, two" in line
    line = refused(capsys, "attribute", "--store", tmp_path / "s", "--trust-store", "--image", big, *out)
    assert "12×12" in line and "--size 8,8" in line
    assert "--trust-store" in refused(capsys, "attribute", "--store", tmp_path / "s", "--image", img, *out)
    assert not (tmp_path / "m.png").exists()


def test_query_size_or_channel_mismatch_is_refused_unless_asked(user, tmp_path, capsys):
    _build(capsys, user, user.uniform, tmp_path / "s", "--method", "tracin")  # no --size: 8×8 RGB as found
    big, gray = user.train / "three" / "img_00.png", user.train / "two" / "img_00.png"
    line = refused(capsys, "query", tmp_path / "s", "--image", big)
    assert "12×12" in line and "--size 8,8" in line
    line = refused(capsys, "query", tmp_path / "s", "--image", gray)
    assert "grayscale" in line and "--channels 3" in line
    assert run(capsys, "query", tmp_path / "s", "--image", big, "--size", "8,8")[0] == 0
    assert run(capsys, "query", tmp_path / "s", "--image", gray, "--channels", "3")[0] == 0
    assert "--size" in refused(capsys, "query", tmp_path / "s", "--data", user.train)


def test_preprocessing_flags_are_checked(user, tmp_path, capsys):
    base = ["build", "--model", user.model_spec, "--data", user.uniform, "--checkpoint", user.net_ckpt]
    assert "--std" in refused(capsys, *base, "--out", tmp_path / "a", "--mean", "0.5,0.5,0.5")
    assert "--std" in refused(capsys, *base, "--out", tmp_path / "b", "--mean", "0,0,0", "--std", "1,0,1")
    assert "one per channel" in refused(capsys, *base, "--out", tmp_path / "c", "--mean", "0,0", "--std", "1,1")


# ----------------------------------------------------------------------------- loading as users save

@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "model_state_dict", "net", "module.", "net+module."])
def test_checkpoint_layouts_load_the_same_weights(user, tmp_path, layout):
    sd = user.state
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    obj = {"plain": sd, "module.": prefixed, "net+module.": {"net": prefixed, "optimizer": {"lr": 0.1}}}.get(layout)
    if obj is None:
        obj = {layout: sd, "epoch": 3}
    torch.save(obj, tmp_path / "c.pt")
    model = load_checkpoint(load_model(user.model_spec), tmp_path / "c.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_unknown_checkpoint_layout_names_the_keys_found(user, tmp_path, capsys):
    torch.save({"weights": user.state, "epoch": 3}, tmp_path / "c.pt")
    with pytest.raises(BadCheckpointError, match="'weights', 'epoch'"):
        load_checkpoint(load_model(user.model_spec), tmp_path / "c.pt")
    line = refused(capsys, "attribute", "--model", user.model_spec, "--checkpoint", tmp_path / "c.pt",
                   "--image", user.test / "one" / "img_00.png", "--out", tmp_path / "m.png")
    assert "'weights', 'epoch'" in line and "'net'" in line
    torch.save(load_model(user.model_spec), tmp_path / "whole.pt")
    assert "state_dict()" in refused(capsys, "attribute", "--model", user.model_spec, "--checkpoint", tmp_path / "whole.pt",
                                     "--image", user.test / "one" / "img_00.png", "--out", tmp_path / "m.png")


def test_architecture_mismatch_names_the_keys(user, tmp_path):
    torch.save({**user.state, "extra.weight": torch.zeros(2)}, tmp_path / "c.pt")
    with pytest.raises(BadCheckpointError, match=r"1 unexpected \(extra.weight\)"):
        load_checkpoint(load_model(user.model_spec), tmp_path / "c.pt")
    with pytest.raises(BadCheckpointError, match=r"2 of another shape \(fc.weight \(3, 16\) in the file, \(4, 16\) in the model"):
        load_checkpoint(load_model(user.model_spec, {"num_classes": 4}), user.net_ckpt)


def test_module_spec_is_found_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_layers.py").write_text(textwrap.dedent(LAYERS_PY))
    (tmp_path / "cwd_model.py").write_text(textwrap.dedent(MODEL_PY).replace("userdata_layers", "cwd_layers"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_model", raising=False)
    monkeypatch.delitem(sys.modules, "cwd_layers", raising=False)
    path_before = list(sys.path)
    model = load_model("cwd_model:make_model", {"width": 5})
    assert model.fc.in_features == 20
    assert sys.path == path_before  # the folder was on the path only while the factory was imported and run
    for name in ("cwd_model", "cwd_layers"):
        sys.modules.pop(name, None)


def test_file_spec_imports_its_sibling(user):
    path_before = list(sys.path)
    model = load_model(user.model_spec)
    assert type(model).__name__ == "Net" and sys.path == path_before


def test_model_args(user, tmp_path, capsys):
    assert parse_model_args(["width=6", "scale=0.5", "flag=True", "name=resnet", "shape=(1, 2)"]) == {
        "width": 6, "scale": 0.5, "flag": True, "name": "resnet", "shape": (1, 2)}
    with pytest.raises(BadSpecError, match="key=value"):
        parse_model_args(["width"])
    wide = load_model(user.model_spec, {"width": 6})
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    base = ["build", "--model", user.model_spec, "--data", user.uniform, "--checkpoint", tmp_path / "wide.pt",
            "--proj-dim", 64, "--method", "tracin"]
    assert "does not match" in refused(capsys, *base, "--out", tmp_path / "a")  # width 4 by default
    code, out, err = run(capsys, *base, "--out", tmp_path / "b", "--model-arg", "width=6", "--json")
    assert code == 0, err
    assert json.loads(out)["model_args"] == {"width": 6}
    # queries rebuild the model with the recorded arguments
    code, out, err = run(capsys, "query", tmp_path / "b", "--image", user.test / "one" / "img_00.png", "--json")
    assert code == 0, err
    line = refused(capsys, *base, "--out", tmp_path / "c", "--model-arg", "depth=7")
    assert "factory with depth=7 raised TypeError" in line


def test_flag_documents_gain_names_and_paths(mixed_store):
    from influence.flag import name_flags
    from influence.query import Influence

    doc = name_flags(Influence.open(mixed_store, trust_store=True), {
        "harmful": [{"train_id": 12, "label": 2, "score": 1.0}],
        "shortcuts": [{"class": 1, "box": [0, 0, 2, 2], "train_ids": [6, 7], "score": 0.5}],
    })
    assert doc["harmful"][0]["label_name"] == "two" and doc["harmful"][0]["path"] == "two/img_00.png"
    assert doc["shortcuts"][0]["class_name"] == "three"
    assert doc["shortcuts"][0]["paths"] == ["three/img_00.png", "three/img_01.png"]
    assert doc["shortcuts"][0]["class"] == 1  # existing keys kept
