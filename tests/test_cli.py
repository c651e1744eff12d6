"""The command layer: errors before any work, exit codes, notes to the user."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from conftest import dfpipe
from dfpipe.pipeline.cli import EXIT_INTERRUPTED, main
from dfpipe.stages import train as train_mod


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
