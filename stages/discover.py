"""List the videos of a dataset as uniform rows, whatever layout the dataset ships in.

Every later stage (extraction folders, pair-aware alignment, leak-free splits) needs the same four facts per
video: a stable id that is safe as a folder name, its label, the real video a fake was made from, and an
identity group. Each public dataset encodes them differently (folder names, file-name conventions, a
metadata.json, a CSV), so one adapter per layout turns its conventions into these rows and everything else
(group union, id safety, sorting, notes) is shared.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import pandas as pd

from ..manifests.errors import InputError
from ..manifests.workspace import safe_name
from .components import smallest_in_component
from .labels import ALIASES, NOT_A_LABEL

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
SPLITS = ("train", "val", "test")
ROW_KEYS = ("video_id", "path", "label", "source_id", "group", "split", "dataset", "method")

FFPP_COMPRESSIONS = frozenset({"raw", "c23", "c40"})
FFPP_PAIR = re.compile(r"(\d+)_(\d+)")                     # 183_253: frames of 183, face of 253
FFPP_DFD_FAKE = re.compile(r"(\d+)_(\d+)__(.+)__([^_]+)")  # 01_02__meeting_serious__YVGY8LOK
FFPP_ACTOR = re.compile(r"(\d+)__.+")                      # 01__meeting_serious
CELEB_REAL = re.compile(r"(id\d+)_(\d+)")                  # id0_0000
CELEB_FAKE = re.compile(r"(id\d+)_(id\d+)_(\d+)")          # id0_id1_0000: frames of id0_0000, face of id1
CELEB_TEST_LIST = "List_of_testing_videos.txt"
LABEL_PREFIX = re.compile(r"^(real|fake)[\s_\-.]*", re.IGNORECASE)
SWAP_DONORS = ("is grouped with the {} whose video it was made from; a face donor's own videos may sit in another "
               "split (the swaps connect nearly every identity)")
CELEB_GROUPS_NOTE = {False: "Celeb-DF: each fake " + SWAP_DONORS.format("identity"),
                     True: "Celeb-DF: splits follow the official test list video by video (a fake with its source "
                           "video); identities are shared between train and test, as in the official protocol"}


class DiscoveryError(InputError):
    pass


@dataclass
class Discovery:
    layout: str
    rows: list[dict]
    notes: list[str] = field(default_factory=list)


def discover(input_path: str | Path, dataset: str = "auto") -> Discovery:
    """Rows (sorted by video_id) for every video of INPUT, read with the adapter of `dataset` or the detected one."""
    root = Path(os.path.abspath(input_path))
    if not root.exists():
        raise DiscoveryError(f"{root}: input does not exist")
    layout = _detect_layout(root) if dataset == "auto" else dataset
    if layout not in ADAPTERS:
        raise DiscoveryError(f"{root}: unknown dataset '{dataset}' (expected auto, {', '.join(ADAPTERS)})")
    if (layout == "csv") != root.is_file():
        raise DiscoveryError(f"{root}: dataset '{layout}' needs {'a .csv file' if layout == 'csv' else 'a folder'}")
    drafts, notes = ADAPTERS[layout](root)
    return _finish(root, layout, drafts, notes)


def _detect_layout(root: Path) -> str:
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise DiscoveryError(f"{root}: input is a file but not a .csv list of videos")
    if (root / "original_sequences").is_dir() or (root / "manipulated_sequences").is_dir():
        return "ffpp"
    if _metadata_files(root):
        return "dfdc"
    if (root / "Celeb-real").is_dir() or (root / "Celeb-synthesis").is_dir():
        return "celebdf"
    if _label_folders(root):
        return "folders"
    raise DiscoveryError(f"{root}: unknown layout (no original_sequences, metadata.json, Celeb-real or real/fake "
                         "folders); pass --dataset")


def _draft(video_id: str, path: Path, label: str, identities: list[str], *, source_id: str = "",
           split: str = "", method: str = "") -> dict:
    """A row before grouping: `identities` are the people in the video; rows sharing one end in one group."""
    return {"video_id": video_id, "path": str(path), "label": label, "source_id": source_id, "split": split,
            "method": method, "identities": identities}


def _finish(root: Path, layout: str, drafts: list[dict], notes: list[str]) -> Discovery:
    if not drafts:
        raise DiscoveryError(f"{root}: no videos found ({layout} layout)")
    # One output folder per video: the same id twice, or ids that safe_name maps alike ('a/b' and 'a__b'), would
    # overwrite each other's frames and crops.
    folders: dict[str, list[dict]] = {}
    for d in drafts:
        folders.setdefault(safe_name(d["video_id"]), []).append(d)
    clash = next((ds for ds in folders.values() if len(ds) > 1), None)
    if clash is not None:
        ids, paths = sorted({d["video_id"] for d in clash}), " and ".join(d["path"] for d in clash)
        if len(ids) == 1:
            raise DiscoveryError(f"{root}: video_id '{ids[0]}' is shared by {paths}")
        raise DiscoveryError(f"{root}: video_ids {' and '.join(map(repr, ids))} would share the output folder "
                             f"'{safe_name(ids[0])}' ({paths}); rename one of the files")
    for d in drafts:
        _check_id(d["video_id"], d["path"])
    groups = _union_groups([d.pop("identities") for d in drafts])
    rows = sorted(({**d, "group": f"{layout}:{g}", "dataset": layout} for d, g in zip(drafts, groups)),
                  key=lambda r: r["video_id"])
    rows = [{k: r[k] for k in ROW_KEYS} for r in rows]
    ids = {r["video_id"] for r in rows}
    fakes = [r for r in rows if r["label"] == "fake"]
    absent = [r["source_id"] for r in fakes if r["source_id"] and r["source_id"] not in ids]
    unknown = [r["video_id"] for r in fakes if not r["source_id"]]
    if absent:
        notes.append(f"{len(absent)} fake video(s) have a source that is not on disk (e.g. {absent[0]})")
    if unknown:
        notes.append(f"{len(unknown)} fake video(s) have no known source (e.g. {unknown[0]})")
    return Discovery(layout, rows, notes)


def _check_id(video_id: str, path: str) -> None:
    """Ids name output folders: an absolute id or a '..' component would write outside the workspace."""
    if any(part in ("", ".", "..") for part in video_id.split("/")):
        raise DiscoveryError(f"{path}: unsafe video_id '{video_id}' (empty, absolute or '.'/'..' component)")
    if any(ord(c) < 32 for c in video_id):  # a line break would split every one-line message and CSV row about it
        raise DiscoveryError(f"{path!r}: the name holds a line break or another control character; rename it")


def _union_groups(identities: list[list[str]]) -> list[str]:
    """Each video's group: the smallest identity of its component (videos sharing an identity are linked)."""
    smallest = smallest_in_component(identities)
    return [smallest[ids[0]] for ids in identities]


