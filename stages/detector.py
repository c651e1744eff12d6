"""`Detector`: a trained checkpoint that scores videos from Python, with no file written.

`score-video` is a loop over `Detector.rows` plus the output store (`score_store.run_score`); a library user calls
`score` or `score_many` and gets `VideoScore`s. Both score exactly alike: the checkpoint's frame sampling, crops and
calibration (`score.scoring_settings`), clips of several videos sharing the model's batches (`score.score_videos`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..pipeline.config import load_config
from .checkpoint import model_from_checkpoint
from .ensemble import load_models, stacked
from .faces import FaceDetector, device_type, resolve_device
from .inference import ClipModel, Predict, amp_dtype, model_batch
from .onnx_model import OnnxClipModel, runtime_for
from .score import Scoring, ScoreError, VideoInput, score_videos


@dataclass(frozen=True)
class ClipScore:
    probability: float        # calibrated
    frames: tuple[int, ...]   # frame numbers in the video (every stride-th frame is sampled)


@dataclass(frozen=True)
class TrackScore:
    track: int
    score: float              # the checkpoint's aggregation rule over the track's clips
    clips: tuple[ClipScore, ...]


@dataclass(frozen=True)
class VideoScore:
    """One video's result. ``score`` is None when the video could not be scored (``status`` and ``reason`` say
    why: no_face, undecodable, empty, error) and no fallback score was set."""
    path: str
    status: str
    reason: str
    score: float | None
    label: str                # "fake", "real", or "" without a score
    threshold: float
    tracks: tuple[TrackScore, ...]
    suspicious_frames: tuple[int, ...]  # first frame numbers of the most fake clips, most suspicious first
    frames_sampled: int
    frames_with_face: int
    seconds: float            # decoding, faces and this video's share of the model batches
    score_std: float | None = None  # spread over Monte-Carlo dropout samples (score.mc_samples), else None
    model_scores: tuple[float, ...] = ()  # an ensemble's models' scores (score is their mean or median)

    @classmethod
    def from_row(cls, row: dict) -> VideoScore:
        """From the row `score_videos` yields (what score-video stores in its JSON lines)."""
        clips: dict[int, list[ClipScore]] = {}
        for track, prob, frames in row["clip_probs"]:
            clips.setdefault(int(track), []).append(ClipScore(float(prob), tuple(frames)))
        tracks = tuple(TrackScore(int(t), float(s), tuple(clips[int(t)])) for t, s in row["track_scores"].items())
        return cls(path=row["path"], status=row["status"], reason=row["reason"], score=row["score"],
                   label=row["label"], threshold=row["threshold"], tracks=tracks,
                   suspicious_frames=tuple(row["suspicious_frames"]), frames_sampled=row["frames_sampled"],
                   frames_with_face=row["frames_with_face"], seconds=row["seconds"],
                   score_std=row.get("score_std"), model_scores=tuple(row.get("model_scores", ())))


class Detector:
    """A checkpoint loaded for scoring: the model (in onnxruntime on CPUs without AMX, see `onnx_model`; else torch,
    in bf16 on CPUs with AMX, fp16 on CUDA), the face detector, and the settings `scoring_settings` reads from the
    checkpoint and the config's `score:` section. Through onnxruntime, with the checkpoint's export cached, the
    checkpoints may be their cards (`onnx_model.cached_card`): the process then never imports torch."""

    def __init__(self, ckpt: dict | list[dict], scoring: Scoring, *, device: str = "auto",
                 batch_size: int | None = None, checkpoint: str | Path | list = "checkpoint"):
        """A list of checkpoints (and of their files), with their `ensemble.EnsembleScoring`, scores as an
        ensemble."""
        self.scoring = scoring
        self.runtime = runtime_for(scoring.runtime, device, scoring.mc_samples)
        self.device = "cpu" if self.runtime == "onnx" else resolve_device(device)
        if isinstance(ckpt, list):
            self._predict = stacked([self._model(c, member, path)
                                     for c, member, path in zip(ckpt, scoring.members, checkpoint)])
        else:
            self._predict = self._model(ckpt, scoring, checkpoint)
        self._faces = FaceDetector(**{**scoring.align, "device": str(self.device)})
        self.batch_size = model_batch(batch_size, device_type(str(self.device)))

    def _model(self, ckpt: dict, scoring: Scoring, checkpoint: str | Path) -> Predict:
        try:
            if self.runtime == "onnx":
                return OnnxClipModel(ckpt, checkpoint, clip_len=scoring.clip_len, temperature=scoring.temperature,
                                     tta_flip=scoring.tta_flip)
            model = model_from_checkpoint(ckpt, self.device)
        except ValueError as e:  # a model_config its weights do not fit, an unknown backbone
            raise ScoreError(f"{checkpoint}: {e}") from None
        return ClipModel(model, device=self.device, dtype=amp_dtype(scoring.amp, self.device),
                         temperature=scoring.temperature, tta_flip=scoring.tta_flip, mc_samples=scoring.mc_samples)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | list, *, device: str = "auto", config=None) -> Detector:
        """``config``: a loaded config (`dfpipe.load_config(path, overrides=...)`) whose `score:` and
        `extract.max_frames` settings apply; the defaults without one. A list of checkpoints is an ensemble (see
        `ensemble`; `VideoScore.model_scores` holds each model's score)."""
        cfg = config if config is not None else load_config()
        ckpts, scoring = load_models(checkpoint, cfg, device=device)
        single = isinstance(checkpoint, (str, Path))
        return cls(ckpts[0] if single else ckpts, scoring, device=device, batch_size=cfg.score.batch_size,
                   checkpoint=checkpoint)

    def rows(self, videos: Iterable[VideoInput]) -> Iterator[dict]:
        """Result rows in the order the videos finish (a video's last clips may share a batch with the next)."""
        return score_videos(videos, self.scoring, self._predict, self._faces, batch_size=self.batch_size)

    def score_many(self, paths: Iterable[str | Path]) -> Iterator[VideoScore]:
        """Scores in the order the videos finish; ``path`` (absolute) says which is which."""
        for row in self.rows(VideoInput(os.path.abspath(p), None) for p in paths):
            yield VideoScore.from_row(row)

    def score(self, path: str | Path) -> VideoScore:
        return next(self.score_many([path]))
