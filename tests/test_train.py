"""Training on a tiny synthetic workspace whose fakes carry a bright blob on the face: learnable in a few epochs.

Crops are 64/32 px instead of 224/112 (the network accepts any size) to keep each epoch to seconds on a shared CPU.
One deterministic run (module fixture) serves the learning, metrics and checkpoint tests and is the reference the
kill-and-resume run must reproduce exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torchvision.io import write_jpeg
from torchvision.transforms.v2 import functional as TF

from conftest import dfpipe
from dfpipe.manifests.errors import InputError
from dfpipe.manifests.table import read_table, write_table
from dfpipe.manifests.units import Journal, Record
from dfpipe.manifests.workspace import Shard, Workspace, WorkspaceError
from dfpipe.models.backbones import build_backbone
from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import load_config
from dfpipe.stages import align_units, extract
from dfpipe.stages import pairs as pairs_mod
from dfpipe.stages import checkpoint as checkpoint_mod
from dfpipe.stages import train as train_mod
from dfpipe.stages.aggregate import RULE_KEYS, RULES, video_score
from dfpipe.stages.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from dfpipe.stages.dataset import SequenceDataset, collate_clips
from dfpipe.stages.distributed import Ranks
from dfpipe.stages.evaluate import binary_metrics, fit_threshold
from dfpipe.stages.faces import template_points
from dfpipe.stages.inference import amp_dtype
from dfpipe.stages.train import (METRIC_COLUMNS, VAL_METRICS, TrainError, batch_inputs, calibrate,
                                 faces_table, make_criterion, make_loaders, make_scheduler, run_train,
                                 train_one_epoch, val_metrics)

TINY = "test_efficientnet"
HQ, LQ = 64, 32
STRIDE = 3
FRAMES = range(0, 12 * STRIDE, STRIDE)                 # 12 sampled frames, one face track
VAL = {"real_06", "real_07", "fake_06", "fake_07"}   # official split: 2 + 2 val videos, 6 + 6 train
EPOCHS = 4
OVERFIT_EPOCHS = 12
TRAIN_OVERRIDES = dict(batch_size=4, workers=0, epochs=EPOCHS, lr_backbone=3e-3, lr_head=3e-3, deterministic=True,
                       from_scratch=True, freeze_backbone_epochs=0, freeze_bn=False)


def face_frames(seed: int, fake: bool) -> list[torch.Tensor]:
    """A smooth per-video 'face' drifting a pixel per frame; fakes get a red cast and a bright blob moving with it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HQ, 0:HQ] / HQ
    phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(2, 5, 3)
    blob_y, blob_x = rng.uniform(0.3, 0.7, 2)
    frames = []
    for k in range(len(FRAMES)):
        shift = k / HQ
        image = np.stack([0.5 + 0.3 * np.sin(freq[c] * (xx + shift) + 2 * yy + phase[c]) for c in range(3)])
        if fake:
            blob = np.exp(-(((yy - blob_y) ** 2 + (xx + shift - blob_x) ** 2) / 0.03))
            image = image + 0.8 * blob
            image[0] += 0.3
        frames.append(torch.tensor(np.clip(image, 0, 1) * 255, dtype=torch.uint8))
    return frames


def make_workspace(root, per_class: int, val_per_class: int):
    """``per_class`` real videos and as many fakes, fake_k made from real_k; the last ``val_per_class`` pairs are the
    official val split."""
    (root / "manifests").mkdir(parents=True)
    videos, faces = [], []
    for n in range(2 * per_class):
        label = "fake" if n >= per_class else "real"
        video_id = f"{label}_{n % per_class:02d}"
        split = "val" if n % per_class >= per_class - val_per_class else "train"
        source = f"real_{n % per_class:02d}" if label == "fake" else ""
        videos.append(dict(video_id=video_id, path=f"/videos/{video_id}.mp4", label=label, source_id=source,
                           group="", split=split, dataset="synthetic", method=""))
        for frame, image in zip(FRAMES, face_frames(n, label == "fake")):
            row = dict(video_id=video_id, frame_index=frame, timestamp=frame / 30, status="face", track_id=0)
            for stream, crop in (("hq", image), ("lq", TF.resize(image, [LQ, LQ], antialias=True))):
                rel = f"faces/{video_id}/0_{frame:06d}_{stream}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                write_jpeg(crop, str(root / rel), quality=95)
                row.update({f"{stream}_path": rel, f"{stream}_sha256": f"{video_id}-{frame}-{stream}"})
            faces.append(row)
    write_table(root / "manifests/videos.csv", videos, extract.VIDEO_COLUMNS)
    write_table(root / "manifests/faces.csv", faces, align_units.FACE_COLUMNS)
    (root / "manifests/extract.params.json").write_text(json.dumps({"stride": STRIDE, "jpeg_quality": 95}))
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), per_class=8, val_per_class=2)


def tiny_cfg(**train):
    return load_config(overrides=[{
        "model": {"hq_backbone": TINY, "lq_backbone": TINY, "convlstm_filters": [16, 8], "mlp": [32, 32],
                  "dropout": [0.2], "pretrained_hq": None, "pretrained_lq": None, "bottleneck": None},
        "dataset": {"clip_len": 4, "synthesize": "none", "augment": {"flip": 0.5, **dict.fromkeys(
            ["affine", "color_jitter", "jpeg", "blur", "noise", "cutout"], 0.0)}},
        "train": {**TRAIN_OVERRIDES, **train},
    }])


