"""Scoring videos: one calibrated fake probability per video, with no frame or crop ever written (`Detector` runs it;
`score_store` keeps `dfpipe score-video`'s outputs).

Each video streams through the same code as training data did (FrameReader with the checkpoint's stride, FaceStream
with the checkpoint's align settings), so a face is cropped with the same geometry as in training, and goes through
the same JPEG round trips as training data did (extract's frames, only around the face; align's crops), so the
model sees the compression it was trained on (tests/test_score.py compares both paths' crops and scores). Per face
track, consecutive crops are cut into non-overlapping clips of the checkpoint's clip_len as they arrive, and clips
wait in one queue shared by all videos: a batch is run when full, so the clips of many short videos fill one GPU
batch, and only the current clips are ever held, so memory stays flat however long a video is.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from ..manifests.errors import InputError
from ..manifests.table import read_table
from ..manifests.workspace import Workspace
from ..manifests.workers import one_line, prefetch
from ..pipeline.config import load_config
from . import align_units
from . import pairs as pairs_mod
from .aggregate import RULE_KEYS, RULES
from .calibration import decide
from .checkpoint import SCORING_KEYS
from .clips import Clip, ClipCutter
from .discover import read_user_csv, video_files
from .extract import VIDEO_COLUMNS
from .faces import FaceDetector, FaceStream, FrameFaces, no_face_reason, select_tracks
from .inference import ClipQueue, Predict
from .labels import parse_label
from .video import Frame, FrameReader, VideoError

STATUSES = ("ok", "no_face", "undecodable", "empty", "error")
# a video that could not be read is a failed input (exit 1); no face is a result
UNREADABLE = ("undecodable", "empty", "error")
DECISION = ("rule", "rule_params", "threshold", "fallback_score", "suspicious_frames")  # Scoring fields


class ScoreError(InputError):
    """A problem with the inputs, the checkpoint or the output path, reported as one line."""


# ---------------------------------------------------------------- inputs

@dataclass(frozen=True)
class VideoInput:
    path: str                  # absolute, the key of the video in every output
    label: str | None = None   # 'real' | 'fake' | None (unknown)


def _label(value: str, where: str) -> str | None:
    try:
        return parse_label(value)
    except InputError as e:
        raise ScoreError(f"{where}: {e}") from None


def _list_file(path: Path) -> list[VideoInput]:
    """A CSV `path[,label]`; relative paths are relative to the CSV's folder, as in `dfpipe extract`."""
    table = read_user_csv(path, ("path",), "path[,label]")
    labels = table["label"] if "label" in table.columns else [""] * len(table)
    return [VideoInput(os.path.abspath(path.parent / p.strip()), _label(lab, f"{path}: row {i + 1}"))
            for i, (p, lab) in enumerate(zip(table["path"], labels))]


def _expand(arg: str) -> list[VideoInput]:
    """A folder means every video below it (hidden entries skipped); a named file is taken whatever its suffix."""
    path = Path(arg)
    if path.is_dir():
        return [VideoInput(os.path.abspath(p)) for p in video_files(path.rglob("*"), path)]
    if path.suffix.lower() == ".csv":
        return _list_file(path)
    if not path.exists() and not path.is_symlink():
        raise ScoreError(f"{arg}: input does not exist")
    return [VideoInput(os.path.abspath(path))]


def read_labels(path: str | Path) -> dict[str, str]:
    """`--labels`: a CSV `path,label` or a DFDC metadata.json. Keys are absolute paths (CSV) and file names (both):
    a name that two CSV rows with different labels share is left out, so it can never label the wrong video."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ScoreError(f"{path}: cannot read labels ({one_line(e)})") from None
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise ScoreError(f"{path}: expected DFDC metadata ({{\"x.mp4\": {{\"label\": \"FAKE\"}}, ...}})")
        return {name: _label(entry.get("label", ""), f"{path}: {name}") for name, entry in entries.items()
                if entry.get("label")}
    table = read_user_csv(path, ("path", "label"), "path,label")
    labels: dict[str, str] = {}
    names: dict[str, set[str]] = {}
    rows: dict[str, int] = {}
    for i, (p, value) in enumerate(zip(table["path"], table["label"])):
        label = _label(value, f"{path}: row {i + 1}")
        if label is not None:
            key = os.path.abspath(path.parent / p.strip())
            if labels.setdefault(key, label) != label:
                raise ScoreError(f"{path}: row {i + 1}: {p.strip()!r} is labelled {labels[key]} in row "
                                 f"{rows[key] + 1} and {label} here")
            rows.setdefault(key, i)
            names.setdefault(Path(p.strip()).name, set()).add(label)
    return {**{n: next(iter(v)) for n, v in names.items() if len(v) == 1}, **labels}


@dataclass(frozen=True)
class TrainedSplits:
    """The splits a checkpoint was trained on: its pairs digest, and the copy of its training pairs in its run folder.
    A later `train` may redraw the workspace's (another pairs.seed, new videos), and its "test" split may then hold
    this model's training videos."""
    checkpoint: str
    digest: str | None   # None: a checkpoint that records none (hand-made); nothing to check against
    own: bool = False    # --run-splits: read the split from the run folder's copy, not the workspace

    def pairs(self, ws: Workspace, split: str) -> tuple[Path, pd.DataFrame]:
        path = Path(self.checkpoint).parent / pairs_mod.RUN_PAIRS if self.own else ws.root / pairs_mod.PAIRS
        if not path.is_file():
            raise ScoreError(f"{path}: not found" + (" (a run trained before dfpipe kept its splits has none; score "
                                                      "the workspace's split without --run-splits)" if self.own
                                                      else " (dfpipe train writes it)"))
        pairs = read_table(path, pairs_mod.COLUMNS)
        if self.digest is not None and pairs_mod.pairs_digest(pairs) != self.digest:
            if self.own:
                raise ScoreError(f"{path}: not the training pairs {self.checkpoint} records (its digest differs)")
            raise ScoreError(f"{path}: the workspace's splits are not the ones {self.checkpoint} was trained on (a "
                             f"later train redrew them), so its {split} split may hold that model's training videos; "
                             f"--run-splits scores the run's own {split} split")
        return path, pairs


