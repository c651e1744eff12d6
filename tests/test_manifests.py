"""The unit protocol on a synthetic stage: idempotence, invalidation, failures, verify, shards, locks, safety."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dfpipe.manifests import progress
from dfpipe.manifests.table import STALE_TMP_SECONDS, atomic_write_bytes, check_writable, read_table, write_table
from dfpipe.manifests.units import (Journal, Record, StageSpec, Unit, UnitError, UnitOutput, count_states,
                                    judge_all, load_state, run_stage, verify)
from dfpipe.manifests.workspace import Shard, Workspace, WorkspaceError, safe_name

SPEC = StageSpec(name="toy", version=1, area="out", rows_table="toy_rows.csv",
                 row_columns=["video_id", "n", "path", "sha256"], file_columns=[("path", "sha256")],
                 info_columns=["count"])


def make_work(calls: list):
    def work(unit: Unit, out: Path) -> UnitOutput:
        calls.append(unit.id)
        if unit.payload == "bad":
            raise UnitError(f"{unit.id}: cannot read")
        rows = []
        for i in range(3):
            (out / f"{i}.txt").write_text(f"{unit.id}:{unit.digest}:{i}")
            rows.append({"n": i, "path": f"{i}.txt"})
        return UnitOutput(rows, {"count": 3})
    return work


def units(*ids, digest="d0", bad=()):
    return [Unit(i, digest, "bad" if i in bad else "ok") for i in ids]


def test_run_records_files_and_rerun_skips(tmp_path):
    ws, calls = Workspace(tmp_path / "ws"), []
    s = run_stage(ws, SPEC, {"p": 1}, units("a", "b"), make_work(calls), progress=False)
    assert (s.ran, s.skipped, s.failed) == (2, 0, [])
    rows = read_table(ws.manifest("toy_rows.csv"), SPEC.row_columns)
    assert list(rows.video_id) == ["a"] * 3 + ["b"] * 3
    assert (ws.root / rows.path[0]).read_text() == "a:d0:0"
    before = {p: p.read_bytes() for p in ws.manifests.glob("*.csv")}
    s = run_stage(ws, SPEC, {"p": 1}, units("a", "b"), make_work(calls), progress=False)
    assert (s.ran, s.skipped) == (0, 2) and calls == ["a", "b"]
    assert {p: p.read_bytes() for p in ws.manifests.glob("*.csv")} == before
    assert not list((ws.manifests / "journal").glob("*.jsonl"))
    assert not (ws.root / "tmp").exists()


def test_param_or_input_change_redoes_exactly_the_affected_units(tmp_path):
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, SPEC, {"p": 1}, units("a", "b"), make_work(calls), progress=False)
    changed = [Unit("a", "d0", "ok"), Unit("b", "NEW", "ok")]
    run_stage(ws, SPEC, {"p": 1}, changed, make_work(calls), progress=False)
    assert calls == ["a", "b", "b"]
    assert (ws.root / "out/b/0.txt").read_text() == "b:NEW:0"
    run_stage(ws, SPEC, {"p": 2}, changed, make_work(calls), progress=False)
    assert calls[3:] == ["a", "b"]


def test_failed_units_are_recorded_skipped_then_retried(tmp_path):
    ws, calls = Workspace(tmp_path / "ws"), []
    s = run_stage(ws, SPEC, {}, units("a", "b", bad={"b"}), make_work(calls), progress=False)
    assert s.failed == [("b", "b: cannot read")]
    table = read_table(ws.manifest("toy.csv"), SPEC.unit_columns).set_index("video_id")
    assert table.loc["b", "status"] == "failed" and table.loc["b", "reason"] == "b: cannot read"
    assert table.loc["a", "status"] == "done"
    s = run_stage(ws, SPEC, {}, units("a", "b", bad={"b"}), make_work(calls), progress=False)
    assert s.skipped_failed == 1 and calls == ["a", "b"]
    s = run_stage(ws, SPEC, {}, units("a", "b"), make_work(calls), retry_failed=True, progress=False)
    assert s.ran == 1 and s.failed == [] and calls[-1] == "b"


def test_worker_processes_and_timeout(tmp_path):
    import time
    ws, calls = Workspace(tmp_path / "ws"), []
    inner = make_work(calls)

    def work(unit, out):
        if unit.id == "slow":
            time.sleep(30)
        return inner(unit, out)
    s = run_stage(ws, SPEC, {}, units("a", "slow", "c"), work, workers=2, timeout=2, progress=False)
    assert s.ran == 2 and s.failed[0][0] == "slow" and "timed out" in s.failed[0][1]
    assert (ws.root / "out/c/2.txt").exists() and not (ws.root / "out/slow").exists()


def test_verify_marks_missing_and_changed_files_and_rerun_repairs(tmp_path):
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, SPEC, {}, units("a", "b", "c"), make_work(calls), progress=False)
    (ws.root / "out/a/1.txt").unlink()
    (ws.root / "out/b/2.txt").write_text("tampered")
    report = verify(ws, SPEC)
    assert report.missing == ["out/a/1.txt"] and report.changed == ["out/b/2.txt"] and report.checked == 9
    assert count_states(ws, SPEC, {}, units("a", "b", "c")) == {"stale": 2, "done": 1}
    again = verify(ws, SPEC)  # the marked units are still broken until the stage reruns
    assert not again.ok and again.redo == ["a", "b"] and again.missing == again.changed == []
    run_stage(ws, SPEC, {}, units("a", "b", "c"), make_work(calls), progress=False)
    assert sorted(calls[3:]) == ["a", "b"]
    assert (ws.root / "out/b/2.txt").read_text() == "b:d0:2"
    assert verify(ws, SPEC).ok


def test_rows_deleted_from_the_table_are_noticed_and_redone(tmp_path):
    """align's rows per sampled frame: deleting a frame's rows by hand (or a half-copied table) left the crops
    unrecorded and changed the training set while status, verify and a rerun all said done."""
    spec = replace(SPEC, rows_info="count", rows_key="n")
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, spec, {}, units("a", "b"), make_work(calls), progress=False)
    table = ws.manifest("toy_rows.csv")
    whole = table.read_bytes()
    lines = whole.decode().splitlines(keepends=True)
    table.write_text("".join(line for line in lines if not line.startswith("b,1,")))
    assert count_states(ws, spec, {}, units("a", "b")) == {"done": 1, "stale": 1}
    report = verify(ws, spec)
    assert not report.ok and report.rows_missing == ["b"] and report.missing == report.changed == []
    run_stage(ws, spec, {}, units("a", "b"), make_work(calls), progress=False)
    assert calls[2:] == ["b"] and table.read_bytes() == whole and verify(ws, spec).ok


def test_temp_files_a_killed_writer_left_are_swept_by_the_next_write(tmp_path):
    """A kill between writing a table's temp file and renaming it left a whole copy behind, forever."""
    old = time.time() - 2 * STALE_TMP_SECONDS
    stale, fresh, other = (tmp_path / n for n in (".tmp-t.csv.k1ll3d", ".tmp-t.csv.n0wxyz", ".tmp-u.csv.k1ll3d"))
    probe = tmp_path / ".tmp-probe.k1ll3d"
    probe.mkdir()
    for path in (stale, fresh, other):
        path.write_bytes(b"half a table")
    for path in (stale, other, probe):
        os.utime(path, (old, old))
    atomic_write_bytes(tmp_path / "t.csv", b"a\n")
    check_writable(tmp_path)
    # an old temp of this target and an old probe go; a fresh one may be another writer's, another target's is not
    # this write's to judge
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-t.csv.n0wxyz", ".tmp-u.csv.k1ll3d", "t.csv"]


