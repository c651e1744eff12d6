"""dfpipe's rearranged MTCNN against facenet-pytorch's own `detect` on the same frames, and its copies of
facenet-pytorch's networks and box helpers against the originals (dfpipe imports neither facenet_pytorch nor
torchvision; the tests may)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from itertools import islice
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from dfpipe.manifests.errors import InputError
from dfpipe.stages import mtcnn, mtcnn_nets
from dfpipe.stages.mtcnn import MTCNN
from facenet_pytorch import MTCNN as FacenetMTCNN
from facenet_pytorch.models import mtcnn as facenet_nets
from facenet_pytorch.models.utils import detect_face as facenet_boxes
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


@pytest.mark.parametrize("name, shape", [("PNet", (2, 3, 41, 57)), ("RNet", (7, 3, 24, 24)), ("ONet", (7, 3, 48, 48))])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_nets_are_facenet_pytorchs_with_its_weights(name, shape, layout):
    ours = getattr(mtcnn_nets, name)().load_weights().eval().to(memory_format=layout)
    theirs = getattr(facenet_nets, name)().eval().to(memory_format=layout)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    x = torch.empty(shape).uniform_(-1, 1, generator=torch.Generator().manual_seed(0)).to(memory_format=layout)
    with torch.inference_mode():
        outputs, expected = ours(x), theirs(x)
    assert len(outputs) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert (expected[0].std(dim=0) > 0).all()  # outputs that depend on the input


def test_nets_load_facenet_pytorchs_files_without_importing_it_and_say_when_it_is_missing(monkeypatch):
    path = mtcnn_nets.weights_file("onet")
    assert path == Path(facenet_nets.__file__).parents[1] / "data" / "onet.pt"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InputError, match="facenet-pytorch, which is not installed"):
        mtcnn_nets.PNet().load_weights()


def test_importing_the_face_path_imports_neither_torchvision_nor_facenet_pytorch():
    code = ("import sys, dfpipe.stages.faces, dfpipe.stages.align; "
            "print([m for m in ('torchvision', 'facenet_pytorch', 'torch._dynamo') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def random_candidates(generator, n: int, images: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 5) float32 boxes (x1, y1, x2, y2, score) around a few centres, overlapping at all ratios, and their
    image indices."""
    centres = torch.rand(4, 2, generator=generator) * 200
    centres = centres[torch.randint(0, 4, (n,), generator=generator)] + torch.randn(n, 2, generator=generator) * 8
    sides = 10 + torch.rand(n, 2, generator=generator) * 40
    boxes = torch.cat([centres - sides / 2, centres + sides / 2, torch.rand(n, 1, generator=generator)], dim=1)
    return boxes, torch.randint(0, images, (n,), generator=generator)


def test_box_helpers_are_facenet_pytorchs_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    reg, probs = torch.randn(3, 4, 23, 31, generator=g) * 0.2, torch.rand(3, 23, 31, generator=g)
    for ours, theirs in zip(mtcnn.generate_bounding_box(reg, probs, 0.37, 0.6),
                            facenet_boxes.generateBoundingBox(reg, probs, 0.37, 0.6)):
        assert torch.equal(ours, theirs)
    boxes, _ = random_candidates(g, 200)
    boxes[:, :4] *= 3.7  # 0-800 px, beyond a 640 x 360 frame on both sides once shifted
    boxes[:, :4] -= 50
    shift = torch.randn(200, 4, generator=g) * 0.1
    assert torch.equal(mtcnn.bbreg(boxes.clone(), shift), facenet_boxes.bbreg(boxes.clone(), shift))
    assert torch.equal(mtcnn.rerec(boxes.clone()), facenet_boxes.rerec(boxes.clone()))
    clipped, expected = mtcnn.pad(boxes, 640, 360), facenet_boxes.pad(boxes, 640, 360)
    assert all(np.array_equal(a, b) for a, b in zip(clipped, expected))
    assert (expected[0] == 1).any() and (expected[3] == 640).any()  # both sides clipped


@pytest.mark.parametrize("n", [0, 1, 40, 300])
def test_min_nms_is_facenet_pytorchs(n):
    boxes, images = random_candidates(torch.Generator().manual_seed(n), n)
    keep = mtcnn.batched_nms_min(boxes[:, :4], boxes[:, 4], images, 0.7)
    expected = facenet_boxes.batched_nms_numpy(boxes[:, :4], boxes[:, 4], images, 0.7, "Min")
    assert keep.dtype == torch.int64 and torch.equal(keep, expected)
    if n >= 40:
        assert 3 < len(keep) < n  # some suppressed, several kept


def test_min_nms_is_facenet_pytorchs_on_ties_and_at_the_threshold():
    boxes, images = random_candidates(torch.Generator().manual_seed(5), 300)
    scores = (boxes[:, 4] * 4).floor() / 4  # four distinct scores: ties broken as facenet's unstable sort does
    keep = mtcnn.batched_nms_min(boxes[:, :4], scores, images, 0.7)
    assert torch.equal(keep, facenet_boxes.batched_nms_numpy(boxes[:, :4], scores, images, 0.7, "Min"))
    # +1 widths: the second box covers exactly 70 of the first's 100 pixels, which is not more than 0.7
    edge = torch.tensor([[0, 0, 9, 9], [0, 3, 9, 19], [0, 2, 9, 19]], dtype=torch.float32)
    keep = mtcnn.batched_nms_min(edge, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64), 0.7)
    assert keep.tolist() == [0, 1]
    assert torch.equal(keep, facenet_boxes.batched_nms_numpy(edge, torch.tensor([0.9, 0.8, 0.7]),
                                                             torch.zeros(3, dtype=torch.int64), 0.7, "Min"))
