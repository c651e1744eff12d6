"""dfpipe's rearranged MTCNN against facenet-pytorch's own `detect` on the same frames, its copies of
facenet-pytorch's networks and box helpers against the originals (dfpipe imports neither facenet_pytorch nor
torchvision; the tests may), its onnxruntime runtime against its torch one, and the cache of the exports."""
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
from dfpipe.stages import mtcnn, mtcnn_modules, mtcnn_nets
from dfpipe.stages.mtcnn import MTCNN
from facenet_pytorch import MTCNN as FacenetMTCNN
from facenet_pytorch.models import mtcnn as facenet_nets
from facenet_pytorch.models.utils import detect_face as facenet_boxes
from skimage import data
from torchvision.ops import box_iou

THRESHOLDS = [0.6, 0.7, 0.7]


@pytest.fixture(scope="module")
def ours():
    """What faces.py builds on the CPU: onnxruntime (exported into the session's cache, see conftest.py)."""
    return MTCNN(min_face_size=20, thresholds=THRESHOLDS, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def ours_in_torch():
    return MTCNN(min_face_size=20, thresholds=THRESHOLDS, device="cpu", runtime="torch")


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
    ours = getattr(mtcnn_modules, name)().load_weights().eval().to(memory_format=layout)
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
        mtcnn_modules.PNet().load_weights()


def test_importing_the_face_path_imports_neither_torchvision_nor_facenet_pytorch():
    code = ("import sys, dfpipe.stages.faces, dfpipe.stages.align; "
            "print([m for m in ('torchvision', 'facenet_pytorch', 'torch._dynamo') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# onnxruntime against torch. Their convolutions sum in different orders, so the nets' outputs differ by float32
# rounding (~1e-6); box regression scales that by the box's side, so boxes and landmarks move by ~1e-4 px (at most
# 1.8e-4 px over 892 real frames of 9 videos, probabilities 1.4e-6). The tolerances are 5x that: a wrong graph
# (a layer off, a transposed weight) moves them by pixels, or finds other faces.
BOX_TOLERANCE, PROB_TOLERANCE = 1e-3, 1e-5


def assert_same_faces(found, expected):
    """The same faces in every frame, within the tolerances; equal scores may come in either order."""
    assert len(found) == len(expected)
    for (boxes, probs, points), (want_boxes, want_probs, want_points) in zip(found, expected):
        assert boxes.shape == want_boxes.shape
        if not len(boxes):
            continue
        match = np.abs(boxes[:, None] - want_boxes[None]).max(axis=2).argmin(axis=0)  # ours nearest each expected
        assert sorted(match.tolist()) == list(range(len(boxes)))
        assert np.abs(boxes[match] - want_boxes).max() < BOX_TOLERANCE
        assert np.abs(probs[match] - want_probs).max() < PROB_TOLERANCE
        assert np.abs(points[match] - want_points).max() < BOX_TOLERANCE


def assert_same_detections(ours: MTCNN, ours_in_torch: MTCNN, frames: np.ndarray) -> tuple[int, int]:
    """detect, and refine from boxes a few pixels off each face found (as a tracker would expect them), give the
    same faces in both runtimes. How many faces each found."""
    expected = ours_in_torch.detect(frames)
    assert_same_faces(ours.detect(frames), expected)
    near = [np.concatenate([boxes + [8, -6, 8, -6], boxes - [5, 3, 5, 3]]) for boxes, _, _ in expected]
    candidates = np.concatenate(near), np.repeat(np.arange(len(frames)), [len(boxes) for boxes in near])
    refined = ours_in_torch.refine(frames, *candidates)
    assert_same_faces(ours.refine(frames, *candidates), refined)
    return sum(len(boxes) for boxes, _, _ in expected), sum(len(boxes) for boxes, _, _ in refined)


def test_onnxruntime_finds_the_faces_torch_finds_on_synthetic_frames(ours, ours_in_torch):
    assert isinstance(ours.pnet, mtcnn_nets.OnnxNet) and isinstance(ours_in_torch.pnet, mtcnn_nets.TorchNet)
    assert assert_same_detections(ours, ours_in_torch, astronaut_frames()) == (8, 8)  # two faces a frame


def real_frames(shared_data: Path) -> list[np.ndarray]:
    """A crowd, a DFDC interview and a FaceForensics++ newsreader, at the detector's 640 px."""
    videos = ["multiface/facenet_pytorch_example.mp4", "dfdc_sample/abqwwspghj.mp4",
              "ffpp_c40/original_sequences/youtube/c40/videos/183.mp4"]
    frames = []
    for video in videos:
        with av.open(str(shared_data / video)) as container:
            for frame in islice(container.decode(video=0), 0, 60, 20):
                image = frame.to_ndarray(format="rgb24")
                scale = 640 / max(image.shape[:2])
                frames.append(cv2.resize(image, (640, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA))
    return frames


def test_onnxruntime_finds_the_faces_torch_finds_on_real_frames(ours, ours_in_torch, shared_data):
    found = np.sum([assert_same_detections(ours, ours_in_torch, frame[None]) for frame in real_frames(shared_data)],
                   axis=0)
    assert found[0] >= 12 and found[1] >= 12


def test_the_cpu_without_onnxruntime_runs_torch_and_an_unknown_runtime_is_refused(monkeypatch, ours_in_torch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        find_spec(name, *a))
    detector = MTCNN(min_face_size=20, thresholds=THRESHOLDS, device="cpu")
    assert all(isinstance(net, mtcnn_nets.TorchNet) for net in (detector.pnet, detector.rnet, detector.onet))
    frames = astronaut_frames()
    for (boxes, probs, points), expected in zip(detector.detect(frames), ours_in_torch.detect(frames)):
        assert np.array_equal(boxes, expected[0]) and np.array_equal(points, expected[2]) and len(boxes) == 2
    with pytest.raises(InputError, match="none of auto, torch, onnx"):
        MTCNN(min_face_size=20, thresholds=THRESHOLDS, device="cpu", runtime="tensorrt")


# The cache of the exports: each test has a cache folder of its own, and `export` replaced by a recorder that hands
# out the exports made once for the module.

@pytest.fixture(scope="module")
def exports() -> dict[str, bytes]:
    return {name: mtcnn_nets.export(name) for name in mtcnn_nets.OUTPUTS}


@pytest.fixture
def exported(monkeypatch, exports) -> list[str]:
    """The nets exported in this test, in order."""
    calls = []
    monkeypatch.setattr(mtcnn_nets, "export", lambda name: calls.append(name) or exports[name])
    return calls


def faces_in_a_frame() -> int:
    """How many faces a freshly built detector finds in the first synthetic frame (two are there)."""
    (boxes, _, _), = MTCNN(min_face_size=20, thresholds=THRESHOLDS, device="cpu").detect(astronaut_frames()[:1])
    return len(boxes)


def test_the_nets_are_exported_once_and_then_read_from_the_cache(monkeypatch, tmp_path, exported, capsys):
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "cache"))
    assert faces_in_a_frame() == 2
    assert exported == ["pnet", "rnet", "onet"]
    assert capsys.readouterr().err.count("exporting MTCNN's networks") == 1
    assert {p.name for p in (tmp_path / "cache" / "onnx").iterdir()} == {
        mtcnn_nets.cache_path(name).name for name in exported}
    assert faces_in_a_frame() == 2
    assert exported == ["pnet", "rnet", "onet"]  # nothing exported the second time
    assert capsys.readouterr().err == ""


def test_a_damaged_cache_file_is_exported_again_with_a_warning(monkeypatch, tmp_path, exports, exported, capsys):
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "cache"))
    for name, graph in exports.items():
        mtcnn_nets.cache_path(name).parent.mkdir(parents=True, exist_ok=True)
        mtcnn_nets.cache_path(name).write_bytes(graph if name != "rnet" else graph[:1000])
    assert faces_in_a_frame() == 2
    assert exported == ["rnet"]
    assert "not a readable export" in capsys.readouterr().err
    assert mtcnn_nets.cache_path("rnet").read_bytes() == exports["rnet"]


