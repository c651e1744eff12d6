"""What `dfpipe align` owes and what it records: the faces manifest's spec, one unit per extracted video (fakes
paired with their source), and which videos are behind. Apart from align itself, so that `status`, `verify` and
the checks before training read the workspace without importing torch and the detector (~7 s)."""
from __future__ import annotations

import hashlib

from ..manifests.table import read_table
from ..manifests.units import StageSpec, Unit, complete, fingerprint, load_params, load_state
from ..manifests.workspace import Workspace
from . import extract

FACE_COLUMNS = ["video_id", "frame_index", "timestamp", "status", "track_id", "x1", "y1", "x2", "y2", "prob",
                "landmarks", "scale", "mode", "hq_path", "lq_path", "hq_sha256", "lq_sha256"]

SPEC = StageSpec(
    name="align", version=4, area="faces", rows_table="faces.csv", row_columns=FACE_COLUMNS,
    file_columns=[("hq_path", "hq_sha256"), ("lq_path", "lq_sha256")],
    info_columns=["mode", "frames", "frames_with_face", "tracks"],
    rows_info="frames", rows_key="frame_index",  # every sampled frame has its rows: faces, or one no_face
)

# settings that cannot change a crop (where it runs, how many frames go to the detector at once)
NOT_IN_FINGERPRINT = ("device", "batch_size")


def params_of(cfg) -> dict:
    return {k: v for k, v in cfg.align.items() if k not in NOT_IN_FINGERPRINT}


def _frames_digest(rows: list[dict]) -> str:
    return hashlib.sha256("".join(f"{r['frame_index']}:{r['sha256']};" for r in rows).encode()).hexdigest()


def plan_units(ws: Workspace, pair_aware: bool, merge: bool = True) -> list[Unit]:
    """One unit per extracted video. A fake whose source was extracted with the same frame size and the same
    sampled frames is cropped with its source's tracks (payload 'source'), so its digest covers both; for any
    other fake with a source, payload 'unpaired' says why it is not."""
    videos = {v["video_id"]: v for v in read_table(ws.manifest("videos.csv"), extract.VIDEO_COLUMNS)
              .to_dict("records")}
    done = {vid: rec for vid, rec in load_state(ws, extract.SPEC, merge=merge).items()
            if rec.status == "done" and complete(extract.SPEC, rec)}
    units = []
    for vid, rec in sorted(done.items()):
        rows = sorted(rec.rows, key=lambda r: int(r["frame_index"]))
        digest, source, unpaired = _frames_digest(rows), None, ""
        src = videos.get(vid, {}).get("source_id", "")
        if pair_aware and videos.get(vid, {}).get("label") == "fake" and src:
            if src not in videos:
                unpaired = "source video not in the workspace"
            elif src not in done:
                unpaired = "source not extracted"
            elif any(videos[vid][k] != videos[src][k] for k in ("width", "height")):
                unpaired = "frame size differs from the source's"
            else:
                src_rows = sorted(done[src].rows, key=lambda r: int(r["frame_index"]))
                if [r["frame_index"] for r in rows] == [r["frame_index"] for r in src_rows]:
                    source, digest = src, digest + _frames_digest(src_rows)
                else:
                    unpaired = "sampled frames differ from the source's"
        payload = {"frames": [(int(r["frame_index"]), float(r["timestamp"]), r["path"]) for r in rows],
                   "source": source, "source_id": src, "unpaired": unpaired}
        units.append(Unit(vid, digest, payload, shard_key=source or vid))
    return units

def status_units(ws: Workspace) -> list[Unit]:
    """Reads only (no journal merge), so that `status` works on a workspace it may not write to."""
    params = load_params(ws, SPEC) or {}
    return plan_units(ws, params.get("pair_aware", True), merge=False)


def behind(ws: Workspace) -> list[str]:
    """Extracted videos whose crops are missing, incomplete in faces.csv, or were cut from older frames or with
    other settings (failures aside: they are results). Training on them would use crops of a video that has changed
    since, or only some of them."""
    params = load_params(ws, SPEC)
    records = load_state(ws, SPEC, merge=False)
    return [u.id for u in status_units(ws) if (rec := records.get(u.id)) is None
            or (rec.status != "failed" and (params is None or rec.fingerprint != fingerprint(SPEC, params, u)
                                            or not complete(SPEC, rec)))]
