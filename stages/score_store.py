"""`dfpipe score-video`'s output store and run: which videos are already scored, the resumable record, the CSV,
metrics and plots. The scoring itself is `Detector` (stages/detector.py).

Output: one JSON line per video, appended and fsynced as soon as the video is finished, is the resumable record; the
CSV is rewritten atomically from it at the end, sorted by path. A rerun with the same checkpoint file and scoring
settings skips every video already recorded (errors are retried); a change of only the aggregation rule, threshold,
fallback or suspicious-frame count re-decides from the recorded clip scores; any other setting rescores. Under
``--shard I/N`` each shard owns the videos whose path hashes to it and writes ``<out>.shard-I-of-N.csv/.jsonl``; a
later run without ``--shard`` reads every shard's JSON lines as finished work, so it only merges them (and writes
the metrics).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..manifests.errors import EXIT_FAILED_UNITS, EXIT_OK
from ..manifests.jsonl import Appender, json_lines
from ..manifests.progress import bar as progress_bar
from ..manifests.progress import note, warn
from ..manifests.table import atomic_write_bytes, check_writable, write_table
from ..manifests.workspace import LockHeld, Shard, Workspace, lock_file
from .detector import Detector
from .ensemble import load_models, models_digest
from .evaluate import binary_metrics, write_plots
from .labels import TARGET
from .score import STATUSES, UNREADABLE, Scoring, ScoreError, TrainedSplits, list_inputs

CSV_COLUMNS = ["path", "score", "label", "threshold", "status", "reason", "frames_sampled", "frames_with_face",
               "tracks", "clips", "track_scores", "suspicious_frames", "seconds", "model_digest", "true_label",
               "score_std", "model_scores"]
# headers before score_std and model_scores: such an output is still ours to rewrite
EARLIER_COLUMNS = (CSV_COLUMNS[:-2], CSV_COLUMNS[:-1])


def output_paths(out: str | Path, shard: Shard) -> tuple[Path, Path]:
    """(csv, jsonl) of this run: `scores.csv` + `scores.jsonl`, or `scores.shard-0-of-2.csv` + `.jsonl`."""
    out = Path(out)
    if out.suffix.lower() != ".csv":  # the record is the same name with .jsonl: --out x.jsonl would overwrite it
        raise ScoreError(f"--out {out}: expected a .csv path (the per-video record goes beside it as .jsonl)")
    if shard.count > 1:
        out = out.with_name(f"{out.stem}.shard-{shard.name}{out.suffix}")
    return out, out.with_suffix(".jsonl")


@contextmanager
def output_lock(csv_path: Path, jsonl: Path) -> Iterator[None]:
    try:
        with lock_file(jsonl.with_name(f".{jsonl.name}.lock")):
            yield
    except LockHeld as e:
        raise ScoreError(f"{csv_path}: another score-video is writing this output ({e.holder}); wait for it to "
                         "finish, or choose another --out (--shard I/N splits one list between processes)") from None


def refuse_foreign(csv_path: Path, jsonl: Path) -> None:
    """--out naming the labels file, the input list or a workspace manifest would replace it with scores: a file
    already there must be one score-video wrote (its header; a first record, unless only a torn line)."""
    if csv_path.is_file():
        with open(csv_path, "rb") as f:
            header = f.readline().decode("utf-8", "replace").strip()
        if header not in {",".join(columns) for columns in (CSV_COLUMNS, *EARLIER_COLUMNS)}:
            raise ScoreError(f"{csv_path}: exists and is not a score-video output (its header differs); it would be "
                             "overwritten: choose another --out")
    if jsonl.is_file():
        with open(jsonl, "rb") as f:
            first = f.readline()
        try:
            record = json.loads(first.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if first.endswith(b"\n") and not (isinstance(record, dict) and "status" in record):
            raise ScoreError(f"{jsonl}: exists and is not a score-video record (the --out CSV's .jsonl); it would "
                             "be overwritten: choose another --out")


def read_records(path: Path) -> list[dict]:
    """Rows of one JSON-lines file. A torn last line (a crash mid-append: no newline yet) is dropped quietly; any
    other line that is not a record is dropped with a warning. Either way the rerun scores that video again."""
    rows, bad = [], []
    data = path.read_bytes()
    lines = data.splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("path"), str):
            rows.append(row)
        elif line.strip() and (number < len(lines) or data.endswith(b"\n")):
            bad.append(number)
    if bad:
        warn(f"score-video: {path}: line(s) {', '.join(map(str, bad[:5]))} are not score records; ignored "
             "(their videos are scored again when listed)")
    return rows


def file_key(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _reusable(row: dict, key: str, digest: str, model_digest: str) -> bool:
    return (row.get(key) == digest and row.get("model_digest") == model_digest
            and row.get("status") != "error" and row.get("file") == file_key(row["path"]))


def _why_rescored(row: dict, digest: str, model_digest: str) -> str:
    if (row.get("settings"), row.get("model_digest")) != (digest, model_digest):
        return "were scored with another checkpoint or other settings"
    if row.get("file") != file_key(row["path"]):
        return "changed on disk since they were scored"
    return "ended in an error last time"


def load_finished(jsonl: Path, paths: set[str], scoring: Scoring,
                  model_digest: str) -> tuple[dict[str, dict], Counter, int]:
    """Rows an earlier run (or a shard) finished with these settings, why the other videos of `paths` that have a
    row are scored again (reason -> videos), and how many were re-decided from their stored clip scores instead
    (see `decide`).

    Our own JSON lines are compacted (for `paths`: only reusable rows; stale settings, errors and a torn line go)
    and receive the reusable rows of the sibling files (the shards' and the unsharded run's), so after a merge run
    the plain `.jsonl` holds every video on its own. Rows of videos outside this call stay as they are: an earlier
    call into the same output scored them, and they are not this call's to judge.
    """
    base = jsonl.name.split(".shard-")[0].removesuffix(".jsonl")
    candidates = [*sorted(jsonl.parent.glob(f"{base}.shard-*-of-*.jsonl")), jsonl.with_name(f"{base}.jsonl")]
    siblings = [p for p in candidates if p != jsonl and p.is_file()]
    own = read_records(jsonl) if jsonl.is_file() else []
    other = [r for p in siblings for r in read_records(p) if r["path"] in paths]
    digest, clips_digest = scoring.digest(), scoring.clips_digest()
    done: dict[str, dict] = {}
    stale: dict[str, dict] = {}
    redecided = set()
    for row in other + own:
        if _reusable(row, "settings", digest, model_digest):
            done[row["path"]] = row
            redecided.discard(row["path"])  # a later row already holds this decision
        elif row["path"] in paths and _reusable(row, "clips_settings", clips_digest, model_digest):
            done[row["path"]] = {**scoring.decide(row), "settings": digest}
            redecided.add(row["path"])
        elif row["path"] in paths:
            stale[row["path"]] = row
    others = {r["path"]: r for r in own if r["path"] not in paths}
    data = json_lines(sorted({**others, **done}.values(), key=lambda r: r["path"]))
    if not jsonl.is_file() or jsonl.read_bytes() != data:  # written even when empty: a shard may own no video
        atomic_write_bytes(jsonl, data)
    why = Counter(_why_rescored(row, digest, model_digest) for path, row in stale.items() if path not in done)
    return done, why, len(redecided)


def _csv_row(row: dict, label: str | None) -> dict:
    return {**row, "track_scores": json.dumps(row["track_scores"], sort_keys=True),
            "suspicious_frames": json.dumps(row["suspicious_frames"]), "true_label": label or "",
            "model_scores": json.dumps(row["model_scores"]) if "model_scores" in row else ""}


def _finite(value):
    """json cannot write NaN; a metric undefined for a single class is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate(rows: list[dict], labels: dict[str, str], threshold: float) -> dict | None:
    """Video-level metrics at the threshold over the labelled videos with a score, plus the frame-level AUC: every
    sampled frame inside a scored clip gets its clip's probability (the highest, when two faces share the frame)
    and its video's label. None when no video is labelled."""
    labelled = [r for r in rows if labels.get(r["path"])]
    if not labelled:
        return None
    scored = [r for r in labelled if r["score"] is not None]
    y = [TARGET[labels[r["path"]]] for r in scored]
    frame_y, frame_p = [], []
    for r in scored:
        frame_prob: dict[int, float] = {}
        for _, prob, frames in r["clip_probs"]:
            for f in frames:
                frame_prob[f] = max(prob, frame_prob.get(f, 0.0))
        frame_y += [TARGET[labels[r["path"]]]] * len(frame_prob)
        frame_p += list(frame_prob.values())
    return {"threshold": threshold, "labelled": len(labelled), "unscored": len(labelled) - len(scored),
            "video": binary_metrics(y, [r["score"] for r in scored], threshold=threshold) if scored else None,
            "frame": {"auc": binary_metrics(frame_y, frame_p, threshold=threshold)["auc"] if frame_y else math.nan,
                      "n": len(frame_y)}}