def test_an_unwritable_cache_still_detects_with_a_warning(monkeypatch, tmp_path, exported, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DFPIPE_CACHE", str(blocker / "cache"))
    assert faces_in_a_frame() == 2
    assert exported == ["pnet", "rnet", "onet"]
    assert capsys.readouterr().err.count("exporting again next time") == 1  # one warning for the folder


def test_a_process_detects_without_importing_torch_once_the_cache_is_warm(ours, tmp_path):
    """`ours` exported the nets into the session's cache, which subprocesses inherit (conftest.py)."""
    frame = tmp_path / "frame.npy"
    np.save(frame, astronaut_frames()[0])
    code = ("import sys, numpy as np; from dfpipe.stages.mtcnn import MTCNN; "
            "detector = MTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.7], device='cpu'); "
            f"(boxes, probs, points), = detector.detect(np.load({str(frame)!r})[None]); "
            "print(len(boxes), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "False"]
    assert "exporting" not in done.stderr


def random_candidates(generator, n: int, images: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 5) float32 boxes (x1, y1, x2, y2, score) around a few centres, overlapping at all ratios, and their
    image indices."""
    centres = torch.rand(4, 2, generator=generator) * 200
    centres = centres[torch.randint(0, 4, (n,), generator=generator)] + torch.randn(n, 2, generator=generator) * 8
    sides = 10 + torch.rand(n, 2, generator=generator) * 40
    boxes = torch.cat([centres - sides / 2, centres + sides / 2, torch.rand(n, 1, generator=generator)], dim=1)
    return boxes, torch.randint(0, images, (n,), generator=generator)


def same_array(ours: np.ndarray, theirs: torch.Tensor) -> bool:
    """Bit for bit, in the same dtype."""
    return ours.dtype == theirs.numpy().dtype and np.array_equal(ours, theirs.numpy())


def test_box_helpers_are_facenet_pytorchs_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    reg, probs = torch.randn(3, 4, 23, 31, generator=g) * 0.2, torch.rand(3, 23, 31, generator=g)
    ours = mtcnn.generate_bounding_box(reg.numpy(), probs.numpy(), 0.37, 0.6)
    theirs = facenet_boxes.generateBoundingBox(reg, probs, 0.37, 0.6)
    assert all(same_array(a, b) for a, b in zip(ours, theirs))
    assert 100 < len(ours[0]) < 3 * 23 * 31  # some windows pass the threshold, not all
    boxes, _ = random_candidates(g, 200)
    boxes[:, :4] *= 3.7  # 0-800 px, beyond a 640 x 360 frame on both sides once shifted
    boxes[:, :4] -= 50
    shift = torch.randn(200, 4, generator=g) * 0.1
    assert same_array(mtcnn.bbreg(boxes.numpy().copy(), shift.numpy()), facenet_boxes.bbreg(boxes.clone(), shift))
    assert same_array(mtcnn.rerec(boxes.numpy().copy()), facenet_boxes.rerec(boxes.clone()))
    clipped, expected = mtcnn.pad(boxes.numpy(), 640, 360), facenet_boxes.pad(boxes, 640, 360)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(clipped, expected))
    assert (expected[0] == 1).any() and (expected[3] == 640).any()  # both sides clipped


def min_nms(boxes: torch.Tensor, scores: torch.Tensor, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Ours and facenet-pytorch's "Min" NMS on the same boxes."""
    return (mtcnn.batched_nms_min(boxes.numpy(), scores.numpy(), images.numpy(), 0.7),
            facenet_boxes.batched_nms_numpy(boxes, scores, images, 0.7, "Min"))


@pytest.mark.parametrize("n", [0, 1, 40, 300])
def test_min_nms_is_facenet_pytorchs(n):
    boxes, images = random_candidates(torch.Generator().manual_seed(n), n)
    keep, expected = min_nms(boxes[:, :4], boxes[:, 4], images)
    assert same_array(keep, expected)
    if n >= 40:
        assert 3 < len(keep) < n  # some suppressed, several kept


def test_min_nms_is_facenet_pytorchs_on_ties_and_at_the_threshold():
    boxes, images = random_candidates(torch.Generator().manual_seed(5), 300)
    scores = (boxes[:, 4] * 4).floor() / 4  # four distinct scores: ties broken as facenet's unstable sort does
    assert same_array(*min_nms(boxes[:, :4], scores, images))
    # +1 widths: the second box covers exactly 70 of the first's 100 pixels, which is not more than 0.7
    edge = torch.tensor([[0, 0, 9, 9], [0, 3, 9, 19], [0, 2, 9, 19]], dtype=torch.float32)
    keep, expected = min_nms(edge, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64))
    assert keep.tolist() == [0, 1] and same_array(keep, expected)
