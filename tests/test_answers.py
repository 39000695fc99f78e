"""Answers a user can act on: bare `flag`, `repair STORE`, explain's per-question default and the report's summary."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch

from conftest import trusted
from influence.cli import main

BOX = [2, 3, 6, 7]


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main(trusted([str(a) for a in args]))
    out, err = capsys.readouterr()
    return code, out, err


def test_bare_flag_runs_the_mislabel_check_and_says_what_needs_test(store, capsys):
    code, out, err = run(capsys, "flag", store, "--top", "7", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc) == ["mislabel", "mislabel_method"] and len(doc["mislabel"]) == 7
    assert "--test" in err
    code, out, err = run(capsys, "flag", store, "--kind", "harmful", "--json")  # asked for alone: still refused
    assert code == 2 and out == "" and "--test" in err


def test_flag_output_is_what_repair_reads(store, tmp_path, capsys):
    """The README's pipeline verbatim: `flag --json > flags.json`, then `repair STORE --flags flags.json`."""
    code, out, err = run(capsys, "flag", store, "--top", "4", "--json")
    assert code == 0, err
    (tmp_path / "flags.json").write_text(out)
    code, _, err = run(capsys, "repair", store, "--flags", tmp_path / "flags.json", "--out", tmp_path / "cleaned", "--json")
    assert code == 0, err
    changes = list(csv.DictReader((tmp_path / "cleaned" / "changes.csv").read_text().splitlines()))
    assert sorted(int(c["train_id"]) for c in changes) == sorted(f["train_id"] for f in json.loads(out)["mislabel"])
    # relabelling takes the class each flag suggested
    code, _, err = run(capsys, "repair", store, "--flags", tmp_path / "flags.json", "--out", tmp_path / "relabelled",
                       "--action", "relabel", "--json")
    assert code == 0, err
    new = {int(c["train_id"]): c["new_label"] for c in csv.DictReader((tmp_path / "relabelled" / "changes.csv").read_text().splitlines())}
    assert new == {f["train_id"]: f["suggested_label_name"] for f in json.loads(out)["mislabel"]}


def _flags(tmp_path: Path, mislabel: list[int], train_ids: list[int], cls: int) -> Path:
    doc = {"mislabel": [{"train_id": i, "score": 1.0, "label": 0, "model_prob_of_label": 0.1} for i in mislabel],
           "shortcuts": [{"class": cls, "box": BOX, "train_ids": train_ids, "score": 0.9}]}
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(doc))
    return path


def test_repair_store_writes_cleaned_npz_changes_and_recipe(store, digits, tmp_path, capsys):
    flags = _flags(tmp_path, [5, 9], [1, 2], cls=int(digits.y[1]))
    out = tmp_path / "cleaned"
    code, text, err = run(capsys, "repair", store, "--flags", flags, "--out", out, "--mask-scope", "flagged")
    assert code == 0, err
    assert "train_cleaned.npz" in text and str(BOX) in text  # the one-screen recipe names its files and the box
    d = np.load(out / "train_cleaned.npz")
    ids = d["ids"].tolist()
    assert len(ids) == len(digits.y) - 2 and 5 not in ids and 9 not in ids
    x0, y0, x1, y1 = BOX
    for i in (1, 2):
        row = d["x"][ids.index(i)]
        orig = digits.x[i].numpy()
        assert not np.array_equal(row[:, y0:y1, x0:x1], orig[:, y0:y1, x0:x1]) or np.ptp(orig[:, y0:y1, x0:x1]) == 0
        assert np.ptp(row[:, y0:y1, x0:x1]) == 0  # one fill colour inside the box
        outside = np.ones(row.shape[-2:], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(row[:, outside], orig[:, outside])
    untouched = ids.index(3)
    assert np.array_equal(d["x"][untouched], digits.x[3].numpy()) and d["y"][untouched] == int(digits.y[3])
    rows = {int(r["train_id"]): r for r in csv.DictReader((out / "changes.csv").read_text().splitlines())}
    assert {i: rows[i]["action"] for i in (1, 2, 5, 9)} == {1: "mask", 2: "mask", 5: "drop", 9: "drop"}
    assert (out / "RECIPE.txt").read_text().startswith("What `influence repair` wrote")


def test_repair_store_relabel_never_keeps_the_given_label(store, digits, tmp_path, capsys):
    flags = _flags(tmp_path, [4, 7], [], cls=0)
    out = tmp_path / "relabelled"
    code, _, err = run(capsys, "repair", store, "--flags", flags, "--out", out, "--action", "relabel", "--json")
    assert code == 0, err
    d = np.load(out / "train_cleaned.npz")
    assert len(d["ids"]) == len(digits.y)
    for i in (4, 7):
        assert d["y"][i] != int(digits.y[i])
    rows = {int(r["train_id"]): r for r in csv.DictReader((out / "changes.csv").read_text().splitlines())}
    assert rows[4]["action"].startswith("relabel") and rows[4]["new_label"] == str(int(d["y"][4]))


def test_repair_store_needs_flags_and_out(store, capsys):
    code, out, err = run(capsys, "repair", store, "--out", "x")
    assert code == 2 and "--flags" in err


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, dict[str, str | None]]] = []
        self.in_summary = False
        self.summary_imgs: list[dict[str, str | None]] = []
        self.summary_text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.order.append((tag, a))
        if tag == "section" and a.get("id") == "summary":
            self.in_summary = True
        if tag == "img" and self.in_summary:
            self.summary_imgs.append(a)

    def handle_endtag(self, tag):
        if tag == "section":
            self.in_summary = False

    def handle_data(self, data):
        if self.in_summary:
            self.summary_text += data


