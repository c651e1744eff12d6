"""The unit protocol every stage runs on.

A unit is one video. Its fingerprint is the sha256 of (stage, output-format version, parameters, input digest);
the unit is *done* when its last record is `done` with that fingerprint and every output file it recorded still
exists. Work happens in a private temp folder; the folder is renamed into place, its files hashed, and only
then is the unit's record appended (fsynced) to the writer's journal. Journals are merged into the manifest
tables by whoever next holds the stage's exclusive lock. So a crash at any instant leaves each unit either
fully recorded or not recorded at all, and a rerun redoes exactly the units that are not done.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import DfpipeError
from .errors import EXIT_FAILED_UNITS, EXIT_OK
from .jsonl import Appender
from .progress import bar as progress_bar
from .table import atomic_write_bytes, read_table, write_table
from .workspace import Shard, Workspace, replace_dir
from .workers import run_parallel



@dataclass(frozen=True)
class StageSpec:
    """What a stage writes: its manifests, its output folder and which row columns name output files."""
    name: str                      # 'extract'
    version: int                   # bump when the output format changes: every unit is redone
    area: str                      # output folder in the workspace ('frames')
    rows_table: str                # 'frames.csv'
    row_columns: list[str]         # columns of the rows table (the first is the unit id column)
    file_columns: list[tuple[str, str]]  # (path column, sha256 column) pairs in the rows
    info_columns: list[str] = field(default_factory=list)  # per-unit summary columns of '<name>.csv'
    rows_info: str = ""            # the info column that counts a unit's rows, if one does ('frames_written')
    rows_key: str = ""             # with rows_info: the row column whose distinct values it counts instead

    @property
    def unit_columns(self) -> list[str]:
        return [self.row_columns[0], "status", "fingerprint", "input", "reason", *self.info_columns]


@dataclass(frozen=True)
class Unit:
    id: str
    digest: str          # what the outputs depend on besides the parameters (input sha256, upstream digests)
    payload: Any = None  # whatever the work function needs (a path, upstream rows)
    shard_key: str = ""  # units with one key go to the same shard (a fake with the source it is cropped by)


@dataclass
class Record:
    status: str          # done | failed | invalid
    fingerprint: str
    reason: str = ""
    info: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    input: str = ""      # `input_digest` of the unit it was made from ("" in records older than it)


@dataclass
class UnitOutput:
    """What a work function returns: rows naming files it wrote into its folder, and a summary."""
    rows: list[dict]
    info: dict = field(default_factory=dict)


class UnitError(DfpipeError):
    """A unit that cannot be done for a reason worth a manifest row (bad video, no face...)."""


@dataclass
class RunSummary:
    stage: str
    total: int = 0
    skipped: int = 0
    ran: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped_failed: int = 0

    def merge(self, other: "RunSummary") -> "RunSummary":
        return RunSummary(self.stage, self.total + other.total, self.skipped + other.skipped,
                          self.ran + other.ran, self.failed + other.failed,
                          self.skipped_failed + other.skipped_failed)

    @property
    def exit_code(self) -> int:
        """1 when this run failed a unit. Failures of earlier runs are in the summary line, not the exit code: some
        are results (align's "no face found") that --retry-failed cannot change, and a rerun must be able to
        succeed."""
        return EXIT_FAILED_UNITS if self.failed else EXIT_OK

    def line(self) -> str:
        text = (f"{self.stage}: {self.total} units, {self.skipped} already done, {self.ran} processed, "
                f"{len(self.failed)} failed")
        if self.skipped_failed:
            text += f", {self.skipped_failed} failed earlier (use --retry-failed)"
        return text


def fingerprint(spec: StageSpec, params: dict, unit: Unit) -> str:
    blob = json.dumps({"stage": spec.name, "version": spec.version, "params": params, "input": unit.digest},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def input_digest(unit: Unit) -> str:
    """Recorded beside the fingerprint, so that a stale unit can say whether its input or the settings changed."""
    return hashlib.sha256(unit.digest.encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- state: tables + journals

def _journal_dir(ws: Workspace) -> Path:
    return ws.manifests / "journal"


def _journals(ws: Workspace, spec: StageSpec) -> list[Path]:
    return sorted(_journal_dir(ws).glob(f"{spec.name}.*.jsonl"))


def _read_journal(path: Path) -> list[tuple[int, str, Record]]:
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:  # a record cut by a crash was never acknowledged: its unit is redone
                d = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                d = None
            if d is None:
                continue
            out.append((d["seq"], d["unit"], Record(d["status"], d["fingerprint"], d["reason"], d["info"],
                                                    d["rows"], d.get("input", ""))))
    return out


def load_state(ws: Workspace, spec: StageSpec, *, merge: bool = True,
               keep: Iterable[str] | None = None) -> dict[str, Record]:
    """Every unit's latest record. With ``merge``, journals are folded into the tables when nobody writes."""
    records, journals = _read_state(ws, spec)
    if merge and (journals or keep is not None):
        held = ws.try_lock(spec.name)
        if held is not None:
            try:
                # read again under the lock: a writer may have appended (and let go) since the first read, and
                # compacting deletes the journals
                records, journals = _read_state(ws, spec)
                _compact(ws, spec, records, journals, keep)
            finally:
                held.__exit__(None, None, None)
    return records


def _read_state(ws: Workspace, spec: StageSpec) -> tuple[dict[str, Record], list[Path]]:
    unit_col = spec.row_columns[0]
    records: dict[str, Record] = {}
    units = read_table(ws.manifest(f"{spec.name}.csv"), spec.unit_columns, optional=["input"])
    for row in units.to_dict("records"):
        records[row[unit_col]] = Record(row["status"], row["fingerprint"], row["reason"],
                                        {c: row[c] for c in spec.info_columns}, input=row["input"])
    for row in read_table(ws.manifest(spec.rows_table), spec.row_columns).to_dict("records"):
        if row[unit_col] in records:
            records[row[unit_col]].rows.append(row)
    journals = _journals(ws, spec)
    entries = sorted((e for j in journals for e in _read_journal(j)), key=lambda e: e[0])
    for _, unit, rec in entries:
        records[unit] = rec
    return records, journals


def _compact(ws: Workspace, spec: StageSpec, records: dict[str, Record], journals: list[Path],
             keep: Iterable[str] | None) -> None:
    """Rewrite the tables from the merged records (sorted, so every history gives the same bytes)."""
    if keep is not None:
        keep = set(keep)
        for unit in [u for u in records if u not in keep]:
            shutil.rmtree(ws.unit_dir(spec.area, unit), ignore_errors=True)
            del records[unit]
    unit_col = spec.row_columns[0]
    order = sorted(records)
    rows = [r for u in order for r in records[u].rows]
    write_table(ws.manifest(spec.rows_table), rows, spec.row_columns)
    write_table(ws.manifest(f"{spec.name}.csv"),
                [{unit_col: u, "status": records[u].status, "fingerprint": records[u].fingerprint,
                  "input": records[u].input, "reason": records[u].reason, **records[u].info} for u in order],
                spec.unit_columns)
    for j in journals:
        j.unlink(missing_ok=True)


class Journal(Appender):
    """The record log of one writer (one stage shard)."""

    def __init__(self, ws: Workspace, spec: StageSpec, shard: Shard):
        _journal_dir(ws).mkdir(parents=True, exist_ok=True)
        super().__init__(_journal_dir(ws) / f"{spec.name}.{shard.name}.jsonl")

    def append(self, unit: str, rec: Record) -> None:
        super().append({"seq": time.time_ns(), "unit": unit, "status": rec.status, "fingerprint": rec.fingerprint,
                        "reason": rec.reason, "info": rec.info, "rows": rec.rows, "input": rec.input})


# ---------------------------------------------------------------- deciding what to do

def complete(spec: StageSpec, rec: Record) -> bool:
    """A done unit has rows, as many as its info says: fewer mean a damaged, half-copied or hand-edited rows
    table, whose missing rows would otherwise pass for a shorter video downstream (or other training crops)."""
    if not rec.rows:
        return False
    counted = len({str(r.get(spec.rows_key)) for r in rec.rows}) if spec.rows_key else len(rec.rows)
    return not spec.rows_info or str(rec.info.get(spec.rows_info)) == str(counted)


def missing_output(ws: Workspace, spec: StageSpec, rec: Record) -> str | None:
    """The first output file of a unit that is not on disk, if any."""
    for row in rec.rows:
        for path_col, _ in spec.file_columns:
            if row.get(path_col) and not (ws.root / row[path_col]).exists():
                return row[path_col]
    return None


def judge(ws: Workspace, spec: StageSpec, params: dict, unit: Unit, rec: Record | None) -> tuple[str, str]:
    """A unit's state (pending, stale, failed or done) and why it is not done, as `dvc status` says why a stage
    changed: what `status -v` shows; the next run redoes every stale unit whatever the reason."""
    if rec is None:
        return "pending", "not run yet"
    if rec.status == "invalid":
        return "stale", rec.reason  # marked by verify: which file was missing or changed
    if rec.fingerprint != fingerprint(spec, params, unit):
        if not rec.input:
            return "stale", "input or settings changed"
        return "stale", "input changed" if rec.input != input_digest(unit) else "settings changed"
    if rec.status == "failed":
        return "failed", rec.reason
    if not complete(spec, rec):
        return "stale", f"rows missing from {spec.rows_table}"
    missing = missing_output(ws, spec, rec)
    return ("stale", f"files missing, e.g. {missing}") if missing else ("done", "")


def unit_state(ws: Workspace, spec: StageSpec, params: dict, unit: Unit, rec: Record | None) -> str:
    return judge(ws, spec, params, unit, rec)[0]


def judge_all(ws: Workspace, spec: StageSpec, params: dict, units: list[Unit]) -> dict[str, tuple[str, str]]:
    """Every unit's (state, why), read without merging journals: `status` may not write to the workspace."""
    records = load_state(ws, spec, merge=False)
    return {u.id: judge(ws, spec, params, u, records.get(u.id)) for u in units}


def count_states(ws: Workspace, spec: StageSpec, params: dict, units: list[Unit]) -> Counter:
    return Counter(state for state, _ in judge_all(ws, spec, params, units).values())


def save_params(ws: Workspace, spec: StageSpec, params: dict) -> None:
    """The parameters of the last run, so `status` can judge units without being told the flags again."""
    atomic_write_bytes(ws.manifest(f"{spec.name}.params.json"),
                       (json.dumps(params, sort_keys=True, indent=1, default=str) + "\n").encode())


def load_params(ws: Workspace, spec: StageSpec) -> dict | None:
    path = ws.manifest(f"{spec.name}.params.json")
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------- running

def _do_unit(work: Callable[[Unit, Path], UnitOutput], spec: StageSpec, unit: Unit, tmp: Path) -> UnitOutput:
    """Runs in the worker: do the work in a fresh folder and hash what it wrote (in parallel, not in the parent)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out = work(unit, tmp)
    for row in out.rows:
        for path_col, sha_col in spec.file_columns:
            if row.get(path_col):
                row[sha_col] = sha256_file(tmp / row[path_col])
    return out


def run_stage(ws: Workspace, spec: StageSpec, params: dict, units: list[Unit],
              work: Callable[[Unit, Path], UnitOutput], *, shard: Shard = Shard(), workers: int = 0,
              timeout: float | None = None, retry_failed: bool = False, progress: bool = True,
              only: Callable[[Unit], bool] | None = None) -> RunSummary:
    """Do every unit of this shard that is not done; record each one as it finishes.

    ``units`` is the whole stage (units missing from it are dropped from the manifests); ``only`` picks the
    ones this call may work on, for stages whose units depend on each other and run in phases."""
    ws.init()
    unit_col = spec.row_columns[0]
    sharded = shard.count > 1
    summary = RunSummary(spec.name)
    with writer_lock(ws, spec, shard):
        save_params(ws, spec, params)
        records = load_state(ws, spec, merge=False)
        tmp_root = ws.tmp_dir(spec.name, shard)
        shutil.rmtree(tmp_root, ignore_errors=True)  # leftovers of a killed run of this same writer
        mine = [u for u in units if shard.owns(u.shard_key or u.id) and (only is None or only(u))]
        summary.total = len(mine)
        todo = []
        for u in mine:
            state = unit_state(ws, spec, params, u, records.get(u.id))
            if state == "done":
                summary.skipped += 1
            elif state == "failed" and not retry_failed:
                summary.skipped_failed += 1
            else:
                todo.append(u)
        journal = Journal(ws, spec, shard)
        try:
            results = run_parallel(lambda u: _do_unit(work, spec, u, tmp_root / safe_tmp(u.id)), todo,
                                   workers=workers, timeout=timeout)
            for unit, ok, value in progress_bar(results, total=len(todo), desc=spec.name, unit="video",
                                                enabled=progress):
                fp = fingerprint(spec, params, unit)
                final = ws.unit_dir(spec.area, unit.id)
                if ok:
                    replace_dir(tmp_root / safe_tmp(unit.id), final)
                    rel = ws.rel(final)
                    for row in value.rows:
                        row[unit_col] = unit.id
                        for path_col, _ in spec.file_columns:
                            if row.get(path_col):
                                row[path_col] = f"{rel}/{row[path_col]}"
                    journal.append(unit.id, Record("done", fp, "", value.info, value.rows, input_digest(unit)))
                    summary.ran += 1
                else:
                    shutil.rmtree(final, ignore_errors=True)  # outputs of an older input are stale now
                    shutil.rmtree(tmp_root / safe_tmp(unit.id), ignore_errors=True)
                    journal.append(unit.id, Record("failed", fp, value, input=input_digest(unit)))
                    summary.failed.append((unit.id, value))
        finally:
            journal.close()
        shutil.rmtree(tmp_root, ignore_errors=True)
        _rmdir_empty(tmp_root.parent)
    # the last writer standing folds all journals into the tables and drops units that left the input
    load_state(ws, spec, merge=True, keep=None if sharded else [u.id for u in units])
    return summary


def safe_tmp(unit_id: str) -> str:
    return hashlib.sha1(unit_id.encode("utf-8")).hexdigest()[:16]


def _rmdir_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


@contextmanager
def writer_lock(ws: Workspace, spec: StageSpec, shard: Shard) -> Iterator[None]:
    """A writer's locks on its stage: exclusive, or shared between the shards of a sharded run (each holding its own
    shard's); refused while another command reads the stage's outputs (see `Workspace.reading`)."""
    if shard.count == 1:
        with ws.lock(spec.name, what=f"the {spec.name} stage"):
            ws.refuse_if_read(spec.name)
            yield
        return
    with ws.lock(spec.name, shared=True, what=f"the {spec.name} stage"), \
            ws.lock(f"{spec.name}.{shard.name}", what=f"shard {shard.index}/{shard.count} of {spec.name}"):
        ws.refuse_if_read(spec.name)
        yield


# ---------------------------------------------------------------- verify

@dataclass
class VerifyReport:
    stage: str
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    redo: list[str] = field(default_factory=list)  # units an earlier verify marked, not yet redone
    rows_missing: list[str] = field(default_factory=list)  # done units with fewer rows than they recorded

    @property
    def ok(self) -> bool:
        return not self.missing and not self.changed and not self.redo and not self.rows_missing


def verify(ws: Workspace, spec: StageSpec) -> VerifyReport:
    """Re-hash every recorded output; units with a missing or changed file are marked for redoing."""
    report = VerifyReport(spec.name)
    with ws.lock(spec.name, what=f"the {spec.name} stage"):
        records = load_state(ws, spec, merge=False)
        bad: dict[str, list[str]] = {}
        for unit, rec in sorted(records.items()):
            if rec.status == "invalid":
                report.redo.append(unit)
            if rec.status != "done":
                continue
            if not complete(spec, rec):
                report.rows_missing.append(unit)
                bad.setdefault(unit, []).append(f"rows missing from {spec.rows_table}")
            for row in rec.rows:
                for path_col, sha_col in spec.file_columns:
                    rel = row.get(path_col)
                    if not rel:
                        continue
                    report.checked += 1
                    path = ws.root / rel
                    if not path.exists():
                        report.missing.append(rel)
                        bad.setdefault(unit, []).append(f"missing {rel}")
                    elif sha256_file(path) != row[sha_col]:
                        report.changed.append(rel)
                        bad.setdefault(unit, []).append(f"changed {rel}")
        if bad:
            journal = Journal(ws, spec, Shard())
            try:
                for unit, problems in bad.items():
                    rec = records[unit]
                    reason = f"verify: {len(problems)} file(s) missing or changed, e.g. {problems[0]}"
                    journal.append(unit, Record("invalid", rec.fingerprint, reason, rec.info, rec.rows, rec.input))
            finally:
                journal.close()
    load_state(ws, spec, merge=True)
    return report
