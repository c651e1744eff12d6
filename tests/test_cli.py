"""The command layer: errors before any work, exit codes, notes to the user."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import dfpipe
from dfpipe.pipeline.cli import EXIT_INTERRUPTED, command, main
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
    proc = dfpipe("verify", "--work", tmp_path / "typo", check=False)
    assert proc.returncode == 2 and "not a dfpipe workspace" in proc.stderr and not (tmp_path / "typo").exists()


def test_ctrl_c_exits_130_saying_a_rerun_completes_the_work(capsys):
    @command
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        interrupted()
    assert e.value.code == EXIT_INTERRUPTED == 130
    assert "rerun the same command to complete the rest" in capsys.readouterr().err

    @command
    def train():  # the same command again would refuse the run folder: the way on is --resume
        raise KeyboardInterrupt

    with pytest.raises(SystemExit):
        train()
    assert "rerun it with --resume" in capsys.readouterr().err


def test_ctrl_c_before_trains_first_epoch_does_not_advise_resume(tmp_path, monkeypatch):
    def interrupted(ws, run_dir, cfg, **kw):
        if (run_dir / "started").exists():  # the second call: an epoch had finished before the interrupt
            (run_dir / "last.pt").write_bytes(b"")
        (run_dir / "started").touch()
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "run_train", lambda ws, run, cfg, **kw: interrupted(ws, Path(run), cfg, **kw))
    (tmp_path / "run").mkdir()
    for advice in ("nothing to resume: rerun the same command", "rerun it with --resume"):
        result = CliRunner().invoke(main, ["train", "--work", str(tmp_path / "ws"), "--run", str(tmp_path / "run")])
        assert result.exit_code == EXIT_INTERRUPTED and advice in result.stderr


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