def write_evaluation(rows: list[dict], labels: dict[str, str | None], metrics: dict | None, threshold: float,
                     csv_path: Path) -> None:
    """`<stem>_metrics.json` and `<stem>_plots/` beside the CSV (named after it, so outputs sharing a folder keep
    their own); without labels, those of an earlier call are removed, so they can never be read as describing the
    new scores."""
    metrics_path, plots = (csv_path.with_name(f"{csv_path.stem}_{name}") for name in ("metrics.json", "plots"))
    scored = [r for r in rows if labels[r["path"]] and r["score"] is not None]
    if metrics is None:
        metrics_path.unlink(missing_ok=True)
    else:
        atomic_write_bytes(metrics_path, (json.dumps(_finite(metrics), indent=1, sort_keys=True) + "\n").encode())
    if scored:
        write_plots([TARGET[labels[r["path"]]] for r in scored], [r["score"] for r in scored],
                    threshold=threshold, out_dir=plots)
    else:
        shutil.rmtree(plots, ignore_errors=True)


@dataclass
class ScoreSummary:
    counts: Counter            # status -> videos of this call (this shard's)
    scored: int                # videos scored by this run
    reused: int                # videos taken from an earlier run's rows
    rescored: int              # videos with an earlier row that could not be reused (see `_why_rescored`)
    metrics: dict | None       # see `evaluate`; None without labels
    csv: Path
    jsonl: Path

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED_UNITS if any(self.counts.get(s) for s in UNREADABLE) else EXIT_OK

    def line(self) -> str:
        statuses = ", ".join(f"{self.counts[s]} {s}" for s in STATUSES if self.counts[s])
        text = (f"score-video: {sum(self.counts.values())} videos ({self.scored} scored, {self.reused} already "
                f"done): {statuses}")
        if self.metrics and self.metrics["video"]:
            video, frame = self.metrics["video"]["auc"], self.metrics["frame"]["auc"]
            if math.isnan(video) and math.isnan(frame):
                text += "; no AUC (the scored labelled videos are all of one class)"
            else:
                text += f"; AUC {video:.4f} (videos), {frame:.4f} (frames)"
        return f"{text} -> {self.csv}"


