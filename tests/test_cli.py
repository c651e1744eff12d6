"""The command layer: errors before any work, exit codes, notes to the user."""
from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import tempfile

import click
import yaml
from click.testing import CliRunner

from conftest import CLI, dfpipe, make_clip
from dfpipe.manifests import progress
from dfpipe.manifests.errors import DfpipeError
from dfpipe.manifests.workspace import Shard
from dfpipe.pipeline.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, PipelineGroup, Setting, StderrHandler, main
from dfpipe.pipeline.config import load_config, parse_override
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
    assert isinstance(TrainError("x"), DfpipeError) and len(list((tmp_path / "run").glob("dfpipe-error-*.log"))) == 1
    assert (tmp_path / "run" / "train.log").read_text().endswith("\nerror: bad run\n")  # the log says why it ended


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


def run(*args) -> click.testing.Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_the_commands_in_pipeline_order_and_each_options_default_from_the_config():
    listed = re.findall(r"^  ([a-z-]+) ", run("--help").stdout.split("Commands:")[1], re.M)
    assert sorted(listed) == sorted(main.commands)
    issue_order = ["extract", "align", "train", "score-video", "report", "status", "verify"]
    assert [n for n in listed if n in issue_order] == [n for n in issue_order if n in main.commands]
    assert listed[:3] == ["extract", "align", "train"] and listed.index("verify") < listed.index("weights")
    group = PipelineGroup(commands={n: click.Command(n) for n in ("weights", "zz", "report", "train", "extract")})
    assert group.list_commands(None) == ["extract", "train", "report", "weights", "zz"]  # what exists, in order

    defaults = load_config()
    assert f"Keep every N-th frame. [default: {defaults.extract.stride}]" in one_line(run("extract", "--help").stdout)
    align = one_line(run("align", "--help").stdout)
    assert f"[default: {defaults.align.detect_every}; x>=1]" in align and "[default: pair-aware]" in align
    train = one_line(run("train", "--help").stdout)
    assert f"model name. [default: {defaults.model.hq_backbone}]" in train
    assert f"--epochs INTEGER [default: {defaults.train.epochs}]" in train
    for name, command in main.commands.items():  # -q and -v on every command
        text = run(name, "--help").stdout
        assert "-q, --quiet" in text and "-v, --verbose" in text, name
        for param in (p for p in command.params if isinstance(p, Setting)):  # a misspelt key would set nothing
            section, key = param.key.split(".", 1)
            assert key in defaults[section], (name, param.key)


