"""The report leaves the host program's matplotlib alone: no backend switch, no pyplot figures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_report_keeps_the_host_backend(tmp_path):
    """A program that chose its own backend keeps it after importing influence.report and writing figures."""
    script = textwrap.dedent(
        """
        import sys
        import matplotlib
        matplotlib.use("svg")  # the host program's choice
        import torch
        from influence.report import write_report
        shortcut = {"class": 7, "box": [1, 1, 3, 3], "train_ids": [4, 9], "score": 0.9}
        write_report(sys.argv[1], [], flags={"shortcuts": [shortcut]}, shortcut_images={0: torch.rand(2, 1, 8, 8)})
        from influence.attribution._render import save_overlay  # what `influence attribute` draws with
        save_overlay(torch.rand(1, 8, 8), torch.randn(1, 8, 8), sys.argv[1] + "/overlay.png")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["svg", "False"]
    assert (tmp_path / "shortcut_00.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<img src='shortcut_00.png'" in (tmp_path / "index.html").read_text()
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explanations.json", "index.html", "overlay.png", "shortcut_00.png"]


def test_mislabel_thumbnails_are_captioned_with_the_suggested_label_on_its_own_line():
    """The summary's mislabel thumbnails: id and stored label, the model's suggestion, the path, one per line (on one
    line they ran into the neighbouring captions); flags files from before suggestions keep two lines."""
    from influence.report import _likely_mislabels

    flags = {"mislabel": [
        {"train_id": 8, "label": 0, "label_name": "cat", "path": "cat/0008.jpg", "suggested_label": 2, "suggested_label_name": "truck"},
        {"train_id": 9, "label": 1, "label_name": "dog", "path": "dog/0009.jpg"},
        {"train_id": 3, "label": 1, "suggested_label": 0},  # a bare file: class 0 is a suggestion too
    ]}
    ids, captions = _likely_mislabels([], flags)
    assert ids == [8, 9, 3]
    assert captions == ["#8 y=cat\nmodel: truck\ncat/0008.jpg", "#9 y=dog\ndog/0009.jpg", "#3 y=1\nmodel: 0"]
