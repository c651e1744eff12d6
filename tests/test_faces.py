"""Detection, tracking and alignment on the astronaut composited into synthetic frames (real MTCNN, CPU)."""
from __future__ import annotations

from itertools import islice
from typing import NamedTuple

import av
import cv2
import numpy as np
import pytest
import torch
from skimage import data

from dfpipe.pipeline.config import load_config
from dfpipe.stages.faces import (Detection, FaceDetector, FaceStream, FaceTracker, align_face, jpeg_round_trip,
                                 select_tracks, template_points)


class Frame(NamedTuple):
    index: int
    timestamp: float
    image: np.ndarray


@pytest.fixture(scope="module")
def cfg():
    # A larger minimum face prunes the MTCNN image pyramid: the synthetic faces are ~50 px, the tests 3x faster.
    return load_config(overrides=[{"align": {"device": "cpu", "min_face_size": 30, "batch_size": 4}}]).align


@pytest.fixture(scope="module")
def detector(cfg):
    return FaceDetector(**cfg)


@pytest.fixture(scope="module")
def head():
    """The astronaut's head and shoulders at half size: a ~45 px wide face."""
    return cv2.resize(data.astronaut()[20:220, 130:320], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)


def composite(head, corners, size=(240, 320)):
    frame = np.full((*size, 3), 128, np.uint8)
    for y, x in corners:
        frame[y:y + head.shape[0], x:x + head.shape[1]] = head
    return frame


def stream(images):
    return [Frame(i, i / 10, image) for i, image in enumerate(images)]


def fake_detection(x, y=40.0, side=50.0):
    box = np.array([x, y, x + side, y + side])
    eyes_nose_mouth = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
    return Detection(box=box, prob=1.0, landmarks=box[:2] + eyes_nose_mouth * side, scale=1.0)


def test_crops_have_exact_sizes_and_put_the_eyes_on_the_template(cfg, detector, head):
    frame = composite(head, [(60, 110)])
    (face,) = detector.detect([frame])[0]
    hq, lq, matrix = align_face(frame, face.landmarks, **cfg)
    assert (hq.shape, hq.dtype, lq.shape, lq.dtype) == ((224, 224, 3), np.uint8, (112, 112, 3), np.uint8)
    assert matrix.shape == (2, 3)
    # The transform sends the detected eyes to the template (least squares over 5 points: a few px slack).
    eyes = cv2.transform(face.landmarks[None, :2], matrix)[0]
    assert np.abs(eyes - template_points(224, cfg.margin)[:2]).max() < 4
    # An independent detection on the crop itself finds the eyes there too.
    (redetected,) = detector.detect([hq])[0]
    assert np.abs(redetected.landmarks[:2] - template_points(224, cfg.margin)[:2]).max() < 8
    # LQ shows the same region as HQ: a direct 112 px warp with the same template matches it.
    direct, _, _ = align_face(frame, face.landmarks, margin=cfg.margin, hq_size=112, lq_size=112)
    assert np.abs(lq.astype(int) - direct.astype(int)).mean() < 6
    assert np.abs(lq.astype(int) - hq[::2, ::2].astype(int)).mean() < 6