def test_config_prints_the_effective_configuration(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 5\nalign:\n  margin: 1.5\n")
    result = run("config", "--config", tmp_path / "c.yaml", "--set", "train.epochs=7")
    assert result.exit_code == 0 and result.stderr == ""
    printed = yaml.safe_load(result.stdout)
    assert printed == load_config(tmp_path / "c.yaml", [parse_override("train.epochs=7")]).to_dict()
    assert (printed["train"]["epochs"], printed["align"]["margin"], printed["extract"]["stride"]) == (7, 1.5, 3)
    assert yaml.safe_load(run("config", "score", "demo").stdout).keys() == {"score", "demo"}
    result = run("config", "trian")
    assert result.exit_code == 2 and "no section trian" in result.stderr

    result = run("extract", tmp_path, "--work", tmp_path / "ws", "--stride", 5, "--set", "extract.workers=1",
                 "--print-config")  # a command's own flags too, as Lightning's --print_config; nothing runs
    assert result.exit_code == 0 and not (tmp_path / "ws").exists()
    assert yaml.safe_load(result.stdout)["extract"] == {**load_config().extract, "stride": 5, "workers": 1}


def test_output_to_a_file_has_plain_progress_lines_and_status_says_why_units_are_stale(tmp_path):
    for name in ("real/a", "real/b", "fake/c"):
        make_clip(tmp_path / "data" / f"{name}.mp4", n=12)
    ws, log = tmp_path / "ws", tmp_path / "extract.log"
    with open(log, "w") as out:  # as under Slurm: stdout and stderr into one file
        proc = subprocess.run([*CLI, "extract", str(tmp_path / "data"), "--work", str(ws)], stdout=out,
                              stderr=subprocess.STDOUT)
    text = log.read_text()
    assert proc.returncode == 0 and "\r" not in text
    assert re.search(r"^extract: 3/3 video \(100%\), [\d.]+ video/s, elapsed \d\d:\d\d, ETA 00:00$", text, re.M)
    assert "extract: 3 units, 0 already done, 3 processed, 0 failed" in text
    assert "note: 1 fake video(s) have no known source (e.g. fake/c)" in text

    quiet = run("extract", tmp_path / "data", "--work", ws, "-q")  # results only: no notes, no progress
    assert quiet.stdout == ("dataset layout: folders (3 videos)\n"
                            "extract: 3 units, 3 already done, 0 processed, 0 failed\n") and quiet.stderr == ""
    loud = run("extract", tmp_path / "data", "--work", ws)
    assert loud.stdout == quiet.stdout and "note: 1 fake video(s)" in loud.stderr

    with open(tmp_path / "data/real/a.mp4", "ab") as f:
        f.write(b"changed")
    status = run("status", "--work", ws, "-v")
    assert status.exit_code == 0
    lines = status.stdout.splitlines()
    assert lines[1].split() == ["extract", "2", "1", "0", "0", "0"] and lines[2].split()[0] == "align"
    assert lines[3:] == ["extract real/a: stale, input changed"]  # pending align units need no reason
    assert len(run("status", "--work", ws).stdout.splitlines()) == 3

    # new settings for one shard's video (real/b): the other two are behind them, real/a changed besides
    assert [Shard(0, 2).owns(v) for v in ("real/a", "real/b", "fake/c")] == [False, True, False]
    run("extract", tmp_path / "data", "--work", ws, "--stride", 2, "--shard", "0/2", "-q")
    stages = json.loads(run("status", "--work", ws, "--json").stdout)["stages"]
    assert [s["stage"] for s in stages] == ["extract", "align"]
    assert {k: stages[0][k] for k in ("done", "stale", "failed", "pending", "waiting")} == {
        "done": 1, "stale": 2, "failed": 0, "pending": 0, "waiting": 0}
    assert stages[0]["units"] == [{"id": "fake/c", "state": "stale", "reason": "settings changed"},
                                  {"id": "real/a", "state": "stale", "reason": "input changed"}]
    assert (stages[1]["pending"], [u["reason"] for u in stages[1]["units"]]) == (3, ["not run yet"] * 3)


def test_train_writes_train_log_with_its_header_and_every_line_it_printed(tmp_path, monkeypatch):
    from test_train import make_workspace, tiny_cfg
    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # a progress line per batch, as every 30 s on a long run
    ws = make_workspace(tmp_path / "ws", per_class=4, val_per_class=1)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_cfg(epochs=1, batch_size=2).to_dict()))
    run_dir = tmp_path / "run"
    args = ["train", "--work", str(ws), "--run", str(run_dir), "--config", str(tmp_path / "tiny.yaml")]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/dfpipe", *args])
    result = run(*args)
    assert result.exit_code == 0, result.output
    log = (run_dir / "train.log").read_text()
    assert "\r" not in log and "\r" not in result.output
    header = log.split("\nconfig:\n", 1)[0]
    assert header.startswith("==== dfpipe train, 20") and f"command: dfpipe train --work {ws}" in header
    assert re.search(r"^versions: dfpipe \S+, python 3\.\S+, torch \S+, torchvision \S+, timm \S+$", header, re.M)
    assert "\ndevice: train.device auto; " in header and "\ngit commit of " in header
    logged_cfg = yaml.safe_load("\n".join(line[2:] for line in log.split("\nconfig:\n", 1)[1].splitlines()
                                          if line.startswith("  ")))
    assert logged_cfg == tiny_cfg(epochs=1, batch_size=2).to_dict()  # the effective config
    for line in result.stdout.splitlines() + result.stderr.splitlines():
        assert line in log.splitlines(), line  # all it printed, results and progress alike
    # results on stdout, progress on stderr: plain lines with counts, rate and ETA
    assert re.search(r"^epoch 1/1  train loss [\d.]+ acc .* clips/s  \*best$", result.stdout, re.M)
    assert result.stdout.splitlines()[-1].startswith("train: initial_weights ")
    steps = re.findall(r"^epoch 1/1: (\d)/(\d) batch \(\d+%\), [\d.]+ (?:batch/s|s/batch), elapsed \d\d:\d\d, "
                       r"ETA \d\d:\d\d, loss=[\d.]+$", result.stderr, re.M)
    assert steps and steps[-1][0] == steps[-1][1] and "epoch 1/1:" not in result.stdout
    again = run("train", "--work", ws, "--run", run_dir, "--config", tmp_path / "tiny.yaml", "-q")
    assert again.exit_code == 0 and again.stderr == ""
    log = (run_dir / "train.log").read_text()
    assert log.count("==== dfpipe train, ") == 2 and log.endswith(again.stdout)  # appended, the rerun's own lines


def test_log_records_go_to_the_stderr_of_the_moment_so_train_log_gets_them_too(tmp_path, monkeypatch):
    """The handler a command line's logging got at start-up kept the stderr of then, past train.log's copy."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logger = logging.getLogger("dfpipe.test")
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    try:
        (tmp_path / "run").mkdir()
        with progress.tee(tmp_path / "run" / "train.log"):
            logger.warning("backbone x is randomly initialised")
    finally:
        logger.removeHandler(handler)
    assert (tmp_path / "run" / "train.log").read_text() == "WARNING: backbone x is randomly initialised\n"
    assert sys.stderr.getvalue() == "WARNING: backbone x is randomly initialised\n"
