"""explain, flag, the HTML report and attribute, through the public API and the CLI in-process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CNN_SPEC, trusted
from influence.cli import main
from influence.explain import explain
from influence.flag import run_flags


def _run(capsys, argv):
    code = main(trusted([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_json_round_trips_and_is_stable(session, digits, capsys):
    argv = ["explain", session.store.root, "--data", digits.test_npz, "--ids", "0,3", "--k", "3", "--json"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    doc = json.loads(out)
    assert [e["test_id"] for e in doc["explanations"]] == [0, 3]
    for e in doc["explanations"]:
        assert len(e["proponents"]) == 3 and len(e["opponents"]) == 3
        assert all({"train_id", "score", "label", "flags", "tfa_peak"} <= set(p) for p in e["proponents"])
        assert e["proponents"][0]["score"] >= e["proponents"][-1]["score"]
        assert e["opponents"][0]["score"] <= e["opponents"][-1]["score"]
    assert json.loads(json.dumps(doc)) == doc
    code2, out2, _ = _run(capsys, argv)

    def untimed(d):
        return [{k: v for k, v in e.items() if k != "search_ms"} for e in d["explanations"]]

    assert code2 == 0 and untimed(json.loads(out2)) == untimed(doc)  # fixed seed: same answer


def test_report_references_only_files_it_wrote(session, digits, tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, _, err = _run(capsys, ["explain", session.store.root, "--data", digits.test_npz, "--ids", "1", "--k", "2", "--out", out_dir])
    assert code == 0, err
    page = (out_dir / "index.html").read_text()
    refs = re.findall(r"src='([^']+)'", page) + re.findall(r'href="([^"]+)"', page)
    assert refs, "the report shows at least one figure"
    for ref in refs:
        assert "/" not in ref and (out_dir / ref).is_file(), ref
    assert json.loads((out_dir / "explanations.json").read_text())["explanations"][0]["figure"] in refs


def test_explain_api_maps_have_image_shapes(session, digits):
    [e] = explain(session, digits.x_test[2], k=2, attribution="saliency")
    assert e.pixel_map.shape == digits.x_test[2].shape
    assert set(e.tfa_maps) == {p.train_id for p in e.result.proponents + e.result.opponents + e.similar}
    for i, m in e.tfa_maps.items():
        assert m.shape == digits.x[i].shape


def test_flag_cli_json_shapes(session, digits, capsys):
    code, out, err = _run(capsys, ["flag", session.store.root, "--test", digits.test_npz, "--kind", "all", "--top", "4", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"mislabel", "mislabel_method", "harmful", "shortcuts"} and doc["mislabel_method"] == "loss"
    assert len(doc["mislabel"]) == 4 and all({"train_id", "score"} <= set(f) for f in doc["mislabel"])
    for s in doc["shortcuts"]:
        assert set(s) == {"class", "box", "train_ids", "score"} and len(s["box"]) == 4
    code, out, _ = _run(capsys, ["flag", session.store.root, "--kind", "mislabel", "--json"])
    assert code == 0 and set(json.loads(out)) == {"mislabel", "mislabel_method"}


def test_flag_needs_test_images_for_harmful(session, capsys):
    code, out, err = _run(capsys, ["flag", session.store.root, "--kind", "harmful"])
    assert code == 2 and out == "" and "--test" in err and len(err.strip().splitlines()) == 1


def test_run_flags_rejects_unknown_kind(session):
    from influence.errors import BadSpecError

    with pytest.raises(BadSpecError, match="unknown --kind"):
        run_flags(session, None, kinds=["nonsense"])


def test_attribute_cli_writes_png_and_raw_map(cnn_ckpts, digits, tmp_path, capsys):
    img = tmp_path / "digit.png"
    Image.fromarray((digits.x_test[0, 0].numpy() * 255).astype("uint8")).save(img)
    out = tmp_path / "map.png"
    code, stdout, err = _run(capsys, ["attribute", "--model", CNN_SPEC, "--checkpoint", cnn_ckpts.paths[-1], "--image", img,
                                      "--method", "saliency", "--out", out, "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert Path(doc["png"]).is_file() and np.load(doc["npy"]).shape == (1, 16, 16)
    assert 0 <= doc["target"] < 10


def test_attribute_cli_bad_size_is_one_line(cnn_ckpts, tmp_path, capsys):
    img = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20), "uint8")).save(img)
    code, out, err = _run(capsys, ["attribute", "--model", CNN_SPEC, "--checkpoint", cnn_ckpts.paths[-1], "--image", img, "--out", tmp_path / "m.png"])
    assert code == 2 and "--size" in err and len(err.strip().splitlines()) == 1
