"""The README demo end to end, as a user runs it: `dfpipe demo-data` -> `extract` -> `align` -> `train --config
scripts/demo.yaml`, each in its own process. The demo promises a detector trained in minutes on a laptop CPU that
really separates the demo's fakes; this is the check that the demo config keeps that promise."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from conftest import REPO, dfpipe

DEMO_CONFIG = REPO / "scripts" / "demo.yaml"
MIN_VAL_PAIRS = 4  # an AUC over fewer val videos says little: a lucky ordering of 4 clips scores 1.0


@pytest.mark.slow
def test_demo_config_trains_a_detector_that_separates_the_demo_fakes(tmp_path):
    videos, ws, run = tmp_path / "videos", tmp_path / "ws", tmp_path / "run"
    dfpipe("demo-data", videos)
    dfpipe("extract", videos, "--work", ws, "--quiet")
    dfpipe("align", "--work", ws, "--quiet")
    out = dfpipe("train", "--work", ws, "--run", run, "--config", DEMO_CONFIG, "--quiet")
    assert "epoch 1/" in out.stdout and "batch" not in out.stderr  # the epoch lines stay, the bars go

    pairs = pd.read_csv(ws / "manifests" / "training_pairs.csv")
    assert (pairs.split == "val").sum() >= MIN_VAL_PAIRS
    metrics = pd.read_csv(run / "metrics.csv")
    best = metrics.loc[metrics.val_loss.idxmin()]
    assert best.val_auc >= 0.95, metrics[["epoch", "train_loss", "val_loss", "val_auc"]].to_string()
    # A separating ranking with chance-level probabilities would be a fluke of the val set, not a trained model.
    assert best.val_loss < 0.5 * math.log(2)
    assert metrics.train_loss.iloc[-1] < 0.5 * metrics.train_loss.iloc[0]

    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == best.epoch
    assert ckpt["model_config"]["hq_backbone"] == "test_efficientnet"
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert math.isfinite(ckpt["calibration"]["temperature"]) and 0 < ckpt["calibration"]["threshold"] < 1