def test_shards_split_units_and_merge_to_the_same_tables(tmp_path):
    ids = [f"v{i}" for i in range(10)]
    one, calls = Workspace(tmp_path / "one"), []
    run_stage(one, SPEC, {}, units(*ids), make_work(calls), progress=False)
    two, calls = Workspace(tmp_path / "two"), []
    s0 = run_stage(two, SPEC, {}, units(*ids), make_work(calls), shard=Shard(0, 2), progress=False)
    s1 = run_stage(two, SPEC, {}, units(*ids), make_work(calls), shard=Shard(1, 2), progress=False)
    assert sorted(calls) == ids and s0.total + s1.total == 10 and 0 < s0.total < 10
    for name in ("toy.csv", "toy_rows.csv"):
        assert (one.manifest(name)).read_bytes() == (two.manifest(name)).read_bytes()


def test_partial_journal_line_is_ignored(tmp_path):
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, SPEC, {}, units("a"), make_work(calls), progress=False)
    journal = ws.manifests / "journal" / "toy.0-of-1.jsonl"
    journal.write_text(json.dumps({"seq": 1, "unit": "b"})[:20])  # a crash in the middle of an append
    assert set(load_state(ws, SPEC, merge=False)) == {"a"}


def test_a_rerun_after_a_torn_journal_line_keeps_its_records(tmp_path):
    """The rerun appends to the same journal: its first record must not be glued onto the torn line (which made it,
    and every record after it, unreadable: the work was done but never counted)."""
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, SPEC, {}, units("a"), make_work(calls), progress=False)
    journal = ws.manifests / "journal" / "toy.0-of-1.jsonl"
    journal.write_text(json.dumps({"seq": 1, "unit": "x"})[:20])
    run_stage(ws, SPEC, {}, units("a", "b", "c"), make_work(calls), progress=False)
    run_stage(ws, SPEC, {}, units("a", "b", "c"), make_work(calls), progress=False)
    assert calls == ["a", "b", "c"]
    assert set(read_table(ws.manifest("toy.csv"), SPEC.unit_columns).video_id) == {"a", "b", "c"}