def video_files(candidates: Iterable[Path], base: Path) -> list[Path]:
    """Video files among `candidates`, skipping hidden entries below `base` (macOS '._x.mp4' forks are not videos).

    A broken symlink is kept: it is a video the user meant to include, and extract records it as failed."""
    return sorted(p for p in candidates
                  if p.suffix.lower() in VIDEO_EXTENSIONS and (p.is_file() or p.is_symlink())
                  and not any(part.startswith(".") for part in p.relative_to(base).parts))


def _id_of(path: Path | PurePosixPath, base: Path | PurePosixPath) -> str:
    return PurePosixPath(path.relative_to(base)).with_suffix("").as_posix()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DiscoveryError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DiscoveryError(f"{path}: not UTF-8 text") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DiscoveryError(f"{path}: not valid JSON ({e})") from None


# --- FaceForensics++ ---------------------------------------------------------------------------------------

def _ffpp(root: Path) -> tuple[list[dict], list[str]]:
    reals = _ffpp_videos(root / "original_sequences")
    fakes = _ffpp_videos(root / "manipulated_sequences")
    with_c = len({c for _, c, _ in reals + fakes}) > 1  # ids carry the compression only when it tells videos apart
    split_of = _ffpp_splits(root)

    def vid(top: str, c: str, stem: str) -> str:
        return "/".join([top, c, stem] if with_c and c else [top, stem])

    drafts = []
    for kind, c, path in reals:
        actor = FFPP_ACTOR.fullmatch(path.stem)
        identity = path.stem if kind == "youtube" else f"actor{actor[1]}" if actor else f"{kind}/{path.stem}"
        split = split_of.get(path.stem, "") if kind == "youtube" else ""
        drafts.append(_draft(vid(kind, c, path.stem), path, "real", [identity], split=split))
    unparsed = dfd_fakes = 0
    for method, c, path in fakes:
        pair, dfd = FFPP_PAIR.fullmatch(path.stem), FFPP_DFD_FAKE.fullmatch(path.stem)
        if pair:
            target, face = pair.groups()
            source, identities = vid("youtube", c, target), [target, face]
            split = split_of.get(target) or split_of.get(face, "")
        elif dfd:  # grouped with the actor whose video it was made from, as Celeb-DF's fakes (see _celebdf)
            target, face, scene, _ = dfd.groups()
            source, identities, split = vid("actors", c, f"{target}__{scene}"), [f"actor{target}"], ""
            dfd_fakes += 1
        else:
            unparsed += 1
            source, identities, split = "", [f"{method}/{path.stem}"], ""
        drafts.append(_draft(vid(method, c, path.stem), path, "fake", identities, source_id=source, split=split,
                             method=method))
    notes = [f"{unparsed} FF++ fake(s) named neither TARGET_FACE nor DeepFakeDetection-style"] if unparsed else []
    if dfd_fakes:
        notes.append("DeepFakeDetection: each fake " + SWAP_DONORS.format("actor"))
    return drafts, notes


