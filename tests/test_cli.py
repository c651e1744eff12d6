"""The command layer: errors before any work, exit codes, notes to the user."""
from __future__ import annotations

import subprocess
import sys
import tempfile

from click.testing import CliRunner

from conftest import dfpipe
from dfpipe.manifests.errors import DfpipeError
from dfpipe.pipeline.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, main
from dfpipe.stages import train as train_mod
from dfpipe.stages.train import TrainError


def test_cli_rejects_a_bad_value_before_any_work(tmp_path):
    (tmp_path / "v.csv").write_text("path,label\nv.mp4,real\n")
    proc = dfpipe("extract", tmp_path / "v.csv", "--work", tmp_path / "ws", "--set", "extract.stride=abc",
                  check=False)
    assert proc.returncode == 2 and proc.stderr == "error: extract.stride: must be an integer >= 1, got 'abc'\n"
    assert not (tmp_path / "ws").exists()
    proc = dfpipe("score-video", tmp_path / "v.mp4", "--checkpoint", tmp_path / "x.pt", "--threshold", "1.5",
                  "--out", tmp_path / "s.csv", check=False)
    assert proc.returncode == 2 and "score.threshold: must be a number in [0, 1]" in proc.stderr
    assert not list(tmp_path.glob("s.*"))
    result = CliRunner().invoke(main, ["score-video", str(tmp_path / "v.mp4"), "--checkpoint", str(tmp_path / "x.pt"),
                                       "--run-splits"])
    assert result.exit_code == 2 and "--run-splits needs --work DIR --split SPLIT" in result.stderr
    proc = dfpipe("verify", "--work", tmp_path / "typo", check=False)
    assert proc.returncode == 2 and "not a dfpipe workspace" in proc.stderr and not (tmp_path / "typo").exists()


def test_ctrl_c_exits_130_saying_a_rerun_completes_the_work(tmp_path, monkeypatch):
    """For every command, train included: its rerun continues an interrupted run (tests/test_train.py)."""
    monkeypatch.setattr(train_mod, "run_train", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    result = CliRunner().invoke(main, ["train", "--work", str(tmp_path / "ws"), "--run", str(tmp_path / "run")])
    assert result.exit_code == EXIT_INTERRUPTED == 130
    assert "interrupted: finished work is kept; rerun the same command to complete the rest" in result.stderr


def test_a_bug_exits_3_with_its_traceback_in_a_log_file_and_a_bad_input_exits_2(tmp_path, monkeypatch):
    """A ValueError that dfpipe does not explain is a bug (exit 3), not a bad input (exit 2) nor a failed video (1)."""
    def bug(*args, **kwargs):
        raise ValueError("shapes (2, 3) and (4,) do not line up")
    monkeypatch.setattr(train_mod, "run_train", bug)
    (tmp_path / "run").mkdir()
    args = ["train", "--work", str(tmp_path / "ws"), "--run", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_INTERNAL == 3 and result.stdout == ""
    logs = list((tmp_path / "run").glob("dfpipe-error-*.log"))
    assert len(logs) == 1 and result.stderr == (
        f"internal error: ValueError: shapes (2, 3) and (4,) do not line up (a bug in dfpipe; the traceback is in "
        f"{logs[0].resolve()})\n")
    text = logs[0].read_text()
    assert text.startswith("Traceback (most recent call last):") and "in bug" in text and "do not line up" in text

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # no run folder yet: the temp folder
    result = CliRunner().invoke(main, ["train", "--work", str(tmp_path / "ws"), "--run", str(tmp_path / "new")])
    assert result.exit_code == 3 and len(list((tmp_path / "tmp").glob("dfpipe-error-*.log"))) == 1

    monkeypatch.setattr(train_mod, "run_train", lambda *a, **kw: (_ for _ in ()).throw(TrainError("bad run")))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_BAD_INPUT == 2 and result.stderr == "error: bad run\n"
    assert isinstance(TrainError("x"), DfpipeError) and len(list((tmp_path / "run").glob("*.log"))) == 1


def test_score_video_says_which_align_overrides_it_ignores(tmp_path):
    proc = dfpipe("score-video", tmp_path / "v.mp4", "--checkpoint", tmp_path / "x.pt", "--out", tmp_path / "s.csv",
                  "--set", "align.min_face_size=40", "--set", "align.batch_size=4", check=False)
    assert "ignoring align.min_face_size\n" in proc.stderr  # batch_size is honoured: frames per detection step
    (tmp_path / "c.yaml").write_text("align:\n  margin: 1.5\nextract:\n  stride: 5\n")
    proc = dfpipe("score-video", tmp_path / "v.mp4", "--checkpoint", tmp_path / "x.pt", "--out", tmp_path / "s.csv",
                  "--config", tmp_path / "c.yaml", check=False)
    assert "ignoring align.margin, extract.stride\n" in proc.stderr
    proc = dfpipe("score-video", tmp_path / "v.mp4", "--checkpoint", tmp_path / "x.pt", "--out",
                  tmp_path / "s.jsonl", check=False)
    assert proc.returncode == 2 and "expected a .csv path" in proc.stderr


def test_status_and_verify_read_a_workspace_without_loading_torch(tmp_path):
    """They only read manifests: importing torch and the detector for them took ~7 s of a 0.6 s answer."""
    (tmp_path / "manifests").mkdir()
    code = ("import sys\nfrom click.testing import CliRunner\nfrom dfpipe.pipeline.cli import main\n"
            f"for cmd in ('status', 'verify'):\n"
            f"    result = CliRunner().invoke(main, [cmd, '--work', {str(tmp_path)!r}])\n"
            "    assert result.exit_code == 0, result.output\n"
            "    print(result.output)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "align" in proc.stdout and proc.stdout.rstrip().endswith("torch not loaded")