def test_a_merge_reads_the_journals_again_once_it_holds_the_lock(tmp_path, monkeypatch):
    """Another shard may append its last record (and let go of the stage) between a merge's first read and its
    lock; compacting deletes the journals, so a merge of the first read would lose that record."""
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, SPEC, {}, units("a"), make_work(calls), progress=False)
    Journal(ws, SPEC, Shard(0, 2)).append("c", Record("done", "f", "", {"count": 0}))
    take = ws.try_lock

    def late_writer(name):
        Journal(ws, SPEC, Shard(1, 2)).append("b", Record("done", "f", "", {"count": 0}))
        return take(name)
    monkeypatch.setattr(ws, "try_lock", late_writer)
    assert set(load_state(ws, SPEC)) == {"a", "b", "c"}
    assert set(read_table(ws.manifest("toy.csv"), SPEC.unit_columns).video_id) == {"a", "b", "c"}
    assert not list((ws.manifests / "journal").glob("*.jsonl"))


def test_units_that_left_the_input_are_dropped_with_their_files(tmp_path):
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, SPEC, {}, units("a", "b"), make_work(calls), progress=False)
    run_stage(ws, SPEC, {}, units("a"), make_work(calls), progress=False)
    assert set(read_table(ws.manifest("toy.csv"), SPEC.unit_columns).video_id) == {"a"}
    assert not (ws.root / "out/b").exists()


def test_a_read_only_workspace_is_one_error_before_any_unit_fails(tmp_path, monkeypatch):
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, SPEC, {}, units("a"), make_work(calls), progress=False)
    before = {p: p.read_bytes() for p in ws.manifests.rglob("*") if p.is_file()}
    real_mkdtemp = tempfile.mkdtemp

    def read_only(*args, dir=None, **kw):  # root ignores permission bits: the refusal is stood in for
        if Path(dir) == ws.root:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_mkdtemp(*args, dir=dir, **kw)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(WorkspaceError, match=r"ws: workspace is not writable \(Operation not permitted\)"):
        run_stage(ws, SPEC, {}, units("a", "b"), make_work(calls), progress=False)
    assert calls == ["a"] and {p: p.read_bytes() for p in ws.manifests.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    assert run_stage(ws, SPEC, {}, units("a", "b"), make_work(calls), progress=False).ran == 1


def test_a_write_that_cannot_happen_names_the_users_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "file/scores.jsonl", b"{}")
    assert str(e.value) == f"{tmp_path / 'file/scores.jsonl'}: cannot write it (File exists)"  # not '.tmp-...'
    with pytest.raises(OSError) as e:
        check_writable(tmp_path / "file/run")
    assert str(e.value) == f"{tmp_path / 'file/run'}: cannot write there (Not a directory)"
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "folder.csv", b"x")
    assert str(e.value) == f"{tmp_path / 'folder.csv'}: cannot write it (Is a directory)"
    assert list(tmp_path.glob(".tmp-*")) == []  # nor is the temp file left behind
    check_writable(tmp_path / "new/run")
    assert list((tmp_path / "new/run").iterdir()) == []  # created, and the probe is gone


