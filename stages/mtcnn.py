"""MTCNN's three stages with facenet-pytorch's networks, weights and box arithmetic, rearranged for speed.

facenet-pytorch's `detect_face` resizes every candidate box with a separate torch call (hundreds per frame in a busy
scene) and runs its networks in NCHW, where convolutions and max-pooling on CPU are ~2x slower than in channels_last.
Here the candidates are cut with OpenCV from the uint8 frames (area interpolation, as facenet's) and the networks
run as `mtcnn_nets.py` chooses: onnxruntime on the CPU, torch channels_last on CUDA; the pyramid, thresholds, the
four NMS steps and the box regression are facenet's own. tests/test_mtcnn.py checks it finds the faces
facenet-pytorch finds; benchmarks/bench_align.py measures the speed.

`refine` skips P-Net and starts the cascade from boxes the caller already expects a face near (a track's last
position): the face's box, probability and landmarks at a fraction of a full detection's cost, which is part of
what lets the face stream run the full detector only on every few sampled frames.

Everything between the networks is numpy, so that a CPU process (score-video's) detects faces without importing
torch: 1.6 s and ~470 MB of its start-up on a 2-core AMD EPYC without AMX. On that machine onnxruntime also runs
the face path faster than torch did (FaceStream, default align settings, 16 sampled frames of each of six
480p-1080p clips): 9.5-10.2 ms per frame against 12.0-12.6, of which `refine` 4.0-4.3 ms against 5.4-5.7; a full
detection on every frame 22.6-23.7 ms against 24.4-25.7.

Nor is facenet-pytorch imported (nor torchvision, which it imports), even where torch is: 1.2-1.7 s and ~165 MB
more (see `boxes.py`). Its networks are defined layer for layer in `mtcnn_nets.py` and load its weight files; its
box helpers are restated below in numpy float32 with facenet-pytorch's own operations in its order (detect_face.py
of facenet-pytorch 2.5.3: generateBoundingBox, bbreg, rerec, pad and batched_nms_numpy's "Min" NMS, with its +1
pixel widths), and torchvision's NMS and IoU come from `boxes.py`: given the same network outputs, every box is
facenet's bit for bit. tests/test_mtcnn.py checks each against the original.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import boxes as box_ops
from . import mtcnn_nets

PYRAMID_FACTOR = 0.709  # facenet-pytorch's and the MTCNN paper's

Faces = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (k, 4), probs (k,), landmarks (k, 5, 2)


def _normalised(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the networks' NCHW float32 input. A transposed view keeps the NHWC memory order
    (astype copies in memory order), which torch reads as channels_last without another copy."""
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    x -= 127.5
    x *= 0.0078125
    return x


def _no_faces() -> Faces:
    return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))


# facenet-pytorch's box helpers (facenet_pytorch/models/utils/detect_face.py), with its operations in its order so
# that every box is bit for bit what facenet-pytorch computes. Boxes are (k, 5+) float32 arrays: x1, y1, x2, y2,
# score (and for P-Net's, its four regression outputs); `bbreg` and `rerec` change them in place, as facenet's do.

def generate_bounding_box(reg: np.ndarray, probs: np.ndarray, scale: float, thresh: float):
    """facenet's `generateBoundingBox`: P-Net's 12 x 12 windows (stride 2) whose face probability (N, h, w) is >=
    thresh, in the frame's pixels: boxes (k, 9) [x1, y1, x2, y2, score, 4 regression outputs] and their image
    indices (k,)."""
    stride, cellsize = 2, 12
    mask = probs >= thresh
    mask_inds = np.argwhere(mask)
    reg = reg.transpose(1, 0, 2, 3)[:, mask].T
    bb = mask_inds[:, 1:].astype(reg.dtype)[:, ::-1]
    q1 = np.floor((stride * bb + 1) / scale)
    q2 = np.floor((stride * bb + cellsize - 1 + 1) / scale)
    return np.concatenate([q1, q2, probs[mask][:, None], reg], axis=1), mask_inds[:, 0]


def bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """facenet's `bbreg`: R-Net's or O-Net's regression (k, 4) applied, as fractions of the +1 pixel width and
    height."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] = boxes[:, :4] + reg[:, :4] * np.stack([w, h, w, h], axis=1)
    return boxes


def rerec(boxes: np.ndarray) -> np.ndarray:
    """facenet's `rerec`: each box made square (side: its longer one) around its centre."""
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = np.maximum(wh[:, 0], wh[:, 1])[:, None]
    boxes[:, 0:2] = boxes[:, 0:2] + wh * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, 0:2] + side
    return boxes


def pad(boxes: np.ndarray, width: int, height: int):
    """facenet's `pad`: the boxes truncated to ints and clipped to the frame in 1-based pixels: y, ey, x, ex."""
    x, y, ex, ey = np.trunc(boxes[:, :4]).astype(np.int32).T
    return np.maximum(y, 1), np.minimum(ey, height), np.maximum(x, 1), np.minimum(ex, width)


def batched_nms_min(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, threshold: float) -> np.ndarray:
    """facenet's `batched_nms_numpy(..., "Min")`, its last NMS: greedy, a box suppressed when its intersection
    covers more than `threshold` of the smaller box's area (areas with +1 widths), within each image (images
    separated by facenet's coordinate offset). Kept indices (int64), by decreasing score."""
    if boxes.size == 0:
        return np.zeros(0, np.int64)
    offsets = idxs.astype(boxes.dtype) * (boxes.max() + 1)
    x1, y1, x2, y2 = (boxes + offsets[:, None]).T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)  # ascending, facenet's sort (ties fall as its sort leaves them)
    pick = []
    while order.size > 0:
        i, rest = order[-1], order[:-1]
        pick.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        order = rest[w * h / np.minimum(area[i], area[rest]) <= threshold]
    return np.array(pick, dtype=np.int64)


