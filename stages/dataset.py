"""Clips of consecutive aligned face crops, the training and validation input of the dual-stream detector.

A clip is ``clip_len`` consecutive sampled frames of ONE face track: the ConvLSTM learns temporal artefacts, so a clip
must never jump across a frame where the tracker lost the face, nor from one person to another. Each clip carries the
same frames twice, as the 224 px (HQ) and the 112 px (LQ) crop, and both streams get identical augmentation so that
they keep describing the same pixels.

Randomness (training clip starts, augmentation, mixing) comes from generators seeded by (seed, epoch, item index)
only, so an epoch is reproducible whatever the number of DataLoader workers. Call ``set_epoch`` on the dataset and the
sampler before each epoch; workers must be re-created per epoch (the DataLoader default, ``persistent_workers=False``)
for the dataset's epoch to reach them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision.io import ImageReadMode, decode_image

from ..manifests.errors import DfpipeError, InputError
from .augment import ClipAugment, ClipMix
from .clips import clip_positions, scoring_clips
from .synthesize import BlendParams, crop_outline, self_blend

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("video_id", "frame_index", "status", "track_id", "hq_path", "lq_path")
GEOMETRY_COLUMNS = ("landmarks", "x1", "y1", "x2", "y2")  # where the face is: what a self-blended fake's mask needs
REAL, FAKE, BLENDED = 0, 1, 2  # item kinds: BalancedSampler gives self-blended fakes their share of the fakes
BLENDED_SUFFIX = "#sbi"  # a self-blended clip's video id: validation scores it as a video of its own
PAIR_KEYS = ("hq_real", "lq_real")

MIX_STREAM, PARTNER_STREAM = 1, 2  # extra seed keys: mixing draws apart from the clip's own, so they change nothing


class CropError(DfpipeError):
    pass


def seeded_generator(*key: int) -> torch.Generator:
    """A generator that depends on ``key`` only, so a worker process reproduces exactly the main process's draws."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass(frozen=True)
class Segment:
    """A run of one track over adjacent sampled frames: the only span a clip may be taken from."""
    video_id: str
    track_id: int
    label: int
    frames: tuple[int, ...]
    hq_paths: tuple[str, ...]
    lq_paths: tuple[str, ...]
    landmarks: np.ndarray | None = field(default=None, compare=False)  # (frames, 5, 2) in frame pixels
    boxes: np.ndarray | None = field(default=None, compare=False)      # (frames, 4)


def face_rows(faces: pd.DataFrame, labels: Mapping[str, int]) -> pd.DataFrame:
    """The face rows of the labelled videos with each frame's position in its video's list of sampled frames.

    Videos missing from ``labels`` belong to another split and are left out. Positions count no_face rows too, so a
    frame where this track (or every face) was lost breaks the adjacency even though frame_index keeps its stride.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in faces.columns]
    if missing:
        raise InputError(f"faces table: missing columns {', '.join(missing)}")
    bad = {v: y for v, y in labels.items() if y not in (0, 1)}
    if bad:
        raise InputError(f"labels: expected 0 (real) or 1 (fake), got {bad}")
    rows = faces[faces["video_id"].isin(list(labels))].copy()
    rows["position"] = rows.groupby("video_id")["frame_index"].rank(method="dense").astype(int)
    rows = rows[rows["status"] == "face"].sort_values(["video_id", "track_id", "frame_index"])
    if rows.duplicated(["video_id", "track_id", "frame_index"]).any():
        raise InputError("faces table: a track has two faces in the same frame")
    if rows[["hq_path", "lq_path"]].isna().any(axis=None):
        raise InputError("faces table: face rows without hq_path or lq_path")
    return rows


def track_segments(rows: pd.DataFrame, labels: Mapping[str, int], geometry: bool = False) -> list[Segment]:
    """Split the face rows (from ``face_rows``) into runs of one track over adjacent sampled frames; with
    ``geometry`` each segment carries its faces' landmarks and boxes."""
    if geometry:
        missing = [c for c in GEOMETRY_COLUMNS if c not in rows.columns]
        if missing:
            raise InputError(f"faces table: missing columns {', '.join(missing)} (needed by dataset.synthesize)")
        marks = np.array(" ".join(rows["landmarks"].astype(str)).split(), dtype=float).reshape(-1, 5, 2)
        boxes = rows[["x1", "y1", "x2", "y2"]].to_numpy(dtype=float)
    same_track = (rows["video_id"] == rows["video_id"].shift()) & (rows["track_id"] == rows["track_id"].shift())
    new_run = ~same_track | (rows["position"].diff() != 1)
    segments = []
    at = 0  # the runs come in row order (the key grows with the rows)
    for _, run in rows.groupby(new_run.cumsum(), sort=False):
        video_id = run["video_id"].iloc[0]
        where = slice(at, at + len(run))
        at += len(run)
        segments.append(Segment(video_id, int(run["track_id"].iloc[0]), int(labels[video_id]),
                                tuple(run["frame_index"].astype(int).tolist()), tuple(run["hq_path"]),
                                tuple(run["lq_path"]), *((marks[where], boxes[where]) if geometry else ())))
    return segments


