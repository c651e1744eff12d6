"""`dfpipe report`: why each scored video scored as it did, as one self-contained HTML page per video and an index.

The scores are not recomputed: score-video's record (the JSON lines beside its CSV) already holds every clip's
calibrated probability with its frame numbers. What the record cannot hold is pixels, so for each video the face
path runs again with the checkpoint's own settings (the same decode, detection, tracks and crops as scoring, hence
the same track numbers and clips), and the model runs only on the few most suspicious clips, in fp32 with gradients,
for their Grad-CAM heatmaps and stream weights (`explain.py`). Pages are written one video at a time (memory stays
flat over a long list) beside a small JSON of the video's index entry; a rerun with the same scores, checkpoint and
report settings reuses both, so an interrupted report resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
import pandas as pd

from ..manifests.errors import InputError
from ..manifests.progress import bar, warn
from ..manifests.table import atomic_write_bytes, check_writable
from ..manifests.units import sha256_file
from .checkpoint import load_checkpoint, model_from_checkpoint
from .explain import ClipExplanation, explain_clip
from .faces import FaceDetector, resolve_device
from .score import FacePath, Scoring, scoring_settings
from .score_store import CSV_COLUMNS, EARLIER_COLUMNS, file_key, read_records
from .video import Frame, VideoError

REPORT_VERSION = 1  # part of every page's key: a change of what a page shows redoes the pages


class ReportError(InputError):
    """Scores, checkpoint or output folder that cannot make a report, in one line."""


@dataclass(frozen=True)
class SuspiciousFace:
    """One of a video's most fake clips, recomputed: its HQ crops and what the model made of them."""
    track: int
    probability: float          # as score-video recorded it (calibrated)
    frames: tuple[int, ...]
    crops: np.ndarray           # (T, H, W, 3) uint8, the HQ crops the model saw
    matrices: np.ndarray        # (T, 2, 3) frame -> HQ crop pixels, to map anything in frame pixels onto the crops
    explanation: ClipExplanation


@dataclass
class Evidence:
    """What a video's page shows besides its record: found again from the video itself."""
    fps: float = 0.0
    faces: list[SuspiciousFace] = field(default_factory=list)
    strip: list[tuple[int, np.ndarray, list[tuple[int, np.ndarray]]]] = field(default_factory=list)  # frame, RGB,
    #                                                                                  (track, box) of each face
    note: str = ""              # why part of it is missing (the video changed or cannot be read any more)


# ---------------------------------------------------------------- inputs

def read_scores(scores_csv: str | Path) -> list[dict]:
    """score-video's rows for the CSV's videos: the record's row (clip probabilities included) with the CSV's
    `true_label`, in the CSV's order."""
    csv_path = Path(scores_csv)
    jsonl = csv_path.with_suffix(".jsonl")
    if not csv_path.is_file():
        raise ReportError(f"{csv_path}: not found (give the CSV `dfpipe score-video --out` wrote)")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        raise ReportError(f"{csv_path}: not a score-video output ({' '.join(str(e).split())})") from None
    if list(table.columns) not in (CSV_COLUMNS, *map(list, EARLIER_COLUMNS)):
        raise ReportError(f"{csv_path}: not a score-video output (its columns differ)")
    if not jsonl.is_file():
        raise ReportError(f"{jsonl}: not found: the report needs the clip scores score-video records beside its CSV")
    records = {r["path"]: r for r in read_records(jsonl)}
    missing = [p for p in table.path if p not in records]
    if missing:
        raise ReportError(f"{jsonl}: holds no record of {len(missing)} video(s) of {csv_path.name} (first: "
                          f"{missing[0]}); score them again")
    return [{**records[p], "true_label": t} for p, t in zip(table.path, table.true_label)]


def page_name(path: str) -> str:
    """A file name per video that two videos of the same name in different folders cannot share."""
    return f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- evidence

def most_suspicious(row: dict, n: int) -> list[tuple[int, float, tuple[int, ...]]]:
    """(track, probability, frames) of the ``n`` most fake clips, ties by first frame: the order `decide` ranks
    suspicious frames in."""
    ranked = sorted(row["clip_probs"], key=lambda c: (-c[1], c[2][0]))
    return [(int(t), float(p), tuple(frames)) for t, p, frames in ranked[:n]]


def _strip_positions(frames_sampled: int, n: int) -> set[int]:
    return set(np.linspace(0, frames_sampled - 1, n).round().astype(int).tolist()) if frames_sampled and n else set()


