"""Training-pair manifest: which fake goes with which real, and which split each video belongs to.

Splits are decided per *group*, never per video: a real, every fake made from it and every video sharing an
identity must sit on the same side of the train/val/test boundary, otherwise validation scores measure
memorised faces instead of detection. Groups are connected components of the graph "video - its identity
group" plus "fake - its source video", so a fake whose group label differs from its source's merges the two.

A group's split, in order of precedence:
  1. the split it had in the previous manifest, so retraining on a grown dataset never moves an old video
     (if two old groups get merged, or the videos table now states a different official split, a note says so);
  2. the official split of its videos (if they disagree, the most restrictive one, test > val > train, wins
     and a note says so: training on a video of an official test group would leak, the other way round
     only costs training data). An official 'train' binds only where its dataset names a val (test) split
     of its own; otherwise val (test) is carved out of it by step 3;
  3. a seeded hash of (seed, group) compared with the fractions, so a new group's split does not depend on
     which other new groups arrived with it. Groups without an official split are stratified by label (a
     group with any fake is 'fake'); only when a stratum of >= 2 groups would otherwise leave a wanted
     split empty (small datasets) is the new group whose hash lies nearest that split moved into it.

Notes are returned in ``pairs.attrs["notes"]`` (a list of one-line strings) for the caller to log.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from itertools import groupby
from operator import itemgetter

import numpy as np
import pandas as pd

from ..manifests.errors import InputError
from .components import smallest_in_component

VIDEOS = "manifests/videos.csv"
FACES = "manifests/faces.csv"
PAIRS = "manifests/training_pairs.csv"
RUN_PAIRS = "training_pairs.csv"  # the run folder's copy: the splits its checkpoint was trained on

SPLIT_SETTINGS = ("seed", "val_fraction", "test_fraction")  # what a split was drawn with
COLUMNS = ["fake_id", "real_id", "split", "group", "dataset", "method", "fake_digest", "real_digest"]
SORT_KEYS = ["group", "real_id", "fake_id"]
SPLITS = ("train", "val", "test")
RESTRICTIVENESS = {"train": 0, "val": 1, "test": 2}

_VIDEO_COLUMNS = ["video_id", "label", "source_id", "group", "split", "dataset", "method"]
_FACE_COLUMNS = ["video_id", "frame_index", "status", "track_id", "hq_sha256", "lq_sha256"]


def _text(table: pd.DataFrame, columns: list[str], where: str) -> pd.DataFrame:
    """CSV round trips turn '' into NaN and ids into numbers; compare everything as plain strings."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{where}: missing columns {', '.join(missing)}")
    return table[columns].astype(object).fillna("").astype(str).reset_index(drop=True)


def _check_videos(videos: pd.DataFrame) -> None:
    duplicated = videos.video_id[videos.video_id.duplicated()]
    if len(duplicated):
        raise InputError(f"{VIDEOS}: duplicate video_id '{duplicated.iloc[0]}'")
    for column, allowed in (("label", {"real", "fake"}), ("split", {"", *SPLITS})):
        bad = videos[~videos[column].isin(allowed)]
        if len(bad):
            raise InputError(f"{VIDEOS}: video '{bad.video_id.iloc[0]}' has {column} '{bad[column].iloc[0]}'")
    fakes = set(videos.video_id[videos.label == "fake"])
    bad = videos[(videos.label == "fake") & videos.source_id.isin(fakes)]
    if len(bad):
        raise InputError(f"{VIDEOS}: fake '{bad.video_id.iloc[0]}' names fake '{bad.source_id.iloc[0]}' as its source")


def crop_digests(faces: pd.DataFrame) -> dict[str, str]:
    """video_id -> sha256 of its face crop set, so a manifest pins the exact crops a model was trained on."""
    text = _text(faces, _FACE_COLUMNS, FACES)
    crops = text.status == "face"
    try:
        keys = faces[["frame_index", "track_id"]].reset_index(drop=True)[crops].apply(pd.to_numeric).astype(np.int64)
    except (ValueError, TypeError) as e:
        raise InputError(f"{FACES}: frame_index/track_id must be integers ({e})") from None
    text = text[crops]
    rows = sorted(zip(text.video_id.tolist(), keys.frame_index.tolist(), keys.track_id.tolist(),
                      text.hq_sha256.tolist(), text.lq_sha256.tolist()))
    return {video: hashlib.sha256("".join(f"{f},{t},{hq},{lq}\n" for _, f, t, hq, lq in crops).encode()).hexdigest()
            for video, crops in groupby(rows, key=itemgetter(0))}