def test_held_sees_shared_and_exclusive_holders_only_while_they_hold(tmp_path):
    ws = Workspace(tmp_path / "ws").init()
    assert not ws.held("extract.readers")  # no lock file yet
    for shared in (True, False):
        with ws.lock("extract.readers", shared=shared):
            assert ws.held("extract.readers")
            with pytest.raises(WorkspaceError, match="another dfpipe command is reading the extract outputs"):
                ws.refuse_if_read("extract")
        assert not ws.held("extract.readers")
    ws.refuse_if_read("extract")


def test_lock_refuses_a_second_writer(tmp_path):
    ws = Workspace(tmp_path / "ws").init()
    with ws.lock("toy"):
        with pytest.raises(WorkspaceError, match="in use by pid"):
            run_stage(ws, SPEC, {}, units("a"), make_work([]), progress=False)


@pytest.mark.parametrize("hostile", ["../../x", "/etc/passwd", "..", "a/../../b", "a\\..\\b"])
def test_hostile_ids_stay_inside_the_workspace(tmp_path, hostile):
    ws = Workspace(tmp_path / "ws")
    run_stage(ws, SPEC, {}, [Unit(hostile, "d", "ok")], make_work([]), progress=False)
    written = [p for p in tmp_path.rglob("*.txt")]
    assert written and all(ws.root in p.parents for p in written)
    assert "/" not in safe_name(hostile) and safe_name(hostile) not in ("..", ".")


def test_table_roundtrip_is_byte_stable(tmp_path):
    cols = ["a", "b"]
    write_table(tmp_path / "t.csv", [{"a": "x,y", "b": ""}, {"a": "ünï côdé", "b": "1.50"}], cols)
    data = (tmp_path / "t.csv").read_bytes()
    write_table(tmp_path / "u.csv", read_table(tmp_path / "t.csv", cols), cols)
    assert (tmp_path / "u.csv").read_bytes() == data


