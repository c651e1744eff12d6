"""`dfpipe runs` over real tiny training runs (test_train's workspace): the table, the diff, the registry and
`score-video --checkpoint best`."""
from __future__ import annotations

import hashlib
import json
import shutil

import pandas as pd
import pytest
import torch

from conftest import dfpipe
from dfpipe.manifests.errors import InputError
from dfpipe.manifests.table import read_table
from dfpipe.stages import pairs as pairs_mod
from dfpipe.stages import runs as runs_mod
from dfpipe.stages import train as train_mod
from dfpipe.stages.checkpoint import load_checkpoint
from dfpipe.stages.runs import REGISTRY, differences, list_runs, promote, resolve_checkpoint
from test_train import make_workspace, tiny_cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/a and runs/b finished (b with another head learning rate), runs/c killed before its calibration."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ws = make_workspace(tmp_path_factory.mktemp("ws"), per_class=4, val_per_class=1)
    folder = tmp_path_factory.mktemp("runs")
    train_mod.run_train(ws, folder / "a", tiny_cfg(epochs=2, steps_per_epoch=1), resume=False)
    train_mod.run_train(ws, folder / "b", tiny_cfg(epochs=2, steps_per_epoch=1, lr_head=1e-2), resume=False)

    def killed(*args, **kw):
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(train_mod, "calibrate_best", killed)
        train_mod.run_train(ws, folder / "c", tiny_cfg(epochs=2, steps_per_epoch=1), resume=False)
    torch.set_num_threads(threads)
    return ws, folder


def test_the_table_lists_every_run_with_its_own_metrics(runs):
    ws, folder = runs
    table = list_runs([folder])
    assert sorted(table.run) == [str(folder / name) for name in "abc"]
    digest = pairs_mod.pairs_digest(read_table(ws / pairs_mod.PAIRS, pairs_mod.COLUMNS))
    for row in table.itertuples():
        metrics = pd.read_csv(f"{row.run}/metrics.csv")
        best = metrics.val_loss.idxmin()
        assert (row.best_val_loss, row.val_auc, row.epochs) == (metrics.val_loss[best], metrics.val_auc[best], 2)
        assert row.data == digest and row.backbones == "test_efficientnet + test_efficientnet"
        assert row.date == json.loads((folder / row.run / "run.json").read_text())["started"]
        calibration = load_checkpoint(f"{row.run}/best.pt")["calibration"]
        if row.run.endswith("c"):
            assert row.status == "interrupted" and calibration is None and pd.isna(row.threshold)
        else:
            assert row.status == "finished" and row.threshold == calibration["threshold"]
    assert table.best_val_loss.is_monotonic_increasing
    by_auc = list_runs([folder / "a", folder / "b", folder / "c"], sort="val_auc")
    assert by_auc.val_auc.is_monotonic_decreasing and set(by_auc.run) == set(table.run)
    with pytest.raises(InputError, match="cannot sort by 'speed'"):
        list_runs([folder], sort="speed")


def test_a_run_that_has_epochs_left_is_interrupted(runs, tmp_path):
    _, folder = runs
    shutil.copytree(folder / "a", tmp_path / "a")
    metrics = pd.read_csv(tmp_path / "a/metrics.csv")
    metrics.iloc[:1].to_csv(tmp_path / "a/metrics.csv", index=False)   # killed after its first epoch
    assert list_runs([tmp_path]).status.tolist() == ["interrupted"]


def test_diff_names_exactly_the_settings_two_runs_differ_in(runs):
    _, folder = runs
    assert differences(folder / "a", folder / "b") == ["train.lr_head: 0.003 -> 0.01"]
    assert differences(folder / "a", folder / "c") == []
    with pytest.raises(InputError, match="not a run folder"):
        differences(folder / "a", folder)


def test_the_cli_lists_sorts_and_diffs(runs):
    _, folder = runs
    out = dfpipe("runs", folder, "--sort", "val_auc").stdout.splitlines()
    assert out[0].split() == runs_mod.COLUMNS and len(out) == 4
    assert [line.split()[-1] for line in out[1:]].count("finished") == 2
    assert dfpipe("runs", "--diff", folder / "a", folder / "b").stdout == "train.lr_head: 0.003 -> 0.01\n"
    bad = dfpipe("runs", folder, "--sort", "speed", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: runs: cannot sort by 'speed'")


def test_promote_writes_the_registry_and_checkpoint_best_resolves_to_it(runs, tmp_path, clip_factory):
    _, folder = runs
    registry = folder / REGISTRY
    registry.unlink(missing_ok=True)
    refused = dfpipe("runs", "--promote", folder / "c", check=False)
    assert refused.returncode == 2 and "the run is interrupted" in refused.stderr and not registry.exists()
    assert "a is the best run of data" in dfpipe("runs", "--promote", folder / "a").stdout
    entry = json.loads(registry.read_text())["best"]
    assert [e["run"] for e in entry.values()] == ["a"]
    assert resolve_checkpoint(folder / "best") == folder / "a/best.pt"
    assert "(was a)" in promote(folder / "b")
    assert resolve_checkpoint(folder / "best") == folder / "b/best.pt"
    assert resolve_checkpoint(folder / "a/best.pt") == folder / "a/best.pt"   # a path is a path
    # score-video scores with the promoted run's checkpoint (its digest in the record)
    video = clip_factory("faceless.mp4", n=12)
    out = tmp_path / "scores.csv"
    dfpipe("score-video", video, "--checkpoint", folder / "best", "--out", out, "--device", "cpu")
    record = json.loads((tmp_path / "scores.jsonl").read_text().splitlines()[0])
    assert record["model_digest"] == hashlib.sha256((folder / "b/best.pt").read_bytes()).hexdigest()[:16]


def test_checkpoint_best_without_a_single_promoted_run_is_one_line(runs, tmp_path):
    _, folder = runs
    missing = dfpipe("score-video", "x.mp4", "--checkpoint", tmp_path / "best", check=False, cwd=tmp_path)
    assert missing.returncode == 2 and f"no {REGISTRY} in {tmp_path}" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1
    other = tmp_path / "runs"
    shutil.copytree(folder / "a", other / "a")
    shutil.copytree(folder / "b", other / "b")
    info = json.loads((other / "b/run.json").read_text())
    (other / "b/run.json").write_text(json.dumps({**info, "pairs_digest": "0" * 64}))   # another dataset
    promote(other / "a")
    promote(other / "b")
    assert len(json.loads((other / REGISTRY).read_text())["best"]) == 2
    with pytest.raises(InputError, match=r"2 datasets have a promoted run, so .* names none of them") as e:
        resolve_checkpoint(other / "best")
    assert f"{other / 'b/best.pt'} (data {'0' * 12})" in str(e.value)
    assert f"{other / 'a/best.pt'} (data " in str(e.value)


def test_an_unreadable_run_is_skipped_with_a_warning_and_the_others_listed(runs, tmp_path, capsys):
    _, folder = runs
    copy = tmp_path / "runs"
    shutil.copytree(folder, copy)
    (copy / "a" / "config.yaml").unlink()        # killed between run.json and config.yaml
    (copy / "b" / "metrics.csv").write_text("")  # a torn metrics file
    assert list(list_runs([copy]).run) == [str(copy / "c")]
    err = capsys.readouterr().err
    assert f"runs: {copy / 'a'}: skipped, unreadable" in err and f"runs: {copy / 'b'}: skipped, unreadable" in err
