"""`score-video` on demo videos: streaming crops and probabilities equal the staged extract + align path, bad files
get their status, resume, shards, metrics; clip cutting and batching on synthetic faces."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import dfpipe, make_clip, moov_first
from dfpipe.manifests.errors import InputError
from dfpipe.manifests.table import write_table
from dfpipe.manifests.workspace import Shard, Workspace
from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import load_config
from dfpipe.stages import pairs as pairs_mod
from dfpipe.stages import ensemble, inference, mtcnn_nets, onnx_model, ort_session, score, score_store
from dfpipe.stages.clips import ClipCutter, clip_positions, scoring_clips
from dfpipe.stages.dataset import face_rows, read_crops, track_segments
from dfpipe.stages.demo import make_demo_dataset
from dfpipe.stages.detector import Detector
from dfpipe.stages.faces import FrameFaces
from dfpipe.stages.checkpoint import CARD_KEYS, load_checkpoint, model_from_checkpoint
from dfpipe.stages.train import run_train
from dfpipe.stages.train_data import align_params
from sklearn.metrics import roc_auc_score

STRIDE, CLIP_LEN, BATCH = 2, 3, 3
TINY = {"hq_backbone": "test_efficientnet", "lq_backbone": "test_efficientnet", "convlstm_filters": [8, 8],
        "mlp": [16, 8, 4], "dropout": [0.2, 0.2], "pretrained_hq": None, "pretrained_lq": None, "bottleneck": None}
DEMO = ["fake/fake_000", "fake/fake_001", "real/real_000", "real/real_001"]
BAD = {"empty.mp4": "empty", "garbage.mp4": "undecodable", "noface.mp4": "no_face"}


def config(**score_keys):
    """fp32 on the CPU, so the streaming and the staged probabilities differ only by the JPEG round trip."""
    return load_config(overrides=[{"train": {"amp": "off"}, "align": {"device": "cpu"},
                                   "score": {"batch_size": BATCH, "device": "cpu", **score_keys}}])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """4 demo face videos (15 frames, 8 sampled) staged by `dfpipe extract` + `align`; 3 bad files elsewhere."""
    root = tmp_path_factory.mktemp("score")
    make_demo_dataset(root / "data", n_real=2, n_fake=2, frames=15, width=256, height=256, fps=30, seed=0)
    make_clip(root / "bad" / "noface.mp4", n=15, width=64, height=48)
    (root / "bad" / "empty.mp4").write_bytes(b"")
    (root / "bad" / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    dfpipe("extract", root / "data", "--work", root / "ws", "--stride", STRIDE, "--quiet")
    # a larger minimum face prunes MTCNN's pyramid (the demo faces are ~100 px); the checkpoint carries it along
    dfpipe("align", "--work", root / "ws", "--no-pair-aware", "--min-face-size", 40, "--quiet")
    pd.DataFrame({"path": [f"data/{v}.mp4" for v in DEMO] + ["bad/noface.mp4"],
                  "label": ["fake", "1", "real", "0", "real"]}).to_csv(root / "labels.csv", index=False)
    return root


def staged_clip(ws: Path, faces: pd.DataFrame, video: str, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip as training reads it: the aligned JPEGs of `frames`, decoded to float (1, T, 3, H, W) in [0, 1]."""
    rows = faces[(faces.video_id == video) & (faces.status == "face")].set_index("frame_index")
    return tuple(read_crops(ws, [rows.loc[f, col] for f in frames]).float().div(255).unsqueeze(0)
                 for col in ("hq_path", "lq_path"))