def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path):
    """Not mkstemp's private 0600: a team reads a shared workspace's manifests and checkpoints."""
    atomic_write_bytes(tmp_path / "t.csv", b"a\n")
    (tmp_path / "plain").write_bytes(b"")
    mode = stat.S_IMODE((tmp_path / "t.csv").stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask
    ws = Workspace(tmp_path / "ws").init()
    with ws.lock("toy"):  # a teammate's shard must be able to take the same lock
        locks = list((tmp_path / "ws").rglob("*.lock"))
        assert locks and all(stat.S_IMODE(lock.stat().st_mode) == mode for lock in locks)


def test_status_says_why_each_unit_is_not_done(tmp_path):
    """As `dvc status` does: the input, the settings, a file or rows gone, a failure; an older table without the
    input column still reads (its stale units cannot tell which of the two changed)."""
    spec = replace(SPEC, rows_info="count", rows_key="n")
    ws, calls = Workspace(tmp_path / "ws"), []
    run_stage(ws, spec, {"p": 1}, units("a", "b", "c", "d", "e", bad={"e"}), make_work(calls), progress=False)
    (ws.root / "out/c/1.txt").unlink()
    table = ws.manifest("toy_rows.csv")
    table.write_text("".join(line for line in table.read_text().splitlines(keepends=True)
                             if not line.startswith("d,2,")))
    now = [Unit("a", "NEW", "ok"), *units("b", "c", "d", "e"), Unit("f", "d0", "ok")]
    assert judge_all(ws, spec, {"p": 1}, now) == {
        "a": ("stale", "input changed"), "b": ("done", ""), "c": ("stale", "files missing, e.g. out/c/1.txt"),
        "d": ("stale", "rows missing from toy_rows.csv"), "e": ("failed", "e: cannot read"),
        "f": ("pending", "not run yet")}
    judged = judge_all(ws, spec, {"p": 2}, now)
    assert {u: judged[u] for u in "ab"} == {"a": ("stale", "input changed"), "b": ("stale", "settings changed")}
    verify(ws, spec)
    assert judge_all(ws, spec, {"p": 1}, units("c"))["c"] == (
        "stale", "verify: 1 file(s) missing or changed, e.g. missing out/c/1.txt")
    units_table = ws.manifest("toy.csv")
    old = read_table(units_table, spec.unit_columns).drop(columns="input")
    write_table(units_table, old, list(old.columns))  # as written before the column existed
    assert judge_all(ws, spec, {"p": 2}, units("b"))["b"] == ("stale", "input or settings changed")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)


def test_progress_in_a_log_is_plain_lines_with_counts_rate_and_eta(every_update, monkeypatch):
    """A Slurm log got one carriage-return frame per batch (200 batches: 203 frames)."""
    log = io.StringIO()
    for _ in progress.bar(range(4), desc="extract", unit="video", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 4
    assert [line.split(",")[0] for line in lines] == [f"extract: {n}/4 video ({25 * n}%)" for n in range(1, 5)]
    assert all(re.search(r", [\d.]+ video/s, elapsed 00:00, ETA 00:00$", line) for line in lines), lines

    monkeypatch.setattr(progress, "INTERVAL", 3600.0)  # a line every 30 s: none within this test but the last
    log = io.StringIO()
    with progress.bar(total=3, desc="score", unit="video", file=log) as bar:
        for _ in range(3):
            bar.update()
            bar.set_postfix(loss="0.6931")
    assert log.getvalue().startswith("score: 3/3 video (100%), ") and log.getvalue().endswith(", loss=0.6931\n")
    log = io.StringIO()
    list(progress.bar(range(3), desc="epoch 1/2", unit="batch", leave=False, file=log))
    assert log.getvalue() == ""  # an epoch's bar leaves nothing: its epoch line follows
    list(progress.bar(range(3), enabled=False, file=log))
    assert log.getvalue() == ""


def test_a_terminal_gets_a_bar_and_the_log_file_only_the_lines(tmp_path, monkeypatch):
    terminal_out, terminal_err = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stdout", terminal_out)
    monkeypatch.setattr(sys, "stderr", terminal_err)
    path = tmp_path / "run" / "train.log"
    with progress.tee(path, "header\n"):
        progress.say("printed before the folder exists")
        path.parent.mkdir()
        for i in progress.bar(range(30), desc="epoch 1/1", unit="batch", leave=False):
            if i == 10:
                progress.say("epoch line")
                progress.note("note: a note")
        for _ in progress.bar(range(2), desc="val", unit="batch"):
            pass
    assert "\r" in terminal_err.getvalue() and "epoch 1/1:" in terminal_err.getvalue()  # tqdm's bar
    assert terminal_out.getvalue() == "printed before the folder exists\nepoch line\n"
    text = path.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[:4] == ["header", "printed before the folder exists", "epoch line", "note: a note"]
    assert len(lines) == 5 and lines[4].startswith("val: 100%|") and lines[4].endswith("batch/s]")
    assert sys.stdout is terminal_out and sys.stderr is terminal_err


def test_a_log_whose_folder_never_appears_is_not_written(tmp_path):
    with progress.tee(tmp_path / "refused" / "train.log", "header\n"):
        progress.say("error: refused before the run folder was made")
    assert not (tmp_path / "refused").exists()
