"""Find, track and align faces: the one code path behind `dfpipe align` and `dfpipe score-video`.

Frames stream through in detector-sized batches and leave as aligned crops as soon as their smoothing
window is complete, so memory stays flat however long the video is. Track selection (minimum length,
largest N faces) needs the whole video and is therefore left to the consumer via `select_tracks`.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

from ..manifests.errors import InputError
from .boxes import box_iou, nms
from .mtcnn import MTCNN
from .video import jpeg_bytes

if TYPE_CHECKING:
    import torch

# ArcFace (insightface) 112x112 template: left eye, right eye, nose tip, left and right mouth corners.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])
# MTCNN's tight box expressed in the template's frame (median over 26 photos of
# /work/shared/data/faces: centre (55.3, 62.8), 75 x 109). The square of the box height is the "tight
# face" that `margin` scales, so margin 1.3 reproduces the usual "MTCNN box x 1.3" crops.
FACE_CENTRE = np.array([56.0, 63.0])
FACE_SIDE = 108.0
# Tracking looks for a known face in a window SEARCH_AREA times its side, shrunk to SEARCH_WINDOW..2x pixels: the
# face is then 50-100 px there, far above MTCNN's smallest, and may move more than its own width between frames.
SEARCH_AREA = 2.5
JITTER_SHIFTS = (-0.1, 0.0, 0.1)
SEARCH_WINDOW = 128
JPEG_BLOCK = 16  # a JPEG's coding unit with 4:2:0 chroma, what OpenCV writes


@dataclass(frozen=True, eq=False)  # holds arrays, whose == is elementwise: compare by identity
class Detection:
    box: np.ndarray        # (4,) x1, y1, x2, y2 in full-resolution pixels
    prob: float
    landmarks: np.ndarray  # (5, 2) full-resolution pixels, ARCFACE_112 order
    scale: float           # factor the frame was shrunk by for detection


@dataclass(frozen=True, eq=False)
class AlignedFace:
    track_id: int
    box: np.ndarray
    prob: float
    landmarks: np.ndarray      # smoothed along the track; the warp uses these
    raw_landmarks: np.ndarray  # as detected in this frame
    scale: float
    matrix: np.ndarray         # (2, 3) frame -> HQ crop pixels
    hq: np.ndarray             # (hq_size, hq_size, 3) uint8 RGB
    lq: np.ndarray             # (lq_size, lq_size, 3) uint8 RGB


@dataclass(frozen=True)
class FrameFaces:
    index: int
    timestamp: float
    faces: list[AlignedFace]


GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/kfd")  # NVIDIA's driver's and AMD's (ROCm), which torch.cuda uses


def resolve_device(device: str) -> torch.device:
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}': no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                         "use --device auto or cpu")
    return resolved


def device_type(device: str) -> str:
    """cpu or cuda for a device setting. Where no GPU driver is loaded, auto is the CPU without asking torch, whose
    import is 1.6 s and ~470 MB: a CPU process may then detect faces and score without torch (see `ort_session`)."""
    device = str(device)
    if device == "cpu" or (device == "auto" and not any(os.path.exists(p) for p in GPU_DRIVER_FILES)):
        return "cpu"
    return resolve_device(device).type


class FaceDetector:
    """`detect`: MTCNN on frames shrunk to `detect_max_side`: its cost grows with pixels (1080p -> 640 px side is 9x
    fewer), while faces big enough to be worth classifying stay far above `min_face_size`. `confirm`: known faces
    re-found in small windows around where they are expected, which is what tracking uses between detections."""

    def __init__(self, *, device, min_face_size, thresholds, detect_max_side, min_prob, **_):
        self.device = "cpu" if device_type(device) == "cpu" else str(resolve_device(device))
        self.detect_max_side = detect_max_side
        self.min_prob = min_prob
        self._mtcnn = MTCNN(min_face_size=min_face_size, thresholds=thresholds, device=self.device)

    def detect(self, frames: Sequence[np.ndarray]) -> list[list[Detection]]:
        if not frames:
            return []
        shape = frames[0].shape
        if len(shape) != 3 or shape[2] != 3 or any(f.shape != shape for f in frames):
            raise ValueError(f"detect needs RGB frames of one size, got shapes {sorted({f.shape for f in frames})}")
        height, width = shape[:2]
        scale = min(1.0, self.detect_max_side / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # Per-axis factors: rounding the small size makes x and y shrink by slightly different amounts.
        to_full = np.array([width / size[0], height / size[1]])
        small = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) if scale < 1 else f for f in frames])
        return [self._keep(boxes * np.tile(to_full, 2), probs, points * to_full, scale)
                for boxes, probs, points in self._mtcnn.detect(small)]

    def confirm(self, frame: np.ndarray, boxes: Sequence[np.ndarray]) -> list[Detection]:
        """The faces at or near these expected full-resolution boxes of one frame.

        Each box's neighbourhood (SEARCH_AREA x its side) is shrunk by a whole factor into a window of
        SEARCH_WINDOW to 2 x SEARCH_WINDOW pixels (a whole factor keeps OpenCV's area resize on its fast path),
        where any face of 50 px or more is 50-100 px (smaller ones keep their size). There, R-Net + O-Net run
        straight on boxes around the expected one (`_jitter`): cheap, and it keeps a marginal face (dark, turned)
        that P-Net finds at some scales and misses at others. Only a window where that confirms nothing (the face
        moved further) gets a full MTCNN pass."""
        if not len(boxes):
            return []
        boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
        windows, origins, shrink = self._windows(frame, boxes)
        expected = (boxes - np.tile(origins, 2)) / shrink[:, None]
        candidates = [_jitter(box) for box in expected]
        found = self._mtcnn.refine(windows, np.concatenate(candidates),
                                   np.repeat(np.arange(len(boxes)), [len(c) for c in candidates]))
        lost = [i for i, (_, probs, _) in enumerate(found) if not (probs >= self.min_prob).any()]
        for i, faces in zip(lost, self._mtcnn.detect(windows[lost]) if lost else []):
            found[i] = faces
        detections = []
        for (boxes_w, probs, points), origin, factor in zip(found, origins, shrink):
            detections += self._keep(boxes_w * factor + np.tile(origin, 2), probs, points * factor + origin,
                                     1.0 / factor)
        if len(detections) < 2:
            return detections
        # Windows of neighbouring faces overlap and find a face twice: keep the likelier copy.
        keep = nms(np.stack([d.box for d in detections]), np.array([d.prob for d in detections]), 0.5)
        return [detections[i] for i in sorted(keep.tolist())]

    @staticmethod
    def _windows(frame: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows around the boxes (zero-padded to one size), each one's top-left corner in the frame and its
        whole shrink factor: frame point = window point x factor + corner."""
        height, width = frame.shape[:2]
        sides = SEARCH_AREA * np.maximum(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]), 1.0)
        shrink = np.maximum(1, sides // SEARCH_WINDOW).astype(int)
        size = np.ceil(sides / shrink).astype(int)  # window side in window pixels
        windows = np.zeros((len(boxes), size.max(), size.max(), 3), np.uint8)
        corners = np.round((boxes[:, :2] + boxes[:, 2:]) / 2 - (size * shrink)[:, None] / 2).astype(int)
        for window, (x0, y0), k, n in zip(windows, corners, shrink, size):
            # The part inside the frame, trimmed to whole multiples of k; what lies outside stays black.
            left, top = x0 + -(-max(0, -x0) // k) * k, y0 + -(-max(0, -y0) // k) * k
            right = left + max(0, min(width, x0 + n * k) - left) // k * k
            bottom = top + max(0, min(height, y0 + n * k) - top) // k * k
            if right <= left or bottom <= top:  # the track left the frame: an empty window finds nothing
                continue
            patch = frame[top:bottom, left:right]
            if k > 1:
                patch = cv2.resize(patch, ((right - left) // k, (bottom - top) // k), interpolation=cv2.INTER_AREA)
            dx, dy = (left - x0) // k, (top - y0) // k
            window[dy:dy + patch.shape[0], dx:dx + patch.shape[1]] = patch
        return windows, corners.astype(float), shrink.astype(float)

    def _keep(self, boxes, probs, points, scale: float) -> list[Detection]:
        return [Detection(box=b, prob=float(p), landmarks=marks, scale=scale)
                for b, p, marks in zip(boxes, probs, points) if p >= self.min_prob]


def _jitter(box: np.ndarray) -> np.ndarray:
    """The square around the box shifted by JITTER_SHIFTS of its side along x and y: the candidates R-Net and
    O-Net look at for a face expected there (their box regression corrects the size)."""
    centre, side = (box[:2] + box[2:]) / 2, max(box[2] - box[0], box[3] - box[1])
    shifted = centre + np.array(np.meshgrid(JITTER_SHIFTS, JITTER_SHIFTS)).reshape(2, -1).T * side
    return np.hstack([shifted - side / 2, shifted + side / 2])


def _assignment(score: np.ndarray) -> Iterable[tuple[int, int]]:
    """The (detection, track) pairs of highest total score. One face and one track, the usual case, pair without
    scipy.optimize, whose import costs ~0.4 s of score-video's start-up (2-core AMD EPYC)."""
    if score.shape == (1, 1):
        return [(0, 0)]
    from scipy.optimize import linear_sum_assignment
    return zip(*linear_sum_assignment(score, maximize=True))


class FaceTracker:
    """Online tracker with optimal (not greedy) assignment, so two nearby faces keep their own tracks.

    Boxes that overlap (IoU >= track_iou) match first. A face that moved further than its own width between two
    sampled frames (a walking person at stride 3 overlaps nothing) still continues its track when its centre
    moved at most `track_max_shift` face sides and its size changed less than 1.5x; otherwise every sampled
    frame would open a new one-frame track and `min_track_len` would drop that person altogether."""

    def __init__(self, *, track_iou, track_max_gap, track_max_shift, **_):
        self.track_iou = track_iou
        self.track_max_gap = track_max_gap
        self.track_max_shift = track_max_shift
        self._last_box: dict[int, np.ndarray] = {}
        self._velocity: dict[int, np.ndarray] = {}  # box change per frame between the track's last two sightings
        self._missed: dict[int, int] = {}
        self._next_id = 0

    @property
    def live(self) -> bool:
        """Whether any track may still continue (seen within the last track_max_gap frames)."""
        return bool(self._last_box)

    def expected(self) -> list[np.ndarray]:
        """Where each live track's face should be in the next frame: its last box moved on at its last speed."""
        return [box + self._velocity.get(t, 0) * (self._missed[t] + 1) for t, box in self._last_box.items()]

    def _scores(self, boxes: np.ndarray, last: np.ndarray) -> np.ndarray:
        """> 1 for overlapping pairs (ranked by IoU), in (0, 1) for nearby ones (ranked by closeness), 0 else."""
        iou = box_iou(boxes, last)
        centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
        side = lambda b: np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))  # noqa: E731
        shift = np.linalg.norm(centre(boxes)[:, None] - centre(last)[None], axis=2) / side(last)[None]
        ratio = side(boxes)[:, None] / side(last)[None]
        near = (shift <= self.track_max_shift) & (ratio < 1.5) & (ratio > 1 / 1.5)
        return np.where(iou >= self.track_iou, 1 + iou, np.where(near, 1 - shift / (self.track_max_shift + 1), 0))

    def update(self, detections: Sequence[Detection]) -> list[int]:
        live = list(self._last_box)
        ids: list[int | None] = [None] * len(detections)
        if live and detections:
            score = self._scores(np.stack([d.box for d in detections]), np.stack([self._last_box[t] for t in live]))
            for row, col in _assignment(score):
                if score[row, col] > 0:
                    ids[row] = live[col]
        # New tracks are numbered left to right, so ids do not depend on the detector's output order.
        for i in sorted((i for i, t in enumerate(ids) if t is None), key=lambda i: tuple(detections[i].box[:2])):
            ids[i] = self._next_id
            self._next_id += 1
        for track in set(live) - set(ids):
            self._missed[track] += 1
            if self._missed[track] > self.track_max_gap:
                del self._last_box[track], self._missed[track]
                self._velocity.pop(track, None)
        for track, det in zip(ids, detections):
            if track in self._last_box:
                self._velocity[track] = (det.box - self._last_box[track]) / (self._missed[track] + 1)
            self._last_box[track] = det.box
            self._missed[track] = 0
        return ids


def template_points(hq_size: int, margin: float) -> np.ndarray:
    """Where the five landmarks land in the HQ crop (cv2 pixel-centre coordinates)."""
    return (ARCFACE_112 - FACE_CENTRE) * (hq_size / (margin * FACE_SIDE)) + (hq_size - 1) / 2


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """An RGB image as extract and align store it, read back as align and training read it."""
    stored = np.frombuffer(jpeg_bytes(image, quality), np.uint8)
    return cv2.cvtColor(cv2.imdecode(stored, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _as_stored(frame: np.ndarray, matrix: np.ndarray, size: int, quality: int) -> np.ndarray:
    """`frame` as the warp to a `size` crop would read it after extract's JPEG of the whole frame. JPEG codes each
    16x16 block (4:2:0) on its own, so a region cut on that grid decodes to the whole frame's pixels except within
    a block of its cut edges (where the decoder's chroma upsampling looks across): coding what the warp reads plus
    a block around it costs ~3 ms, the whole frame ~60. The region goes back to where it was in a frame-sized
    canvas (np.zeros: the pages the warp does not read are never touched) rather than the warp being moved onto
    it: OpenCV's warp rounds differently at other coordinates, and the crop must be exact."""
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], float)
    frame_corners = corners @ cv2.invertAffineTransform(matrix).T
    h, w = frame.shape[:2]
    x0, y0 = (np.clip(np.floor(frame_corners.min(0)) - JPEG_BLOCK, 0, None) // JPEG_BLOCK * JPEG_BLOCK).astype(int)
    x1, y1 = np.minimum((np.ceil(frame_corners.max(0)) + 2 * JPEG_BLOCK) // JPEG_BLOCK * JPEG_BLOCK, (w, h)).astype(int)
    if x1 <= x0 or y1 <= y0:  # the crop lies outside the frame: the warp reads only its border
        return frame
    stored = np.zeros(frame.shape, frame.dtype)
    stored[y0:y1, x0:x1] = jpeg_round_trip(frame[y0:y1, x0:x1], quality)
    return stored


def align_face(frame: np.ndarray, landmarks: np.ndarray, *, margin, hq_size, lq_size,
               as_stored: tuple[int, int] | None = None, **_):
    """One similarity warp per face; LQ is the HQ crop shrunk, so both streams see exactly the same face.

    `as_stored` = (frame, crop) JPEG qualities: score-video crops raw frames, and makes its crops what the staged
    path (extract's JPEG frames, align's JPEG crops) would have given the model in training, pixel for pixel for
    the same landmarks: the compression a detector is trained on is part of what it looks at."""
    transform = SimilarityTransform.from_estimate(np.asarray(landmarks, dtype=float), template_points(hq_size, margin))
    if not transform:
        raise ValueError(f"cannot align face: degenerate landmarks {np.round(landmarks, 1).tolist()}")
    matrix = transform.params[:2]
    source = frame if as_stored is None else _as_stored(frame, matrix, hq_size, as_stored[0])
    hq = cv2.warpAffine(source, matrix, (hq_size, hq_size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    lq = cv2.resize(hq, (lq_size, lq_size), interpolation=cv2.INTER_AREA)
    if as_stored is not None:
        hq, lq = jpeg_round_trip(hq, as_stored[1]), jpeg_round_trip(lq, as_stored[1])
    return hq, lq, matrix


def no_face_reason(faces_seen: bool, min_track_len: int, frames: int) -> str:
    """Why a video has no usable face, said alike by align and score-video: none found, or only in tracks too
    short to keep (a face the user can see in the video)."""
    what = f"no face track of at least {min_track_len} sampled frames" if faces_seen else "no face found"
    return f"{what} in {frames} sampled frames"


def select_tracks(track_lengths: dict[int, int], track_sizes: dict[int, float], *, min_track_len, max_faces,
                  **_) -> set[int]:
    """Short tracks are mostly false positives; extra small faces are background people."""
    kept = sorted((t for t, n in track_lengths.items() if n >= min_track_len), key=lambda t: (-track_sizes[t], t))
    return set(kept if max_faces is None else kept[:max_faces])


@dataclass
class _Tracked:
    frame: Any
    detections: list[Detection]
    ids: list[int]


class FaceStream:
    """Iterate for one FrameFaces per input frame; afterwards `track_lengths`/`track_sizes` feed `select_tracks`."""

    def __init__(self, frames: Iterable[Any], detector: FaceDetector, *, smooth_window, margin, hq_size, lq_size,
                 batch_size, detect_every, track_iou, track_max_gap, track_max_shift,
                 as_stored: tuple[int, int] | None = None, **_):
        for name, value in (("smooth_window", smooth_window), ("detect_every", detect_every)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        self._frames = frames
        self._detector = detector
        self._behind = (smooth_window - 1) // 2
        self._ahead = smooth_window // 2
        self._crop = dict(margin=margin, hq_size=hq_size, lq_size=lq_size, as_stored=as_stored)
        self._batch_size = batch_size
        self._detect_every = detect_every
        self._tracker = FaceTracker(track_iou=track_iou, track_max_gap=track_max_gap,
                                    track_max_shift=track_max_shift)
        self.track_lengths: dict[int, int] = {}
        self._area_sums: dict[int, float] = {}

    @property
    def track_sizes(self) -> dict[int, float]:
        """Mean box area per track in full-resolution pixels."""
        return {t: self._area_sums[t] / n for t, n in self.track_lengths.items()}

    def __iter__(self) -> Iterator[FrameFaces]:
        frames = iter(self._frames)
        # Entries already yielded stay only as long as later frames need them for look-back smoothing.
        window: deque[_Tracked] = deque()
        done = seen = 0
        while batch := list(islice(frames, self._batch_size)):
            keys = [k for k in range(len(batch)) if (seen + k) % self._detect_every == 0]
            found = dict(zip(keys, self._detector.detect([batch[k].image for k in keys])))
            seen += len(batch)
            for k, frame in enumerate(batch):
                if k not in found and not self._tracker.live:  # nothing to follow: look on this frame too
                    found[k] = self._detector.detect([frame.image])[0]
                detections = self._follow(frame.image, found.get(k, []))
                window.append(_Tracked(frame, detections, self._track(detections)))
            while len(window) - done > self._ahead:
                yield self._align(window, done)
                done += 1
                if done > self._behind:
                    window.popleft()
                    done -= 1
        for position in range(done, len(window)):
            yield self._align(window, position)

    def _follow(self, image: np.ndarray, found: list[Detection]) -> list[Detection]:
        """The live tracks' faces confirmed where they are expected, plus the faces only the detector found (new
        faces). Confirmed faces win where both found one: the detector may miss a face a frame at a time (a dark or
        turned face), and a track's landmarks then all come from windows at a similar scale, which keeps them
        steady."""
        expected = self._tracker.expected()
        confirmed = self._detector.confirm(image, expected) if expected else []
        if confirmed and found:
            overlap = box_iou(np.stack([d.box for d in found]), np.stack([d.box for d in confirmed])).max(axis=1)
            found = [d for d, iou in zip(found, overlap.tolist()) if iou < 0.5]
        return confirmed + found

    def _track(self, detections: list[Detection]) -> list[int]:
        ids = self._tracker.update(detections)
        for track, det in zip(ids, detections):
            x1, y1, x2, y2 = det.box
            self.track_lengths[track] = self.track_lengths.get(track, 0) + 1
            self._area_sums[track] = self._area_sums.get(track, 0.0) + (x2 - x1) * (y2 - y1)
        return ids

    def _align(self, window: deque[_Tracked], position: int) -> FrameFaces:
        entry = window[position]
        neighbours = list(islice(window, max(0, position - self._behind), position + self._ahead + 1))
        faces = []
        for track, det in zip(entry.ids, entry.detections):
            # Mean over the frames of the window where this track was seen (a gap just shortens the window).
            smoothed = np.mean([d.landmarks for n in neighbours for t, d in zip(n.ids, n.detections) if t == track],
                               axis=0)
            hq, lq, matrix = align_face(entry.frame.image, smoothed, **self._crop)
            faces.append(AlignedFace(track_id=track, box=det.box, prob=det.prob, landmarks=smoothed,
                                     raw_landmarks=det.landmarks, scale=det.scale, matrix=matrix, hq=hq, lq=lq))
        return FrameFaces(index=entry.frame.index, timestamp=entry.frame.timestamp, faces=faces)