def make_checkpoint(path: Path, model: DualStreamNet, cfg, align: dict, stride: int = STRIDE, **calibration) -> Path:
    torch.save({"model": model.state_dict(), "model_config": {**cfg.model, **TINY}, "config": cfg.to_dict(),
                "extract": {"stride": stride, "jpeg_quality": 95}, "align": align, "clip_len": CLIP_LEN,
                "calibration": {"temperature": 1.0, "threshold": 0.5, "aggregate": "mean", **calibration},
                "dfpipe_version": "test", "pairs_digest": "test"}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(root) -> Path:
    """A random tiny net made input-sensitive. Random init squeezes the logits of similar faces into a range ~1e-4
    wide; amplifying the backbones' last BatchNorm, recentring the output bias on the staged clips and a temperature
    of their spread puts the demo clips all over (0, 1), so any pixel-convention slip shows in the probabilities."""
    cfg = config()
    torch.manual_seed(0)
    model = DualStreamNet.from_config({**cfg.model, **TINY}).eval()
    faces = pd.read_csv(root / "ws/manifests/faces.csv", keep_default_na=False)
    clips = [staged_clip(root / "ws", faces, video, frames[i:i + CLIP_LEN]) for video in DEMO
             for frames in [sorted(faces.frame_index[(faces.video_id == video) & (faces.status == "face")])]
             for i in range(len(frames) - CLIP_LEN + 1)]
    with torch.no_grad():
        for stream in (model.hq, model.lq):
            stream.backbone.net.bn2.weight.mul_(300)
        logits = model(torch.cat([c[0] for c in clips]), torch.cat([c[1] for c in clips]))
        model.classifier[-1].bias -= logits.mean()
    return make_checkpoint(root / "tiny.pt", model, cfg, align_params(Workspace(root / "ws"), cfg),
                           temperature=float(logits.std()) / 2)


def record_model_calls(monkeypatch) -> list:
    """Every batch the model scores, in whichever runtime: (hq, lq, probs)."""
    calls = []

    def recorder(original):
        def recording(self, hq, lq):
            probs = original(self, hq, lq)
            calls.append((hq.copy(), lq.copy(), probs))
            return probs
        return recording
    for model in (inference.ClipModel, onnx_model.OnnxClipModel):
        monkeypatch.setattr(model, "__call__", recorder(model.__call__))
    return calls


@pytest.fixture
def model_calls(monkeypatch) -> list:
    return record_model_calls(monkeypatch)


def run(checkpoint, inputs, out, cfg=None, **kw):
    kw = {"labels": None, "work": None, "split": None, "shard": Shard(), **kw}
    return score_store.run_score([str(p) for p in inputs], str(checkpoint), cfg or config(), out=str(out),
                                 progress=False, **kw)


def jsonl(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def scored(root, checkpoint):
    """One labelled call over all 7 videos, with every model batch recorded."""
    with pytest.MonkeyPatch.context() as mp:
        calls = record_model_calls(mp)
        summary = run(checkpoint, [root / "data", root / "bad"], root / "out/scores.csv",
                      labels=str(root / "labels.csv"))
    return summary, calls


def prob_of(model, ckpt, hq: np.ndarray, lq: np.ndarray) -> float:
    """The calibrated probability of one clip given as float (T, H, W, 3) arrays in 0..255."""
    clip = (torch.from_numpy(np.ascontiguousarray(c) / 255).float().permute(0, 3, 1, 2)[None] for c in (hq, lq))
    with torch.no_grad():
        return torch.sigmoid(model(*clip) / ckpt["calibration"]["temperature"]).item()


def test_streaming_clips_equal_the_staged_jpegs_and_their_probabilities(root, scored):
    summary, calls = scored
    rows = jsonl(summary.jsonl)
    faces = pd.read_csv(root / "ws/manifests/faces.csv", keep_default_na=False)
    hq, lq, probs = (np.concatenate(c) for c in zip(*calls))
    clips = [(v, *clip) for v in DEMO for clip in rows[str(root / f"data/{v}.mp4")]["clip_probs"]]
    assert len(clips) == len(hq) == 4 * 2  # 8 sampled frames per video: two non-overlapping clips of 3
    ckpt = load_checkpoint(root / "tiny.pt")
    model = model_from_checkpoint(ckpt, "cpu")
    staged_probs, own, others = [], [], []
    for (video, track, prob, frames), h, low, p in zip(clips, hq, lq, probs):
        sampled = sorted(faces.frame_index[faces.video_id == video])
        assert track == 0 and frames == sampled[sampled.index(frames[0]):][:CLIP_LEN]  # consecutive sampled frames
        assert prob == p
        jpeg_hq, jpeg_lq = (255 * c[0].permute(0, 2, 3, 1).numpy() for c in staged_clip(root / "ws", faces, video,
                                                                                          frames))
        # Equal up to the sub-pixel landmark shifts that detecting on JPEG frames causes (the round trips themselves
        # are reproduced exactly: tests/test_faces.py), far nearer than the staged crops of the other frames are.
        assert np.abs(h - jpeg_hq).mean() < 4 and np.abs(low - jpeg_lq).mean() < 4
        all_staged = 255 * staged_clip(root / "ws", faces, video, sampled)[0][0].permute(0, 2, 3, 1).numpy()
        for crop, frame in zip(h, frames):
            diffs = np.abs(all_staged - crop).mean(axis=(1, 2, 3))
            own.append(diffs[sampled.index(frame)])
            others.append(np.delete(diffs, sampled.index(frame)).mean())
        staged_probs.append([prob_of(model, ckpt, jpeg_hq[..., channels], jpeg_lq[..., channels])
                             for channels in ([0, 1, 2], [2, 1, 0])])
    assert np.mean(own) < 0.5 * np.mean(others)
    streaming = np.array([c[2] for c in clips])
    staged, swapped = np.array(staged_probs).T
    assert np.abs(streaming - staged).max() < 0.15 and np.ptp(streaming) > 0.5
    assert np.abs(streaming - swapped).max() > 0.3  # the model is sensitive enough to catch a BGR slip


def test_every_video_gets_a_status_and_only_face_videos_a_score(root, checkpoint, scored):
    summary, _ = scored
    table = pd.read_csv(summary.csv, keep_default_na=False)
    assert list(table.columns) == score_store.CSV_COLUMNS and list(table.path) == sorted(table.path)
    by_path = table.set_index("path")
    for name, status in BAD.items():
        row = by_path.loc[str(root / "bad" / name)]
        assert (row.status, row.score, row.label) == (status, "", "") and row.reason
    assert "no face found in 8 sampled frames" == by_path.loc[str(root / "bad/noface.mp4"), "reason"]
    assert summary.counts == {"ok": 4, "empty": 1, "undecodable": 1, "no_face": 1} and summary.scored == 7
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    for video in DEMO:
        row = by_path.loc[str(root / f"data/{video}.mp4")]
        clips = jsonl(summary.jsonl)[str(root / f"data/{video}.mp4")]["clip_probs"]
        probs = [p for _, p, _ in clips]
        assert row.status == "ok" and math.isclose(float(row.score), np.mean(probs))  # mean rule, one track
        assert json.loads(row.track_scores) == {"0": float(row.score)}
        assert row.label == ("fake" if float(row.score) >= 0.5 else "real") and row.true_label == video[:4]
        assert (row.frames_sampled, row.frames_with_face, row.tracks, row.clips) == (8, 8, 1, 2)
        assert json.loads(row.suspicious_frames) == [frames[0] for _, _, frames in sorted(clips, key=lambda c: -c[1])]
        assert row.model_digest == digest and row.seconds > 0


def test_batches_span_video_boundaries(scored):
    _, calls = scored
    assert [len(c[0]) for c in calls] == [BATCH, BATCH, 2]  # 8 clips of 4 videos in 3 full-as-possible batches


def test_metrics_and_plots_match_sklearn(root, scored):
    summary, _ = scored
    metrics = json.loads((root / "out/scores_metrics.json").read_text())
    rows = jsonl(summary.jsonl)
    y = [int(v.startswith("fake")) for v in DEMO]
    s = [rows[str(root / f"data/{v}.mp4")]["score"] for v in DEMO]
    assert metrics["labelled"] == 5 and metrics["unscored"] == 1 and metrics["video"]["n"] == 4
    assert math.isclose(metrics["video"]["auc"], roc_auc_score(y, s))
    frame_y = [label for v, label in zip(DEMO, y) for _, _, frames in rows[str(root / f"data/{v}.mp4")]["clip_probs"]
               for _ in frames]
    frame_p = [p for v in DEMO for _, p, frames in rows[str(root / f"data/{v}.mp4")]["clip_probs"] for _ in frames]
    assert metrics["frame"]["n"] == 24 and math.isclose(metrics["frame"]["auc"], roc_auc_score(frame_y, frame_p))
    assert f"AUC {metrics['video']['auc']:.4f} (videos)" in summary.line()
    plots = sorted(p.name for p in (root / "out/scores_plots").iterdir())
    assert plots == ["confusion.png", "hist.png", "pr.png", "roc.png"]
    assert all((root / "out/scores_plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_rerun_skips_finished_videos_and_changed_settings_rescore(root, checkpoint, scored, model_calls, tmp_path):
    summary, _ = scored
    shutil.copytree(root / "out", tmp_path / "out")
    with open(tmp_path / "out/scores.jsonl", "a") as f:
        f.write('{"path": "torn by a cra')  # a crash mid-append
    before = (tmp_path / "out/scores.csv").read_bytes()
    again = run(checkpoint, [root / "data", root / "bad"], tmp_path / "out/scores.csv",
                labels=str(root / "labels.csv"))
    assert model_calls == [] and (again.scored, again.reused, again.rescored) == (0, 7, 0)
    assert (tmp_path / "out/scores.csv").read_bytes() == before
    assert (tmp_path / "out/scores.jsonl").read_text().endswith("}\n")  # the torn line is gone
    one = root / "data/real/real_000.mp4"
    flipped = run(checkpoint, [one], tmp_path / "out/scores.csv", cfg=config(tta_flip=True))
    assert (flipped.scored, flipped.rescored) == (1, 1) and len(model_calls) == 1
    rows, first = jsonl(tmp_path / "out/scores.jsonl"), jsonl(summary.jsonl)
    assert rows[str(one)]["score"] != first[str(one)]["score"]
    # the other six videos were not in this call: their rows stay, and a call over all seven still reuses them
    assert len(rows) == 7 and all(rows[p] == first[p] for p in rows if p != str(one))
    assert list(pd.read_csv(flipped.csv).path) == [str(one)]  # the CSV reports this call
    # unlabelled now: the earlier call's metrics and plots must not stay beside the new scores
    assert not (tmp_path / "out/scores_metrics.json").exists() and not (tmp_path / "out/scores_plots").exists()
    back = run(checkpoint, [root / "data", root / "bad"], tmp_path / "out/scores.csv")
    assert (back.scored, back.reused, back.rescored) == (1, 6, 1) and len(model_calls) == 2


def test_errors_and_changed_videos_are_scored_again_and_each_reason_reported(root, checkpoint, scored, model_calls,
                                                                            tmp_path, capsys):
    shutil.copytree(root / "out", tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out/scores.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    ok[0].update(status="error", reason="RuntimeError: out of memory")
    ok[1]["file"] = "another size and time"
    (tmp_path / "out/scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    again = run(checkpoint, [root / "data", root / "bad"], tmp_path / "out/scores.csv")
    out = capsys.readouterr().err  # notes: stderr
    assert "1 video(s) ended in an error last time; scoring them again" in out
    assert "1 video(s) changed on disk since they were scored; scoring them again" in out
    assert "other settings" not in out
    assert (again.scored, again.reused, again.rescored) == (2, 5, 2) and len(model_calls) == 2
    fixed = jsonl(again.jsonl)
    assert fixed[ok[0]["path"]]["status"] == "ok" and fixed[ok[1]["path"]]["file"] != "another size and time"


def test_a_cut_video_is_undecodable_not_scored_on_its_part(root, checkpoint, tmp_path):
    whole = moov_first(root / "data/real/real_000.mp4", tmp_path / "streamable.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 9 // 10])  # frames 0-7 of 15 still decode
    summary = run(checkpoint, [cut, root / "data/fake/fake_000.mp4"], tmp_path / "scores.csv")
    rows = jsonl(summary.jsonl)
    assert rows[str(cut)]["status"] == "undecodable" and rows[str(cut)]["score"] is None
    assert rows[str(cut)]["reason"].startswith("truncated or corrupt, decoded frames up to")
    assert rows[str(root / "data/fake/fake_000.mp4")]["status"] == "ok"  # the other video of the call is scored


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_a_one_line_error(root, checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model_config"]["mlp"] = [12, 8, 4]
    torch.save(ckpt, tmp_path / "other.pt")
    proc = dfpipe("score-video", root / "data/real/real_000.mp4", "--checkpoint", tmp_path / "other.pt", "--out",
                  tmp_path / "s.csv", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'other.pt'}: the checkpoint's weights do not fit its "
                                  "model_config (size mismatch for ")
    assert len(proc.stderr.splitlines()) == 1


def test_an_output_that_is_not_ours_is_refused_not_overwritten(root, checkpoint, tmp_path):
    """--out naming the labels file (or an input list, or a workspace manifest) replaced it with scores."""
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{root / 'data/real/real_000.mp4'},real\n")
    before = labels.read_bytes()
    with pytest.raises(score.ScoreError, match=r"labels.csv: exists and is not a score-video output \(its header "
                                               r"differs\); it would be overwritten: choose another --out"):
        run(checkpoint, [root / "data/real/real_000.mp4"], labels, labels=str(labels))
    assert labels.read_bytes() == before and not labels.with_suffix(".jsonl").exists()
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\n')
    with pytest.raises(score.ScoreError, match=r"notes.jsonl: exists and is not a score-video record"):
        run(checkpoint, [root / "data/real/real_000.mp4"], tmp_path / "notes.csv")
    assert notes.read_text() == '{"my": "notes"}\n'
    # A real output is taken, and one whose first append was torn by a crash (no complete line) too.
    ours = run(checkpoint, [root / "data/real/real_000.mp4"], tmp_path / "ours.csv")
    run(checkpoint, [root / "data/real/real_000.mp4"], ours.csv)
    (tmp_path / "torn.jsonl").write_text('{"path": "/x.mp4", "sta')
    run(checkpoint, [root / "data/real/real_000.mp4"], tmp_path / "torn.csv")


def test_a_second_call_into_the_same_output_is_refused(root, checkpoint, tmp_path):
    """Two calls with one --out both ran: a video twice in the record, and the CSV held one call's videos."""
    from dfpipe.manifests.workspace import lock_file
    held = tmp_path / ".scores.jsonl.lock"
    with lock_file(held):  # as a running call holds it
        with pytest.raises(score.ScoreError, match=r"scores.csv: another score-video is writing this output \(pid "):
            run(checkpoint, [root / "data/real/real_000.mp4"], tmp_path / "scores.csv")
    assert not (tmp_path / "scores.csv").exists()
    run(checkpoint, [root / "data/real/real_000.mp4"], tmp_path / "scores.csv")  # free again once it is done


def test_an_output_below_a_file_is_a_one_line_error(root, checkpoint, tmp_path):
    (tmp_path / "taken.csv").write_text("x\n")
    with pytest.raises(score.ScoreError, match=r"scores.csv: cannot create its folder \(.*taken.csv is a file, "
                                               r"not a folder\)"):
        run(checkpoint, [root / "bad"], tmp_path / "taken.csv/scores.csv")
    assert (tmp_path / "taken.csv").read_text() == "x\n"


def test_a_damaged_record_line_is_reported_and_only_its_video_rescored(root, checkpoint, scored, model_calls,
                                                                        tmp_path, capsys):
    shutil.copytree(root / "out", tmp_path / "out")
    lines = (tmp_path / "out/scores.jsonl").read_bytes().splitlines(keepends=True)
    lost = json.loads(lines[1])["path"]
    (tmp_path / "out/scores.jsonl").write_bytes(b"".join([lines[0], b"garbage \xff\n", *lines[2:]]))
    again = run(checkpoint, [root / "data", root / "bad"], tmp_path / "out/scores.csv")
    assert "scores.jsonl: line(s) 2 are not score records" in capsys.readouterr().err
    assert (again.scored, again.reused) == (1, 6) and set(jsonl(again.jsonl)) == set(jsonl(scored[0].jsonl))
    assert lost in jsonl(again.jsonl)


def test_labels_that_match_no_video_are_reported(root, checkpoint, tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("path,label\nelsewhere.mp4,fake\n")
    summary = run(checkpoint, [root / "bad"], tmp_path / "scores.csv", labels=str(tmp_path / "labels.csv"))
    assert summary.metrics is None
    assert f"{tmp_path / 'labels.csv'} labels none of the 3 videos" in capsys.readouterr().err


def test_labels_of_one_class_give_no_auc_and_null_in_metrics(root, checkpoint, scored, model_calls, tmp_path):
    shutil.copytree(root / "out", tmp_path / "out")
    (tmp_path / "labels.csv").write_text("path,label\nreal_000.mp4,real\nreal_001.mp4,real\n")
    summary = run(checkpoint, [root / "data"], tmp_path / "out/scores.csv", labels=str(tmp_path / "labels.csv"))
    assert model_calls == [] and summary.metrics["video"]["n"] == 2
    assert "no AUC (the scored labelled videos are all of one class)" in summary.line() and "nan" not in summary.line()
    metrics = json.loads((tmp_path / "out/scores_metrics.json").read_text())
    assert metrics["video"]["auc"] is None and metrics["frame"]["auc"] is None and metrics["video"]["accuracy"] >= 0


def test_a_new_rule_or_threshold_is_decided_from_the_stored_clip_scores(root, checkpoint, scored, model_calls,
                                                                         tmp_path, monkeypatch):
    summary, _ = scored
    shutil.copytree(root / "out", tmp_path / "out")
    inputs = [root / "data", root / "bad"]
    cfg = config(aggregate="max", threshold=0.3, suspicious_frames=1, fallback_score=0.9)
    with monkeypatch.context() as m:
        m.setattr(score, "FrameReader", lambda *a, **k: pytest.fail("a video was decoded again"))
        again = run(checkpoint, inputs, tmp_path / "out/scores.csv", cfg=cfg)
    assert model_calls == [] and (again.scored, again.reused, again.rescored) == (0, 7, 0)
    fresh = run(checkpoint, inputs, tmp_path / "fresh/scores.csv", cfg=cfg)
    assert fresh.scored == 7
    decided, scored_anew, before = jsonl(again.jsonl), jsonl(fresh.jsonl), jsonl(summary.jsonl)
    for path, row in scored_anew.items():  # the same rows as scoring from scratch with the new settings
        assert {k: v for k, v in decided[path].items() if k != "seconds"} == {k: v for k, v in row.items()
                                                                              if k != "seconds"}
    assert {r["score"] for r in decided.values()} != {r["score"] for r in before.values()}
    assert [r["score"] for r in decided.values() if r["status"] != "ok"] == [0.9] * 3


def test_fallback_score_fills_unscorable_videos(root, checkpoint):
    summary = run(checkpoint, [root / "bad"], root / "fallback/scores.csv", cfg=config(fallback_score=0.75))
    table = pd.read_csv(summary.csv, keep_default_na=False)
    assert list(table.status) == ["empty", "undecodable", "no_face"]
    assert list(table.score) == [0.75] * 3 and list(table.label) == ["fake"] * 3


def test_shards_write_their_own_files_and_a_plain_run_merges_them(root, checkpoint, model_calls, tmp_path):
    inputs = [root / "data/real/real_001.mp4", root / "data/fake/fake_001.mp4", root / "bad"]
    out = tmp_path / "scores.csv"
    shards = [run(checkpoint, inputs, out, shard=Shard(i, 2)) for i in range(2)]
    assert [s.csv.name for s in shards] == ["scores.shard-0-of-2.csv", "scores.shard-1-of-2.csv"]
    paths = [set(pd.read_csv(s.csv).path) for s in shards]
    assert not paths[0] & paths[1] and len(paths[0] | paths[1]) == 5
    calls = len(model_calls)
    merged = run(checkpoint, inputs, out)
    assert len(model_calls) == calls and (merged.scored, merged.reused) == (0, 5)
    rows = jsonl(merged.jsonl)  # the plain JSON lines now hold every video on their own
    assert set(rows) == paths[0] | paths[1]
    assert rows == {**jsonl(shards[0].jsonl), **jsonl(shards[1].jsonl)}


def test_a_shard_that_owns_no_video_still_writes_both_files(root, checkpoint, tmp_path):
    paths = set(pd.read_csv(run(checkpoint, [root / "bad"], tmp_path / "all.csv").csv).path)
    idle = next(Shard(i, 64) for i in range(64) if not any(Shard(i, 64).owns(p) for p in paths))
    summary = run(checkpoint, [root / "bad"], tmp_path / "scores.csv", shard=idle)
    assert summary.jsonl.read_bytes() == b"" and pd.read_csv(summary.csv).empty
    merged = run(checkpoint, [root / "bad"], tmp_path / "scores.csv")
    assert (merged.scored, set(pd.read_csv(merged.csv).path)) == (3, paths)


def test_checkpoint_from_train_scores_a_workspace_split(root, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(root / "ws", ws)
    cfg = load_config(overrides=[{"model": TINY, "dataset": {"clip_len": CLIP_LEN, "synthesize": "none"},
                                  "train": {"epochs": 1, "batch_size": 2, "workers": 0, "amp": "off",
                                            "from_scratch": True},
                                  "align": {"device": "cpu"}, "score": {"device": "cpu"}}])
    run_train(ws, tmp_path / "run", cfg, resume=False)
    summary = run(tmp_path / "run/best.pt", [], tmp_path / "scores.csv", cfg=cfg, work=str(ws), split="val")
    table = pd.read_csv(summary.csv, keep_default_na=False)
    videos = pd.read_csv(ws / "manifests/videos.csv").set_index("path")
    assert len(table) >= 1 and (table.status == "ok").all() and table.score.between(0, 1).all()
    assert list(table.true_label) == [videos.loc[p, "label"] for p in table.path]
    assert (tmp_path / "scores_metrics.json").is_file()

    # A later train redraws the workspace's splits: its val split is no longer the one this model was validated on.
    pairs = pd.read_csv(ws / pairs_mod.PAIRS, keep_default_na=False)
    assert pairs_mod.pairs_digest(pd.read_csv(tmp_path / "run" / pairs_mod.RUN_PAIRS, keep_default_na=False)) == \
        load_checkpoint(tmp_path / "run/best.pt")["pairs_digest"] == pairs_mod.pairs_digest(pairs)
    redrawn = pairs.assign(split=pairs.split.map({"train": "val", "val": "train", "test": "test"}))
    write_table(ws / pairs_mod.PAIRS, redrawn, pairs_mod.COLUMNS)
    with pytest.raises(score.ScoreError, match=r"training_pairs.csv: the workspace's splits are not the ones "
                                               r".*best.pt was trained on .*--run-splits scores the run's own val"):
        run(tmp_path / "run/best.pt", [], tmp_path / "again.csv", cfg=cfg, work=str(ws), split="val")
    # in an ensemble every model is held to the split: one trained on the redrawn pairs does not excuse another
    fresh = tmp_path / "fresh.pt"
    torch.save({**torch.load(tmp_path / "run/best.pt", weights_only=True),
                "pairs_digest": pairs_mod.pairs_digest(redrawn)}, fresh)
    both = [str(fresh), str(tmp_path / "run/best.pt")]
    with pytest.raises(score.ScoreError, match=r"not the ones .*run/best.pt was trained on"):
        score_store.run_score([], both, cfg, out=str(tmp_path / "both.csv"), labels=None, work=str(ws), split="val",
                              shard=Shard(), progress=False)
    with pytest.raises(score.ScoreError, match="--run-splits reads one run's splits"):
        score_store.run_score([], both, cfg, out=str(tmp_path / "both.csv"), labels=None, work=str(ws), split="val",
                              shard=Shard(), progress=False, run_splits=True)
    own = run(tmp_path / "run/best.pt", [], tmp_path / "own.csv", cfg=cfg, work=str(ws), split="val", run_splits=True)
    assert list(pd.read_csv(own.csv).path) == list(table.path)
    videos_csv = ws / "manifests/videos.csv"
    write_table(videos_csv, videos.reset_index().query("path != @table.path[0]"), list(videos.reset_index()))
    with pytest.raises(score.ScoreError, match=r"videos.csv: 1 video\(s\) of the val split in .*run/training_pairs"
                                               r".csv are not in this workspace"):  # another workspace than the run's
        run(tmp_path / "run/best.pt", [], tmp_path / "own.csv", cfg=cfg, work=str(ws), split="val", run_splits=True)
    (tmp_path / "run" / pairs_mod.RUN_PAIRS).unlink()  # a run trained before runs kept their splits
    with pytest.raises(score.ScoreError, match=r"run/training_pairs.csv: not found \(a run trained before"):
        run(tmp_path / "run/best.pt", [], tmp_path / "own.csv", cfg=cfg, work=str(ws), split="val", run_splits=True)



# ---------------------------------------------------------------- the Python API

def test_detector_scores_from_python_exactly_as_score_video_does(root, checkpoint, scored):
    """`dfpipe.Detector` is what score-video runs: the same scores, clips, tracks and statuses, with no file."""
    import dfpipe
    rows = jsonl(scored[0].jsonl)
    files = sorted(root.rglob("*"))
    detector = dfpipe.Detector.from_checkpoint(checkpoint, device="cpu", config=config())
    paths = sorted(rows)
    results = {r.path: r for r in detector.score_many(paths)}
    assert sorted(results) == paths
    for path, row in rows.items():
        got = results[path]
        assert isinstance(got, dfpipe.VideoScore)
        assert (got.status, got.reason, got.score, got.label, got.threshold) == (
            row["status"], row["reason"], row["score"], row["label"], row["threshold"])
        assert [list(f) for f in [got.suspicious_frames]] == [row["suspicious_frames"]]
        assert [[t.track, c.probability, list(c.frames)] for t in got.tracks for c in t.clips] == row["clip_probs"]
        assert {str(t.track): t.score for t in got.tracks} == row["track_scores"]
        assert (got.frames_sampled, got.frames_with_face) == (row["frames_sampled"], row["frames_with_face"])
        assert got.seconds >= 0 and (got.seconds > 0) == (got.status != "empty")
    real = next(p for p in paths if rows[p]["status"] == "ok")
    one = detector.score(real)
    assert one.status == "ok" and one.score == results[real].score and len(one.tracks) == 1
    assert detector.score(root / "bad/noface.mp4").status == "no_face"
    assert detector.score(root / "bad/garbage.mp4").score is None
    assert sorted(root.rglob("*")) == files  # nothing written


def test_stage_functions_return_the_summaries_the_commands_print(root, tmp_path):
    import dfpipe
    summary = dfpipe.extract(root / "data", tmp_path / "ws", extract={"stride": STRIDE})
    assert (summary.ran, summary.failed) == (4, []) and (tmp_path / "ws/manifests/frames.csv").is_file()
    again = dfpipe.extract(root / "data", tmp_path / "ws", extract={"stride": STRIDE})
    assert (again.ran, again.skipped) == (0, 4)  # resumable as the command is
    summary = dfpipe.align(tmp_path / "ws", align={"min_face_size": 40, "pair_aware": False})
    assert (summary.ran, summary.failed) == (4, [])
    faces, staged = (pd.read_csv(ws / "manifests/faces.csv", keep_default_na=False) for ws in (tmp_path / "ws",
                                                                                                 root / "ws"))
    assert (faces.status == "face").sum() == (staged.status == "face").sum() == 4 * 8  # as `dfpipe align` found
    assert sorted(faces.hq_sha256) == sorted(staged.hq_sha256)


# ---------------------------------------------------------------- inputs

def test_inputs_from_folders_lists_labels_and_metadata(root, tmp_path):
    (tmp_path / "list.csv").write_text(f"path,label\n{root}/bad/noface.mp4,real\n{root}/data/fake/fake_000.mp4,\n")
    (tmp_path / "metadata.json").write_text(json.dumps({"fake_000.mp4": {"label": "FAKE"},
                                                        "real_001.mp4": {"label": "REAL"}}))
    videos = score.list_inputs([str(root / "data/real"), str(tmp_path / "list.csv")],
                               labels=str(tmp_path / "metadata.json"), work=None, split=None)
    assert [(Path(v.path).name, v.label) for v in videos] == [
        ("noface.mp4", "real"), ("fake_000.mp4", "fake"), ("real_000.mp4", None), ("real_001.mp4", "real")]
    with pytest.raises(score.ScoreError, match=r"^nope.mp4: input does not exist$"):
        score.list_inputs(["nope.mp4"], labels=None, work=None, split=None)
    (tmp_path / "bad.csv").write_text("path,label\nx.mp4,maybe\n")
    with pytest.raises(score.ScoreError, match=r"bad.csv: row 1: label 'maybe' is not real, fake, 0 or 1"):
        score.list_inputs([str(tmp_path / "bad.csv")], labels=None, work=None, split=None)
    (tmp_path / "twice.csv").write_text("path,label\nx.mp4,real\ny.mp4,fake\n./x.mp4, 0\nx.mp4,fake\n")
    with pytest.raises(score.ScoreError, match=r"twice.csv: row 4: 'x.mp4' is labelled real in row 1 and fake here"):
        score.read_labels(tmp_path / "twice.csv")  # the last row used to win silently


def test_uncalibrated_checkpoint_needs_rule_and_threshold(root, checkpoint):
    ckpt = {**load_checkpoint(checkpoint), "calibration": None}
    with pytest.raises(score.ScoreError, match="not calibrated"):
        score.scoring_settings(ckpt, config(), "last.pt")
    settings = score.scoring_settings(ckpt, config(aggregate="max", threshold=0.3), "last.pt")
    assert (settings.rule, settings.threshold, settings.temperature) == ("max", 0.3, 1.0)
    assert settings.digest() != score.scoring_settings(ckpt, config(aggregate="max", threshold=0.4), "x").digest()


# ---------------------------------------------------------------- clips and batches

def face(track: int, value: int):
    return SimpleNamespace(track_id=track, hq=np.full((4, 4, 3), value, np.uint8),
                           lq=np.full((2, 2, 3), value, np.uint8))


def cut(tracks_per_frame: list[list[int]], clip_len=3, track_max_gap=2, min_track_len=2, clip_every=1):
    """Feed frames (index = 10 x position) whose faces carry their frame index as pixel value."""
    cutter = ClipCutter(clip_len, track_max_gap=track_max_gap, min_track_len=min_track_len,
                              clip_every=clip_every)
    clips = []
    for position, tracks in enumerate(tracks_per_frame):
        frame = FrameFaces(10 * position, position / 10, [face(t, position) for t in tracks])
        clips += cutter.add(position, frame)
    return clips + cutter.finish(), cutter


def test_clips_are_consecutive_non_overlapping_and_never_cross_a_gap():
    clips, cutter = cut([[0, 1], [0, 1], [0], [0, 1], [0], [0], [0, 1], [1]])
    by_track = {t: [c.frames for c, _, _ in clips if c.track == t] for t in (0, 1)}
    assert by_track[0] == [(0, 10, 20), (30, 40, 50)]  # frame 60 is a leftover, dropped
    # track 1 never fills a clip: its longest run (60, 70 ties with 0, 10 and loses to the first) is padded
    assert by_track[1] == [(0, 10, 10)]
    for c, hq, lq in clips:
        assert hq.shape == (3, 4, 4, 3) and lq.shape == (3, 2, 2, 3)
        assert [int(h[0, 0, 0]) * 10 for h in hq] == list(c.frames)  # the crops are the frames' crops
    assert cutter.face_frames[1] == [0, 10, 30, 60, 70]


def test_clip_every_keeps_every_nth_full_clip_of_each_track():
    frames = [[0, 1]] * 12 + [[0]] * 3
    every = {n: [(c.track, c.frames) for c, _, _ in cut(frames, clip_every=n)[0]] for n in (1, 2, 3)}
    assert [f for t, f in every[1] if t == 0] == [tuple(range(s, s + 30, 10)) for s in range(0, 150, 30)]
    assert [f for t, f in every[2] if t == 0] == [f for t, f in every[1] if t == 0][::2]
    for n in (2, 3):  # per track, not over the video: track 1's clips are thinned on their own count
        for track in (0, 1):
            assert [f for t, f in every[n] if t == track] == [f for t, f in every[1] if t == track][::n]
    with pytest.raises(ValueError, match="clip_every"):
        ClipCutter(3, track_max_gap=2, min_track_len=2, clip_every=0)


@pytest.mark.parametrize("clip_every", [1, 2])
def test_calibration_clips_are_the_clips_score_video_cuts(clip_every):
    """train calibrates on `scoring_clips` of the val videos' faces table; score-video cuts with ClipCutter as
    frames stream in: the two must pick the same clips, or the rule and threshold are fitted on other clips."""
    frames = [[0, 1], [0, 1], [0], [0, 1], [0], [0], [0, 1], [1], [0], [0, 2], [0, 2], [0], [0, 1], [0, 1], [0, 1]]
    streamed = sorted((c.track, c.frames) for c, _, _ in cut(frames, clip_every=clip_every)[0])
    rows = [{"video_id": "v", "frame_index": 10 * p, "status": "face", "track_id": t, "hq_path": f"{p}-{t}",
             "lq_path": f"{p}-{t}"} for p, tracks in enumerate(frames) for t in tracks]
    segments = track_segments(face_rows(pd.DataFrame(rows), {"v": 1}), {"v": 1})
    tabled = sorted((segments[i].track_id, tuple(segments[i].frames[p] for p in clip_positions(
        len(segments[i].frames), start, 3))) for i, start in scoring_clips(segments, 3, clip_every))
    assert tabled == streamed and len(streamed) >= 4


def test_padding_matches_the_dataset_and_dead_spurious_tracks_are_dropped():
    clips, cutter = cut([[0, 5], [0], [0], [0], [0], [0, 6], [0, 6]], clip_len=5, track_max_gap=1, min_track_len=2)
    assert [(c.track, c.frames) for c, _, _ in clips] == [(0, (0, 10, 20, 30, 40)), (6, (50, 50, 60, 60, 60))]
    assert 5 not in dict(cutter.tiling.padded())  # seen once, then dead: shorter than min_track_len, its crops were released


def test_each_dead_short_track_is_judged_by_its_own_length():
    # A spurious face, then frames without any face (a cutaway): the spurious run is released, nothing fails.
    clips, cutter = cut([[5], [], [], [], [0], [0], [0]], clip_len=3, track_max_gap=1, min_track_len=2)
    assert [(c.track, c.frames) for c, _, _ in clips] == [(0, (40, 50, 60))] and 5 not in dict(cutter.tiling.padded())
    # A track long enough to keep (7) must survive while a one-frame track (8) is the last face seen.
    clips, _ = cut([[7], [7], [], [], [8], [], [], []], clip_len=5, track_max_gap=1, min_track_len=2)
    assert [c.track for c, _, _ in clips] == [7]


def test_queue_runs_full_batches_across_owners_and_flushes_the_rest():
    seen = []

    def predict(hq, lq):
        seen.append(len(hq))
        return hq.reshape(len(hq), -1)[:, 0] / 10

    queue = inference.ClipQueue(predict, batch_size=2)

    def clip(value):
        return np.full((1, 2, 2, 3), value, np.uint8), np.zeros((1, 1, 1, 3), np.uint8)

    assert queue.put(("a", 0), *clip(1)) == []
    assert queue.put(("b", 0), *clip(2)) == [(("a", 0), 0.1), (("b", 0), 0.2)]
    assert queue.put(("b", 1), *clip(3)) == [] and queue.flush() == [(("b", 1), 0.3)] and queue.flush() == []
    assert seen == [2, 1]


def test_flip_tta_averages_the_clip_and_its_mirror(checkpoint):
    model = model_from_checkpoint(load_checkpoint(checkpoint), "cpu")
    rng = np.random.default_rng(0)
    hq = rng.integers(0, 256, (2, CLIP_LEN, 224, 224, 3), dtype=np.uint8)
    lq = rng.integers(0, 256, (2, CLIP_LEN, 112, 112, 3), dtype=np.uint8)
    hq[1] = np.concatenate([hq[1, :, :, :112], hq[1, :, :, :112][:, :, ::-1]], axis=2)  # mirror-symmetric clip
    lq[1] = np.concatenate([lq[1, :, :, :56], lq[1, :, :, :56][:, :, ::-1]], axis=2)
    temperature = load_checkpoint(checkpoint)["calibration"]["temperature"]
    plain, tta = (inference.ClipModel(model, device=torch.device("cpu"), dtype=None, temperature=temperature,
                                      tta_flip=f) for f in (False, True))
    mirrored = plain(hq[:, :, :, ::-1].copy(), lq[:, :, :, ::-1].copy())
    both = tta(hq, lq)
    np.testing.assert_allclose(both, (plain(hq, lq) + mirrored) / 2, rtol=1e-6)
    assert abs(both[1] - plain(hq, lq)[1]) < 1e-6 and abs(both[0] - plain(hq, lq)[0]) > 1e-4


def test_checkpoint_model_is_the_trained_model_and_bf16_scoring_stays_close(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    mapped = {t.untyped_storage().data_ptr() for t in ckpt["model"].values()}  # the file's memory map
    model = model_from_checkpoint(ckpt, "cpu")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    reference = DualStreamNet.from_config(ckpt["model_config"]).eval()
    reference.load_state_dict(ckpt["model"])
    rng = np.random.default_rng(1)
    hq = rng.integers(0, 256, (3, CLIP_LEN, 224, 224, 3), dtype=np.uint8)
    lq = rng.integers(0, 256, (3, CLIP_LEN, 112, 112, 3), dtype=np.uint8)
    temperature = ckpt["calibration"]["temperature"]
    want = inference.ClipModel(reference, device=torch.device("cpu"), dtype=None, temperature=temperature,
                           tta_flip=False)(hq, lq)
    fp32 = inference.ClipModel(model, device=torch.device("cpu"), dtype=None, temperature=temperature, tta_flip=False)
    np.testing.assert_allclose(fp32(hq, lq), want, rtol=1e-5)
    bf16 = inference.ClipModel(model_from_checkpoint(ckpt, "cpu"), device=torch.device("cpu"),
                           dtype=torch.bfloat16, temperature=temperature, tta_flip=False)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16  # cast, not autocast: no BatchNorm round trips
    assert {p.dtype for p in bf16.model.classifier.parameters()} == {torch.float32}
    # and nothing of the model still views the checkpoint's memory map (which would keep ~all of it resident)
    assert [n for n, t in [*bf16.model.named_parameters(), *bf16.model.named_buffers()]
            if t.untyped_storage().data_ptr() in mapped] == []
    probs = bf16(hq, lq)
    assert probs.shape == (3,) and ((probs >= 0) & (probs <= 1)).all()
    logits = torch.logit(torch.from_numpy(probs)).float() * temperature
    assert not torch.equal(logits.bfloat16().float(), logits)  # fp32 logits: clips do not tie on bf16's grid
    assert not np.array_equal(probs.astype(np.float32), probs)  # nor on fp32's, where a sigmoid near 0.5 rounds
    # The fixture's calibration (a tiny temperature for a barely trained model) magnifies any rounding in the
    # probabilities, so bf16 is compared where its rounding shows: the streams' features.
    with torch.no_grad():
        for stream, clip in (("hq", hq), ("lq", lq)):
            want_f = getattr(reference, stream)(fp32._tensor(clip))
            got_f = getattr(bf16.model, stream)(bf16._tensor(clip)).float()
            assert (got_f - want_f).abs().max() <= 0.03 * want_f.abs().max()


# ---------------------------------------------------------------- real videos

def test_shared_videos_all_get_a_status(shared_data, tmp_path):
    """DFDC 1080p clips labelled by metadata.json, the wild pairs by a list, and the unlabelled multi-face clips
    (faces come and go there): 4 sampled frames each."""
    (tmp_path / "wild.csv").write_text("path,label\n" + "".join(
        f"{p},{p.parent.name}\n" for p in sorted((shared_data / "wild_pairs").rglob("*.mp4"))))
    cfg = load_config(overrides=[{"train": {"amp": "off"}, "extract": {"max_frames": 4},
                                  "score": {"device": "cpu", "batch_size": 8}}])
    torch.manual_seed(0)
    model = DualStreamNet.from_config({**cfg.model, **TINY})
    align = {**cfg.align.to_dict(), "min_track_len": 2}
    ckpt = make_checkpoint(tmp_path / "tiny.pt", model, cfg, align, stride=15)
    summary = score_store.run_score([str(shared_data / "dfdc_sample"), str(tmp_path / "wild.csv"),
                                     str(shared_data / "multiface")], str(ckpt), cfg, out=str(tmp_path / "scores.csv"),
                                    labels=str(shared_data / "dfdc_sample/metadata.json"), work=None, split=None,
                                    shard=Shard(), progress=False)
    table = pd.read_csv(summary.csv, keep_default_na=False)
    assert len(table) == 16 and set(table.status) <= set(score.STATUSES) - {"error"}, table.reason.tolist()
    assert (table.true_label != "").sum() == 14
    ok = table[table.status == "ok"]
    assert len(ok) >= 10 and ok.score.astype(float).between(0, 1).all()
    assert (table[table.status != "ok"].score == "").all()
    # The Python API on the same real videos (several faces that come and go): the same results, track by track.
    import dfpipe
    rows = table.set_index("path")
    multiface = sorted(str(p) for p in (shared_data / "multiface").rglob("*.mp4"))
    for result in dfpipe.Detector.from_checkpoint(ckpt, device="cpu", config=cfg).score_many(multiface):
        row = rows.loc[result.path]
        assert result.status == row.status
        assert (result.score is None) if row.score == "" else result.score == pytest.approx(float(row.score))
        assert {str(t.track): t.score for t in result.tracks} == json.loads(row.track_scores)


def test_the_checkpoints_rule_is_applied_with_the_parameters_it_was_chosen_with():
    ckpt = {"extract": {"stride": 3}, "align": {}, "clip_len": 4,
            "calibration": {"temperature": 1.0, "threshold": 0.5, "aggregate": "topk",
                            "rule_params": {"topk": 1, "confident_high": 0.7, "confident_low": 0.3,
                                            "confident_fraction": 0.5}}}
    settings = score.scoring_settings(ckpt, load_config(), "best.pt")
    assert (settings.rule, settings.rule_params["topk"], settings.rule_params["confident_high"]) == ("topk", 1, 0.7)
    chosen = load_config(overrides=[{"score": {"aggregate": "topk", "topk": 2}}])
    assert score.scoring_settings(ckpt, chosen, "best.pt").rule_params["topk"] == 2  # a rule given, its parameters


def test_the_command_exits_1_when_a_video_could_not_be_read(root, checkpoint, tmp_path):
    """As extract does for a failed video; a video without a face is a result (exit 0)."""
    out = dfpipe("score-video", root / "bad" / "noface.mp4", "--checkpoint", checkpoint, "--out", tmp_path / "a.csv",
                 "--quiet", check=False)
    assert out.returncode == 0 and "no_face" in out.stdout
    out = dfpipe("score-video", root / "bad", "--checkpoint", checkpoint, "--out", tmp_path / "b.csv", "--quiet",
                 check=False)
    assert out.returncode == 1 and "undecodable" in out.stdout and (tmp_path / "b.csv").is_file()


# ---------------------------------------------------------------- the onnxruntime path (stages/onnx_model.py)

def onnx_and_torch(checkpoint, tta_flip=False):
    ckpt = load_checkpoint(checkpoint)
    temperature = ckpt["calibration"]["temperature"]
    torch_model = inference.ClipModel(model_from_checkpoint(ckpt, "cpu"), device=torch.device("cpu"), dtype=None,
                                      temperature=temperature, tta_flip=tta_flip)
    ort_model = onnx_model.OnnxClipModel(load_checkpoint(checkpoint), checkpoint, clip_len=CLIP_LEN,
                                         temperature=temperature, tta_flip=tta_flip)
    return torch_model, ort_model


@pytest.mark.parametrize("tta_flip", [False, True])
def test_onnxruntime_gives_torchs_fp32_probabilities_at_any_batch_size(checkpoint, tta_flip):
    torch_model, ort_model = onnx_and_torch(checkpoint, tta_flip)
    rng = np.random.default_rng(2)
    for batch in (1, 4):  # exported at batch 1: the batch axis must stay free
        hq = rng.integers(0, 256, (batch, CLIP_LEN, 224, 224, 3), dtype=np.uint8)
        lq = rng.integers(0, 256, (batch, CLIP_LEN, 112, 112, 3), dtype=np.uint8)
        want, got = torch_model(hq, lq), ort_model(hq, lq)
        assert got.shape == (batch,) and got.dtype == np.float64
        # float rounding, magnified by this checkpoint's amplified BatchNorm and small temperature (see `checkpoint`)
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.ptp(want) > 0.05  # distinct clips, distinct probabilities: the comparison can fail


def cache_files(tmp_path) -> tuple[Path, Path, Path]:
    """The checkpoint's export, the graph as onnxruntime optimised it for this CPU and the checkpoint's card (MTCNN's
    exports may lie beside them)."""
    files = sorted(p for p in (tmp_path / "cache/onnx").iterdir() if not p.name.startswith("mtcnn"))
    assert len(files) == 3, files
    export, optimized = sorted((p for p in files if p.suffix == ".onnx"), key=lambda p: "-optimized-" in p.name)
    assert all(p.stat().st_size > 10_000 for p in (export, optimized))
    assert optimized.name.startswith(export.stem + "-optimized-")
    card = next(p for p in files if p.suffix == ".json")
    return export, optimized, card


def test_the_export_is_cached_per_checkpoint_file_and_a_hit_reads_no_weights(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "cache"))
    _, first = onnx_and_torch(checkpoint)
    cached = cache_files(tmp_path)
    ckpt = load_checkpoint(checkpoint)
    ckpt["model"] = {}  # a hit must not build the model: with no weights, building it would fail
    monkeypatch.setattr(onnx_model, "export", lambda *a, **k: pytest.fail("exported again"))
    hit = onnx_model.OnnxClipModel(ckpt, checkpoint, clip_len=CLIP_LEN, temperature=1.0, tta_flip=False)
    hq = np.random.default_rng(3).integers(0, 256, (2, CLIP_LEN, 224, 224, 3), dtype=np.uint8)
    lq = np.random.default_rng(4).integers(0, 256, (2, CLIP_LEN, 112, 112, 3), dtype=np.uint8)
    first.temperature = 1.0
    # the optimised graph read back gives what the session that optimised it gave, bit for bit
    assert np.array_equal(hit(hq, lq), first(hq, lq))
    other = tmp_path / "other.pt"
    other.write_bytes(checkpoint.read_bytes() + b"")  # same bytes: same cache entry
    onnx_model.OnnxClipModel(load_checkpoint(other), other, clip_len=CLIP_LEN, temperature=1.0, tta_flip=False)
    assert cache_files(tmp_path) == cached


def test_the_optimised_graph_is_named_for_the_cpu_and_onnxruntime(tmp_path, monkeypatch):
    export = tmp_path / "abc-T10.onnx"
    here = ort_session._optimized_path(export)
    monkeypatch.setattr(ort_session, "cpu_flags", lambda: "fpu avx2")
    assert ort_session._optimized_path(export) != here and here.parent == tmp_path


def test_with_its_export_cached_a_checkpoint_is_read_from_its_card_alone(root, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "cache"))
    video = root / "data/fake/fake_000.mp4"
    first = Detector.from_checkpoint(checkpoint, device="cpu", config=config(runtime="onnx")).score(video)
    _, _, card_file = cache_files(tmp_path)
    card = json.loads(card_file.read_text())
    full = load_checkpoint(checkpoint)
    assert card == {k: full[k] for k in CARD_KEYS} and card["calibration"]["temperature"] != 1.0
    monkeypatch.setattr(ensemble, "load_checkpoint", lambda p: pytest.fail(f"read {p}"))
    again = Detector.from_checkpoint(checkpoint, device="cpu", config=config(runtime="onnx")).score(video)
    same = lambda result: dataclasses.replace(result, seconds=0.0)  # noqa: E731  (wall time aside)
    assert same(again) == same(first) and first.status == "ok" and len(first.tracks[0].clips) == 2
    # torch asked for: the weights are needed, and read
    with pytest.raises(pytest.fail.Exception, match="read"):
        Detector.from_checkpoint(checkpoint, device="cpu", config=config(runtime="torch"))


def test_a_card_without_its_export_or_unreadable_is_not_used(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "cache"))
    onnx_and_torch(checkpoint)
    export, _, card_file = cache_files(tmp_path)
    assert onnx_model.cached_card(checkpoint)["clip_len"] == CLIP_LEN
    card_file.write_text('{"clip_len": 1')  # cut short
    assert onnx_model.cached_card(checkpoint) is None
    onnx_and_torch(checkpoint)  # scoring with the checkpoint itself writes the card again
    assert onnx_model.cached_card(checkpoint) == json.loads(card_file.read_text())
    export.unlink()
    assert onnx_model.cached_card(checkpoint) is None


def test_an_unwritable_cache_still_scores_with_a_warning(checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "file"))  # a file where the cache folder would go
    torch_model, ort_model = onnx_and_torch(checkpoint)
    assert "cannot write" in capsys.readouterr().err
    hq = np.full((1, CLIP_LEN, 224, 224, 3), 90, np.uint8)
    lq = np.full((1, CLIP_LEN, 112, 112, 3), 90, np.uint8)
    np.testing.assert_allclose(ort_model(hq, lq), torch_model(hq, lq), atol=1e-4)


def test_a_damaged_cache_file_is_exported_again(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "cache"))
    torch_model, ort_model = onnx_and_torch(checkpoint)
    cached, optimized, _ = cache_files(tmp_path)
    good = cached.read_bytes()
    for path in (cached, optimized):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # cut short
    capsys.readouterr()
    again = onnx_model.OnnxClipModel(load_checkpoint(checkpoint), checkpoint, clip_len=CLIP_LEN,
                                      temperature=load_checkpoint(checkpoint)["calibration"]["temperature"],
                                      tta_flip=False)
    err = capsys.readouterr().err
    assert f"{cached}: not a readable export" in err and "exporting" in err
    assert cached.read_bytes() == good  # replaced by the same export
    hq = np.full((1, CLIP_LEN, 224, 224, 3), 60, np.uint8)
    lq = np.full((1, CLIP_LEN, 112, 112, 3), 60, np.uint8)
    np.testing.assert_allclose(again(hq, lq), torch_model(hq, lq), atol=1e-4)
    # a damaged optimised graph alone: optimised again from the export, with the same probabilities
    optimized.write_bytes(b"not a graph")
    capsys.readouterr()
    third = onnx_model.OnnxClipModel(load_checkpoint(checkpoint), checkpoint, clip_len=CLIP_LEN,
                                      temperature=load_checkpoint(checkpoint)["calibration"]["temperature"],
                                      tta_flip=False)
    err = capsys.readouterr().err
    assert f"{optimized}: not a readable optimised graph" in err and "exporting" not in err
    assert optimized.stat().st_size > 10_000 and np.array_equal(third(hq, lq), again(hq, lq))


def test_runtime_choice_and_refusals(monkeypatch):
    cpu, cuda = "cpu", "cuda"
    monkeypatch.setattr(onnx_model, "has_amx", lambda: False)
    assert onnx_model.choose_runtime("auto", cpu, 0) == "onnx"
    assert onnx_model.choose_runtime("auto", cpu, 4) == "torch"  # Monte-Carlo dropout runs in torch
    assert onnx_model.choose_runtime("auto", cuda, 0) == "torch"
    assert onnx_model.choose_runtime("torch", cpu, 0) == "torch"
    monkeypatch.setattr(onnx_model, "has_amx", lambda: True)
    assert onnx_model.choose_runtime("auto", cpu, 0) == "torch"  # AMX: torch's bf16 is the faster
    assert onnx_model.choose_runtime("onnx", cpu, 0) == "onnx"
    with pytest.raises(InputError, match="score.device is cuda"):
        onnx_model.choose_runtime("onnx", cuda, 0)
    with pytest.raises(InputError, match="mc_samples needs torch"):
        onnx_model.choose_runtime("onnx", cpu, 2)
    monkeypatch.setattr(onnx_model, "has_amx", lambda: False)
    find_spec = onnx_model.importlib.util.find_spec
    monkeypatch.setattr(onnx_model.importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else find_spec(n))
    assert onnx_model.choose_runtime("auto", cpu, 0) == "torch"  # an install without it still scores
    with pytest.raises(InputError, match="onnx needs onnxruntime, not installed here: pip install onnxruntime"):
        onnx_model.choose_runtime("onnx", cpu, 0)


def test_amx_is_read_from_the_cpu_flags_as_torch_reads_it(monkeypatch):
    assert onnx_model.has_amx() == torch.cpu._is_amx_tile_supported()  # this machine, either way
    monkeypatch.setattr(onnx_model, "cpu_flags", lambda: " fpu avx512f amx_bf16 amx_tile amx_int8")
    assert onnx_model.has_amx()
    monkeypatch.setattr(onnx_model, "cpu_flags", lambda: " fpu avx512f avx512_bf16")
    assert not onnx_model.has_amx()


def test_score_video_in_onnxruntime_and_in_torch_agree_and_a_warm_process_imports_no_torch(root, checkpoint,
                                                                                            tmp_path):
    videos = [root / f"data/{v}.mp4" for v in DEMO[:2]]
    rows = {}
    for runtime in ("onnx", "torch"):
        summary = run(checkpoint, videos, tmp_path / runtime / "scores.csv", cfg=config(runtime=runtime))
        rows[runtime] = jsonl(summary.jsonl)
    probs = {rt: np.array([c[2] for v in videos for c in r[str(v)]["clip_probs"]]) for rt, r in rows.items()}
    assert len(probs["onnx"]) == 4 and np.ptp(probs["torch"]) > 0.1
    np.testing.assert_allclose(probs["onnx"], probs["torch"], atol=1e-4)
    # the export and MTCNN's are cached now: a new process scoring through them loads no torch (nor timm, torchvision)
    script = (f"import sys; from dfpipe.stages import score_store; from dfpipe.manifests.workspace import Shard; "
              f"from dfpipe.pipeline.config import load_config; "
              f"cfg = load_config(overrides=[{{'score': {{'runtime': 'onnx', 'device': 'cpu'}}, "
              f"'align': {{'device': 'cpu'}}}}]); "
              f"score_store.run_score([{str(videos[0])!r}], {str(checkpoint)!r}, cfg, out={str(tmp_path / 'w.csv')!r},"
              f" labels=None, work=None, split=None, shard=Shard(), progress=False); "
              f"print(sorted(m for m in ('torch', 'timm', 'torchvision', 'facenet_pytorch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "exporting" not in proc.stderr
    # and it scores as the process that loaded the checkpoint with torch did, bit for bit
    assert jsonl(tmp_path / "w.jsonl")[str(videos[0])]["clip_probs"] == rows["onnx"][str(videos[0])]["clip_probs"]



def test_the_runtime_option_picks_what_runs_the_model(root, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DFPIPE_CACHE", str(tmp_path / "cache"))
    video = root / "data/real/real_000.mp4"
    torch_run = dfpipe("score-video", video, "--checkpoint", checkpoint, "--out", tmp_path / "t.csv", "--runtime",
                       "torch", "--device", "cpu", "--set", "train.amp=off")  # fp32, as onnxruntime's
    # the model is not exported (the face path's MTCNN runs in onnxruntime on the CPU whatever runs the model)
    assert f"exporting {checkpoint}" not in torch_run.stderr
    assert [p.name[:6] for p in (tmp_path / "cache/onnx").iterdir()] == ["mtcnn-"] * 3
    onnx_run = dfpipe("score-video", video, "--checkpoint", checkpoint, "--out", tmp_path / "o.csv", "--runtime",
                      "onnx", "--device", "cpu")
    assert "exporting" in onnx_run.stderr and len(cache_files(tmp_path)) == 3
    scores = [float(pd.read_csv(tmp_path / f"{name}.csv").score[0]) for name in ("t", "o")]
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)


def test_onnxruntime_scores_real_videos_as_torch_fp32(shared_data, checkpoint, tmp_path):
    videos = [shared_data / "ffpp_c40/original_sequences/youtube/c40/videos/183.mp4",
              shared_data / "ffpp_c40/manipulated_sequences/Deepfakes/c40/videos/183_253.mp4"]
    probs = {}
    for runtime in ("onnx", "torch"):
        cfg = load_config(overrides=[{"train": {"amp": "off"}, "align": {"device": "cpu"}, "extract": {"max_frames": 24},
                                      "score": {"runtime": runtime, "device": "cpu"}}])
        rows = jsonl(run(checkpoint, videos, tmp_path / runtime / "s.csv", cfg=cfg).jsonl)
        probs[runtime] = np.array([c[1] for v in videos for c in rows[str(v)]["clip_probs"]])
    assert len(probs["onnx"]) >= 4 and np.ptp(probs["torch"]) > 0.01
    np.testing.assert_allclose(probs["onnx"], probs["torch"], atol=1e-4)


def test_mtcnn_in_onnxruntime_scores_real_videos_as_mtcnn_in_torch(shared_data, checkpoint, tmp_path, monkeypatch):
    """MTCNN's nets in onnxruntime move boxes and landmarks by ~1e-4 px against torch's (tests/test_mtcnn.py); the
    crops warped from them then differ by a rounding here and there, and the scores by about as much as that moves
    them: on 10 shared videos (354 clips, a default-architecture checkpoint) 1.1e-3 at most per clip, 2.5e-4 per
    video. This test's tiny model amplifies its input (see `checkpoint`): 8.7e-3 at most over these 26 clips, hence
    its tolerance, against clip probabilities spread over 0.98 of (0, 1): a wrong crop moves them by far more."""
    videos = [shared_data / "ffpp_c40/manipulated_sequences/Deepfakes/c40/videos/183_253.mp4",
              shared_data / "dfdc_sample/abqwwspghj.mp4"]
    cfg = load_config(overrides=[{"align": {"device": "cpu"}, "extract": {"max_frames": 40},
                                  "score": {"runtime": "onnx", "device": "cpu"}}])
    probs = {}
    load = mtcnn_nets.load
    for runtime in ("onnx", "torch"):
        monkeypatch.setattr(mtcnn_nets, "load", lambda device, _, runtime=runtime: load(device, runtime))
        rows = jsonl(run(checkpoint, videos, tmp_path / runtime / "s.csv", cfg=cfg).jsonl)
        probs[runtime] = {(str(v), c[0], tuple(c[2])): c[1] for v in videos for c in rows[str(v)]["clip_probs"]}
    assert probs["onnx"].keys() == probs["torch"].keys() and len(probs["onnx"]) >= 6  # the same clips
    got, want = (np.array([probs[r][k] for k in sorted(probs["onnx"])]) for r in ("onnx", "torch"))
    assert np.ptp(want) > 0.5
    np.testing.assert_allclose(got, want, atol=2e-2)


def test_a_checkpoint_of_the_older_convlstm_layout_scores_alike_in_onnxruntime(checkpoint, tmp_path):
    """Checkpoints written before the ConvLSTM's gate convolution was split hold one `conv` over [x, h]."""
    ckpt = torch.load(checkpoint, weights_only=True)
    state = ckpt["model"]
    for prefix in sorted({k.rsplit(".input_conv.", 1)[0] for k in state if ".input_conv." in k}):
        state[f"{prefix}.conv.weight"] = torch.cat([state.pop(f"{prefix}.input_conv.weight"),
                                                    state.pop(f"{prefix}.hidden_conv.weight")], dim=1)
        state[f"{prefix}.conv.bias"] = state.pop(f"{prefix}.input_conv.bias")
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    temperature = ckpt["calibration"]["temperature"]
    rng = np.random.default_rng(3)
    hq = rng.integers(0, 256, (2, CLIP_LEN, 224, 224, 3), dtype=np.uint8)
    lq = rng.integers(0, 256, (2, CLIP_LEN, 112, 112, 3), dtype=np.uint8)
    torch_model, _ = onnx_and_torch(checkpoint)
    from_old = onnx_model.OnnxClipModel(load_checkpoint(old), old, clip_len=CLIP_LEN, temperature=temperature,
                                        tta_flip=False)
    np.testing.assert_allclose(from_old(hq, lq), torch_model(hq, lq), atol=1e-4)