def metrics(run_dir) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = run_train(workspace, run_dir, tiny_cfg(), resume=False)
    return run_dir, summary


def test_overfits_a_small_subset(tmp_path):
    """2 + 2 training videos, one balanced batch per epoch: the loop must drive training accuracy to 1."""
    root = make_workspace(tmp_path / "ws", per_class=4, val_per_class=2)
    cfg = tiny_cfg(epochs=OVERFIT_EPOCHS)
    cfg.dataset["val_clips_per_track"] = 1
    cfg.model["dropout"] = [0.0]
    run_train(root, tmp_path / "run", cfg, resume=False)
    table = metrics(tmp_path / "run")
    assert table.train_acc.iloc[0] < 0.99 <= table.train_acc.max()
    assert table.train_loss.iloc[-1] < table.train_loss.iloc[0]


def test_learns_what_separates_the_val_videos(trained):
    run_dir, summary = trained
    table = metrics(run_dir)
    assert table.val_auc.max() >= 0.95
    assert table.val_loss.min() < table.val_loss.iloc[0]
    best = table.val_loss.idxmin()
    assert summary["best_epoch"] == table.epoch[best]
    assert summary["best_val_loss"] == pytest.approx(table.val_loss[best])


def test_metrics_csv_has_one_row_per_epoch(trained):
    run_dir, summary = trained
    table = metrics(run_dir)
    assert list(table.columns) == METRIC_COLUMNS
    assert table.epoch.tolist() == list(range(1, EPOCHS + 1)) and summary["epochs_run"] == EPOCHS
    assert table.lr_backbone.eq(3e-3).all() and table.lr_head.eq(3e-3).all()  # plateau: no reduction yet
    assert table[[c for c in METRIC_COLUMNS if c.startswith("val_")]].notna().all(axis=None)


def test_best_checkpoint_is_plain_data_with_calibration(trained, workspace):
    run_dir, summary = trained
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    assert ckpt["epoch"] == summary["best_epoch"]
    assert ckpt["format"] == checkpoint_mod.FORMAT and {f.name for f in fields(checkpoint_mod.Trained)} <= ckpt.keys()
    assert ckpt["extract"] == {"stride": STRIDE, "jpeg_quality": 95} and ckpt["clip_len"] == 4
    assert ckpt["model_config"]["hq_backbone"] == TINY and ckpt["align"]["hq_size"] == 224
    pairs = read_table(workspace / pairs_mod.PAIRS, pairs_mod.COLUMNS)
    assert ckpt["pairs_digest"] == pairs_mod.pairs_digest(pairs) and len(pairs) == 8
    assert pairs_mod.split_videos(pairs)["val"] == VAL
    calibration = ckpt["calibration"]
    assert calibration == summary["calibration"]
    assert 0.05 <= calibration["temperature"] <= 20 and 0 < calibration["threshold"] < 1
    assert calibration["aggregate"] in RULES
    assert calibration["rule_params"] == {k: load_config().score[k] for k in RULE_KEYS}  # what the rule was chosen with
    assert load_checkpoint(run_dir / "last.pt")["calibration"] is None  # only best.pt is calibrated
    assert "optimizer" not in ckpt and "optimizer" in load_checkpoint(run_dir / "last.pt")  # only last.pt resumes
    assert json.loads((run_dir / "run.json").read_text())["pairs_digest"] == ckpt["pairs_digest"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == EPOCHS


def test_model_from_checkpoint_reproduces_the_best_val_loss_and_decisions(trained, workspace):
    run_dir, summary = trained
    ckpt = load_checkpoint(run_dir / "best.pt")
    model = model_from_checkpoint(ckpt, "cpu")
    assert not model.training
    cfg = tiny_cfg()
    faces = pd.read_csv(workspace / "manifests/faces.csv")
    val = SequenceDataset(workspace, faces, {v: int(v.startswith("fake")) for v in VAL}, train=False, seed=0,
                          **cfg.dataset)
    batch = collate_clips([val[i] for i in range(len(val))])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # train.amp auto on CPU
        logits = model(batch["hq"], batch["lq"]).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]).item()
    assert loss == pytest.approx(summary["best_val_loss"], rel=1e-2)
    calibration = ckpt["calibration"]
    probs = torch.sigmoid(logits / calibration["temperature"]).tolist()
    videos: dict[str, dict[int, list[float]]] = {}
    for video, track, prob in zip(batch["video_id"], batch["track_id"].tolist(), probs):
        videos.setdefault(video, {}).setdefault(track, []).append(prob)
    decided = {v: video_score(tracks, calibration["aggregate"], **calibration["rule_params"])[0]
               >= calibration["threshold"] for v, tracks in videos.items()}
    assert decided == {v: v.startswith("fake") for v in VAL}


def test_a_train_split_without_real_clips_is_explained(workspace):
    faces = faces_table(Workspace(workspace))
    videos = sorted(set(faces.video_id[faces.status == "face"]))
    labels = {"train": {v: 1 for v in videos if v.startswith("fake") and v not in VAL},
              "val": {v: int(v.startswith("fake")) for v in VAL}}
    with pytest.raises(TrainError, match=r"training_pairs.csv: the train split has no real clip to balance \(0 "
                                         r"real video\(s\) in it.*dataset.balanced=false"):
        make_loaders(workspace, faces, labels, {}, tiny_cfg(), Ranks(0, 1, torch.device("cpu")), 1.3)


