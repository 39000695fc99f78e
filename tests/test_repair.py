"""The repair loop's array logic (masking, relabelling, dropping) on tiny tensors; no training."""

from __future__ import annotations

import pytest
import torch

from influence.errors import BadDataError, BadSpecError
from influence.demo.retrain import run_repair
from influence.repair import apply_repair, local_background, mask_box, relabel_targets


def _images(n: int = 4, size: int = 6, fill: float = 0.2) -> torch.Tensor:
    x = torch.full((n, 1, size, size), fill)
    x[:, :, 4:6, 4:6] = 1.0  # a bright patch in the bottom-right corner
    return x


def test_local_background_is_ring_median_and_clips_at_border():
    x = _images()
    x[1] = 0.5
    x[1, :, 4:6, 4:6] = 1.0
    bg = local_background(x, [4, 4, 6, 6])
    assert bg.shape == (4, 1, 1, 1)
    assert torch.allclose(bg[:, 0, 0, 0], torch.tensor([0.2, 0.5, 0.2, 0.2]))


def test_mask_box_only_touches_given_ids_and_box():
    x = _images()
    out = mask_box(x, [0, 2], [4, 4, 6, 6])
    assert torch.equal(out[[1, 3]], x[[1, 3]])
    assert torch.allclose(out[[0, 2], :, 4:6, 4:6], torch.tensor(0.2))
    assert torch.equal(out[..., :4, :], x[..., :4, :])
    assert torch.equal(x[:, :, 4:6, 4:6], torch.ones(4, 1, 2, 2))  # input not modified
    assert torch.allclose(mask_box(x, [1], [4, 4, 6, 6], value=0.0)[1, :, 4:6, 4:6], torch.tensor(0.0))


def test_mask_box_rejects_bad_boxes_and_ids():
    x = _images()
    with pytest.raises(BadSpecError, match="does not fit"):
        mask_box(x, [0], [4, 4, 7, 6])
    with pytest.raises(BadSpecError, match="integers"):
        mask_box(x, [0], [4, 4])
    with pytest.raises(BadDataError, match="out of range|must lie in"):
        mask_box(x, [9], [4, 4, 6, 6])


def test_relabel_targets_never_keeps_the_flagged_label():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = [0, 1, 2]
    # row 0: model agrees with the (suspect) label -> runner-up; rows 1, 2: the model's top class
    assert relabel_targets(probs, labels, [0, 1, 2]) == {0: 1, 1: 2, 2: 0}


def test_apply_repair_drop_relabel_and_mask_scopes():
    x = _images(5)
    y = torch.tensor([7, 7, 3, 7, 1])
    shortcut = {"class": 7, "box": [4, 4, 6, 6], "train_ids": [0], "score": 1.0}
    x2, y2, kept = apply_repair(x, y, drop=[4], relabel={2: 5}, boxes=[shortcut], mask_scope="flagged")
    assert kept.tolist() == [0, 1, 2, 3] and y2.tolist() == [7, 7, 5, 7]
    patch_on = (x2[:, 0, 4:6, 4:6] == 1.0).all(-1).all(-1).tolist()
    assert patch_on == [False, True, True, True]
    x3, _, _ = apply_repair(x, y, boxes=[shortcut], mask_scope="class")
    patch_on = (x3[:, 0, 4:6, 4:6] == 1.0).all(-1).all(-1).tolist()
    assert patch_on == [False, False, True, False, True]  # every class-7 image masked, others kept
    x4, _, _ = apply_repair(x, y, boxes=[[4, 4, 6, 6]])  # a bare box: all images
    assert not (x4[:, 0, 4:6, 4:6] == 1.0).any()
    x5, y5, kept5 = apply_repair(x, y)  # nothing flagged: unchanged
    assert torch.equal(x5, x) and torch.equal(y5, y) and kept5.tolist() == list(range(5))


def test_apply_repair_errors():
    x, y = _images(3), torch.tensor([0, 1, 2])
    with pytest.raises(BadSpecError, match="mask_scope"):
        apply_repair(x, y, mask_scope="everything")
    with pytest.raises(BadDataError, match="drop ids"):
        apply_repair(x, y, drop=[3])
    with pytest.raises(BadDataError, match="relabel id"):
        apply_repair(x, y, relabel={-1: 0})
    with pytest.raises(BadSpecError, match="'box'"):
        apply_repair(x, y, boxes=[{"class": 1}])


def test_run_repair_refuses_a_folder_that_is_not_a_demo_run(tmp_path):
    with pytest.raises(BadDataError, match="not a finished demo run"):
        run_repair(tmp_path)
    with pytest.raises(BadSpecError, match="action"):
        run_repair(tmp_path, action="burn")