def _ffpp_videos(top: Path) -> list[tuple[str, str, Path]]:
    """(kind or method, compression, path) under `top`/<kind>/, skipping the manipulation masks (not videos)."""
    found = []
    for kind in sorted(d for d in top.iterdir() if d.is_dir()) if top.is_dir() else []:
        for path in video_files(kind.rglob("*"), kind):
            parts = path.relative_to(kind).parts[:-1]
            if "masks" not in parts:
                found.append((kind.name, next((p for p in parts if p in FFPP_COMPRESSIONS), ""), path))
    return found


def _ffpp_splits(root: Path) -> dict[str, str]:
    """Video number -> official split; both numbers of a pair share it, so their fakes cannot leak across splits."""
    split_of: dict[str, str] = {}
    for name in SPLITS:
        for path in (root / f"{name}.json", root / "splits" / f"{name}.json"):
            if not path.is_file():
                continue
            pairs = _read_json(path)
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise DiscoveryError(f"{path}: expected a list of [target, source] pairs")
            for number in (str(n) for pair in pairs for n in pair):
                if split_of.setdefault(number, name) != name:
                    raise DiscoveryError(f"{path}: video {number} is also in the {split_of[number]} split")
    return split_of


# --- DFDC --------------------------------------------------------------------------------------------------

def _metadata_files(root: Path) -> list[Path]:
    return sorted(p for pattern in ("metadata.json", "*/metadata.json", "*/*/metadata.json")
                  for p in root.glob(pattern) if p.is_file())


def _dfdc(root: Path) -> tuple[list[dict], list[str]]:
    listed, notes = [], []
    for meta in _metadata_files(root):
        entries = _read_json(meta)
        if not isinstance(entries, dict):
            raise DiscoveryError(f"{meta}: expected an object mapping file names to entries")
        on_disk = {p.name: p for p in video_files(meta.parent.iterdir(), meta.parent)}
        unlisted, absent = sorted(set(on_disk) - set(entries)), set(entries) - set(on_disk)
        if unlisted:
            notes.append(f"{meta}: {len(unlisted)} video(s) not in metadata.json skipped (e.g. {unlisted[0]})")
        if absent:
            notes.append(f"{meta}: {len(absent)} listed video(s) are not on disk")
        listed += [(meta, name, on_disk[name], entries[name]) for name in sorted(set(on_disk) & set(entries))]
    id_of_stem = {path.stem: _id_of(path, root) for _, _, path, _ in listed}
    drafts = []
    for meta, name, path, entry in listed:
        label = str(entry.get("label", "")).lower() if isinstance(entry, dict) else ""
        if label not in ("real", "fake"):
            raise DiscoveryError(f"{meta}: entry '{name}' has no REAL/FAKE label")
        video_id = _id_of(path, root)
        original = Path(str(entry.get("original") or "")).stem if label == "fake" else ""
        # an original that is not on disk is assumed to sit next to its fake, as in DFDC's parts
        source = id_of_stem.get(original, (PurePosixPath(video_id).parent / original).as_posix()) if original else ""
        split = entry.get("split") if entry.get("split") in SPLITS else ""
        drafts.append(_draft(video_id, path, label, [original or path.stem], source_id=source,
                             split=split, method="dfdc" if label == "fake" else ""))
    return drafts, notes