def test_a_val_split_with_one_class_is_refused(workspace):
    """Validation with reals only picks the epoch that leans most to 'real' and fits calibration to nothing."""
    faces = faces_table(Workspace(workspace))
    videos = sorted(set(faces.video_id[faces.status == "face"]))
    labels = {"train": {v: int(v.startswith("fake")) for v in videos if v not in VAL},
              "val": {v: 0 for v in VAL if v.startswith("real")}}
    with pytest.raises(TrainError, match=r"training_pairs.csv: the val split has no fake clip \(0 fake video\(s\) in "
                                         r"it\): early stopping, calibration and the threshold need both classes"):
        make_loaders(workspace, faces, labels, {}, tiny_cfg(), Ranks(0, 1, torch.device("cpu")), 1.3)


def test_new_split_settings_draw_the_splits_anew(tmp_path, capsys):
    """The previous manifest outranks the hash (stable splits as data grows), but not a new seed or fraction."""
    (tmp_path / "manifests").mkdir()
    ws = Workspace(tmp_path)
    videos = pd.DataFrame([dict(video_id=f"{label}_{k:02d}", label=label, group="", split="", dataset="d",
                                method="", source_id=f"real_{k:02d}" if label == "fake" else "")
                           for k in range(30) for label in ("real", "fake")])
    faces = pd.DataFrame(columns=["video_id", "frame_index", "status", "track_id", "hq_sha256", "lq_sha256"])
    cfg = dict(load_config().pairs)
    first = train_mod.update_pairs(ws, videos, faces, cfg)
    grown = pd.concat([videos, videos.assign(video_id=videos.video_id + "_b", source_id=videos.source_id + "_b")
                      .replace({"source_id": {"_b": ""}})])
    again = train_mod.update_pairs(ws, grown, faces, cfg)
    assert again.set_index(["real_id", "fake_id"]).split.loc[first.set_index(["real_id", "fake_id"]).index].tolist() \
        == first.split.tolist()
    assert "drawn anew" not in capsys.readouterr().err
    redrawn = train_mod.update_pairs(ws, videos, faces, {**cfg, "seed": 1, "test_fraction": 0.2})
    assert (redrawn.split == "test").any()
    assert "note: pairs.seed 0 -> 1, pairs.test_fraction 0.0 -> 0.2: splits drawn anew" in capsys.readouterr().err
    fresh = pairs_mod.build_training_pairs(videos, faces, None, **{**cfg, "seed": 1, "test_fraction": 0.2})
    assert redrawn.equals(fresh)
    (tmp_path / "manifests" / "training_pairs.json").write_text("{")
    with pytest.raises(TrainError, match=r"training_pairs.json: unreadable \(JSONDecodeError\); delete it"):
        train_mod.update_pairs(ws, videos, faces, cfg)


def test_align_cannot_rewrite_crops_while_training_reads_them(workspace, tmp_path, monkeypatch):
    seen = []

    def loaders(*args, **kw):  # training has started: an align run now, sharded or not, must be refused
        ws = Workspace(workspace)
        try:
            ws.refuse_if_read("align")
            seen.append("align may run")
        except WorkspaceError as e:
            seen.append(str(e))
        with ws.lock("align"):  # while journal merges (another train's) and verify still can
            pass
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "make_loaders", loaders)
    with pytest.raises(KeyboardInterrupt):
        run_train(workspace, tmp_path / "run", tiny_cfg(), resume=False)
    assert len(seen) == 1 and "another dfpipe command is reading the align outputs" in seen[0]
    Workspace(workspace).refuse_if_read("align")  # free again once training ends


def test_calibration_is_fitted_on_the_clips_score_video_cuts(workspace, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train_mod, "calibrate", lambda pred, score_cfg: seen.append(pred) or calibrate(pred, score_cfg))
    cfg = tiny_cfg(epochs=1, steps_per_epoch=1)
    run_train(workspace, tmp_path / "run", cfg, resume=False)
    faces = faces_table(Workspace(workspace))
    val = {v: int(v.startswith("fake")) for v in VAL}
    scoring = SequenceDataset(workspace, faces, val, train=False, seed=0,
                              **{**cfg.dataset, "scoring_every": 1, "short_tracks": "pad"})
    expected = sorted((scoring.segments[i].video_id, scoring.segments[i].track_id, scoring.segments[i].frames[start])
                      for i, start in scoring.clips)
    assert sorted(zip(seen[0].video_id, seen[0].track_id, seen[0].start)) == expected
    evenly = SequenceDataset(workspace, faces, val, train=False, seed=0, **cfg.dataset)
    assert len(expected) != len(evenly)  # not the per-epoch validation clips


def test_a_diverged_val_epoch_gives_nan_metrics_not_an_error():
    ok = val_metrics(pd.DataFrame({"logit": [-2.0, 1.0, -1.0, 0.5], "label": [0, 1, 0, 1]}))
    assert ok["auc"] == 1.0 and ok["loss"] < 0.5
    diverged = val_metrics(pd.DataFrame({"logit": [math.nan, 1.0, -1.0, 0.5], "label": [0, 1, 0, 1]}))
    assert set(diverged) == set(VAL_METRICS) and all(math.isnan(v) for v in diverged.values())
    assert not diverged["loss"] < math.inf  # early stopping: not an improvement