def _components(videos: pd.DataFrame) -> pd.Series:
    """Group name of each video's connected component (its smallest group label, else its smallest video id).

    A fake is linked to its source_id even when that video is absent, so fakes of one missing original
    (DFDC) still share a group.
    """
    with_group = videos[videos.group != ""]
    fakes = videos[(videos.label == "fake") & (videos.source_id != "")]
    # 'g:' < 'v:': a component with any group label is named after its smallest label.
    smallest = smallest_in_component([
        *(("v:" + v,) for v in videos.video_id),
        *zip("v:" + with_group.video_id, "g:" + with_group.group),
        *zip("v:" + fakes.video_id, "v:" + fakes.source_id)])
    return pd.Series([smallest["v:" + v][2:] for v in videos.video_id], index=videos.video_id.to_numpy())


def _most_restrictive(splits: set[str]) -> str:
    return max(splits, key=RESTRICTIVENESS.__getitem__)


def _previous_splits(previous: pd.DataFrame | None, videos: pd.DataFrame, group_of: pd.Series) -> dict[str, set[str]]:
    """group -> splits it had in the previous manifest, found through its videos or its group labels.

    Matching by video id survives a group being renamed by a merge; matching by label keeps a group whose
    old videos were all replaced.
    """
    if previous is None or previous.empty:
        return {}
    previous = _text(previous, ["fake_id", "real_id", "split", "group"], PAIRS)
    bad = previous[~previous.split.isin(SPLITS)]
    if len(bad):
        raise InputError(f"{PAIRS}: group '{bad.group.iloc[0]}' has split '{bad.split.iloc[0]}'")
    video_split = {video: split for split, ids in split_videos(previous).items() for video in ids}
    group_split = dict(zip(previous.group, previous.split))
    found: dict[str, set[str]] = {}
    for video, label, group in zip(videos.video_id, videos.group, group_of):
        for split in (video_split.get(video), group_split.get(label), group_split.get(group)):
            if split:
                found.setdefault(group, set()).add(split)
    return found


def _unit_hash(seed: int, group: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, group) alone, so it never depends on the other groups."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{group}".encode()).digest()[:8], "big") / 2.0 ** 64


def _seeded_splits(strata: dict[str, str], fixed: dict[str, str], *, seed: int, val_fraction: float,
                   test_fraction: float) -> dict[str, str]:
    """Hash-assign the groups not in ``fixed``; then cover the wanted splits of each small stratum."""
    bounds = {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction),
              "train": (test_fraction + val_fraction, 1.0)}
    u = {g: _unit_hash(seed, g) for g in strata if g not in fixed}
    split_of = dict(fixed)
    split_of.update({g: next(s for s, (_, hi) in bounds.items() if x < hi) for g, x in u.items()})
    wanted = [s for s, fraction in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)) if fraction > 0]
    for stratum in sorted(set(strata.values())):
        members = sorted(g for g, label in strata.items() if label == stratum)
        if len(members) < 2:
            continue
        for split in wanted[:len(members)]:
            counts = Counter(split_of[g] for g in members)
            donors = [g for g in members if g in u and counts[split_of[g]] >= 2]
            if counts[split] or not donors:
                continue
            lo, hi = bounds[split]
            split_of[min(donors, key=lambda g: (max(lo - u[g], u[g] - hi, 0.0), g))] = split
    return split_of


def _assign_splits(videos: pd.DataFrame, group_of: pd.Series, previous: pd.DataFrame | None, *, seed: int,
                   val_fraction: float, test_fraction: float) -> tuple[dict[str, str], list[str]]:
    notes = []
    table = videos.assign(group_name=group_of.to_numpy())
    official = table[table.split != ""].groupby("group_name").split.agg(set).to_dict()
    pools = _hashed_pools(table, official, val_fraction, test_fraction, notes)
    hashed = {g for groups in pools.values() for g in groups}
    old = _previous_splits(previous, videos, group_of)
    fixed, forced = {}, {}
    for group in sorted(set(table.group_name)):
        binding = official.get(group) if group not in hashed else None
        if group in old:
            fixed[group] = _most_restrictive(old[group])
            if len(old[group]) > 1:
                forced.setdefault("merged", []).append(
                    f"group '{group}' merges previously separate splits {sorted(old[group])}: now {fixed[group]}")
            if binding and _most_restrictive(binding) != fixed[group]:
                forced.setdefault("kept", []).append(
                    f"group '{group}' keeps previous split {fixed[group]} over official {sorted(binding)}")
        elif binding:
            fixed[group] = _most_restrictive(binding)
            if len(binding) > 1:
                forced.setdefault("official", []).append(
                    f"group '{group}' has official splits {sorted(binding)}: using {fixed[group]}")
    # one note per kind (a dataset may force hundreds of groups alike), with its first case
    notes += [first + (f" (and {len(rest)} more groups)" if rest else "") for first, *rest in forced.values()]
    has_fake = (table.label == "fake").groupby(table.group_name).any()
    split_of = dict(fixed)
    for (val, test), groups in pools.items():
        pool = {g: "fake" if has_fake[g] else "real" for g in groups}
        split_of.update(_seeded_splits(pool, {g: fixed[g] for g in groups if g in fixed}, seed=seed,
                                       val_fraction=val, test_fraction=test))
    largest = table.group_name.value_counts()
    if val_fraction + test_fraction > 0 and largest.iloc[0] > max(1 - val_fraction - test_fraction, 0.5) * len(table):
        notes.append(f"group '{largest.index[0]}' holds {largest.iloc[0]} of {len(table)} videos: the splits cannot "
                     "follow pairs.val_fraction/test_fraction (its identities or sources connect most videos)")
    return split_of, notes