class MTCNN:
    def __init__(self, *, min_face_size: float, thresholds, device, runtime: str = "auto"):
        """`device`: a torch.device or its name ("cpu", "cuda:1"); `runtime`: see `mtcnn_nets.load`."""
        self.min_face_size = min_face_size
        self.thresholds = list(thresholds)
        self.pnet, self.rnet, self.onet = mtcnn_nets.load(device, runtime)

    def detect(self, frames: np.ndarray) -> list[Faces]:
        """(N, H, W, 3) uint8 RGB frames -> their faces, in the frames' pixels."""
        boxes, image_inds = self._propose(frames)
        boxes, image_inds = self._refine(frames, boxes, image_inds)
        boxes, image_inds, points = self._output(frames, boxes, image_inds)
        return self._split(boxes, image_inds, points, len(frames))

    def refine(self, frames: np.ndarray, boxes: np.ndarray, image_inds: np.ndarray) -> list[Faces]:
        """R-Net and O-Net on candidate boxes (k, 4) of frames[image_inds], P-Net skipped: per frame, the faces
        they confirm."""
        if not len(boxes):
            return [_no_faces() for _ in frames]
        boxes = np.c_[boxes, np.ones(len(boxes))].astype(np.float32)
        image_inds = np.asarray(image_inds, dtype=np.int64)
        boxes, image_inds = self._refine(frames, rerec(boxes), image_inds, nms=False)
        return self._split(*self._output(frames, boxes, image_inds, vote=True), len(frames))

    @staticmethod
    def _split(boxes, image_inds, points, n: int) -> list[Faces]:
        return [(boxes[image_inds == i, :4].astype(float), boxes[image_inds == i, 4].astype(float),
                 points[image_inds == i].astype(float)) for i in range(n)]

    def _scales(self, height: int, width: int) -> list[float]:
        scale = 12.0 / self.min_face_size
        side = min(height, width) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= PYRAMID_FACTOR
            side *= PYRAMID_FACTOR
        return scales

    def _propose(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P-Net over the image pyramid: candidate boxes, NMS'd per scale and then per image. Each level is
        area-resampled by OpenCV from the uint8 level before it. facenet-pytorch area-resamples every level from
        the float frame: same sizes, nearly the same pixels, ~3.5x the time on CPU (OpenCV's area filter is slow
        for large fractional factors, so each level shrinks the one before by 0.709 only)."""
        height, width = frames.shape[1:3]
        boxes, image_inds = [], []
        level = frames
        for scale in self._scales(height, width):
            size = (int(width * scale + 1), int(height * scale + 1))
            level = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in level])
            reg, probs = self.pnet(_normalised(level))
            found, inds = generate_bounding_box(reg, probs[:, 1], scale, self.thresholds[0])
            pick = box_ops.batched_nms(found[:, :4], found[:, 4], inds, 0.5)
            boxes.append(found[pick])
            image_inds.append(inds[pick])
        if not boxes:  # frames smaller than the smallest face: no pyramid level, no candidate
            return np.zeros((0, 5), np.float32), np.zeros(0, np.int64)
        boxes, image_inds = np.concatenate(boxes), np.concatenate(image_inds)
        pick = box_ops.batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds = boxes[pick], image_inds[pick]
        size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
        regressed = np.concatenate([boxes[:, :4] + boxes[:, 5:9] * size, boxes[:, 4:5]], axis=1)
        return rerec(regressed), image_inds

    @staticmethod
    def _crops(frames: np.ndarray, boxes: np.ndarray, image_inds: np.ndarray, size: int):
        """The boxes clipped to the frame (facenet-pytorch's `pad`); those still covering a pixel, area-resampled
        to size x size."""
        height, width = frames.shape[1:3]
        y, ey, x, ex = pad(boxes, width, height)
        keep = np.flatnonzero((ey > y - 1) & (ex > x - 1))
        crops = np.zeros((len(keep), size, size, 3), dtype=np.uint8)
        for row, k in enumerate(keep):
            crops[row] = cv2.resize(frames[image_inds[k], y[k] - 1:ey[k], x[k] - 1:ex[k]], (size, size),
                                    interpolation=cv2.INTER_AREA)
        return _normalised(crops), boxes[keep], image_inds[keep]

    def _refine(self, frames, boxes, image_inds, nms: bool = True):
        """R-Net rescoring and box regression (and NMS, unless O-Net's results are to be voted on)."""
        crops, boxes, image_inds = self._crops(frames, boxes, image_inds, 24)
        if not len(boxes):
            return boxes, image_inds
        reg, probs = self.rnet(crops)
        passed = probs[:, 1] > self.thresholds[1]
        boxes = np.concatenate([boxes[passed, :4], probs[passed, 1:2]], axis=1)
        image_inds, reg = image_inds[passed], reg[passed]
        if nms:
            pick = box_ops.batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
            boxes, image_inds, reg = boxes[pick], image_inds[pick], reg[pick]
        return rerec(bbreg(boxes, reg)), image_inds

    def _output(self, frames, boxes, image_inds, vote: bool = False):
        """O-Net: final score, box and the five landmarks. With `vote`, each kept face's box and landmarks are the
        probability-weighted mean over all of O-Net's outputs that overlap it: O-Net's landmarks move by a pixel
        or two with its input box, and the mean of several input boxes steadies them. (Its sums are numpy's, which
        add in another order than torch's did: the same means up to a few float32 ulps, ~1e-4 px.)"""
        crops, boxes, image_inds = self._crops(frames, boxes, image_inds, 48)
        if not len(boxes):
            return np.zeros((0, 5), np.float32), image_inds, np.zeros((0, 5, 2), np.float32)
        reg, marks, probs = self.onet(crops)
        passed = probs[:, 1] > self.thresholds[2]
        boxes = np.concatenate([boxes[passed, :4], probs[passed, 1:2]], axis=1)
        image_inds, reg, marks = image_inds[passed], reg[passed], marks[passed]
        side = (boxes[:, 2:4] - boxes[:, 0:2] + 1)[:, None]  # (k, 1, 2): width, height
        points = np.stack([marks[:, :5], marks[:, 5:]], axis=2) * side + boxes[:, None, 0:2] - 1
        boxes = bbreg(boxes, reg)
        pick = batched_nms_min(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        if vote and len(pick):
            same = (box_ops.box_iou(boxes[pick, :4], boxes[:, :4]) >= 0.5) & (image_inds[pick, None] == image_inds)
            weight = same * boxes[None, :, 4]
            weight = weight / weight.sum(axis=1, keepdims=True)
            voted = np.concatenate([weight @ boxes[:, :4], boxes[pick, 4:5]], axis=1)
            return voted, image_inds[pick], np.einsum("pk,kij->pij", weight, points)
        return boxes[pick], image_inds[pick], points[pick]