def test_the_val_loss_weighs_both_classes_alike():
    """One real clip, four fakes: a real called fake must cost as much as four fakes called real."""
    pred = pd.DataFrame({"logit": [2.0, 3.0, 3.0, 3.0, 3.0], "label": [0, 1, 1, 1, 1]})
    real_loss, fake_loss = math.log1p(math.exp(2.0)), math.log1p(math.exp(-3.0))
    assert val_metrics(pred)["loss"] == pytest.approx((real_loss + fake_loss) / 2)
    assert val_metrics(pred.iloc[1:])["loss"] == pytest.approx(fake_loss)  # one class: its mean


def test_the_threshold_is_fitted_on_the_video_scores_it_is_applied_to():
    """Three tracks of four clips per video, scored by the max over tracks: video scores sit above their clips',
    so a threshold fitted on clips calls real videos fake."""
    rng = np.random.default_rng(0)
    rows = [{"video_id": f"v{v:03d}", "track_id": t, "start": c, "label": v % 2,
             "logit": rng.normal(0.8 if v % 2 else -0.8, 1.5)} for v in range(200) for t in range(3) for c in range(4)]
    pred = pd.DataFrame(rows)
    cal = calibrate(pred, load_config().score)
    probs = torch.sigmoid(torch.tensor(pred.logit.to_numpy()) / cal["temperature"]).numpy()
    scores = [video_score({t: probs[g.index].tolist() for t, g in clips.groupby("track_id")}, cal["aggregate"],
                          **cal["rule_params"])[0] for _, clips in pred.groupby("video_id")]
    labels = pred.groupby("video_id").label.first().to_numpy()

    def balanced(threshold):
        return binary_metrics(labels, scores, threshold=threshold)["balanced_accuracy"]
    assert cal["threshold"] == fit_threshold(labels, scores)
    assert balanced(cal["threshold"]) > balanced(fit_threshold(pred.label, probs)) + 0.05


def test_a_run_killed_before_writing_the_best_epochs_best_pt_resumes_with_it(workspace, tmp_path):
    run_train(workspace, tmp_path, tiny_cfg(epochs=1), resume=False)  # epoch 1 is the best so far
    last = load_checkpoint(tmp_path / "last.pt")
    (tmp_path / "best.pt").unlink()  # killed after last.pt was written
    summary = run_train(workspace, tmp_path, tiny_cfg(epochs=1), resume=True)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == summary["best_epoch"] == 1 and "optimizer" not in best
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert best["calibration"] == summary["calibration"]


def test_killed_and_resumed_run_reproduces_the_uninterrupted_metrics(trained, workspace, tmp_path):
    run_dir, _ = trained
    run_train(workspace, tmp_path, tiny_cfg(epochs=2), resume=False)
    assert len(metrics(tmp_path)) == 2
    run_train(workspace, tmp_path, tiny_cfg(), resume=True)
    for name in ("metrics.csv", "last.pt", "best.pt"):  # the same bytes, as for the stages
        assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert len(json.loads((tmp_path / "run.json").read_text())["resumed"]) == 1


