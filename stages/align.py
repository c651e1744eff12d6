"""`dfpipe align`: extracted frames -> face tracks -> 224x224 HQ and 112x112 LQ aligned crops per face.

Detection, tracking and alignment live in `faces.py` (shared with score-video), the units and the faces manifest's
spec in `align_units.py`; this module maps the one onto the other: pair-aware cropping of fakes and the rows
recorded for each video.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..manifests.units import Unit, UnitError, UnitOutput, load_state, run_stage
from ..manifests.workspace import Shard, Workspace
from ..manifests.workers import prefetch
from . import extract
from .align_units import SPEC, params_of, plan_units
from .boxes import box_iou
from .faces import FaceDetector, FaceStream, align_face, no_face_reason, resolve_device, select_tracks
from .video import Frame, jpeg_bytes

# frames of a fake on which `lines_up` checks that it is frame-aligned with its source before cropping it so
PAIR_CHECK_FRAMES = 3


def _read_frames(ws: Workspace, frames: list[tuple[int, float, str]]):
    for index, timestamp, rel in frames:
        image = cv2.imread(str(ws.root / rel), cv2.IMREAD_COLOR)
        if image is None:
            # a failure a rerun skips (the fingerprint is the same once extract restores the frame): say how to retry
            raise UnitError(f"{ws.root / rel}: frame cannot be read (run `dfpipe verify`, `dfpipe extract`, then "
                            "`dfpipe align --retry-failed`)")
        yield Frame(index, timestamp, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def _fmt(values) -> str:
    return " ".join(f"{v:.2f}" for v in np.asarray(values, dtype=float).ravel())


def _face_row(index, timestamp, track, box, prob, landmarks, scale, mode, hq_name, lq_name) -> dict:
    x1, y1, x2, y2 = (f"{v:.1f}" for v in box)
    return {"frame_index": index, "timestamp": f"{timestamp:.6f}", "status": "face", "track_id": track,
            "x1": x1, "y1": y1, "x2": x2, "y2": y2, "prob": f"{prob:.4f}", "landmarks": _fmt(landmarks),
            "scale": f"{scale:.4f}", "mode": mode, "hq_path": hq_name, "lq_path": lq_name}


def _write_crops(out_dir: Path, track: int, index: int, hq: np.ndarray, lq: np.ndarray, quality: int):
    names = (f"{track:02d}/{index:06d}_hq.jpg", f"{track:02d}/{index:06d}_lq.jpg")
    (out_dir / f"{track:02d}").mkdir(exist_ok=True)
    for name, crop in zip(names, (hq, lq)):
        (out_dir / name).write_bytes(jpeg_bytes(crop, quality))
    return names


def _finish(unit: Unit, rows: list[dict], mode: str, min_track_len: int) -> UnitOutput:
    """Frames whose faces were all dropped become no_face rows; a video without any face is a failure."""
    by_frame: dict[int, list[dict]] = {}
    for r in rows:
        by_frame.setdefault(r["frame_index"], []).append(r)
    out = []
    for index, timestamp, _ in unit.payload["frames"]:
        faces = [r for r in by_frame.get(index, []) if r["status"] == "face"]
        out += faces or [{"frame_index": index, "timestamp": f"{timestamp:.6f}", "status": "no_face",
                          "track_id": -1, "mode": mode}]
    with_face = len({r["frame_index"] for r in out if r["status"] == "face"})
    if not with_face:
        raise UnitError(no_face_reason(bool(rows), min_track_len, len(unit.payload["frames"])))
    tracks = len({r["track_id"] for r in out if r["status"] == "face"})
    return UnitOutput(out, {"mode": mode, "frames": len(unit.payload["frames"]), "frames_with_face": with_face,
                            "tracks": tracks})


def align_detect(ws: Workspace, unit: Unit, out_dir: Path, detector: FaceDetector, align_cfg: dict,
                 mode: str = "detect") -> UnitOutput:
    stream = FaceStream(prefetch(_read_frames(ws, unit.payload["frames"]), 2 * align_cfg["batch_size"]),
                        detector, **align_cfg)
    rows = []
    for ff in stream:
        for face in ff.faces:
            names = _write_crops(out_dir, face.track_id, ff.index, face.hq, face.lq, align_cfg["jpeg_quality"])
            rows.append(_face_row(ff.index, ff.timestamp, face.track_id, face.box, face.prob, face.landmarks,
                                  face.scale, mode, *names))
    keep = select_tracks(stream.track_lengths, stream.track_sizes, **align_cfg)
    for r in rows:
        if r["track_id"] not in keep:
            for col in ("hq_path", "lq_path"):
                (out_dir / r[col]).unlink()
            r["status"] = "dropped"
    return _finish(unit, rows, mode, align_cfg["min_track_len"])


def _faces_at(rows: list[dict]) -> dict[int, list[dict]]:
    faces_at: dict[int, list[dict]] = {}
    for r in rows:
        if r["status"] == "face":
            faces_at.setdefault(int(r["frame_index"]), []).append(r)
    return faces_at


def _box(row: dict) -> list[float]:
    return [float(row[k]) for k in ("x1", "y1", "x2", "y2")]


def lines_up(ws: Workspace, unit: Unit, source_rows: list[dict], detector: FaceDetector) -> bool:
    """Whether the fake shows its faces where its source does, on PAIR_CHECK_FRAMES frames spread over the video.

    The same frame size and sampled frames make a pair only in datasets whose fakes are made from the real video
    frame by frame (FF++, DFDC); two unrelated shots at 1920x1080 would otherwise get background crops labelled
    fake. A frame agrees when a face the detector re-finds near the source's boxes overlaps one of them (IoU >= 0.5)
    and disagrees when the faces it finds do not; at least one frame must agree and none disagree."""
    faces_at = _faces_at(source_rows)
    indices = sorted(faces_at)
    picks = {indices[k * (len(indices) - 1) // max(1, PAIR_CHECK_FRAMES - 1)] for k in range(PAIR_CHECK_FRAMES)}
    verdicts = []
    for frame in _read_frames(ws, [f for f in unit.payload["frames"] if f[0] in picks]):
        boxes = np.array([_box(r) for r in faces_at[frame.index]])
        found = detector.confirm(frame.image, boxes)
        if found:
            overlap = box_iou(np.stack([d.box for d in found]), boxes)
            verdicts.append(bool((overlap >= 0.5).any()))
    return bool(verdicts) and all(verdicts)


def align_pair(ws: Workspace, unit: Unit, out_dir: Path, source_rows: list[dict], align_cfg: dict) -> UnitOutput:
    """Crop a fake with its source's landmarks, frame by frame: real and fake crops are pixel-aligned."""
    faces_at = _faces_at(source_rows)
    rows = []
    for frame in _read_frames(ws, unit.payload["frames"]):
        for r in faces_at.get(frame.index, []):
            landmarks = np.array(r["landmarks"].split(), dtype=float).reshape(5, 2)
            hq, lq, _ = align_face(frame.image, landmarks, **align_cfg)
            track = int(r["track_id"])
            names = _write_crops(out_dir, track, frame.index, hq, lq, align_cfg["jpeg_quality"])
            rows.append(_face_row(frame.index, frame.timestamp, track, _box(r), float(r["prob"]), landmarks,
                                  float(r["scale"]), "pair", *names))
    return _finish(unit, rows, "pair", align_cfg["min_track_len"])


