"""The README demo end to end, as a user runs it: `dfpipe demo-data` -> `extract` -> `align` -> `train --config
scripts/demo.yaml`, each in its own process. The demo promises a detector trained in minutes on a laptop CPU that
really separates the demo's fakes; this is the check that the demo config keeps that promise."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, dfpipe
from dfpipe.pipeline.config import load_config
from dfpipe.stages import report
from dfpipe.stages.checkpoint import load_checkpoint, model_from_checkpoint
from dfpipe.stages.demo import mask_path, read_mask
from dfpipe.stages.explain import mass_inside
from dfpipe.stages.faces import FaceDetector
from dfpipe.stages.score import scoring_settings

DEMO_CONFIG = REPO / "scripts" / "demo.yaml"
MIN_VAL_PAIRS = 4  # an AUC over fewer val videos says little: a lucky ordering of 4 clips scores 1.0


@pytest.mark.slow
def test_demo_config_trains_a_detector_that_separates_the_demo_fakes(tmp_path):
    videos, ws, run = tmp_path / "videos", tmp_path / "ws", tmp_path / "run"
    dfpipe("demo-data", videos, "--masks")
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

    # The report of the val split; where the model calls a fake fake, its heatmaps lie on the blend
    scores, pages = tmp_path / "scores.csv", tmp_path / "report"
    dfpipe("score-video", "--work", ws, "--split", "val", "--checkpoint", run / "best.pt", "--out", scores,
           "--report", pages, "--quiet")
    assert (pages / "index.html").is_file() and len(list((pages / "videos").glob("*.html"))) >= 2 * MIN_VAL_PAIRS
    shares = blend_mask_shares(scores, run / "best.pt", videos)
    assert len(shares) >= MIN_VAL_PAIRS, shares  # clips of at least 2 fakes called fake
    inside, area = np.mean(shares, axis=0)
    assert inside > area, shares
    assert sum(i > a for i, a in shares) >= 0.75 * len(shares), shares


def blend_mask_shares(scores: Path, checkpoint: Path, videos: Path) -> list[tuple[float, float]]:
    """(share of the Grad-CAM mass inside the blend mask, the mask's share of the crop) of every clip the report
    shows for each val fake called fake: the mask warped into the crops by the very transforms that cut them."""
    ckpt = load_checkpoint(checkpoint)
    scoring = scoring_settings(ckpt, load_config(), checkpoint)
    model = model_from_checkpoint(ckpt, "cpu").float().eval()
    detector = FaceDetector(**{**scoring.align, "device": "cpu"})
    shares = []
    for row in report.read_scores(scores):
        if row["true_label"] != "fake" or row["label"] != "fake":
            continue
        mask = read_mask(mask_path(videos, int(Path(row["path"]).stem.split("_")[1])))
        for face in report.gather_evidence(row, scoring, detector, model, faces=3, strip_frames=0).faces:
            crops = np.stack([cv2.warpAffine(mask[f], m, face.crops.shape[1:3][::-1])
                              for f, m in zip(face.frames, face.matrices)])
            shares.append((mass_inside(face.explanation.heatmaps, crops), float((crops > 0.5).mean())))
    return shares
