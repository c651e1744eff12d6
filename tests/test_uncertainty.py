"""score.mc_samples: Monte-Carlo dropout over the head gives each video a score_std (test_score's demo videos and
tiny checkpoint)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import test_score
from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.stages.detector import Detector
from test_score import TINY, config, jsonl, run

root, checkpoint = test_score.root, test_score.checkpoint   # the same module fixtures, made here too


def with_dropout(checkpoint, path, dropout: list[float]):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model_config"] = {**ckpt["model_config"], "dropout": dropout}
    torch.save(ckpt, path)
    return path


def test_the_first_column_is_the_model_and_the_rest_draw_dropout_without_touching_the_global_rng():
    torch.manual_seed(0)
    model = DualStreamNet.from_config({**config().model, **TINY}).eval()
    hq, lq = torch.rand(2, 3, 3, 64, 64), torch.rand(2, 3, 3, 32, 32)
    state = torch.get_rng_state()
    with torch.no_grad():
        plain, sampled = model(hq, lq), model(hq, lq, mc_samples=5)
    assert torch.equal(torch.get_rng_state(), state) and not model.classifier.training
    assert sampled.shape == (2, 6) and torch.equal(sampled[:, 0], plain)
    assert (sampled[:, 1:] - plain[:, None]).abs().max() > 0
    with torch.no_grad():
        assert torch.equal(model(hq, lq, mc_samples=5), sampled)   # a fixed seed: the same spread every time
        # a clip's samples are its own: the same alone or behind another clip in a batch
        alone = model(hq[1:], lq[1:], mc_samples=5)
    assert torch.allclose(alone[0], sampled[1], atol=1e-6)


def test_mc_dropout_gives_a_score_std_and_leaves_the_score_alone(root, checkpoint, tmp_path):
    videos = [root / "data", root / "bad"]
    run(checkpoint, videos, tmp_path / "plain.csv", cfg=config(runtime="torch"))  # what --mc-samples runs in
    run(checkpoint, videos, tmp_path / "onnx.csv")  # the CPU default without AMX
    run(checkpoint, videos, tmp_path / "mc.csv", cfg=config(mc_samples=8))
    no_dropout = with_dropout(checkpoint, tmp_path / "no_dropout.pt", [0.0, 0.0])
    run(no_dropout, videos, tmp_path / "zero.csv", cfg=config(mc_samples=8))
    plain, onnx, mc, zero = (jsonl(tmp_path / f"{name}.jsonl") for name in ("plain", "onnx", "mc", "zero"))
    ok = [p for p, r in plain.items() if r["status"] == "ok"]
    assert len(ok) == 4 and all(plain[p]["score_std"] is None for p in plain)
    for path in ok:
        assert mc[path]["score"] == plain[path]["score"] == zero[path]["score"]
        assert mc[path]["score"] == pytest.approx(onnx[path]["score"], abs=1e-4)  # float rounding apart
        assert mc[path]["score_std"] > 1e-4 and zero[path]["score_std"] == 0.0
        assert len(mc[path]["clip_samples"]) == mc[path]["clips"] and len(mc[path]["clip_samples"][0]) == 8
    assert all(mc[p]["score_std"] is None for p in mc if p not in ok)    # no face, undecodable: no score
    table = pd.read_csv(tmp_path / "mc.csv").set_index("path")
    assert table.score_std[ok].tolist() == pytest.approx([mc[p]["score_std"] for p in ok])
    assert pd.read_csv(tmp_path / "plain.csv").score_std.isna().all()


def test_the_detector_reports_the_std_too(root, checkpoint):
    detector = Detector.from_checkpoint(checkpoint, device="cpu", config=config(mc_samples=8))
    result = detector.score(root / "data/fake/fake_000.mp4")
    assert result.status == "ok" and result.score_std > 0
    assert Detector.from_checkpoint(checkpoint, device="cpu", config=config()).score(
        root / "data/fake/fake_000.mp4").score_std is None
