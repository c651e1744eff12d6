"""`dfpipe extract`: list the videos of a dataset, then decode each one and keep every stride-th frame as JPEG."""
from __future__ import annotations

import os
from pathlib import Path

from ..manifests.progress import bar
from ..manifests.table import read_table, write_table
from ..manifests.units import (StageSpec, Unit, UnitError, UnitOutput, load_state, run_stage, sha256_file,
                               writer_lock)
from ..manifests.workspace import Shard, Workspace, WorkspaceError
from .discover import Discovery, discover
from .video import FrameReader, VideoError, jpeg_bytes, probe

VIDEO_COLUMNS = ["video_id", "path", "label", "source_id", "group", "split", "dataset", "method",
                 "size", "mtime_ns", "sha256", "frames", "fps", "width", "height", "codec"]
PROBE_KEYS = ["frames", "fps", "width", "height", "codec"]

SPEC = StageSpec(
    name="extract", version=1, area="frames", rows_table="frames.csv",
    row_columns=["video_id", "frame_index", "timestamp", "path", "sha256"],
    file_columns=[("path", "sha256")],
    info_columns=["decoder", "frames_written", "frames_expected"], rows_info="frames_written",
)

def params_of(cfg) -> dict:
    return {k: cfg.extract[k] for k in ("stride", "max_frames", "jpeg_quality", "decoder")}


def build_videos_table(ws: Workspace, found: Discovery, progress: bool = True) -> list[dict]:
    """Describe each discovered video; sha256 and probe are reused while size and mtime match."""
    old = {r["path"]: r for r in read_table(ws.manifest("videos.csv"), VIDEO_COLUMNS).to_dict("records")}
    rows = []
    for row in bar(found.rows, desc="hashing", unit="video", enabled=progress, leave=False):
        row = {k: row.get(k, "") for k in VIDEO_COLUMNS}
        try:
            st = os.stat(row["path"])
        except OSError:
            rows.append(row)  # vanished or unreadable: extract records why
            continue
        row["size"], row["mtime_ns"] = str(st.st_size), str(st.st_mtime_ns)
        prev = old.get(row["path"])
        if prev and prev["size"] == row["size"] and prev["mtime_ns"] == row["mtime_ns"] and prev["sha256"]:
            row.update({k: prev[k] for k in ["sha256", *PROBE_KEYS]})
        else:
            try:
                row["sha256"] = sha256_file(Path(row["path"]))
                info = probe(row["path"])
                row.update({"frames": info["frames"], "fps": round(info["fps"], 3), "width": info["width"],
                            "height": info["height"], "codec": info["codec"]})
            except (OSError, VideoError):
                pass
        rows.append(row)
    write_table(ws.manifest("videos.csv"), rows, VIDEO_COLUMNS)
    return rows


def units_of(videos: list[dict]) -> list[Unit]:
    return [Unit(v["video_id"], v["sha256"], v["path"]) for v in videos]


def extract_video(unit: Unit, out_dir: Path, *, stride: int, max_frames: int | None, jpeg_quality: int,
                  decoder: str) -> UnitOutput:
    reader = FrameReader(unit.payload, stride=stride, max_frames=max_frames, decoder=decoder)
    rows = []
    for frame in reader:
        name = f"{frame.index:06d}.jpg"
        try:
            (out_dir / name).write_bytes(jpeg_bytes(frame.image, jpeg_quality))
        except ValueError as e:
            raise UnitError(f"{unit.payload}: {e} at frame {frame.index}") from None
        rows.append({"frame_index": frame.index, "timestamp": f"{frame.timestamp:.6f}", "path": name})
    if not rows:
        raise UnitError(f"{unit.payload}: no frame could be decoded")
    reader.check_complete()
    return UnitOutput(rows, {"decoder": "+".join(reader.decoders_used), "frames_written": len(rows),
                             "frames_expected": int(reader.expected_frames or 0)})


def run_extract(ws: Workspace, input_path: str | Path, cfg, *, dataset: str = "auto", shard: Shard = Shard(),
                retry_failed: bool = False, prune: bool = False, progress: bool = True):
    """Videos that are no longer in INPUT lose their frames and crops, so that needs `prune`: a narrower or
    mistyped INPUT (a subfolder of the dataset) must not delete finished work."""
    found = discover(input_path, dataset)  # first: a bad input must not leave an empty workspace behind
    gone = sorted(vid for vid, rec in load_state(ws, SPEC, merge=False).items() if rec.status == "done"
                  and vid not in {row["video_id"] for row in found.rows})
    if gone and not prune:
        raise WorkspaceError(f"{ws.root}: {len(gone)} video(s) extracted earlier are not in {input_path} (e.g. "
                             f"{gone[0]}); give the earlier INPUT, or pass --prune to delete their frames and crops")
    ws.init()
    with writer_lock(ws, SPEC, shard):
        pass  # refused now, before hashing every video, rather than by run_stage after it
    videos = build_videos_table(ws, found, progress)
    params = params_of(cfg)
    summary = run_stage(ws, SPEC, params, units_of(videos),
                        lambda unit, out: extract_video(unit, out, **params),
                        shard=shard, workers=cfg.extract.workers, timeout=cfg.extract.timeout,
                        retry_failed=retry_failed, progress=progress)
    return found, summary


def status_units(ws: Workspace) -> list[Unit]:
    """As the next extract would see them: a video that is gone or changed size is stale; one only touched (a new
    modification time) is hashed again, as extract would, and stale only if its bytes changed."""
    rows = read_table(ws.manifest("videos.csv"), VIDEO_COLUMNS).to_dict("records")
    for row in (r for r in rows if r["size"]):  # no size: unreadable when discovered, judged by its record
        try:
            st = os.stat(row["path"])
            if str(st.st_size) != row["size"]:
                row["sha256"] = ""
            elif str(st.st_mtime_ns) != row["mtime_ns"]:
                row["sha256"] = sha256_file(Path(row["path"]))
        except OSError:
            row["sha256"] = ""
    return units_of(rows)