def test_the_same_command_again_completes_a_killed_run_and_then_does_nothing(trained, workspace, tmp_path,
                                                                           monkeypatch):
    """Like every stage: the rerun of an interrupted `train` continues it (same bytes as the uninterrupted run),
    a rerun of a finished one leaves it alone, and one with other settings is refused."""
    run_dir, summary = trained
    saves = []

    def killed_after_epoch_1(path, state):
        save_checkpoint(path, state)
        saves.append(path.name)
        if saves == ["last.pt", "best.pt"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_train(workspace, tmp_path, tiny_cfg(), resume=False)
    monkeypatch.undo()
    assert len(metrics(tmp_path)) == 1
    again = run_train(workspace, tmp_path, tiny_cfg(), resume=False)
    for name in ("metrics.csv", "last.pt", "best.pt"):
        assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert again["best_epoch"] == summary["best_epoch"] and again["calibration"] == summary["calibration"]
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert run_train(workspace, tmp_path, tiny_cfg(), resume=False) == again  # finished: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    with pytest.raises(TrainError, match=r"other settings \(train\.lr_head .*--resume"):
        run_train(workspace, tmp_path, tiny_cfg(lr_head=0.5), resume=False)
    with pytest.raises(TrainError, match=r"other settings \(train\.epochs \(run: 4, now: 5\)\)"):
        run_train(workspace, tmp_path, tiny_cfg(epochs=5), resume=False)  # more epochs: that is --resume
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


def test_a_run_from_before_mixing_and_peft_existed_is_still_found_finished(trained, workspace, tmp_path):
    """Its config lacks the settings added since, which were off for it, as their defaults are."""
    run_dir, summary = trained
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("randaugment", "randaugment_ops", "randaugment_magnitude", "mixup", "mixup_alpha", "cutmix",
                "cutmix_alpha"):
        del last["config"]["dataset"]["augment"][key]
    del last["config"]["train"]["peft"], last["config"]["train"]["peft_rank"]
    save_checkpoint(tmp_path / "last.pt", last)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert run_train(workspace, tmp_path, tiny_cfg(), resume=False)["calibration"] == summary["calibration"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps   # nothing to do
    cfg = tiny_cfg()
    cfg.dataset.augment["mixup"] = 0.5
    with pytest.raises(TrainError, match=r"other settings \(dataset\.augment\.mixup \(run: 0\.0, now: 0\.5\)\)"):
        run_train(workspace, tmp_path, cfg, resume=False)


def test_resume_refuses_changed_training_settings_and_the_cli_resumes_with_the_runs_config(trained, workspace,
                                                                                          tmp_path):
    run_train(workspace, tmp_path, tiny_cfg(epochs=1), resume=False)
    with pytest.raises(TrainError, match=r"these differ: dataset\.clip_len \(run: 4, now: 3\); "
                                         r"train\.lr_head \(run: .*, now: 0\.5\)"):
        run_train(workspace, tmp_path, load_config(overrides=[
            tiny_cfg(epochs=2).to_dict(), {"dataset": {"clip_len": 3}, "train": {"lr_head": 0.5}}]), resume=True)
    assert len(metrics(tmp_path)) == 1  # nothing was trained or rewritten
    # Without --config, `--resume` takes the run's own config.yaml (its tiny model, not the defaults' B4).
    proc = dfpipe("train", "--work", workspace, "--run", tmp_path, "--resume", "--epochs", 2)
    assert len(metrics(tmp_path)) == 2 and "best_epoch" in proc.stdout
    proc = dfpipe("train", "--work", workspace, "--run", tmp_path, "--resume", "--epochs", 2)
    assert "no epoch left to run (finished at epoch 2)" in proc.stdout and len(metrics(tmp_path)) == 2


def test_refuses_to_overwrite_a_run_resume_nothing_or_train_without_manifests(trained, workspace, tmp_path):
    run_dir, _ = trained
    with pytest.raises(TrainError, match="already holds a run with other settings"):
        run_train(workspace, run_dir, tiny_cfg(seed=1), resume=False)
    with pytest.raises(TrainError, match="nothing to resume"):
        run_train(workspace, tmp_path, tiny_cfg(), resume=True)
    with pytest.raises(TrainError, match=r"extract\.params\.json: not found \(run dfpipe extract first\)"):
        run_train(tmp_path / "empty", tmp_path / "run", tiny_cfg(), resume=False)


def test_early_stopping_ends_a_run_whose_val_loss_stalls(workspace, tmp_path):
    # Frozen backbones (BatchNorm statistics too) and zero learning rates: the val loss can never improve.
    cfg = tiny_cfg(epochs=10, early_stop_patience=2, lr_backbone=0.0, lr_head=0.0, freeze_backbone_epochs=10,
                   steps_per_epoch=1, deterministic=False)
    summary = run_train(workspace, tmp_path, cfg, resume=False)
    table = metrics(tmp_path)
    assert table.epoch.tolist() == [1, 2, 3]
    assert table.val_loss.nunique() == 1
    assert summary["stopped_early"] and summary["best_epoch"] == 1


def test_frozen_backbone_phase_trains_only_the_head(workspace, tmp_path):
    run_train(workspace, tmp_path, tiny_cfg(epochs=1, freeze_backbone_epochs=1, steps_per_epoch=1), resume=False)
    trained = load_checkpoint(tmp_path / "last.pt")["model"]
    torch.manual_seed(0)  # train.seed: the run's initial weights
    initial = DualStreamNet.from_config(tiny_cfg().model).state_dict()
    backbone = [k for k in initial if ".backbone." in k]
    assert backbone and all(torch.equal(initial[k], trained[k]) for k in backbone)  # BatchNorm statistics too
    assert not all(torch.equal(initial[k], trained[k]) for k in initial if k not in backbone)


def test_alternative_options_run_end_to_end(workspace, tmp_path):
    """Worker processes, paired clips, plain shuffling, accumulation, one-cycle schedule, focal loss, fp32, MixUp,
    CutMix and RandAugment."""
    cfg = tiny_cfg(epochs=2, workers=1, accumulate=2, scheduler="onecycle", loss="focal", amp="off",
                   lr_backbone=1e-3, deterministic=False)
    cfg.dataset.update(paired=True, balanced=False)
    cfg.dataset.augment.update(mixup=0.4, cutmix=0.4, randaugment=0.5)
    summary = run_train(workspace, tmp_path, cfg, resume=False)
    table = metrics(tmp_path)
    assert table.epoch.tolist() == [1, 2] and table.notna().all(axis=None)
    assert table.lr_head[0] != table.lr_head[1] and table.lr_backbone[0] < table.lr_head[0]
    assert summary["calibration"]["aggregate"] in RULES


def test_kept_batchnorm_statistics_stay_while_the_backbones_train(workspace, tmp_path):
    """train.freeze_bn: the backbones' weights move, their BatchNorm running statistics do not."""
    run_train(workspace, tmp_path, tiny_cfg(epochs=1, steps_per_epoch=2, freeze_bn=True), resume=False)
    trained = load_checkpoint(tmp_path / "last.pt")["model"]
    torch.manual_seed(0)
    initial = DualStreamNet.from_config(tiny_cfg().model).state_dict()
    stats = [k for k in initial if ".backbone." in k and k.endswith(("running_mean", "running_var"))]
    weights = [k for k in initial if ".backbone." in k and k.endswith("weight")]
    assert stats and all(torch.equal(initial[k], trained[k]) for k in stats)
    assert not all(torch.equal(initial[k], trained[k]) for k in weights)


def with_geometry(root):
    """Landmarks and boxes for every face, as align writes them (self-blending draws its mask from them)."""
    faces = read_table(root / "manifests/faces.csv", align_units.FACE_COLUMNS)
    points = template_points(HQ, 1.3)  # frame == crop: the landmarks sit on the template
    faces["landmarks"] = " ".join(f"{v:.2f}" for v in points.ravel())
    faces["x1"], faces["y1"], faces["x2"], faces["y2"] = 0.28 * HQ, 0.22 * HQ, 0.72 * HQ, 0.8 * HQ
    write_table(root / "manifests/faces.csv", faces, align_units.FACE_COLUMNS)
    return root


def test_the_default_recipe_starts_from_the_shipped_imagenet_weights(tmp_path):
    """`dfpipe train` with pipeline/defaults.yaml (only the budget cut to one step): both backbones load the
    ImageNet weights the Lite packages installed, with no file supplied; after the head-first epoch they are still
    exactly those weights (BatchNorm statistics included), and the run records where they came from."""
    root = with_geometry(make_workspace(tmp_path / "ws", per_class=4, val_per_class=1))
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump({
        "dataset": {"clip_len": 4}, "train": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "workers": 0}}))
    proc = dfpipe("train", "--work", root, "--run", tmp_path / "run", "--config", tmp_path / "budget.yaml")
    for stream, name in (("HQ", "tf_efficientnet_lite2"), ("LQ", "tf_efficientnet_lite0")):
        assert f"{stream} backbone {name} starts from imagenet:" in proc.stdout + proc.stderr
    info = json.loads((tmp_path / "run/run.json").read_text())
    hq = info["initial_weights"]["hq"]
    assert hq.startswith("imagenet:") and "efficientnet-lite2" in hq
    best = load_checkpoint(tmp_path / "run/best.pt")["model"]
    for stream, name in (("hq", "tf_efficientnet_lite2"), ("lq", "tf_efficientnet_lite0")):
        shipped = build_backbone(name, pretrained="imagenet").state_dict()
        assert all(torch.equal(best[f"{stream}.backbone.{k}"], v) for k, v in shipped.items())
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["dataset"]["synthesize"] == "sbi"