def run_align(ws: Workspace, cfg, *, shard: Shard = Shard(), retry_failed: bool = False, progress: bool = True):
    """Sources and unpaired videos first; then fakes cropped with their source's freshly recorded tracks."""
    align_cfg = dict(cfg.align)
    resolve_device(cfg.align.device)  # an unusable device is one error now, not one per video
    params = params_of(cfg)
    detector = None

    def work(unit: Unit, out_dir: Path) -> UnitOutput:
        nonlocal detector
        if detector is None:
            detector = FaceDetector(**align_cfg)
        source = unit.payload["source"]
        mode = f"detect ({unit.payload['unpaired']})" if unit.payload["unpaired"] else "detect"
        if source:
            rec = records.get(source)
            if rec is None or rec.status != "done":
                mode = "detect (source has no face)"
            elif not lines_up(ws, unit, rec.rows, detector):
                mode = "detect (faces not where the source has them)"
            else:
                return align_pair(ws, unit, out_dir, rec.rows, align_cfg)
        return align_detect(ws, unit, out_dir, detector, align_cfg, mode=mode)

    summaries = []
    with ws.reading(extract.SPEC.name, "align"):  # extract must not rewrite the frames being read
        units = plan_units(ws, cfg.align.pair_aware)
        for phase in (lambda u: not u.payload["source"], lambda u: bool(u.payload["source"])):
            records = load_state(ws, SPEC, merge=False)
            summaries.append(run_stage(ws, SPEC, params, units, work, shard=shard, workers=0, only=phase,
                                       retry_failed=retry_failed, progress=progress))
    return summaries[0].merge(summaries[1])