def _workspace_videos(work: str, split: str, trained: TrainedSplits) -> list[VideoInput]:
    """The videos of one split of the workspace a checkpoint was trained on, labelled, so a held-out split is
    scored like new videos."""
    if split not in pairs_mod.SPLITS:
        raise ScoreError(f"--split '{split}': expected one of {', '.join(pairs_mod.SPLITS)}")
    ws = Workspace(work)
    pairs_path, pairs = trained.pairs(ws, split)
    ids = pairs_mod.split_videos(pairs)[split]
    videos = read_table(ws.manifest("videos.csv"), VIDEO_COLUMNS)
    missing = sorted(ids - set(videos.video_id))
    if missing:
        raise ScoreError(f"{ws.manifest('videos.csv')}: {len(missing)} video(s) of the {split} split in {pairs_path} "
                         f"are not in this workspace (first: {missing[0]}); is --work the one the run trained on?")
    return [VideoInput(os.path.abspath(p), _label(lab, f"{ws.manifest('videos.csv')}: {v}"))
            for v, p, lab in zip(videos.video_id, videos.path, videos.label) if v in ids]


def list_inputs(inputs: list[str], *, labels: str | None, work: str | None, split: str | None,
                trained: TrainedSplits | None = None) -> list[VideoInput]:
    """Every video to score, once, sorted by path; a label from the input list beats the workspace's, which beats
    `--labels`. A workspace split is read as ``trained`` says (the checkpoint's splits); without it (no checkpoint
    to hold the split to), from the workspace as it is."""
    if (work is None) != (split is None):
        raise ScoreError("--work and --split go together (score one split of a workspace)")
    found = [v for arg in inputs for v in _expand(arg)]
    if work is not None:
        found += _workspace_videos(work, split, trained or TrainedSplits(checkpoint="", digest=None))
    extra = read_labels(labels) if labels else {}
    videos: dict[str, VideoInput] = {}
    for v in found:
        known = videos.get(v.path)
        label = (known.label if known else None) or v.label or extra.get(v.path) or extra.get(Path(v.path).name)
        videos[v.path] = VideoInput(v.path, label)
    if not videos:
        raise ScoreError(f"no video found in {', '.join(inputs) or f'the {split} split of {work}'}")
    return [videos[p] for p in sorted(videos)]


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class Scoring:
    """Everything a score depends on besides the checkpoint file; its digest decides whether a rerun may reuse rows."""
    stride: int
    max_frames: int | None
    decoder: str
    align: dict
    clip_len: int
    rule: str
    rule_params: dict
    temperature: float
    threshold: float
    tta_flip: bool
    fallback_score: float | None
    suspicious_frames: int
    amp: str
    clip_every: int
    mc_samples: int = 0
    runtime: str = "auto"  # torch or onnxruntime for the model (see onnx_model.choose_runtime)

    def clip_extra(self) -> str | None:
        """The row key of what a clip's probability columns past the first hold (see `Clip.samples`)."""
        return "clip_samples" if self.mc_samples else None

    def decide(self, row: dict) -> dict:
        return decide(row, self)

    def digest(self) -> str:
        return _digest(self._params())

    def clips_digest(self) -> str:
        """What the clips and their probabilities depend on: rows that share it differ only in the decision made
        from those probabilities (DECISION), which `decide` redoes from the stored clip scores, without decoding."""
        return _digest(self._params(skip=DECISION))

    def _params(self, skip: tuple[str, ...] = ()) -> dict:
        # settings newer than the digest left out at their defaults: rows scored before they existed stay reusable
        newer = {"mc_samples": 0, "runtime": "auto"}
        return {**{k: v for k, v in self.__dict__.items() if k not in skip and not (k in newer and v == newer[k])},
                "align": {k: v for k, v in self.align.items() if k not in align_units.NOT_IN_FINGERPRINT},
                "face_path": align_units.SPEC.version}  # a changed face path gives other crops: rescore