def test_reals_alone_train_a_detector_of_self_blended_fakes(tmp_path):
    """dataset.synthesize: sbi on a workspace of real videos only: the fakes are self-blended from the training
    reals, validation and calibration score self-blended fakes of the val reals as videos of their own, and the
    run records that its backbones started from random weights."""
    root = with_geometry(make_workspace(tmp_path / "ws", per_class=6, val_per_class=2))
    faces = read_table(root / "manifests/faces.csv", align_units.FACE_COLUMNS)
    write_table(root / "manifests/faces.csv", faces[faces.video_id.str.startswith("real")], align_units.FACE_COLUMNS)
    videos = read_table(root / "manifests/videos.csv", extract.VIDEO_COLUMNS)
    write_table(root / "manifests/videos.csv", videos[videos.label == "real"], extract.VIDEO_COLUMNS)
    cfg = tiny_cfg(epochs=2)
    cfg.dataset["synthesize"] = "sbi"
    summary = run_train(root, tmp_path / "run", cfg, resume=False)
    table = metrics(tmp_path / "run")
    assert table.val_auc.notna().all() and summary["calibration"]["threshold"] is not None
    assert summary["initial_weights"] == "hq random, lq random"
    info = json.loads((tmp_path / "run/run.json").read_text())
    assert info["initial_weights"] == {"hq": "random", "lq": "random"}


def test_paired_source_crops_join_the_batch_as_reals():
    batch = {"hq": torch.ones(2, 4, 3, 8, 8), "lq": torch.ones(2, 4, 3, 4, 4), "label": torch.tensor([1.0, 0.0]),
             "pair_index": torch.tensor([0]), "hq_real": torch.zeros(1, 4, 3, 8, 8),
             "lq_real": torch.zeros(1, 4, 3, 4, 4)}
    hq, lq, y = batch_inputs(batch, torch.device("cpu"))
    assert hq.shape == (3, 4, 3, 8, 8) and lq.shape == (3, 4, 3, 4, 4)
    assert y.tolist() == [1.0, 0.0, 0.0] and hq[2].eq(0).all() and hq[:2].eq(1).all()