@pytest.mark.parametrize("corner, side", [((300, 500), 90), ((7, 3), 60), ((650, 1180), 80), ((-30, 600), 70)])
def test_crops_as_stored_equal_the_staged_crops_pixel_for_pixel(cfg, corner, side):
    """score-video JPEGs only the region around a face; the staged path stores the whole frame, then the crops, and
    training decodes them with torchvision: for the same landmarks both must give the model the same pixels
    (mid-frame, at the top-left and bottom-right edges of a frame whose size is no multiple of 16, half outside)."""
    from torchvision.io import ImageReadMode, decode_image
    rng = np.random.default_rng(1)
    frame = cv2.resize(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8), (1278, 718), interpolation=cv2.INTER_CUBIC)
    frame = cv2.add(frame, rng.integers(0, 24, frame.shape, dtype=np.uint8))  # texture JPEG cannot keep exactly
    landmarks = fake_detection(corner[1], corner[0], side).landmarks
    staged_frame = jpeg_round_trip(frame, 90)  # extract writes it, align reads it
    hq, lq, _ = align_face(staged_frame, landmarks, **cfg)
    written = [cv2.imencode(".jpg", cv2.cvtColor(c, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])[1]
               for c in (hq, lq)]  # align writes the crops; the dataset decodes them with torchvision
    staged = [decode_image(torch.from_numpy(w), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy() for w in written]
    streamed = align_face(frame, landmarks, **{**cfg, "as_stored": (90, 80)})
    for ours, theirs in zip(streamed[:2], staged):
        np.testing.assert_array_equal(ours, theirs)
    raw = align_face(frame, landmarks, **cfg)[0]
    assert np.abs(raw.astype(int) - staged[0]).mean() > 1  # the round trips do change the crop


def test_margin_widens_the_crop(cfg, detector, head):
    frame = composite(head, [(60, 110)])
    (face,) = detector.detect([frame])[0]
    tight = template_points(224, 1.0)
    wide = template_points(224, 2.0)

    def eye_distance(pts):
        return np.linalg.norm(pts[1] - pts[0])

    assert eye_distance(tight) == pytest.approx(2 * eye_distance(wide))
    hq_wide, _, _ = align_face(frame, face.landmarks, margin=2.0, hq_size=224, lq_size=112)
    # At margin 2 the crop reaches past the pasted patch into the grey canvas.
    assert (hq_wide[:10, :10] == 128).all()


def test_downscaled_detection_maps_back_to_full_resolution(cfg):
    frame = np.full((720, 1280, 3), 128, np.uint8)
    frame[100:612, 300:812] = data.astronaut()
    found = {}
    for side in (640, 1280):
        detector = FaceDetector(**{**cfg, "detect_max_side": side, "min_face_size": 40})
        (face,) = detector.detect([frame])[0]
        found[side] = face
    assert found[640].scale == 0.5 and found[1280].scale == 1.0
    # Detector noise between two resolutions: a few pixels on this 115 px face (a mapping error would be ~100s)
    assert np.abs(found[640].box - found[1280].box).max() < 8
    assert np.abs(found[640].landmarks - found[1280].landmarks).max() < 6
    # The astronaut's face sits at (481, 160)-(568, 275) in this frame, not at half those coordinates.
    assert 470 < found[640].box[0] < 495 and 150 < found[640].box[1] < 170


def test_two_moving_faces_keep_their_tracks_and_reruns_are_identical(cfg, detector, head):
    images = [composite(head, [(30 + 3 * i, 10 + 4 * i), (90 - 3 * i, 210 - 4 * i)]) for i in range(6)]
    runs = [list(FaceStream(stream(images), detector, **cfg)) for _ in range(2)]
    for frame_faces in runs[0]:
        by_track = {face.track_id: face.box for face in frame_faces.faces}
        assert sorted(by_track) == [0, 1]
        assert by_track[0][0] < 160 < by_track[1][0]  # track 0 always the left face
    first, second = ([(f.track_id, f.hq.tobytes()) for ff in run for f in ff.faces] for run in runs)
    assert first == second


def test_smoothing_averages_landmarks_over_a_centred_window(cfg, detector, head):
    images = [composite(head, [(40 + 5 * i, 60 + 7 * i)]) for i in range(5)]
    smooth = list(FaceStream(stream(images), detector, **{**cfg, "smooth_window": 3}))
    raw = np.array([ff.faces[0].raw_landmarks for ff in smooth])
    used = np.array([ff.faces[0].landmarks for ff in smooth])
    np.testing.assert_allclose(used[2], raw[1:4].mean(axis=0))
    np.testing.assert_allclose(used[0], raw[:2].mean(axis=0))   # the window is cut at the stream's ends
    np.testing.assert_allclose(used[4], raw[3:].mean(axis=0))
    off = list(FaceStream(stream(images), detector, **{**cfg, "smooth_window": 1}))
    assert all(np.array_equal(ff.faces[0].landmarks, ff.faces[0].raw_landmarks) for ff in off)
    np.testing.assert_allclose([ff.faces[0].raw_landmarks for ff in off], raw)


def test_frame_without_face_gets_an_empty_list_and_the_track_survives_the_gap(cfg, detector, head):
    images = [composite(head, [(60, 100 + 3 * i)]) for i in range(4)]
    images[2] = composite(head, [])
    result = list(FaceStream(stream(images), detector, **cfg))
    assert [ff.index for ff in result] == [0, 1, 2, 3]
    assert result[2].faces == []
    assert [[f.track_id for f in ff.faces] for ff in result] == [[0], [0], [], [0]]


def test_tracker_continues_across_max_gap_and_not_beyond(cfg):
    tracker = FaceTracker(**cfg)
    seen = [tracker.update([fake_detection(10 + 2 * i)]) for i in range(3)]
    seen += [tracker.update([]) for _ in range(cfg.track_max_gap)]
    seen.append(tracker.update([fake_detection(20)]))
    seen += [tracker.update([]) for _ in range(cfg.track_max_gap + 1)]
    seen.append(tracker.update([fake_detection(22)]))
    assert [ids for ids in seen if ids] == [[0], [0], [0], [0], [1]]


def test_fast_faces_without_overlap_keep_their_tracks(cfg):
    """Two people crossing the frame a box width per sampled frame: no IoU at all, yet two tracks."""
    tracker = FaceTracker(**cfg)
    seen = [tracker.update([fake_detection(10 + 55 * i), fake_detection(600 - 55 * i, y=300)]) for i in range(5)]
    assert seen == [[0, 1]] * 5
    assert tracker.update([fake_detection(10 + 55 * 5 + 200)]) == [2]  # a jump of 4 sides is someone else


def test_tracker_numbers_new_tracks_left_to_right(cfg):
    tracker = FaceTracker(**cfg)
    assert tracker.update([fake_detection(200), fake_detection(10)]) == [1, 0]
    assert tracker.update([fake_detection(14), fake_detection(600), fake_detection(196)]) == [0, 2, 1]


class StubDetector:
    """One face per frame at a position that drifts with the frame's pixel value; records which frames each
    method saw."""

    def __init__(self, absent=(), lost=()):
        self.detected, self.confirmed = [], []
        self.absent, self.lost = set(absent), set(lost)  # frames detect / confirm find nothing in

    def detect(self, frames):
        self.detected += [int(f[0, 0, 0]) for f in frames]
        return [[] if f[0, 0, 0] in self.absent else [fake_detection(10 + float(f[0, 0, 0]))] for f in frames]

    def confirm(self, frame, boxes):
        self.confirmed.append(int(frame[0, 0, 0]))
        return [] if frame[0, 0, 0] in self.lost else [fake_detection(10 + float(frame[0, 0, 0]))]


def test_stream_buffers_at_most_a_batch_plus_the_window(cfg):
    pulled = 0

    def frames():
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield Frame(i, i / 10, np.full((120, 160, 3), i, np.uint8))

    faces = FaceStream(frames(), StubDetector(), **{**cfg, "smooth_window": 5, "batch_size": 8,
                                                         "detect_every": 1})
    indices, held = [], []
    for frame_faces in faces:
        indices.append(frame_faces.index)
        held.append(pulled - len(indices))
    assert indices == list(range(100))
    assert held[0] == 7  # the first crop leaves after one detector batch, not after the whole video
    assert max(held) <= 8 + 5
    assert faces.track_lengths == {0: 100}
    assert faces.track_sizes == {0: pytest.approx(2500.0)}


def test_full_detection_runs_on_every_nth_frame_and_tracking_fills_the_rest(cfg):
    detector = StubDetector()
    frames = [Frame(i, i / 10, np.full((120, 160, 3), i, np.uint8)) for i in range(11)]
    faces = FaceStream(frames, detector, **{**cfg, "detect_every": 4, "batch_size": 3})
    result = list(faces)
    assert detector.detected == [0, 4, 8]  # by position in the stream, whatever the batch size
    assert detector.confirmed == list(range(1, 11))  # every frame after the first, once a track is live
    assert [[f.track_id for f in ff.faces] for ff in result] == [[0]] * 11
    assert faces.track_lengths == {0: 11}


def test_frames_with_nothing_to_follow_are_always_detected(cfg):
    """The face appears on frame 2 and is lost on frames 4-6 (longer than track_max_gap): until it is found, and
    again once its track has ended, every frame is searched, not only the scheduled ones (0 and 8)."""
    detector = StubDetector(absent={0, 1}, lost={4, 5, 6})
    frames = [Frame(i, i / 10, np.full((120, 160, 3), i, np.uint8)) for i in range(11)]
    faces = FaceStream(frames, detector, **{**cfg, "detect_every": 8, "batch_size": 3, "track_max_gap": 2})
    result = [[f.track_id for f in ff.faces] for ff in faces]
    assert sorted(detector.detected) == [0, 1, 2, 7, 8]
    assert detector.confirmed == [3, 4, 5, 6, 8, 9, 10]
    assert result == [[], [], [0], [0], [], [], [], [1], [1], [1], [1]]


def test_tracking_between_detections_follows_a_face_moving_its_own_width_per_frame(cfg, detector, head):
    """Full detection on frames 0, 4 and 8 only; in between, the search windows must keep up with the face."""
    corners = [(40 + 3 * i, 10 + 48 * i) for i in range(6)]
    images = [composite(head, [corner], size=(240, 360)) for corner in corners]
    result = list(FaceStream(stream(images), detector, **{**cfg, "detect_every": 4}))
    assert [[f.track_id for f in ff.faces] for ff in result] == [[0]] * 6
    for ff, (y, x) in zip(result, corners):
        truth = np.array([x, y, x + head.shape[1], y + head.shape[0]], dtype=float)
        centre = (ff.faces[0].box[:2] + ff.faces[0].box[2:]) / 2
        assert truth[0] < centre[0] < truth[2] and truth[1] < centre[1] < truth[3]


@pytest.mark.parametrize("box, shrink", [((-20.0, 30.0, 20.0, 70.0), 1),         # over the left edge, native size
                                          ((250.0, 150.0, 370.0, 270.0), 2)])   # 120 px face, past the bottom right
def test_search_windows_map_back_to_the_frame(box, shrink):
    """frame point = window point x factor + corner, with what lies outside the frame black."""
    yy, xx = np.mgrid[0:240, 0:320]
    frame = np.stack([7 * xx % 256, 5 * yy % 256, (3 * xx + 11 * yy) % 256], axis=-1).astype(np.uint8)  # 1 px off shows
    windows, corners, factors = FaceDetector._windows(frame, np.array([box]))
    (window,), (x0, y0), k = windows, corners[0].astype(int), int(factors[0])
    assert k == shrink and window.shape[0] == window.shape[1] >= 2.5 * (box[2] - box[0]) / k - 1
    for wy, wx in [(0, 0), (5, 7), (window.shape[0] // 2, window.shape[1] // 2), (window.shape[0] - 1, 3)]:
        fy, fx = y0 + wy * k, x0 + wx * k
        if 0 <= fy and fy + k <= 240 and 0 <= fx and fx + k <= 320:
            np.testing.assert_allclose(window[wy, wx], frame[fy:fy + k, fx:fx + k].reshape(-1, 3).mean(axis=0),
                                       atol=1)
        else:
            assert (window[wy, wx] == 0).all()


def test_select_tracks_drops_short_tracks_then_keeps_the_largest():
    lengths = {0: 10, 1: 2, 2: 10, 3: 7}
    sizes = {0: 900.0, 1: 5000.0, 2: 2500.0, 3: 1600.0}
    assert select_tracks(lengths, sizes, min_track_len=3, max_faces=None) == {0, 2, 3}
    assert select_tracks(lengths, sizes, min_track_len=3, max_faces=2) == {2, 3}


def test_bad_input_is_rejected(cfg, detector):
    with pytest.raises(ValueError, match="one size"):
        detector.detect([np.zeros((48, 64, 3), np.uint8), np.zeros((64, 48, 3), np.uint8)])
    with pytest.raises(ValueError, match="smooth_window"):
        FaceStream([], detector, **{**cfg, "smooth_window": 0})
    with pytest.raises(ValueError, match="detect_every"):
        FaceStream([], detector, **{**cfg, "detect_every": 0})
    with pytest.raises(ValueError, match="degenerate"):
        align_face(np.zeros((48, 64, 3), np.uint8), np.zeros((5, 2)), **cfg)


def sampled_frames(path, count, stride):
    with av.open(str(path)) as container:
        decoded = (f for i, f in enumerate(container.decode(video=0)) if i % stride == 0)
        return [Frame(i, float(f.time), f.to_ndarray(format="rgb24")) for i, f in enumerate(islice(decoded, count))]


def test_multiface_video_gives_four_long_tracks(shared_data):
    cfg = load_config(overrides=[{"align": {"device": "cpu"}}]).align
    faces = FaceStream(sampled_frames(shared_data / "multiface" / "facenet_pytorch_example.mp4", 10, 3),
                            FaceDetector(**cfg), **cfg)
    result = list(faces)
    assert len(result) == 10
    assert all(face.hq.shape == (224, 224, 3) for ff in result for face in ff.faces)
    assert len(select_tracks(faces.track_lengths, faces.track_sizes, min_track_len=5, max_faces=None)) >= 4


def test_wild_clip_gives_one_main_track(shared_data):
    cfg = load_config(overrides=[{"align": {"device": "cpu"}}]).align
    faces = FaceStream(sampled_frames(shared_data / "wild_pairs" / "real" / "RealObama.mp4", 12, 3),
                            FaceDetector(**cfg), **cfg)
    result = list(faces)
    assert select_tracks(faces.track_lengths, faces.track_sizes, **cfg) == {0}
    assert faces.track_lengths[0] >= 11
    assert sum(len(ff.faces) for ff in result) == sum(faces.track_lengths.values())


def test_smoothing_removes_most_landmark_jitter_on_a_real_clip(shared_data):
    cfg = load_config(overrides=[{"align": {"device": "cpu", "smooth_window": 3}}]).align
    frames = sampled_frames(shared_data / "reals" / "d10.mp4", 15, 3)
    faces = [ff.faces[0] for ff in FaceStream(frames, FaceDetector(**cfg), **cfg)]
    assert len(faces) == 15

    def jitter(points):  # second differences: steady head motion cancels, detector noise stays
        return np.linalg.norm(points[:-2] - 2 * points[1:-1] + points[2:], axis=-1).mean()

    raw = jitter(np.array([f.raw_landmarks for f in faces]))
    smoothed = jitter(np.array([f.landmarks for f in faces]))
    assert smoothed < 0.6 * raw
