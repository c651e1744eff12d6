"""Box arithmetic in numpy: IoU and greedy non-maximum suppression on (x1, y1, x2, y2) boxes.

These are torchvision.ops' `box_iou`, `nms` and `batched_nms`, written here because importing torchvision costs every
process 1.2-1.7 s and ~165 MB at start-up (torchvision.ops imports torch._dynamo through roi_align; measured with
`python -X importtime` on a 2-core AMD EPYC with AVX512-BF16, no AMX), which `dfpipe score-video` and `align` pay
for three small functions. Same definitions as torchvision's: areas without +1, IoU computed in the boxes' dtype
with torchvision's operations in its order (so float32 IoUs are bit-identical), a box suppressed when its IoU
with a kept, higher-scored box of its group is > iou_threshold.

Speed, against torchvision 0.29 on one thread of that machine, on the candidates the MTCNN of `stages/mtcnn.py`
hands to NMS on real frames (0-1750 boxes a call; P-Net finds 405 at the first scale of a 1080p frame, 801 over
all its scales; 1669 for 8 frames at 640x360): 8.9 ms in all against torchvision's 10.3 for the 36 calls of one
1080p frame and two batches of 8 frames at 640x360 (whose detection takes 1.4 s): up to ~0.15 ms slower on calls
of under ~600 boxes (numpy's per-call overhead), 1.3-2.2x faster on those of 700-1750 boxes. The greedy loop is
not run box by box: only pairs of boxes that overlap along x are looked at (a sweep over x1, so the cost follows
the overlapping pairs, not n^2), and the greedy result is found as the fixed point of "kept = not suppressed by a
kept, higher-scored box" (Cluster-NMS, Zheng et al. 2021: equal to greedy NMS, reached in as many rounds as the
longest suppression chain, 4-9 on real frames). OpenCV's `cv2.dnn.NMSBoxes`/`NMSBoxesBatched` (x, y, w, h boxes)
keep the same boxes on those frames but are not used: their IoU is computed in double and rounded to float
(borderline pairs can go the other way), OpenCV 5 refuses a score threshold below 0 (boxes scored <= 0 would be
dropped), and NMSBoxesBatched took 2-5x torchvision's time on the 800-1750-box calls.

Ties: boxes of equal score are taken in index order (a stable sort), which is what torchvision's `nms` does on
CPU. torchvision's `batched_nms` agrees for up to 1000 boxes; above, it sorts its kept boxes again with an unstable
sort, so the order of equal-scored kept boxes in its output is arbitrary there (the boxes kept are the same). Below
1000 boxes it also shifts each group's boxes by a coordinate offset before calling `nms`, which rounds float32
coordinates of the groups after the first; this module's groups are exact, like torchvision's path above 1000.
"""
from __future__ import annotations

import numpy as np


def _floating(boxes) -> np.ndarray:
    boxes = np.asarray(boxes)
    return boxes if np.issubdtype(boxes.dtype, np.floating) else boxes.astype(np.float64)


def box_area(boxes) -> np.ndarray:
    boxes = _floating(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2) -> np.ndarray:
    """IoU of every box of (n, 4) with every box of (m, 4): (n, m)."""
    boxes1, boxes2 = _floating(boxes1).reshape(-1, 4), _floating(boxes2).reshape(-1, 4)
    lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = np.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: NaN, as torchvision's
        return inter / (box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter)


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Indices (int64) of the boxes (n, 4) kept by greedy NMS, by decreasing score."""
    return batched_nms(boxes, scores, np.zeros(len(scores), np.int64), iou_threshold)


def batched_nms(boxes, scores, groups, iou_threshold: float) -> np.ndarray:
    """Greedy NMS within each group (boxes of different groups never suppress each other): indices (int64) of the
    kept boxes, by decreasing score. `iou_threshold` in [0, 1]."""
    boxes, scores = _floating(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1)
    n = len(boxes)
    if len(scores) != n or len(groups) != n:
        raise ValueError(f"batched_nms: {n} boxes, {len(scores)} scores, {len(groups)} groups")
    if n == 0:
        return np.zeros(0, np.int64)
    # Everything below works in rank order: box r is the r-th highest score.
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    group = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)[1].reshape(-1)[order]
    first, second = _x_overlapping_pairs(b, group)
    i, j = np.minimum(first, second), np.maximum(first, second)  # i outranks j
    keep = group[i] == group[j]
    i, j = i[keep], j[keep]
    # torchvision's arithmetic, in the boxes' dtype; the threshold compared in double, as its C++ kernel does
    w = np.maximum(np.minimum(b[i, 2], b[j, 2]) - np.maximum(b[i, 0], b[j, 0]), 0)
    h = np.maximum(np.minimum(b[i, 3], b[j, 3]) - np.maximum(b[i, 1], b[j, 1]), 0)
    inter = w * h
    area = box_area(b)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 for empty boxes: NaN, suppresses nothing
        suppresses = inter / (area[i] + area[j] - inter) > np.float64(iou_threshold)
    i, j = i[suppresses], j[suppresses]
    kept = np.ones(n, bool)
    while True:  # Cluster-NMS: from "all kept", drop what a kept box suppresses, until nothing changes
        suppressed = np.zeros(n, bool)
        suppressed[j[kept[i]]] = True
        if np.array_equal(kept, ~suppressed):
            return order[kept]
        kept = ~suppressed


def _x_overlapping_pairs(boxes: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) of boxes of the same group whose x ranges may overlap: a superset of the pairs with a
    positive intersection (any other pair has IoU 0 and suppresses nothing). Boxes sorted by (group, x1); each box
    pairs with the following ones that start before it ends."""
    x1, x2 = boxes[:, 0].astype(np.float64), boxes[:, 2].astype(np.float64)
    lo = x1.min()
    stride = 2 * (max(x2.max(), x1.max()) - lo) + 2  # separates the groups on one axis
    start, end = group * stride + (x1 - lo), group * stride + (x2 - lo)
    by_start = np.argsort(start, kind="stable")
    count = np.searchsorted(start[by_start], end[by_start], side="right") - np.arange(1, len(boxes) + 1)
    count = np.maximum(count, 0)
    a = np.repeat(np.arange(len(boxes)), count)
    b = a + 1 + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return by_start[a], by_start[b]
