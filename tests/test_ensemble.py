"""Several checkpoints scoring together (`score-video --checkpoint a --checkpoint b`, `dfpipe calibrate`), on
test_score's demo videos and tiny checkpoint."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import test_score
from conftest import dfpipe
from dfpipe.manifests.workspace import Shard
from dfpipe.stages import score as score_mod
from dfpipe.stages import score_store
from dfpipe.stages.detector import Detector
from dfpipe.stages.evaluate import fit_threshold
from dfpipe.stages.score import ScoreError
from test_score import config, jsonl, run

root, checkpoint = test_score.root, test_score.checkpoint   # the same module fixtures, made here too


def score_together(checkpoints, inputs, out, cfg=None):
    return score_store.run_score([str(p) for p in inputs], [str(c) for c in checkpoints], cfg or config(),
                                 out=str(out), labels=None, work=None, split=None, shard=Shard(), progress=False)


@pytest.fixture(scope="module")
def other(checkpoint):
    """The same network under another calibration: other clip probabilities, the same clips."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["calibration"] = {**ckpt["calibration"], "temperature": ckpt["calibration"]["temperature"] * 3,
                           "threshold": 0.4, "aggregate": "max"}
    path = checkpoint.with_name("other.pt")
    torch.save(ckpt, path)
    return path


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The path of every video a FrameReader is opened on."""
    opened = []
    original = score_mod.FrameReader

    def reader(path, **kw):
        opened.append(path)
        return original(path, **kw)
    monkeypatch.setattr(score_mod, "FrameReader", reader)
    return opened


def test_an_ensemble_of_one_model_is_that_model(root, checkpoint, tmp_path):
    run(checkpoint, [root / "data", root / "bad"], tmp_path / "one.csv")
    score_together([checkpoint], [root / "data", root / "bad"], tmp_path / "ensemble.csv")
    single, ensemble = jsonl(tmp_path / "one.jsonl"), jsonl(tmp_path / "ensemble.jsonl")
    assert single.keys() == ensemble.keys()
    for path, row in single.items():
        for key in ("score", "label", "threshold", "status", "clip_probs", "track_scores", "suspicious_frames"):
            assert ensemble[path][key] == row[key], key
        assert ensemble[path]["model_scores"] == ([row["score"]] if row["status"] == "ok" else [])


def test_two_models_score_the_clips_of_one_decoding_each_by_its_own_calibration(root, checkpoint, other, tmp_path,
                                                                                decoded):
    videos = [root / "data"]
    run(checkpoint, videos, tmp_path / "a.csv")
    run(other, videos, tmp_path / "b.csv")
    decoded.clear()
    score_together([checkpoint, other], videos, tmp_path / "ab.csv")
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 4    # each video decoded once
    score_together([checkpoint, other], videos, tmp_path / "median.csv", cfg=config(ensemble="median"))
    a, b, ab, median = (jsonl(tmp_path / f"{name}.jsonl") for name in ("a", "b", "ab", "median"))
    for path, row in ab.items():
        assert row["model_scores"] == [a[path]["score"], b[path]["score"]]
        assert row["score"] == pytest.approx(np.mean(row["model_scores"]))
        assert median[path]["score"] == pytest.approx(np.median(row["model_scores"]))
        assert row["threshold"] == pytest.approx((a[path]["threshold"] + b[path]["threshold"]) / 2)
        assert row["label"] == ("fake" if row["score"] >= row["threshold"] else "real")
        mean_clips = [(pa + pb) / 2 for (_, pa, _), (_, pb, _) in zip(a[path]["clip_probs"], b[path]["clip_probs"])]
        assert [p for _, p, _ in row["clip_probs"]] == pytest.approx(mean_clips)
    assert len({round(r["model_scores"][0] - r["model_scores"][1], 6) for r in ab.values()}) > 1   # they differ
    table = pd.read_csv(tmp_path / "ab.csv")
    assert table.model_scores.map(eval).tolist() == [ab[p]["model_scores"] for p in table.path]


def test_models_that_would_cut_other_clips_are_refused_naming_the_setting(checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["extract"] = {**ckpt["extract"], "stride": 3}
    torch.save(ckpt, tmp_path / "stride3.pt")
    with pytest.raises(ScoreError, match=r"stride3.pt: extract.stride 3 differs from .*tiny.pt's 2; an ensemble's "
                                         r"models must score the same clips"):
        Detector.from_checkpoint([checkpoint, tmp_path / "stride3.pt"], device="cpu", config=config())
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["align"] = {**ckpt["align"], "margin": 1.5}
    torch.save(ckpt, tmp_path / "margin.pt")
    with pytest.raises(ScoreError, match=r"margin.pt: align.margin 1.5 differs"):
        Detector.from_checkpoint([checkpoint, tmp_path / "margin.pt"], device="cpu", config=config())


def test_calibrate_fits_the_ensembles_threshold_on_a_labelled_list(root, checkpoint, other, tmp_path):
    out = tmp_path / "cal.csv"
    proc = dfpipe("calibrate", root / "labels.csv", "--checkpoint", checkpoint, "--checkpoint", other,
                  "--labels", root / "labels.csv", "--out", out, "--set", "score.device=cpu", "--set", "train.amp=off")
    table = pd.read_csv(out, keep_default_na=False)
    labelled = table[(table.true_label != "") & (table.score != "")]
    threshold = fit_threshold(labelled.true_label.map({"real": 0, "fake": 1}), labelled.score.astype(float))
    assert f"calibrate: threshold {threshold:.6g} " in proc.stdout and f"--threshold {threshold:.6g}" in proc.stdout
    assert len(labelled) == 4 and table.model_scores.str.len().gt(2).sum() == 4


def test_a_new_threshold_or_rule_re_decides_an_ensembles_stored_rows(root, checkpoint, other, tmp_path, decoded):
    score_together([checkpoint, other], [root / "data"], tmp_path / "ab.csv")
    first = jsonl(tmp_path / "ab.jsonl")
    decoded.clear()
    score_together([checkpoint, other], [root / "data"], tmp_path / "ab.csv", cfg=config(threshold=0.9))
    assert decoded == []                                                       # decided from the stored clips
    again = jsonl(tmp_path / "ab.jsonl")
    assert all(r["threshold"] == 0.9 and r["score"] == first[p]["score"] for p, r in again.items())
    score_together([checkpoint, other], [root / "data"], tmp_path / "ab.csv", cfg=config(aggregate="median"))
    assert decoded == []
    assert [r["model_scores"] for r in jsonl(tmp_path / "ab.jsonl").values()] != [
        r["model_scores"] for r in first.values()]
