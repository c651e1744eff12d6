"""dfpipe's rearranged MTCNN against facenet-pytorch's own `detect` on the same frames."""
from __future__ import annotations

from itertools import islice

import av
import cv2
import numpy as np
import pytest
import torch
from dfpipe.stages.mtcnn import MTCNN
from facenet_pytorch import MTCNN as FacenetMTCNN
from skimage import data
from torchvision.ops import box_iou

THRESHOLDS = [0.6, 0.7, 0.7]


@pytest.fixture(scope="module")
def ours():
    return MTCNN(min_face_size=20, thresholds=THRESHOLDS, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def reference():
    return FacenetMTCNN(keep_all=True, min_face_size=20, thresholds=THRESHOLDS, device="cpu")


def astronaut_frames() -> np.ndarray:
    """Two astronauts of different sizes per frame, moving, on a noisy background."""
    rng = np.random.default_rng(0)
    face = data.astronaut()[20:220, 130:320]
    frames = []
    for i in range(4):
        frame = rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)
        big = cv2.resize(face, None, fx=0.8, fy=0.8)
        small = cv2.resize(face, None, fx=0.35, fy=0.35)
        frame[40 + 5 * i:40 + 5 * i + big.shape[0], 60 + 9 * i:60 + 9 * i + big.shape[1]] = big
        frame[200:200 + small.shape[0], 420 - 7 * i:420 - 7 * i + small.shape[1]] = small
        frames.append(frame)
    return np.stack(frames)


def matched(reference_faces, our_faces) -> tuple[int, int, list[float]]:
    """(faces of the reference, how many we found with box IoU >= 0.7, landmark errors of the matched ones)"""
    total = hits = 0
    errors = []
    for (ref_boxes, ref_points), (boxes, _, points) in zip(reference_faces, our_faces):
        total += len(ref_boxes)
        if not len(ref_boxes) or not len(boxes):
            continue
        iou = box_iou(torch.as_tensor(ref_boxes, dtype=torch.float32), torch.as_tensor(boxes, dtype=torch.float32))
        best, where = iou.max(dim=1)
        for r, (value, j) in enumerate(zip(best.tolist(), where.tolist())):
            if value >= 0.7:
                hits += 1
                side = ref_boxes[r, 2] - ref_boxes[r, 0]
                errors.append(float(np.abs(ref_points[r] - points[j]).max() / side))
    return total, hits, errors


def facenet_faces(reference, frames):
    boxes, _, points = reference.detect(frames, landmarks=True)
    return [(np.zeros((0, 4)), np.zeros((0, 5, 2))) if b is None else
            (np.asarray(b, dtype=float).reshape(-1, 4), np.asarray(p, dtype=float).reshape(-1, 5, 2))
            for b, p in zip(boxes, points)]


def test_finds_the_faces_facenet_pytorch_finds_on_synthetic_frames(ours, reference):
    frames = astronaut_frames()
    total, hits, errors = matched(facenet_faces(reference, frames), ours.detect(frames))
    assert total == 8 and hits == 8
    assert max(errors) < 0.05  # landmarks within 5% of the face's width


def test_finds_the_faces_facenet_pytorch_finds_in_a_crowd(ours, reference, shared_data):
    with av.open(str(shared_data / "multiface" / "facenet_pytorch_example.mp4")) as container:
        frames = np.stack([cv2.resize(f.to_ndarray(format="rgb24"), (640, 360), interpolation=cv2.INTER_AREA)
                           for f in islice(container.decode(video=0), 0, 30, 10)])
    total, hits, errors = matched(facenet_faces(reference, frames), ours.detect(frames))
    assert total >= 12
    assert hits >= 0.9 * total
    assert np.median(errors) < 0.05


def test_refine_confirms_a_face_near_a_box_and_nothing_on_a_blank_frame(ours):
    frames = astronaut_frames()
    (boxes, _, _), *_ = ours.detect(frames[:1])
    big = boxes[np.argmax(boxes[:, 2] - boxes[:, 0])]
    shifted = big + np.array([8, -6, 8, -6])  # where a tracker might expect it
    ((found, probs, points),) = ours.refine(frames[:1], shifted[None], np.array([0]))
    assert len(found) == 1 and probs[0] > 0.9
    assert box_iou(torch.as_tensor(found[:1]), torch.as_tensor(big[None])).item() > 0.7
    assert points.shape == (1, 5, 2)
    blank = np.full_like(frames[:1], 128)
    ((found, probs, points),) = ours.refine(blank, shifted[None], np.array([0]))
    assert found.shape == (0, 4) and probs.shape == (0,) and points.shape == (0, 5, 2)


def test_frames_without_candidates_give_empty_results(ours):
    (boxes, probs, points), = ours.detect(np.zeros((1, 120, 160, 3), np.uint8))
    assert boxes.shape == (0, 4) and probs.shape == (0,) and points.shape == (0, 5, 2)


def test_frames_smaller_than_the_smallest_face_have_no_faces(ours):
    """No pyramid level fits a 16 px frame when faces start at 20 px: an empty result, not an error."""
    found = ours.detect(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert [len(boxes) for boxes, _, _ in found] == [0, 0]