# ---------------------------------------------------------------- the run

def run_score(inputs: list[str], checkpoint: str | list[str], cfg, *, out: str, labels: str | None,
              work: str | None, split: str | None, shard: Shard, progress: bool,
              run_splits: bool = False) -> ScoreSummary:
    """Score every input video not already scored with these settings; write CSV, JSON lines and, with labels,
    <stem>_metrics.json and plots beside the CSV (not for a shard: the merging run writes them). A workspace
    split is the one the checkpoint was trained on, or refused (``run_splits``: read it from the run folder).
    A list of checkpoints scores as an ensemble (`ensemble`): a workspace split must then be every model's."""
    csv_path, jsonl = output_paths(out, shard)
    ckpts, scoring = load_models(checkpoint, cfg, device=cfg.score.device)
    paths = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    if work is not None and len(paths) > 1:
        if run_splits:
            raise ScoreError("--run-splits reads one run's splits: give one --checkpoint")
        for path, ckpt in zip(paths[1:], ckpts[1:]):  # no model may have trained on the videos scored
            TrainedSplits(path, ckpt.get("pairs_digest")).pairs(Workspace(work), split)
    trained = TrainedSplits(paths[0], ckpts[0].get("pairs_digest"), own=run_splits)
    videos = [v for v in list_inputs(inputs, labels=labels, work=work, split=split, trained=trained)
              if shard.owns(v.path)]
    if labels and videos and not any(v.label for v in videos):
        warn(f"score-video: {labels} labels none of the {len(videos)} videos (matched by path, then by file "
             "name): no metrics")
    model_digest = models_digest(checkpoint)
    try:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a part of the folder is a file
        blocking = next((p for p in jsonl.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else f"{e.strerror}: {e.filename}"
        raise ScoreError(f"{csv_path}: cannot create its folder ({why})") from None
    check_writable(jsonl.parent)  # the CSV is written last: a folder that takes no new file must fail first
    with output_lock(csv_path, jsonl):  # a second call into the same output would lose the first's rows
        refuse_foreign(csv_path, jsonl)
        done, rescored, redecided = load_finished(jsonl, {v.path for v in videos}, scoring, model_digest)
        todo = [v for v in videos if v.path not in done]
        if redecided:
            note(f"score-video: {redecided} video(s) re-decided from their stored clip scores (only the "
                 "aggregation, threshold or fallback changed)")
        for reason, n in sorted(rescored.items()):
            note(f"score-video: {n} video(s) {reason}; scoring them again")
        if todo:
            detector = Detector(ckpts[0] if isinstance(checkpoint, str) else ckpts, scoring,
                                device=cfg.score.device, batch_size=cfg.score.batch_size,
                                checkpoint=checkpoint)
            for ckpt in ckpts:  # the model holds what it needs (cast, or moved to the GPU): the files' tensors can go
                ckpt.clear()
            extra = {"settings": scoring.digest(), "clips_settings": scoring.clips_digest(),
                     "model_digest": model_digest}
            with Appender(jsonl) as record, progress_bar(total=len(todo), unit="video", desc="score",
                                                         enabled=progress) as bar:
                for row in detector.rows(todo):
                    row = {**row, **extra, "file": file_key(row["path"])}
                    record.append(row)
                    done[row["path"]] = row
                    bar.update()
        rows = [done[v.path] for v in videos]
        truth = {v.path: v.label for v in videos}
        write_table(csv_path, [_csv_row(r, truth[r["path"]]) for r in rows], CSV_COLUMNS)
        metrics = evaluate(rows, truth, scoring.threshold)
        if shard.count == 1:
            write_evaluation(rows, truth, metrics, scoring.threshold, csv_path)
        return ScoreSummary(Counter(r["status"] for r in rows), len(todo), len(videos) - len(todo),
                            sum(rescored.values()), metrics, csv_path, jsonl)