def test_train_reads_the_faces_an_unmerged_align_journal_holds(workspace, tmp_path):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(workspace, ws.root)
    faces = read_table(ws.manifest("faces.csv"), align_units.FACE_COLUMNS)
    late = "real_03"  # recorded by a shard of align whose journal nobody has merged yet
    frames = faces.groupby("video_id").frame_index.nunique()
    done = [{"video_id": v, "status": "done", "fingerprint": "f", "frames": frames[v]}
            for v in sorted(set(faces.video_id) - {late})]
    write_table(ws.manifest("align.csv"), done, align_units.SPEC.unit_columns)
    write_table(ws.manifest("faces.csv"), faces[faces.video_id != late].to_dict("records"), align_units.FACE_COLUMNS)
    late_rows = faces[faces.video_id == late].to_dict("records")
    Journal(ws, align_units.SPEC, Shard(1, 2)).append(late, Record("done", "f", "", {"frames": frames[late]},
                                                                   rows=late_rows))
    got = faces_table(ws)
    assert sorted(set(got.video_id)) == sorted(set(faces.video_id)) and len(got) == len(faces)


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "last.pt"
    for data, reason in ((b"PK\x03\x04 the rest cut off", "truncated or damaged checkpoint .the zip archive"),
                         (b"path,label\n", "not a checkpoint .torch.save writes a zip archive"),
                         (b"", "not a checkpoint .torch.save writes a zip archive")):
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=reason) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with zipfile.ZipFile(path, "w") as z:  # a zip, but not torch's
        z.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"model": {}, "model_config": {}, "format": checkpoint_mod.FORMAT + 1}, path)
    with pytest.raises(CheckpointError, match=rf"last.pt: written by a newer dfpipe \(checkpoint format "
                                              rf"{checkpoint_mod.FORMAT + 1}; this one reads up to "
                                              rf"{checkpoint_mod.FORMAT}\): update dfpipe$"):
        load_checkpoint(path)


def test_losses_on_known_logits():
    z, y = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    t = load_config().train
    bce = make_criterion(**{**t, "loss": "bce"})(z, y).item()
    assert bce == pytest.approx(np.mean([math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0))]))
    smooth = make_criterion(**{**t, "loss": "smooth", "label_smoothing": 0.2})(z, y).item()
    assert smooth == pytest.approx(np.mean([math.log1p(math.exp(-2.0)) + 0.1 * 2.0,
                                            math.log1p(math.exp(-1.0)) + 0.1 * 1.0]))
    focal = make_criterion(**{**t, "loss": "focal", "focal_gamma": 2.0})(z, y).item()
    p = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0))   # probability of the true class
    assert focal == pytest.approx(np.mean([(1 - q) ** 2 * -math.log(q) for q in p]))


@pytest.mark.parametrize("loss", ["bce", "smooth", "focal"])
def test_losses_on_mixed_targets_are_smallest_at_the_target(loss):
    """A mixed clip's target is its share of fake pixels: the loss must pull the probability to it (for `smooth`,
    to the smoothed target), not past it."""
    t = {**load_config().train, "loss": loss, "label_smoothing": 0.2}
    y = torch.tensor([0.3, 0.5, 0.85])
    aim = y * 0.8 + 0.1 if loss == "smooth" else y
    z = torch.logit(aim).requires_grad_()
    make_criterion(**t)(z, y).backward()
    assert torch.allclose(z.grad, torch.zeros(3), atol=1e-6)
    for step in (-0.2, 0.2):                     # and it is a minimum
        assert make_criterion(**t)(z.detach() + step, y) > make_criterion(**t)(z.detach(), y)


def lr_curve(scheduler_name: str, epochs: int = 4, updates: int = 5) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    t = {**load_config().train, "scheduler": scheduler_name, "epochs": epochs, "warmup_epochs": 1}
    scheduler, per_update = make_scheduler(optimizer, updates, **t)
    assert per_update
    lrs = []
    for _ in range(epochs * updates):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_warms_up_for_warmup_epochs_then_decays_to_zero():
    lrs = lr_curve("cosine")
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01


def test_onecycle_rises_to_the_configured_lr_then_falls():
    lrs = lr_curve("onecycle")
    peak = int(np.argmax(lrs))
    assert lrs[peak] == pytest.approx(1.0, rel=1e-3) and 0 < peak < len(lrs) - 1
    assert lrs[0] < 0.1 and lrs[-1] < 0.01


def test_two_process_ddp_run_writes_one_checkpoint_set(workspace, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**tiny_cfg(epochs=1, steps_per_epoch=1).to_dict()}))
    driver = tmp_path / "driver.py"
    driver.write_text("import sys\nfrom dfpipe.pipeline.config import load_config\n"
                      "from dfpipe.stages.train import run_train\n"
                      "run_train(sys.argv[1], sys.argv[2], load_config(sys.argv[3]), resume=False)\n")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), str(workspace), str(run_dir), str(config)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.csv",
                                                         "run.json", "training_pairs.csv"]
    assert len(metrics(run_dir)) == 1
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert done.stdout.count("epoch 1/1") == 1  # rank 0 alone reports
    assert load_checkpoint(run_dir / "best.pt")["calibration"]["aggregate"] in RULES


