"""The one clip-tiling rule: which clips of a face track are scored. score-video applies it as frames stream in
(`ClipCutter`), train's calibration to the staged crops of the val videos (`scoring_clips`); both count clips
through `TrackTiling`, so calibration is fitted on exactly the clips it is applied to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np

from ..manifests.errors import InputError
from .faces import FrameFaces


def clip_positions(length: int, start: int, clip_len: int) -> np.ndarray:
    """Indices into a segment for the clip starting at ``start``.

    A segment shorter than the clip repeats its edge frames on both sides, keeping the real motion in the middle.
    """
    lead = max(0, (clip_len - length) // 2)
    return np.clip(np.arange(clip_len) + start - lead, 0, length - 1)


class TrackTiling:
    """Per track: its runs of consecutive sampled frames are tiled by non-overlapping clips of ``clip_len``, of
    which the 1st, N+1st, ... are kept for ``clip_every`` N; a track that fills no clip gets one clip padded from
    its longest run (the first of equal ones)."""

    def __init__(self, clip_len: int, clip_every: int = 1):
        if clip_len < 1:
            raise InputError(f"clip_len must be at least 1, got {clip_len}")
        if not isinstance(clip_every, int) or clip_every < 1:
            raise InputError(f"score.clip_every must be a positive integer, got {clip_every!r}")
        self.clip_len = clip_len
        self.clip_every = clip_every
        self._cut: dict[Hashable, int] = {}                  # full clips of each track so far
        self._longest: dict[Hashable, tuple[int, Any]] = {}  # track -> (length, key) of its longest short run

    def full_clip(self, track: Hashable) -> bool:
        """Counts one more full clip of ``track``; whether it is kept."""
        self._cut[track] = self._cut.get(track, 0) + 1
        return (self._cut[track] - 1) % self.clip_every == 0

    def has_clip(self, track: Hashable) -> bool:
        return track in self._cut

    def short_run(self, track: Hashable, length: int, key: Any) -> None:
        """A run of ``track`` too short for a clip, named by ``key``."""
        if track not in self._longest or length > self._longest[track][0]:
            self._longest[track] = (length, key)

    def drop(self, track: Hashable) -> None:
        self._longest.pop(track, None)

    def padded(self) -> list[tuple[Hashable, Any]]:
        """(track, key of its longest run) of each track that filled no clip, in the order tracks first ran short."""
        return [(t, key) for t, (_, key) in self._longest.items() if t not in self._cut]


def scoring_clips(segments: Sequence, clip_len: int, clip_every: int) -> list[tuple[int, int]]:
    """(segment index, start) of the clips score-video scores, over a faces table's segments (among the segments
    given: under ``short_tracks: skip`` short runs are not)."""
    tiling, out = TrackTiling(clip_len, clip_every), []
    for i, s in enumerate(segments):
        track = (s.video_id, s.track_id)
        out += [(i, start) for start in range(0, len(s.frames) - clip_len + 1, clip_len) if tiling.full_clip(track)]
        if len(s.frames) < clip_len:
            tiling.short_run(track, len(s.frames), i)
    return out + [(i, 0) for _, i in tiling.padded()]


@dataclass
class Clip:
    track: int
    frames: tuple[int, ...]   # frame numbers of the video; a padded clip repeats its edge frames
    prob: float | None = None
    samples: list[float] | None = None  # more probabilities: Monte-Carlo dropout's, or an ensemble's models'


@dataclass
class _Run:
    frames: list[int] = field(default_factory=list)
    hq: list[np.ndarray] = field(default_factory=list)
    lq: list[np.ndarray] = field(default_factory=list)


class ClipCutter:
    """Cuts one video's aligned faces into per-track clips as they stream in (`TrackTiling`'s rule).

    A clip never spans a frame where its track was missing (the rule of the training dataset). Full clips leave as
    soon as they are complete; with `clip_every` N the crops of the clips not kept are dropped, which divides the
    model's work by N. The padded clips of tracks that filled none leave at `finish`. Runs of tracks already dead
    (unseen for more than track_max_gap frames) and shorter than min_track_len are dropped at once, so that a long
    video full of spurious detections does not pile up crops that select_tracks would reject anyway.
    """

    def __init__(self, clip_len: int, *, track_max_gap: int, min_track_len: int, clip_every: int = 1, **_):
        self.tiling = TrackTiling(clip_len, clip_every)
        self.clip_len = clip_len
        self.track_max_gap = track_max_gap
        self.min_track_len = min_track_len
        self.face_frames: dict[int, list[int]] = {}  # sampled frames where each track has a face
        self._runs: dict[int, _Run] = {}
        self._last_seen: dict[int, int] = {}

    def add(self, position: int, frame: FrameFaces) -> list[tuple[Clip, np.ndarray, np.ndarray]]:
        """`position` counts sampled frames (with or without faces); clips completed by this frame come back."""
        done = []
        for face in frame.faces:
            track = face.track_id
            self.face_frames.setdefault(track, []).append(frame.index)
            self._last_seen[track] = position
            run = self._runs.setdefault(track, _Run())
            run.frames.append(frame.index)
            run.hq.append(face.hq)
            run.lq.append(face.lq)
            if len(run.frames) == self.clip_len:
                if self.tiling.full_clip(track):
                    done.append(self._clip(track, run, np.arange(self.clip_len)))
                self._runs[track] = _Run()
        for track in [t for t in self._runs if self._last_seen[t] != position]:
            self._end(track)
        for track, _ in self.tiling.padded():
            dead = position - self._last_seen[track] > self.track_max_gap
            if dead and len(self.face_frames[track]) < self.min_track_len:
                self.tiling.drop(track)
        return done

    def finish(self) -> list[tuple[Clip, np.ndarray, np.ndarray]]:
        for track in list(self._runs):
            self._end(track)
        return [self._clip(t, run, clip_positions(len(run.frames), 0, self.clip_len))
                for t, run in sorted(self.tiling.padded(), key=lambda item: item[0])]

    def _end(self, track: int) -> None:
        run = self._runs.pop(track)
        if run.frames and not self.tiling.has_clip(track):
            self.tiling.short_run(track, len(run.frames), run)

    @staticmethod
    def _clip(track: int, run: _Run, positions: np.ndarray) -> tuple[Clip, np.ndarray, np.ndarray]:
        return (Clip(track, tuple(run.frames[p] for p in positions)),
                np.stack([run.hq[p] for p in positions]), np.stack([run.lq[p] for p in positions]))