def gather_evidence(row: dict, scoring: Scoring, detector: FaceDetector, model, *, faces: int,
                    strip_frames: int) -> Evidence:
    """Runs the video's face path again (as scoring did, so track numbers and clips match the record), keeps the
    crops of its ``faces`` most suspicious clips and ``strip_frames`` frames spread over the video with their boxes,
    and explains those clips with ``model`` (fp32)."""
    evidence = Evidence()
    if row["status"] not in ("ok", "no_face"):
        return evidence
    if row.get("file") is not None and file_key(row["path"]) != row["file"]:
        evidence.note = ("the video changed on disk since it was scored" if os.path.exists(row["path"]) else
                         "the video is no longer where it was scored") + ": nothing is shown from it"
        return evidence
    wanted = {(t, frames): p for t, p, frames in most_suspicious(row, faces)}
    tracks = {t for t, _ in wanted}
    kept = {int(c[0]) for c in row["clip_probs"]}
    strip_at = _strip_positions(row["frames_sampled"], strip_frames)
    images: dict[int, np.ndarray] = {}
    matrices: dict[tuple[int, int], np.ndarray] = {}
    found: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}

    decoded = count()

    def keep_image(frame: Frame) -> None:
        if next(decoded) in strip_at:
            images[frame.index] = frame.image

    def keep(cut) -> None:
        for clip, hq, lq in cut:
            if (clip.track, clip.frames) in wanted:
                found[(clip.track, clip.frames)] = (hq, lq)

    try:
        path = FacePath(row["path"], scoring, detector, tap=keep_image)
        evidence.fps = float(path.reader.info["fps"])
        for frame, clips in path:
            keep(clips)
            if frame is None:
                continue
            for face in frame.faces:
                if face.track_id in tracks:
                    matrices[(face.track_id, frame.index)] = face.matrix
            if frame.index in images:  # the tracks scoring kept (or every face of a no_face video's short tracks)
                evidence.strip.append((frame.index, images.pop(frame.index),
                                       [(f.track_id, f.box) for f in frame.faces if not kept or f.track_id in kept]))
    except VideoError as e:
        evidence.note = f"the video cannot be read any more ({e.reason})"
        return evidence
    for (track, frames), (hq, lq) in found.items():
        evidence.faces.append(SuspiciousFace(track, wanted[(track, frames)], frames, hq,
                                             np.stack([matrices[(track, f)] for f in frames]),
                                             explain_clip(model, hq, lq)))
    evidence.faces.sort(key=lambda f: (-f.probability, f.frames[0]))
    if len(found) < len(wanted):
        evidence.note = (f"{len(wanted) - len(found)} of the {len(wanted)} most suspicious clips were not found again "
                         "(scored with other settings? give `dfpipe report` score-video's --config / --set)")
    return evidence


# ---------------------------------------------------------------- the report

@dataclass
class ReportSummary:
    pages: int                 # video pages written by this call
    reused: int                # pages an earlier call wrote with the same inputs
    index: Path

    def line(self) -> str:
        return (f"report: {self.pages + self.reused} video pages ({self.pages} written, {self.reused} already "
                f"done) -> {self.index}")


def _page_key(row: dict, model_digest: str, settings: dict) -> str:
    params = {"row": row, "model": model_digest, "settings": settings, "version": REPORT_VERSION}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_report(scores_csv: str | Path, checkpoint: str | Path, out_dir: str | Path, cfg, *,
                 progress: bool = True) -> ReportSummary:
    """``out_dir/index.html`` and ``out_dir/videos/<name>.html`` for every video of a score-video CSV, explained
    with the checkpoint that scored it (refused if the record names another)."""
    from . import report_html  # matplotlib and jinja2: only when pages are drawn

    rows = read_scores(scores_csv)
    ckpt = load_checkpoint(checkpoint)
    model_digest = sha256_file(Path(checkpoint))[:16]
    other = next((r for r in rows if r.get("model_digest") not in (None, model_digest)), None)
    if other is not None:
        raise ReportError(f"{scores_csv}: scored with another checkpoint than {checkpoint} (e.g. {other['path']}); "
                          "give the checkpoint score-video used")
    scoring = scoring_settings(ckpt, cfg, checkpoint)
    if any(r.get("clips_settings") not in (None, scoring.clips_digest()) for r in rows):
        warn(f"report: {scores_csv} was scored with other settings than these (--max-frames, --clip-every, precision, "
             "...): a page may miss clips; give `dfpipe report` score-video's --config / --set")
    out_dir, settings = Path(out_dir), dict(cfg.report)
    check_writable(out_dir / "videos")
    device = resolve_device(cfg.score.device)
    model = detector = None  # loaded on the first page that is not reused
    entries, written = [], 0
    for row in bar(rows, desc="report", unit="video", enabled=progress):
        name, key = page_name(row["path"]), _page_key(row, model_digest, settings)
        entry_path = out_dir / "videos" / f"{name}.json"
        entry = json.loads(entry_path.read_text()) if entry_path.is_file() else None
        if entry is None or entry.get("key") != key or not (out_dir / "videos" / f"{name}.html").is_file():
            if model is None:
                model = model_from_checkpoint(ckpt, device).float().eval()
                detector = FaceDetector(**{**scoring.align, "device": str(device)})
            evidence = gather_evidence(row, scoring, detector, model, faces=settings["faces"],
                                       strip_frames=settings["strip_frames"])
            page, entry = report_html.video_page(row, evidence, name, settings)
            atomic_write_bytes(out_dir / "videos" / f"{name}.html", page.encode())
            entry = {**entry, "key": key}
            atomic_write_bytes(entry_path, json.dumps(entry, sort_keys=True).encode())
            written += 1
        entries.append(entry)
    index = out_dir / "index.html"
    csv_path = Path(scores_csv)
    plots = csv_path.with_name(f"{csv_path.stem}_plots")  # score-video's, with labels (see write_evaluation)
    atomic_write_bytes(index, report_html.index_page(entries, plots, csv_path.name).encode())
    return ReportSummary(written, len(rows) - written, index)
