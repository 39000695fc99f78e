"""The README's first command: `influence demo` end to end, in-process (about a minute on one thread)."""

from __future__ import annotations

import json

from influence.cli import main


def test_demo_finds_the_injected_noise_and_shortcut(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--k", "3", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(stdout)  # --json: one JSON document on stdout and nothing else
    truth = json.loads((out / "injections.json").read_text())
    assert len(truth["flipped"]) == 144 and truth["patch_box"] == [12, 12, 15, 15]
    assert summary["misclassified"] > 0 and len(summary["results"]) == summary["misclassified"]
    assert summary["mislabel_recall_top20"] >= 0.9  # flips are 10% of the data: the top 20% should hold nearly all
    assert summary["shortcut_found"], summary["shortcuts"]
    page = (out / "report" / "index.html").read_text()
    assert "shortcut: class 7, box [12, 12, 15, 15]" in page
    flags = json.loads((out / "flags.json").read_text())
    assert {"mislabel", "harmful", "shortcuts"} <= set(flags)
    assert "ground truth found" in err