def evenly_spaced_starts(length: int, clip_len: int, count: int) -> list[int]:
    """Fixed validation starts covering the whole segment; a segment too short for ``count`` distinct clips gets
    fewer."""
    return np.unique(np.linspace(0, max(0, length - clip_len), count).round().astype(int)).tolist()


def read_crops(root: Path, paths: Sequence[str]) -> torch.Tensor:
    """uint8 (T, 3, H, W); a padded clip names the same file several times and it is decoded once."""
    decoded = {}
    for rel in dict.fromkeys(paths):
        path = root / rel
        try:
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        except OSError as e:
            raise CropError(f"{path}: cannot read crop ({e.strerror})") from None
        try:
            decoded[rel] = decode_image(data, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            raise CropError(f"{path}: crop is not a decodable image") from None
    return torch.stack([decoded[rel] for rel in paths])


class SequenceDataset(Dataset):
    """Clips of ``clip_len`` consecutive crops of one track, with the video's label (1 fake, 0 real).

    Training: one item per segment per epoch, starting at a random frame. Validation: ``val_clips_per_track`` evenly
    spaced clips per segment, the same every epoch, no augmentation; with ``scoring_every`` N instead the clips
    score-video would score with clip_every N (see `scoring_clips`), for calibration. Segments shorter than
    ``clip_len`` are dropped (``short_tracks: skip``) or padded with their edge frames (``pad``).

    With ``synthesize: sbi`` every real segment also gives a self-blended fake item (`synthesize.self_blend`, one
    draw per clip, made from the crops as they are read, before augmentation); in validation only when the split
    has no fake of its own, since a detector is judged on real fakes where there are any. ``crop_margin`` (align's
    margin) places the face outline in the crop.

    With ``paired`` (training only) a fake item also carries ``hq_real``/``lq_real``: the crops of its source real
    (``sources[fake_id]``, which must be in ``labels`` too) with the same track_id at the same frame indices,
    augmented identically. Pair-aware alignment makes these pixel-aligned with the fake's crops. A fake whose source
    lacks that track at any of the clip's frames, or has no source, yields an item without pair.

    Training items may be mixed with a partner clip (``augment.mixup`` / ``cutmix``, see `ClipMix`): the partner is
    any item, made as it would be on its own (its own start, blend and augmentation, from a seed of its own), and
    the label becomes the mixed target. Items that carry their source's crops (``paired``) are not mixed, since the
    pair contrasts the fake with its source pixel for pixel.

    An unreadable crop (of either stream or of the pair) drops the whole clip: ``__getitem__`` logs a warning naming
    the file and returns None, which ``collate_clips`` filters out; ``stats['failed_clips']`` counts them across
    worker processes.
    """

    def __init__(self, root: str | Path, faces: pd.DataFrame, labels: Mapping[str, int], *, train: bool,
                 clip_len: int, short_tracks: str, val_clips_per_track: int, augment: Mapping[str, float], seed: int,
                 sources: Mapping[str, str] | None = None, paired: bool = False, scoring_every: int | None = None,
                 synthesize: str = "none", sbi_fraction: float = 0.5, crop_margin: float | None = None, **_):
        if short_tracks not in ("skip", "pad"):
            raise InputError(f"dataset.short_tracks: '{short_tracks}' is neither skip nor pad")
        if train and paired and sources is None:
            raise InputError("dataset.paired: needs the sources mapping (fake video -> real video)")
        if synthesize not in ("none", "sbi"):
            raise InputError(f"dataset.synthesize: '{synthesize}' is neither none nor sbi")
        if synthesize == "sbi" and crop_margin is None:
            raise InputError("dataset.synthesize: sbi needs crop_margin (align.margin) to place the face in the crop")
        self.root = Path(root)
        self.train = train
        self.clip_len = clip_len
        self.augment = dict(augment)
        self.seed = seed
        self.epoch = 0
        self.crop_margin = crop_margin
        self.sbi_fraction = sbi_fraction
        rows = face_rows(faces, labels)
        segments = track_segments(rows, labels, geometry=synthesize == "sbi")
        short = sum(len(s.frames) < clip_len for s in segments)
        self.short_counts = {"short_skipped": short if short_tracks == "skip" else 0,
                             "short_padded": short if short_tracks == "pad" else 0}
        self.segments = segments if short_tracks == "pad" else [s for s in segments if len(s.frames) >= clip_len]
        if train:
            self.clips = [(i, None) for i in range(len(self.segments))]
        elif scoring_every:
            self.clips = scoring_clips(self.segments, clip_len, scoring_every)
        else:
            self.clips = [(i, start) for i, s in enumerate(self.segments)
                          for start in evenly_spaced_starts(len(s.frames), clip_len, val_clips_per_track)]
        self.kinds = [self.segments[i].label for i, _ in self.clips]
        if synthesize == "sbi" and (train or FAKE not in self.kinds):
            blended = [clip for clip, kind in zip(self.clips, self.kinds) if kind == REAL]
            self.clips += blended
            self.kinds += [BLENDED] * len(blended)
        self.sources = dict(sources or {}) if train and paired else {}
        source_rows = rows[rows["video_id"].isin(set(self.sources.values()))]
        self.real_crops = {(v, int(t), int(f)): (hq, lq) for v, t, f, hq, lq in source_rows[
            ["video_id", "track_id", "frame_index", "hq_path", "lq_path"]].itertuples(index=False)}
        # Shared memory so DataLoader workers' failures reach the main process; a log figure, so left unlocked.
        self._failed = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.clips)

    def __iter__(self) -> Iterator[dict | None]:
        # explicit: indices past the end are valid (repeat draws, see __getitem__), so the old protocol of
        # indexing until an IndexError would never end
        return (self[i] for i in range(len(self)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def item_labels(self) -> list[int]:
        """Label of every item, in index order (what ``BalancedSampler`` balances)."""
        return [int(kind != REAL) for kind in self.kinds]

    @property
    def stats(self) -> dict[str, int]:
        """Counts for the training log."""
        return {"segments": len(self.segments), "clips": len(self.clips), "blended": self.kinds.count(BLENDED),
                **self.short_counts, "failed_clips": int(self._failed)}

    def _pair_paths(self, segment: Segment, frames: Sequence[int]) -> dict[str, list[str]]:
        real = self.sources.get(segment.video_id) if segment.label == 1 else None
        keys = [(real, segment.track_id, f) for f in frames]
        if real is None or not all(k in self.real_crops for k in keys):
            return {}
        return {"hq_real": [self.real_crops[k][0] for k in keys], "lq_real": [self.real_crops[k][1] for k in keys]}

    def __getitem__(self, index: int) -> dict | None:
        """An index past the end is a repeat draw of `index % len(self)` (BalancedSampler oversampling): its own
        seed gives the repeat another random start and augmentation, not a copy of the first draw."""
        item = self._item(index % len(self.clips), seeded_generator(self.seed, self.epoch, index))
        mix = self.mix_plan(index, item["lq"].shape[-1]) if item is not None and PAIR_KEYS[0] not in item else None
        if mix is None:
            return item
        partner = self._item(mix.partner, seeded_generator(self.seed, self.epoch, index, PARTNER_STREAM))
        if partner is None:
            return item
        return {**item, "hq": mix(item["hq"], partner["hq"]), "lq": mix(item["lq"], partner["lq"]),
                "label": mix.ratio * item["label"] + (1 - mix.ratio) * partner["label"]}

    def mix_plan(self, index: int, grid: int) -> ClipMix | None:
        """Item ``index``'s mix (None: not mixed); ``grid`` is its smallest stream's crop size."""
        if not self.train or self.augment.get("mixup", 0) + self.augment.get("cutmix", 0) == 0:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index, MIX_STREAM])
        return ClipMix.sample(self.augment, len(self.clips), grid, rng)

    def _item(self, clip: int, gen: torch.Generator) -> dict | None:
        """Clip ``clip`` (an index into ``self.clips``) read, blended and augmented with draws from ``gen``."""
        seg_index, start = self.clips[clip]
        blend = self.kinds[clip] == BLENDED
        segment = self.segments[seg_index]
        if start is None:
            start = int(torch.randint(max(1, len(segment.frames) - self.clip_len + 1), (), generator=gen))
        positions = clip_positions(len(segment.frames), start, self.clip_len)
        frames = [segment.frames[p] for p in positions]
        streams = {"hq": [segment.hq_paths[p] for p in positions], "lq": [segment.lq_paths[p] for p in positions],
                   **({} if blend else self._pair_paths(segment, frames))}
        try:
            clips = {name: read_crops(self.root, paths) for name, paths in streams.items()}
        except CropError as e:
            log.warning("skipping clip of %s track %d at frame %d: %s", segment.video_id, segment.track_id,
                        frames[0], e)
            self._failed += 1
            return None
        if blend:
            outlines = crop_outline(segment.landmarks[positions], segment.boxes[positions],
                                    hq_size=clips["hq"].shape[-1], margin=self.crop_margin)
            clips["hq"], clips["lq"], _ = self_blend(clips["hq"], clips["lq"], outlines, BlendParams.sample(gen))
        augment = ClipAugment.sample(self.augment, gen) if self.train else ClipAugment()
        item = {name: augment(clip, gen) for name, clip in clips.items()}
        item.update(label=torch.tensor(float(blend or segment.label)),
                    video_id=segment.video_id + (BLENDED_SUFFIX if blend else ""),
                    track_id=segment.track_id, start=frames[0])
        return item


