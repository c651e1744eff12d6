"""stages/boxes.py against torchvision.ops, which it replaces: the same IoUs, the same boxes kept in the same order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from dfpipe.stages.boxes import batched_nms, box_iou, nms


def random_boxes(rng, n: int, dtype=np.float32, clusters: int = 6, size: float = 40.0) -> np.ndarray:
    """Boxes around a few centres, as a detector's candidates are: many overlap, at all IoUs."""
    centres = rng.uniform(0, 300, (clusters, 2))[rng.integers(0, clusters, n)] + rng.normal(0, size / 4, (n, 2))
    sides = rng.uniform(0.3, 1.5, (n, 2)) * size
    return np.c_[centres - sides / 2, centres + sides / 2].astype(dtype)


def torchvision_nms(boxes, scores, threshold):
    return torchvision.ops.nms(torch.as_tensor(boxes), torch.as_tensor(scores), threshold).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_iou_is_torchvisions_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 70, dtype), random_boxes(rng, 50, dtype)
    b[:5] = a[:5]  # identical boxes: IoU exactly 1
    ours = box_iou(a, b)
    assert ours.dtype == dtype and ours.shape == (70, 50)
    assert np.array_equal(ours, torchvision.ops.box_iou(torch.as_tensor(a), torch.as_tensor(b)).numpy())
    assert (ours[np.arange(5), np.arange(5)] == 1).all() and (ours == 0).any() and ((ours > 0) & (ours < 1)).any()


def test_box_iou_of_no_boxes_and_of_disjoint_and_nested_boxes():
    assert box_iou(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 3)
    assert box_iou(np.ones((2, 4)), np.zeros((0, 4))).shape == (2, 0)
    iou = box_iou([[0, 0, 10, 10]], [[10, 0, 20, 10], [0, 0, 5, 10], [5, 5, 15, 15]])
    assert np.allclose(iou, [[0, 0.5, 25 / 175]])  # no +1 in widths: touching boxes do not overlap


@pytest.mark.parametrize("n", [2, 30, 400, 1500])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_nms_keeps_what_torchvision_keeps_in_its_order(n, threshold):
    rng = np.random.default_rng(n)
    boxes, scores = random_boxes(rng, n), rng.permutation(n).astype(np.float32) / n  # no ties
    keep = nms(boxes, scores, threshold)
    expected = torchvision_nms(boxes, scores, threshold)
    assert keep.dtype == np.int64
    assert np.array_equal(keep, expected)
    if n >= 30 and 0 < threshold < 0.9:
        assert 1 < len(keep) < n  # the test suppresses something and keeps several


def test_nms_takes_equal_scores_in_index_order_as_torchvision_does_on_cpu():
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 600)
    scores = rng.integers(0, 8, 600).astype(np.float32)  # ~75 boxes per score
    assert np.array_equal(nms(boxes, scores, 0.5), torchvision_nms(boxes, scores, 0.5))
    same = np.tile(np.array([[0, 0, 10, 10]], np.float32), (3, 1))
    assert nms(same, np.ones(3, np.float32), 0.5).tolist() == [0]


def test_nms_float64_and_degenerate_boxes():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 200, np.float64)
    boxes[:10, 2:] = boxes[:10, :2]  # zero area: IoU 0/0 with their copies, never suppressed
    boxes[10:20] = boxes[:10]
    scores = rng.random(200)
    assert np.array_equal(nms(boxes, scores, 0.4), torchvision_nms(boxes, scores, 0.4))


def test_nms_of_no_box_and_of_one_box():
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 0.5).dtype == np.int64
    assert nms(np.array([[1, 2, 3, 4]], np.float32), np.array([0.3], np.float32), 0.5).tolist() == [0]


@pytest.mark.parametrize("n", [1, 5, 300, 999, 1001, 2500])  # torchvision switches algorithm above 1000 boxes
def test_batched_nms_keeps_what_torchvision_keeps_per_group(n):
    rng = np.random.default_rng(n)
    boxes, scores = random_boxes(rng, n, clusters=3), rng.permutation(n).astype(np.float32) / n
    groups = rng.choice([7, -3, 0, 100], n)  # any integers: boxes of one group overlap those of the others
    keep = batched_nms(boxes, scores, groups, 0.5)
    expected = torchvision.ops.batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), torch.as_tensor(groups),
                                           0.5).numpy()
    assert np.array_equal(keep, expected)
    assert np.array_equal(np.sort(scores[keep])[::-1], scores[keep])
    if n > 5:
        alone = nms(boxes, scores, 0.5)  # groups ignored: boxes of other groups suppress, fewer kept
        assert len(alone) < len(keep)
        for g in np.unique(groups):  # each group's result is plain NMS within it
            members = np.flatnonzero(groups == g)
            assert np.array_equal(keep[groups[keep] == g], members[nms(boxes[members], scores[members], 0.5)])