# --- Celeb-DF ----------------------------------------------------------------------------------------------

def _celebdf(root: Path) -> tuple[list[dict], list[str]]:
    """Celeb-DF's face swaps connect nearly every identity (id0's video with id1's face, id1's with id2's, ...), so
    grouping a fake with both identities would put the whole dataset in one group and leave val with one class.
    A fake is grouped with the identity whose video it was made from. With the official test list, groups are
    single videos (a real and the fakes made from it, through their source): the official protocol shares
    identities between train and test, and grouping by identity would pull whole identities into test."""
    tests = _celeb_tests(root)
    drafts = []
    for folder, label in (("Celeb-real", "real"), ("Celeb-synthesis", "fake"), ("YouTube-real", "real")):
        top = root / folder
        for path in video_files(top.rglob("*"), top) if top.is_dir() else []:
            video_id = _id_of(path, root)
            real, fake = CELEB_REAL.fullmatch(path.stem), CELEB_FAKE.fullmatch(path.stem)
            source = f"Celeb-real/{fake[1]}_{fake[3]}" if label == "fake" and fake else ""
            identity = fake[1] if source else real[1] if folder == "Celeb-real" and real else video_id
            split = "" if tests is None else "test" if video_id in tests else "train"
            drafts.append(_draft(video_id, path, label, [video_id if tests is not None else identity],
                                 source_id=source, split=split, method=folder if label == "fake" else ""))
    swaps = any(d["source_id"] for d in drafts)
    return drafts, [CELEB_GROUPS_NOTE[tests is not None]] if swaps else []


def _celeb_tests(root: Path) -> set[str] | None:
    """Ids of the official test videos (lines like '1 YouTube-real/00170.mp4'), or None without the list."""
    path = root / CELEB_TEST_LIST
    if not path.is_file():
        return None
    tests = set()
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        fields = line.split(maxsplit=1)
        if len(fields) == 1:
            raise DiscoveryError(f"{path}: line {number} is not 'LABEL PATH'")
        if fields:
            tests.add(PurePosixPath(fields[1].strip()).with_suffix("").as_posix())
    return tests


# --- real/ + fake/ folders ---------------------------------------------------------------------------------

def _label_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.lower() in ("real", "fake"))


def _pair_key(stem: str) -> str:
    """'RealBateman', 'fake_003' -> 'bateman', '003': what a real and its fake have in common."""
    return LABEL_PREFIX.sub("", stem).lower() or stem.lower()


def _folders(root: Path) -> tuple[list[dict], list[str]]:
    videos = [(d.name.lower(), p) for d in _label_folders(root) for p in video_files(d.rglob("*"), d)]
    reals: dict[str, list[Path]] = {}
    for label, path in videos:
        if label == "real":
            reals.setdefault(_pair_key(path.stem), []).append(path)
    drafts, ambiguous = [], 0
    for label, path in videos:
        key = _pair_key(path.stem)
        source = ""
        if label == "fake":
            candidates = reals.get(key, [])
            ambiguous += len(candidates) > 1
            source = _id_of(candidates[0], root) if len(candidates) == 1 else ""
        drafts.append(_draft(_id_of(path, root), path, label, [key], source_id=source))
    notes = [f"{ambiguous} fake(s) match several reals by name; their source is left unknown"] if ambiguous else []
    return drafts, notes


# --- explicit CSV ------------------------------------------------------------------------------------------