def collate_clips(batch: Sequence[dict | None]) -> dict | None:
    """Batch the clips that could be read, or None if none could.

    Paired crops are stacked only for the items that have them, and ``pair_index`` gives those items' rows in the
    batch: filling the gaps with blank crops would teach the model that a black face is real.
    """
    items = [item for item in batch if item is not None]
    if not items:
        return None
    out = default_collate([{k: v for k, v in item.items() if k not in PAIR_KEYS} for item in items])
    paired = [i for i, item in enumerate(items) if PAIR_KEYS[0] in item]
    if paired:
        out["pair_index"] = torch.tensor(paired)
        for key in PAIR_KEYS:
            out[key] = torch.stack([items[i][key] for i in paired])
    return out


class BalancedSampler(Sampler[int]):
    """Draws real and fake items equally often per epoch; with ``num_replicas`` > 1 it replaces DistributedSampler.

    Self-blended fakes (kind BLENDED) take ``blended_share`` of the fakes' half when the dataset has fakes of its
    own, all of it when it has none. Each kind is shuffled (the same way on every rank) and dealt out to the ranks, so
    ranks draw from disjoint items whenever a kind has at least ``num_replicas`` items; each rank then takes its
    quota of each kind from its share, cycling through fresh permutations of a share smaller than that (oversampling
    the minority instead of truncating the majority's epoch); see `_draw` for how a repeat is told apart.
    """

    def __init__(self, dataset: SequenceDataset, *, seed: int, num_replicas: int = 1, rank: int = 0,
                 blended_share: float = 0.5):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"BalancedSampler: rank {rank} is outside 0..{num_replicas - 1}")
        kinds = np.asarray(dataset.kinds)
        self.kinds = [np.flatnonzero(kinds == kind) for kind in (REAL, FAKE, BLENDED)]
        if len(self.kinds[REAL]) == 0:
            raise ValueError("BalancedSampler: the dataset has no real clips to balance")
        if len(self.kinds[FAKE]) + len(self.kinds[BLENDED]) == 0:
            raise ValueError("BalancedSampler: the dataset has no fake clips to balance")
        self.per_class = math.ceil(len(kinds) / (2 * num_replicas))
        blended = (0 if len(self.kinds[BLENDED]) == 0 else self.per_class if len(self.kinds[FAKE]) == 0
                   else round(self.per_class * blended_share))
        self.quotas = [self.per_class, self.per_class - blended, blended]
        self.size = len(kinds)
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def __len__(self) -> int:
        return 2 * self.per_class

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draw(self, share: np.ndarray, count: int, gen: torch.Generator) -> np.ndarray:
        """Round r of a share smaller than ``count`` is offset by r * len(dataset): the dataset reads it as a repeat
        draw of the same clip with a seed of its own."""
        rounds = math.ceil(count / len(share))
        return np.concatenate([share[torch.randperm(len(share), generator=gen).numpy()] + r * self.size
                               for r in range(rounds)])[:count]

    def __iter__(self) -> Iterator[int]:
        common = seeded_generator(self.seed, self.epoch)
        own = seeded_generator(self.seed, self.epoch, self.rank)
        drawn = []
        for members, quota in zip(self.kinds, self.quotas):
            if quota == 0:
                continue
            shuffled = members[torch.randperm(len(members), generator=common).numpy()]
            if len(shuffled) >= self.num_replicas:
                share = shuffled[self.rank::self.num_replicas]
            else:
                share = shuffled[[self.rank % len(shuffled)]]
            drawn.append(self._draw(share, quota, own))
        order = np.concatenate(drawn)[torch.randperm(len(self), generator=own).numpy()]
        return iter(order.tolist())
