"""What training reads from a workspace: the faces and videos manifests, the training pairs and their splits, the
extract and align settings scoring must repeat, and the loaders over the clips."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler
from ..manifests.errors import InputError
from ..manifests.progress import note
from ..manifests.table import atomic_write_bytes, read_table, write_table
from ..manifests.units import load_state
from ..manifests.workspace import Workspace
from . import align_units
from . import pairs as pairs_mod
from .dataset import BalancedSampler, SequenceDataset, collate_clips
from .distributed import Ranks
from .labels import TARGET


class TrainError(InputError):
    """A problem with the workspace, the run folder or the config, reported as one line."""


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise TrainError(f"{path}: not found ({what})")
    return path


def faces_table(ws: Workspace) -> pd.DataFrame:
    """faces.csv, with what a sharded or interrupted align left in its journals folded in first (those crops are on
    disk and recorded, just not yet in the table), and integer frame_index/track_id: the dataset orders frames
    numerically ('12' < '3' as text). Refused while align has work left: training would silently use old crops of
    a changed video, or leave new videos out."""
    load_state(ws, align_units.SPEC)
    behind = align_units.behind(ws)
    if behind:
        raise TrainError(f"{ws.root}: {len(behind)} extracted video(s) have no crops yet or crops of an older "
                         f"version (e.g. {behind[0]}); run `dfpipe align --work {ws.root}` first")
    path = ws.manifest("faces.csv")
    faces = read_table(require_file(path, "run dfpipe align first"), align_units.FACE_COLUMNS)
    try:
        return faces.assign(frame_index=faces.frame_index.astype(np.int64),
                            track_id=faces.track_id.where(faces.status == "face", "-1").astype(np.int64))
    except ValueError:
        raise TrainError(f"{path}: frame_index and track_id must be integers") from None


def update_pairs(ws: Workspace, videos: pd.DataFrame, faces: pd.DataFrame, pairs_cfg) -> pd.DataFrame:
    """Rebuilds training_pairs.csv; the previous one is passed in so old groups never change split, unless the
    settings it was drawn with (kept beside it) changed: a new seed or fraction is a request for new splits, and
    keeping the old ones would silently ignore it (cross-validation folds would all be the same split)."""
    path = ws.root / pairs_mod.PAIRS
    settings_path = path.with_suffix(".json")
    settings = {k: pairs_cfg[k] for k in pairs_mod.SPLIT_SETTINGS}
    previous = read_table(path, pairs_mod.COLUMNS) if path.exists() else None
    if previous is not None and settings_path.exists():
        try:
            drawn_with = json.loads(settings_path.read_text(encoding="utf-8"))
            changed = [f"pairs.{k} {drawn_with[k]} -> {v}" for k, v in settings.items() if drawn_with[k] != v]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"{settings_path}: unreadable ({type(e).__name__}); delete it to keep the current "
                             "splits") from None
        if changed:
            note(f"note: {', '.join(changed)}: splits drawn anew (official splits still apply)")
            previous = None
    pairs = pairs_mod.build_training_pairs(videos, faces, previous, **pairs_cfg)
    write_table(path, pairs, pairs_mod.COLUMNS)
    atomic_write_bytes(settings_path, json.dumps(settings, sort_keys=True).encode() + b"\n")
    for text in pairs.attrs["notes"]:
        note(f"note: {text}")
    return pairs


def split_labels(pairs: pd.DataFrame, videos: pd.DataFrame) -> dict[str, dict[str, int]]:
    """split -> {video_id: 0 real | 1 fake}."""
    label_of = dict(zip(videos.video_id, videos.label.map(TARGET)))
    return {split: {v: int(label_of[v]) for v in sorted(ids)} for split, ids in pairs_mod.split_videos(pairs).items()}


def make_loaders(root: Path, faces: pd.DataFrame, labels: dict[str, dict[str, int]], sources: dict[str, str],
                 cfg, ctx: Ranks, crop_margin: float) -> tuple[DataLoader, DataLoader]:
    """Train: balanced (or shuffled) and sharded by rank. Val: each rank scores every world-th clip, in order.

    The train loader's workers are not persistent: ``SequenceDataset.set_epoch`` must reach fresh worker copies each
    epoch. Each loader draws worker seeds from its own generator, so the global RNG (dropout) advances the same way
    whether or not the run was resumed.
    """
    t = cfg.train
    train_ds = SequenceDataset(root, faces, labels["train"], train=True, seed=t.seed, sources=sources,
                               crop_margin=crop_margin, **cfg.dataset)
    val_ds = SequenceDataset(root, faces, labels["val"], train=False, seed=t.seed, crop_margin=crop_margin,
                             **cfg.dataset)
    if len(train_ds) == 0 or len(val_ds) == 0:
        empty = "train" if len(train_ds) == 0 else "val"
        raise TrainError(f"{root / pairs_mod.PAIRS}: the {empty} split has no track of at least dataset.clip_len="
                         f"{cfg.dataset.clip_len} frames (more videos, pairs.val_fraction or a shorter clip_len)")
    one_class = [name for label, name in ((0, "real"), (1, "fake")) if label not in set(val_ds.item_labels)]
    if one_class:
        held = sum(1 for v in labels["val"].values() if v == (one_class[0] == "fake"))
        raise TrainError(f"{root / pairs_mod.PAIRS}: the val split has no {one_class[0]} clip ({held} {one_class[0]} "
                         "video(s) in it): early stopping, calibration and the threshold need both classes (more "
                         "videos, pairs.val_fraction, or official splits that give val both)")
    missing = [name for label, name in ((0, "real"), (1, "fake")) if label not in set(train_ds.item_labels)]
    if cfg.dataset.balanced and missing:
        held = sum(1 for v in labels["train"].values() if v == (missing[0] == "fake"))
        raise TrainError(f"{root / pairs_mod.PAIRS}: the train split has no {missing[0]} clip to balance ({held} "
                         f"{missing[0]} video(s) in it, none with a track of dataset.clip_len={cfg.dataset.clip_len} "
                         "crops; see `dfpipe status` for failed videos): more videos, or dataset.balanced=false")
    if cfg.dataset.balanced:
        sampler = BalancedSampler(train_ds, seed=t.seed, num_replicas=ctx.world, rank=ctx.rank,
                                  blended_share=cfg.dataset.sbi_fraction)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=t.seed)
    train = DataLoader(train_ds, sampler=sampler, generator=torch.Generator().manual_seed(t.seed),
                       **_loader_options(cfg, ctx))
    return train, eval_loader(val_ds, cfg, ctx, persistent=True)


def _loader_options(cfg, ctx: Ranks) -> dict:
    return dict(batch_size=cfg.train.batch_size, num_workers=cfg.train.workers, collate_fn=collate_clips,
                pin_memory=ctx.device.type == "cuda")


def eval_loader(dataset: SequenceDataset, cfg, ctx: Ranks, *, persistent: bool) -> DataLoader:
    """Each rank scores every world-th clip, in order."""
    return DataLoader(dataset, sampler=range(ctx.rank, len(dataset), ctx.world),
                      persistent_workers=persistent and cfg.train.workers > 0,
                      generator=torch.Generator().manual_seed(cfg.train.seed), **_loader_options(cfg, ctx))


def batch_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hq, lq, labels on the device; paired source-real crops (dataset.paired) join the batch as extra reals."""
    def to(t: torch.Tensor) -> torch.Tensor:  # before any cat: a cat on the host is unpinned memory again
        return t.to(device, non_blocking=True)
    hq, lq, y = to(batch["hq"]), to(batch["lq"]), to(batch["label"])
    if "pair_index" in batch:
        hq = torch.cat([hq, to(batch["hq_real"])])
        lq = torch.cat([lq, to(batch["lq_real"])])
        y = torch.cat([y, y.new_zeros(len(batch["pair_index"]))])
    return hq, lq, y


def extract_settings(ws: Workspace) -> dict:
    """How the training frames were sampled and stored, for score-video to do the same with a raw video."""
    path = require_file(ws.manifest("extract.params.json"), "run dfpipe extract first")
    try:
        params = json.loads(path.read_text())
        return {"stride": int(params["stride"]), "jpeg_quality": int(params["jpeg_quality"])}
    except (ValueError, KeyError, TypeError):
        raise TrainError(f"{path}: no integer 'stride' and 'jpeg_quality'") from None


def align_params(ws: Workspace, cfg) -> dict:
    """How the training crops were made, for score-video to crop the same way: the workspace's align.params.json
    (written by `dfpipe align`) over the config, which also supplies the keys that do not change a crop."""
    path = ws.manifest("align.params.json")
    return {**cfg.align.to_dict(), **(json.loads(path.read_text()) if path.is_file() else {})}