def _csv(path: Path) -> tuple[list[dict], list[str]]:
    """A listed file that is not on disk stays in (as a broken symlink does): extract fails it with the reason,
    as score-video does, rather than a note that is easy to miss."""
    table = _read_table(path)
    base = path.parent
    files = [Path(os.path.abspath(base / p)) for p in table["path"]]
    first_row: dict[Path, int] = {}
    for i, f in enumerate(files):
        if first_row.setdefault(f, i) != i:
            raise DiscoveryError(f"{path}: row {i + 1}: {table.loc[i, 'path']!r} is the file of row {first_row[f] + 1}")
    ids = [_csv_id(f, base) for f in files]
    id_by_key = {**{i: i for i in ids}, **{str(f): i for f, i in zip(files, ids)}}

    def source_id(text: str) -> str:
        if not text:
            return ""
        if text in id_by_key:
            return id_by_key[text]
        target = Path(os.path.abspath(base / text))
        return id_by_key.get(str(target)) or _csv_id(target, base)

    labels = [ALIASES[v.lower()] for v in table["label"]]
    sources = [source_id(s) if lab == "fake" else "" for s, lab in zip(table["source"], labels)]
    explicit = dict(zip(ids, table["group"]))
    source_of = dict(zip(ids, sources))
    drafts = [_draft(i, f, lab, [_csv_group(i, source_of, explicit)], source_id=s, split=sp)
              for i, f, lab, s, sp in zip(ids, files, labels, sources, table["split"])]
    return drafts, []


def read_user_csv(path: Path, required: tuple[str, ...], header: str) -> pd.DataFrame:
    """A CSV a user wrote (video lists, labels): cells as strings, lower-case column names, required columns."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DiscoveryError(f"{path}: cannot read as CSV ({str(e).splitlines()[0]})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DiscoveryError(f"{path}: missing column(s) {', '.join(missing)} (header must be {header})")
    return table


def _read_table(path: Path) -> pd.DataFrame:
    """The CSV with every optional column present and every cell a stripped string; rejects bad cells by line."""
    table = read_user_csv(path, ("path", "label"), "path,label[,source,split,group]")
    if table.empty:
        raise DiscoveryError(f"{path}: no videos listed (a header and no rows)")
    table = table.reindex(columns=["path", "label", "source", "split", "group"], fill_value="")
    table = table.apply(lambda col: col.str.strip())
    checks = (("path", table["path"] == "", "empty path"),
              ("label", ~table["label"].str.lower().isin(list(ALIASES)), NOT_A_LABEL),
              ("split", ~table["split"].isin(["", *SPLITS]), "split {} is not train, val, test or empty"))
    for column, bad, reason in checks:
        if bad.any():
            i = int(bad.to_numpy().argmax())
            raise DiscoveryError(f"{path}: row {i + 1}: {reason.format(repr(table.loc[i, column]))}")
    return table


def _csv_id(file: Path, base: Path) -> str:
    """The file's path without extension, relative to the CSV's folder, or for a file outside it to the deepest
    folder holding both ('videos/x.mp4' -> 'videos/x'; '../../data/ff/x.mp4' -> 'data/ff/x'). An id depends only
    on its file and the list's folder, so ids stay put as rows are added, where the rows' common folder would move
    (renaming every video, its finished work orphaned) whenever a row outside it came in. Two files that come out
    alike are refused by `_finish`, naming both."""
    rel = PurePosixPath(file.relative_to(os.path.commonpath([file, base])))
    return rel.with_suffix("").as_posix()


def _csv_group(video_id: str, source_of: dict[str, str], explicit: dict[str, str]) -> str:
    """The row's own group, else that of the first ancestor (along sources) that names one, else the root source
    (the smallest id of a source cycle, so every member of the cycle agrees)."""
    seen = []
    while video_id and video_id not in seen:
        if explicit.get(video_id):
            return explicit[video_id]
        seen.append(video_id)
        video_id = source_of.get(video_id, "")
    return min(seen[seen.index(video_id):]) if video_id else seen[-1]


ADAPTERS: dict[str, Callable[[Path], tuple[list[dict], list[str]]]] = {
    "ffpp": _ffpp, "dfdc": _dfdc, "celebdf": _celebdf, "folders": _folders, "csv": _csv}