DDP_UNREADABLE_BATCH = """
import datetime, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from dfpipe.stages.distributed import Ranks, sync_buffers
from dfpipe.stages.train import train_one_epoch
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=45))
rank = dist.get_rank()
torch.manual_seed(0)
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 1)
        self.register_buffer("seen", torch.zeros(()))  # moves with each rank's own batches, like BatchNorm's stats
    def forward(self, hq, lq):
        if self.training:
            self.seen += hq.sum()
        return self.fc(hq.mean(dim=(1, 3, 4)) + lq.mean(dim=(1, 3, 4))).squeeze(1)
def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"hq": torch.rand(2, 2, 3, 4, 4, generator=g), "lq": torch.rand(2, 2, 3, 2, 2, generator=g),
            "label": torch.tensor([0.0, 1.0])}
net = DistributedDataParallel(Toy())
loader = [batch(rank), batch(10) if rank == 0 else None]  # rank 1 could read no clip of its second batch
optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
stats = train_one_epoch(net, loader, optimizer, None, torch.amp.GradScaler("cpu", enabled=False),
                        torch.nn.BCEWithLogitsLoss(), ctx=Ranks(rank, 2, torch.device("cpu")), dtype=None, steps=2,
                        accumulate=1, grad_clip=None, desc="t", progress=False)
def same(tensor):
    both = [torch.zeros_like(tensor) for _ in range(2)]
    dist.all_gather(both, tensor)
    return torch.equal(*both)
weights = same(torch.cat([p.detach().flatten() for p in net.parameters()]))
drifted = not same(net.module.seen.clone())
sync_buffers(net.module, Ranks(rank, 2, torch.device("cpu")))
if rank == 0:
    print("clips", stats["clips"], "same weights", weights, flush=True)
    print("buffers drifted", drifted, flush=True)
synced = same(net.module.seen.clone())
if rank == 0:
    print("buffers synced", synced, flush=True)
# a new epoch whose first batch rank 1 cannot read: no earlier batch to stand in, so both ranks drop that update
loader = [batch(20) if rank == 0 else None, batch(21 + rank)]
stats = train_one_epoch(net, loader, optimizer, None, torch.amp.GradScaler("cpu", enabled=False),
                        torch.nn.BCEWithLogitsLoss(), ctx=Ranks(rank, 2, torch.device("cpu")), dtype=None, steps=2,
                        accumulate=1, grad_clip=None, desc="t", progress=False)
weights = same(torch.cat([p.detach().flatten() for p in net.parameters()]))
if rank == 0:
    print("first batch unreadable: clips", stats["clips"], "same weights", weights, flush=True)
del net, optimizer  # as in run_train: the DDP model goes before its process group
dist.barrier()
dist.destroy_process_group()
"""


def test_ddp_rank_without_a_readable_batch_still_joins_the_update(tmp_path):
    """Without it the other rank waits in the gradient all-reduce (here until the 45 s timeout; in a real run
    forever) and the ranks' weights part ways."""
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_UNREADABLE_BATCH)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "clips 6 same weights True" in done.stdout  # the stand-in batch adds no clip to the stats
    # validation scores every rank's share with rank 0's BatchNorm statistics, those of the saved model
    assert "buffers drifted True" in done.stdout and "buffers synced True" in done.stdout
    assert "first batch unreadable: clips 4 same weights True" in done.stdout  # the dropped update counts no clip


def test_the_epochs_last_short_accumulation_group_is_not_scaled_down():
    """Three batches, two per update: the third is an update of its own, with its full gradient."""
    torch.manual_seed(0)
    batches = [{"hq": torch.rand(2, 2, 3, 4, 4), "lq": torch.rand(2, 2, 3, 2, 2), "label": torch.tensor([0.0, 1.0])}
               for _ in range(3)]

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 1)

        def forward(self, hq, lq):
            return self.fc(hq.mean(dim=(1, 3, 4)) + lq.mean(dim=(1, 3, 4))).squeeze(1)
    net, criterion = Toy(), torch.nn.BCEWithLogitsLoss()
    manual = Toy()
    manual.load_state_dict(net.state_dict())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    train_one_epoch(net, batches, optimizer, None, torch.amp.GradScaler("cpu", enabled=False), criterion,
                    ctx=Ranks(0, 1, torch.device("cpu")), dtype=None, steps=3, accumulate=2, grad_clip=None, desc="t",
                    progress=False)
    reference = torch.optim.SGD(manual.parameters(), lr=0.5)
    for group in (batches[:2], batches[2:]):
        reference.zero_grad()
        for b in group:
            (criterion(manual(b["hq"], b["lq"]), b["label"]) / len(group)).backward()
        reference.step()
    for mine, theirs in zip(net.parameters(), manual.parameters()):
        torch.testing.assert_close(mine, theirs)


def test_amp_auto_uses_bf16_only_on_cpus_that_have_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("off", cpu) is None and amp_dtype("off", cuda) is None
    assert amp_dtype("auto", cuda) == torch.float16
    for avx512_bf16, amx, want in ((True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert amp_dtype("auto", cpu) == want
    with pytest.raises(InputError, match="neither auto nor off"):
        amp_dtype("fp8", cpu)


def test_cuda_rng_state_is_this_ranks_gpu_only(monkeypatch):
    """Saving every visible GPU's state made a resume on a machine with fewer GPUs fail (no GPU here: the CUDA RNG
    calls are stood in for)."""
    saved, restored = {}, []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved.setdefault(device, torch.tensor([7])))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.item(), device)))
    state = checkpoint_mod.rng_state(torch.device("cuda", 3))
    assert state["cuda"] == [torch.tensor([7])] and list(saved) == [torch.device("cuda", 3)]
    checkpoint_mod.set_rng_state(state, torch.device("cuda", 0))  # resumed on a one-GPU machine
    older = {**state, "cuda": [torch.tensor([k]) for k in range(8)]}  # last.pt files before: every GPU's
    checkpoint_mod.set_rng_state(older, torch.device("cuda", 5))
    assert restored == [(7, torch.device("cuda", 0)), (5, torch.device("cuda", 5))]
    assert checkpoint_mod.rng_state(torch.device("cpu"))["cuda"] == []