def test_report_opens_with_a_summary_and_draws_the_shortcut_box(session, digits, tmp_path):
    from PIL import Image

    from influence.explain import explain
    from influence.report import write_report

    pred = session.predict(digits.x_test).argmax(-1)
    labels = [int(pred[0] + 1) % 10, int(digits.y_test[1])]  # the first is a failure whatever the model predicts
    found = explain(session, digits.x_test[:2], labels=labels, test_ids=[0, 1], k=3, progress=False)
    assert found[0].result.method == "tracin" and found[0].similar_method == "gradcos" and len(found[0].similar) == 3
    flags = {"mislabel": [{"train_id": 11, "score": 2.0, "label": int(digits.y[11]), "path": None}], "mislabel_method": "loss",
             "shortcuts": [{"class": 7, "box": BOX, "train_ids": [3, 4, 5], "score": 0.8}]}
    imgs = session.training_examples([3, 4, 5])[0]
    path = write_report(tmp_path / "rep", found, flags=flags, shortcut_images={0: imgs},
                        mislabel_images={11: session.training_examples([11])[0][0]})
    page = _Page()
    page.feed(path.read_text())
    tags = [t for t, _ in page.order]
    first_h2 = next(i for i, (t, a) in enumerate(page.order) if t == "h2" and a.get("id", "").startswith("explain-"))
    assert tags.index("section") < first_h2
    assert "1 misclassified test image(s) explained" in page.summary_text
    assert f"box {BOX}" in page.summary_text and "#11" in page.summary_text
    assert "flagged by influence flag (ranking: loss)" in page.summary_text  # the ranking the flags file used
    srcs = [a["src"] for a in page.summary_imgs]
    assert "shortcut_00.png" in srcs and "summary_mislabels.png" in srcs
    png = np.asarray(Image.open(tmp_path / "rep" / "shortcut_00.png").convert("RGB")).astype(int)
    lime = (png[..., 1] > 200) & (png[..., 0] < 60) & (png[..., 2] < 60)
    assert lime.sum() > 50  # the box is drawn (green edges) on the supporting images


def test_report_without_flags_says_shortcuts_were_not_searched(session, digits, tmp_path):
    from influence.explain import explain
    from influence.report import write_report

    found = explain(session, digits.x_test[:1], k=2, method="trak", progress=False)
    assert found[0].similar == [] and found[0].result.method == "trak"
    page = _Page()
    page.feed(write_report(tmp_path / "r", found).read_text())
    assert "not searched" in page.summary_text and not [a for a in page.summary_imgs if "shortcut" in (a["src"] or "")]


from test_user_data import mixed_store, user  # noqa: E402,F401  (a real image-folder store, fixtures reused)


def test_repair_folder_store_writes_a_file_list_and_masked_pngs(mixed_store, user, tmp_path, capsys):
    from PIL import Image

    from influence.query import Influence

    s = Influence.open(mixed_store, trust_store=True)
    paths = [s.train_path(i) for i in range(s.n_train)]
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"mislabel": [{"train_id": 0, "score": 1.0, "label": 0}],
                                 "shortcuts": [{"class": 1, "box": [1, 1, 4, 4], "train_ids": [7, 8], "score": 0.9}]}))
    out = tmp_path / "cleaned"
    code, text, err = run(capsys, "repair", mixed_store, "--flags", flags, "--out", out, "--mask-scope", "flagged")
    assert code == 0, err
    files = list(csv.DictReader((out / "train_files.csv").read_text().splitlines()))
    listed = [f["path"] for f in files]
    assert len(files) == s.n_train - 1 and paths[0] not in listed  # the dropped row, by path
    for i in (7, 8):
        masked = f"masked/{Path(paths[i]).with_suffix('.png')}"
        assert masked in listed and paths[i] not in listed
        new = np.asarray(Image.open(out / masked).convert("RGB")).astype(int)
        old = np.asarray(Image.open(user.train / paths[i]).convert("RGB")).astype(int)
        assert new.shape == old.shape
        h, w = old.shape[:2]
        y0, y1, x0, x1 = h // 8, -(-4 * h // 8), w // 8, -(-4 * w // 8)  # the 8×8 model box on this file's pixels
        assert np.ptp(new[y0:y1, x0:x1].reshape(-1, 3), axis=0).max() == 0
        keep = np.ones((h, w), bool)
        keep[y0:y1, x0:x1] = False
        assert np.abs(new[keep] - old[keep]).max() <= 1
    changes = {int(r["train_id"]): r for r in csv.DictReader((out / "changes.csv").read_text().splitlines())}
    assert changes[0]["action"] == "drop" and changes[0]["path"] == paths[0] and changes[7]["action"] == "mask"
    assert "train_files.csv" in text
