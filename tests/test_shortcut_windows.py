"""The shortcut detector on 32×32 colour images: patches of 2, 4 and 6 px found with their box, at several windows."""

from __future__ import annotations

import pytest
import torch

from influence.errors import BadDataError
from influence.shortcut import box_iou, default_windows, detect_shortcuts


def _photos(box: tuple[int, int, int, int] | None, colour: object = (1.0, 0.0, 0.0), n_patched: int = 20, seed: int = 0):
    """60 noisy 32×32 RGB images (classes 3 and 5) and TFA-like maps; the first ``n_patched`` carry the patch.

    The maps peak on the patch (plus noise everywhere); with ``box=None`` they peak at one common place whose pixels
    differ between images (natural class evidence, not a patch).
    """
    g = torch.Generator().manual_seed(seed)
    n = 60
    images = torch.rand(n, 3, 32, 32, generator=g)
    maps = torch.rand(n, 3, 32, 32, generator=g) * 0.3
    labels = [3] * 30 + [5] * 30
    x0, y0, x1, y1 = box if box is not None else (12, 12, 16, 16)
    for j in range(n_patched):
        if box is not None:
            if colour == "checker":
                yy, xx = torch.meshgrid(torch.arange(y1 - y0), torch.arange(x1 - x0), indexing="ij")
                images[j, :, y0:y1, x0:x1] = ((yy + xx) % 2).double().float()[None]
            else:
                images[j, :, y0:y1, x0:x1] = torch.tensor(colour)[:, None, None]
        maps[j, :, y0:y1, x0:x1] += 1.0 + torch.rand(3, y1 - y0, x1 - x0, generator=g)
    return maps, images, list(range(1000, 1000 + n)), labels


@pytest.mark.parametrize("box", [(2, 2, 4, 4), (26, 26, 30, 30), (24, 2, 30, 8)], ids=["2px", "4px", "6px"])
def test_patch_of_each_size_found_with_its_box(box):
    maps, images, ids, labels = _photos(box)
    found = detect_shortcuts(maps, images, ids, labels)
    assert [s.cls for s in found] == [3]
    assert found[0].box == list(box)
    assert set(found[0].train_ids) == set(range(1000, 1020))


def test_checkerboard_patch_spans_its_whole_box():
    # one colour of a checkerboard touches itself only diagonally: the box must still cover the whole board
    maps, images, ids, labels = _photos((14, 14, 18, 18), colour="checker")
    found = detect_shortcuts(maps, images, ids, labels)
    assert [s.cls for s in found] == [3]
    assert found[0].box == [14, 14, 18, 18]


def test_small_patch_needs_a_small_window():
    maps, images, ids, labels = _photos((2, 2, 4, 4))
    # the single 5 px window of earlier versions compares 21 noisy background pixels around a 2 px patch
    assert detect_shortcuts(maps, images, ids, labels, window=5) == []
    assert [s.box for s in detect_shortcuts(maps, images, ids, labels, window=2)] == [[2, 2, 4, 4]]
    assert [s.box for s in detect_shortcuts(maps, images, ids, labels, window=[5, 2])] == [[2, 2, 4, 4]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_images_give_no_report(seed):
    # no patch: peaks either random or clustered on pixels that differ between images
    maps, images, ids, labels = _photos(None, n_patched=0, seed=seed)
    assert detect_shortcuts(maps, images, ids, labels) == []
    maps, images, ids, labels = _photos(None, n_patched=25, seed=seed)
    assert detect_shortcuts(maps, images, ids, labels) == []


def test_default_windows_and_bad_windows():
    assert default_windows(16) == [2, 3]
    assert default_windows(32) == [2, 3, 4, 5]
    assert default_windows(8) == [2]
    maps, images, ids, labels = _photos((2, 2, 4, 4))
    for bad in (0, 33, [], [2, 40]):
        with pytest.raises(BadDataError, match="window="):
            detect_shortcuts(maps, images, ids, labels, window=bad)


def test_found_box_overlaps_truth_under_iou_threshold_used_by_benchmarks():
    # the benchmarks count a detection as found at IoU >= 0.5; a patch off the window grid must still pass
    box = (7, 19, 10, 22)
    maps, images, ids, labels = _photos(box, colour=(0.0, 1.0, 0.0))
    found = detect_shortcuts(maps, images, ids, labels)
    assert found and box_iou(found[0].box, box) == 1.0