def _digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fixed_by_checkpoint(cfg) -> list[str]:
    """The settings this config changes that scoring takes from the checkpoint instead: frames are sampled and
    faces cropped as in training (align.batch_size aside: frames per detection step)."""
    defaults = load_config()
    ignored = [f"align.{k}" for k in cfg.align if k != "batch_size" and cfg.align[k] != defaults.align[k]]
    return ignored + ["extract.stride"] * (cfg.extract.stride != defaults.extract.stride)


def scoring_settings(ckpt: dict, cfg, checkpoint: str | Path) -> Scoring:
    """The checkpoint's decode, crop and calibration settings, with the `score:` keys that override them."""
    missing = [k for k in SCORING_KEYS if k not in ckpt]
    if missing:
        raise ScoreError(f"{checkpoint}: not a dfpipe training checkpoint (no {', '.join(missing)})")
    s = cfg.score
    calibration = ckpt["calibration"] or {}
    rule = s.aggregate or calibration.get("aggregate")
    # the checkpoint's rule comes with the parameters it was chosen with; a rule given here, with the ones given here
    rule_params = calibration.get("rule_params") if not s.aggregate else None
    threshold = s.threshold if s.threshold is not None else calibration.get("threshold")
    if rule is None or threshold is None:
        raise ScoreError(f"{checkpoint}: checkpoint is not calibrated (last.pt?): use best.pt, or give both "
                         "--aggregate and --threshold")
    if rule not in RULES:
        raise ScoreError(f"score.aggregate: '{rule}' is none of {', '.join(RULES)}")
    if s.fallback_score is not None and not 0 <= s.fallback_score <= 1:
        raise ScoreError(f"score.fallback_score: {s.fallback_score} is not a probability in [0, 1]")
    # crops as the training crops were stored (frames and crops as JPEG); a checkpoint from before the frames'
    # quality was recorded in it is scored on raw crops, as it was then (and its rows stay reusable)
    stored = ckpt["extract"].get("jpeg_quality")
    as_stored = {"as_stored": (int(stored), int(ckpt["align"]["jpeg_quality"]))} if stored is not None else {}
    return Scoring(stride=int(ckpt["extract"]["stride"]), max_frames=cfg.extract.max_frames,
                   decoder=cfg.extract.decoder,
                   # settings newer than the checkpoint keep their defaults
                   align={**cfg.align, **ckpt["align"], "device": s.device, "batch_size": cfg.align.batch_size,
                          **as_stored},
                   clip_len=int(ckpt["clip_len"]), rule=rule,
                   rule_params=rule_params or {k: s[k] for k in RULE_KEYS},
                   # an uncalibrated checkpoint scores with the plain sigmoid of its logits
                   temperature=float(calibration.get("temperature", 1.0)), threshold=float(threshold),
                   tta_flip=bool(s.tta_flip), fallback_score=s.fallback_score,
                   suspicious_frames=int(s.suspicious_frames), amp=cfg.train.amp, clip_every=s.clip_every,
                   mc_samples=int(s.mc_samples), runtime=s.runtime)


# ---------------------------------------------------------------- videos

@dataclass
class _Job:
    video: VideoInput
    seconds: float = 0.0
    status: str = "ok"
    reason: str = ""
    frames_sampled: int = 0
    clips: list[Clip] = field(default_factory=list)
    face_frames: dict[int, list[int]] = field(default_factory=dict)
    kept: set[int] = field(default_factory=set)
    pending: int = 0
    streamed: bool = False


def _is_empty(path: str, reader: FrameReader | None) -> bool:
    """0 bytes, or a container that promises no frame and whose decoders found none, without error."""
    if reader is None:
        return os.path.isfile(path) and os.path.getsize(path) == 0
    return not reader.errors and not reader.count and not reader.promised_frames()