def _hashed_pools(table: pd.DataFrame, official: dict[str, set[str]], val_fraction: float, test_fraction: float,
                  notes: list[str]) -> dict[tuple[float, float], list[str]]:
    """(val, test fractions) -> the groups hashed with them. Groups without an official split get both. An official
    'train' binds only where the dataset names its own val (or test) split: DFDC's metadata calls every video
    train, Celeb-DF every video outside its test list, and without carving val out of those there is none."""
    pools: dict[tuple[float, float], list[str]] = {}
    named = table[table.split != ""].groupby("dataset").split.agg(set).to_dict()
    datasets = table.groupby("group_name").dataset.agg(set).to_dict()
    carved: set[str] = set()
    for group in sorted(datasets):
        splits = official.get(group)
        if splits is None:
            pools.setdefault((val_fraction, test_fraction), []).append(group)
            continue
        if splits != {"train"}:
            continue
        present = set().union(*(named.get(d, set()) for d in datasets[group]))
        val = 0.0 if "val" in present else val_fraction
        test = 0.0 if "test" in present else test_fraction
        if val or test:
            pools.setdefault((val, test), []).append(group)
            carved |= datasets[group]
    for dataset in sorted(carved):
        missing = [s for s in ("val", "test") if s not in named.get(dataset, set())]
        notes.append(f"{dataset}: no official {' or '.join(missing)} split: carved from its official train split "
                     "by pairs.seed and the fractions")
    return pools


def build_training_pairs(videos: pd.DataFrame, faces: pd.DataFrame, previous: pd.DataFrame | None, *, seed: int,
                         val_fraction: float, test_fraction: float, **_) -> pd.DataFrame:
    """Rows of manifests/training_pairs.csv: each fake with its source real, plus each real without a fake.

    ``previous`` is the last manifest (or None): its groups keep their splits. Notes about forced choices
    (conflicting official or previous splits) are in ``result.attrs["notes"]``.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise InputError(f"pairs config: val_fraction={val_fraction} and test_fraction={test_fraction} "
                         "must be >= 0 and sum to less than 1")
    videos = _text(videos, _VIDEO_COLUMNS, VIDEOS)
    _check_videos(videos)
    group_of = _components(videos)
    split_of, notes = _assign_splits(videos, group_of, previous, seed=seed, val_fraction=val_fraction,
                                     test_fraction=test_fraction)
    digests = crop_digests(faces)

    reals = set(videos.video_id[videos.label == "real"])
    fakes = videos[videos.label == "fake"]
    fake_rows = pd.DataFrame({"fake_id": fakes.video_id, "dataset": fakes.dataset, "method": fakes.method,
                              "real_id": fakes.source_id.where(fakes.source_id.isin(reals), "")})
    lonely = videos[(videos.label == "real") & ~videos.video_id.isin(fake_rows.real_id)]
    real_rows = pd.DataFrame({"fake_id": "", "real_id": lonely.video_id, "dataset": lonely.dataset,
                              "method": lonely.method})
    pairs = pd.concat([fake_rows, real_rows], ignore_index=True)
    anchor = pairs.fake_id.where(pairs.fake_id != "", pairs.real_id)
    pairs["group"] = group_of.loc[anchor].to_numpy()
    pairs["split"] = pairs.group.map(split_of)
    pairs["fake_digest"] = [digests.get(v, "") for v in pairs.fake_id]
    pairs["real_digest"] = [digests.get(v, "") for v in pairs.real_id]
    pairs = pairs[COLUMNS].astype(str).sort_values(SORT_KEYS).reset_index(drop=True)
    pairs.attrs["notes"] = notes
    return pairs


def pairs_digest(pairs: pd.DataFrame) -> str:
    """sha256 of the canonical CSV (fixed columns, sorted rows, '\\n' line ends), whatever order it was read in."""
    table = _text(pairs, COLUMNS, PAIRS).sort_values(SORT_KEYS)
    return hashlib.sha256(table.to_csv(index=False, lineterminator="\n").encode()).hexdigest()


def split_videos(pairs: pd.DataFrame) -> dict[str, set[str]]:
    """split -> every video id (fake or real) in it; all three splits present, possibly empty."""
    table = _text(pairs, ["fake_id", "real_id", "split"], PAIRS)
    ids = pd.concat([table[["fake_id", "split"]].set_axis(["id", "split"], axis=1),
                     table[["real_id", "split"]].set_axis(["id", "split"], axis=1)])
    ids = ids[ids.id != ""]
    return {split: set(ids.id[ids.split == split]) for split in SPLITS}