class FacePath:
    """One video's faces as scoring sees them: decoded (in a prefetch thread) with the checkpoint's stride, detected,
    tracked and aligned with its align settings, cut into its clips. score-video scores these clips; the report
    (stages/report.py) walks the same path to find the very clips it scored, with the same track numbers. ``tap``
    sees every decoded frame before the face path does (the report keeps a few images)."""

    def __init__(self, path: str, scoring: Scoring, detector: FaceDetector,
                 tap: Callable[[Frame], None] | None = None):
        self.reader = FrameReader(path, stride=scoring.stride, max_frames=scoring.max_frames, decoder=scoring.decoder)
        frames = prefetch(self.reader, scoring.align["batch_size"])
        self.stream = FaceStream(frames if tap is None else _tapped(frames, tap), detector, **scoring.align)
        self.cutter = ClipCutter(scoring.clip_len, clip_every=scoring.clip_every, **scoring.align)

    def __iter__(self) -> Iterator[tuple[FrameFaces | None, list[tuple[Clip, np.ndarray, np.ndarray]]]]:
        """Each frame's faces with the clips it completed; last (None, the padded clips of the tracks that filled
        none), once the reader found the video complete: a cut or damaged file is not scored on its part, as
        extract does not keep it."""
        for position, frame in enumerate(self.stream):
            yield frame, self.cutter.add(position, frame)
        self.reader.check_complete()
        yield None, self.cutter.finish()


def _tapped(frames: Iterable[Frame], tap: Callable[[Frame], None]) -> Iterator[Frame]:
    for frame in frames:
        tap(frame)
        yield frame


def _video_clips(job: _Job, scoring: Scoring, detector: FaceDetector) -> Iterator[tuple[Clip, np.ndarray, np.ndarray]]:
    """One video's clips (`FacePath`); failures become the job's status."""
    faces = None
    try:
        faces = FacePath(job.video.path, scoring, detector)
        for frame, clips in faces:
            job.frames_sampled += frame is not None
            yield from clips
        job.face_frames = faces.cutter.face_frames
        job.kept = select_tracks(faces.stream.track_lengths, faces.stream.track_sizes, **scoring.align)
        job.reason = "; ".join(faces.reader.errors)  # the first decoder stopped early, the fallback read the rest
    except VideoError as e:
        empty = _is_empty(job.video.path, faces.reader if faces else None)
        job.status, job.reason = ("empty" if empty else "undecodable"), e.reason
    except Exception as e:  # noqa: BLE001 - one bad video must not stop the others
        job.status, job.reason = "error", one_line(e)


def _result(job: _Job, scoring: Scoring) -> dict:
    """The video's output row; clips of tracks select_tracks rejected are dropped here."""
    clips = [c for c in job.clips if c.track in job.kept]
    status, reason = job.status, job.reason
    if status == "ok" and not job.frames_sampled:
        status, reason = "empty", "no frame decoded"
    elif status == "ok" and not clips:
        status = "no_face"
        reason = no_face_reason(bool(job.face_frames), scoring.align["min_track_len"], job.frames_sampled)
    tracks = sorted({c.track for c in clips}) if status == "ok" else []
    with_face = set().union(*(job.face_frames.get(t, []) for t in tracks))
    extra = scoring.clip_extra()
    return scoring.decide({"path": job.video.path, "status": status, "reason": reason,
                           "frames_sampled": job.frames_sampled, "frames_with_face": len(with_face),
                           "tracks": len(tracks), "clips": len(clips), "seconds": round(job.seconds, 3),
                           "clip_probs": [[c.track, c.prob, list(c.frames)] for c in clips],
                           **({extra: [c.samples for c in clips]} if extra else {})})


def score_videos(videos: Iterable[VideoInput], scoring: Scoring, predict: Predict, detector: FaceDetector, *,
                 batch_size: int) -> Iterator[dict]:
    """Result rows (see `_result`) in the order videos finish: a video is finished once it is decoded and all its
    clips are back from the model, which for its last clips may be in a batch filled by the next videos. A video's
    `seconds` are its own decoding and face work plus its clips' share of the batches they ran in."""
    queue = ClipQueue(predict, batch_size)
    open_jobs: list[_Job] = []
    model_seconds = 0.0

    def run(call: Callable[[], list[tuple[Any, float]]]) -> Iterator[dict]:
        nonlocal model_seconds
        start = time.perf_counter()
        results = call()
        spent = time.perf_counter() - start
        model_seconds += spent
        for (job, clip), prob in results:
            clip.prob, clip.samples = (prob[0], prob[1:]) if isinstance(prob, list) else (prob, None)
            job.pending -= 1
            job.seconds += spent / len(results)
        for job in [j for j in open_jobs if j.streamed and not j.pending]:
            open_jobs.remove(job)
            yield _result(job, scoring)

    for video in videos:
        job = _Job(video)
        open_jobs.append(job)
        start, model_seconds = time.perf_counter(), 0.0
        for clip, hq, lq in _video_clips(job, scoring, detector):
            job.clips.append(clip)
            job.pending += 1
            yield from run(partial(queue.put, (job, clip), hq, lq))
        job.seconds += time.perf_counter() - start - model_seconds
        job.streamed = True
        yield from run(list)
    yield from run(queue.flush)
