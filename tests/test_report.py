"""`dfpipe report` on score-video's output for demo videos and bad files: pages and their links, the recomputed
clips are the scored ones, Grad-CAM, resume, refusals, and the pages as headless Chromium draws them."""
from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, dfpipe
import test_score
from test_score import TINY, config, run

from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.stages import report, report_html
from dfpipe.stages.checkpoint import load_checkpoint, model_from_checkpoint
from dfpipe.stages.explain import explain_clip, mass_inside
from dfpipe.stages.faces import FaceDetector
from dfpipe.stages.score import scoring_settings

# the scoring tests' fixtures: demo videos and bad files staged by extract + align, a tiny input-sensitive model
root, checkpoint = test_score.root, test_score.checkpoint
IMAGE = re.compile(r'src="data:image/(png|jpeg);base64,([^"]+)"')


@pytest.fixture(scope="module")
def scores(root, checkpoint) -> Path:
    """score-video's output over the demo videos and the bad files, labelled (so metrics and plots exist)."""
    out = root / "out" / "scores.csv"
    run(checkpoint, [root / "data", root / "bad"], out, labels=str(root / "labels.csv"))
    return out


@pytest.fixture(scope="module")
def written(root, scores, checkpoint) -> tuple[report.ReportSummary, Path]:
    out = root / "report"
    return report.write_report(scores, checkpoint, out, config(), progress=False), out


def images(page: str) -> list[np.ndarray]:
    decoded = [cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
               for _, data in IMAGE.findall(page)]
    assert all(im is not None and im.size for im in decoded)
    return decoded


def test_every_video_has_a_page_linked_from_the_index_and_back(written, scores):
    summary, out = written
    rows = pd.read_csv(scores, keep_default_na=False)
    index = (out / "index.html").read_text()
    assert summary.pages == len(rows) == 7 and summary.reused == 0
    for path, status, clips in zip(rows.path, rows.status, rows.clips):
        name = report.page_name(path)
        page = (out / "videos" / f"{name}.html").read_text()
        assert f'href="videos/{name}.html"' in index and 'href="../index.html"' in page
        assert Path(path).name in page and status in page
        pictures = images(page)
        if status == "ok":  # a timeline per track, then crop + heatmap per suspicious clip, then the frame strip
            shown = min(3, clips)
            assert len(pictures) == 1 + 2 * shown + 6, path
            assert page.count('alt="Grad-CAM heatmap"') == shown and "HQ " in page and "LQ " in page
        elif status == "no_face":
            assert "No face was found" in page and len(pictures) == 6  # the frames, without boxes
        else:
            assert {"undecodable": "could not be decoded", "empty": "holds no frame"}[status] in page
            assert not pictures
    # with labels: score-video's ROC, PR and confusion plots, embedded
    assert len(images(index.split("<h2>Videos</h2>")[0])) == 3


def test_index_lists_misclassified_first_then_by_score(written, scores):
    _, out = written
    rows = pd.read_csv(scores, keep_default_na=False)
    index = (out / "index.html").read_text()
    order = [m for m in re.findall(r'href="videos/([^"]+)\.html"', index)]
    by_name = {report.page_name(p): r for p, r in zip(rows.path, rows.to_dict("records"))}
    listed = [by_name[n] for n in order]
    wrong = [bool(r["true_label"] and r["label"] and r["true_label"] != r["label"]) for r in listed]
    assert wrong == sorted(wrong, reverse=True)
    scored = [float(r["score"]) for r, w in zip(listed, wrong) if not w and r["score"] != ""]
    assert scored == sorted(scored, reverse=True)
    assert [r["score"] for r in listed[-3:]] == ["", "", ""]  # the unscored bad files last


def test_evidence_is_the_scored_clips(scores, checkpoint):
    """Running the face path again gives the very clips score-video scored: the fp32 model on the recomputed crops
    gives each clip's recorded probability."""
    cfg = config()
    ckpt = load_checkpoint(checkpoint)
    scoring = scoring_settings(ckpt, cfg, checkpoint)
    model = model_from_checkpoint(ckpt, "cpu").float().eval()
    detector = FaceDetector(**{**scoring.align, "device": "cpu"})
    ok = [r for r in report.read_scores(scores) if r["status"] == "ok"]
    assert len(ok) == 4
    for row in ok:
        evidence = report.gather_evidence(row, scoring, detector, model, faces=99, strip_frames=2)
        assert len(evidence.faces) == len(row["clip_probs"]) and not evidence.note
        recorded = {(t, tuple(f)): p for t, p, f in row["clip_probs"]}
        for face in evidence.faces:
            prob = 1 / (1 + math.exp(-face.explanation.logit / scoring.temperature))
            assert prob == pytest.approx(recorded[(face.track, face.frames)], abs=2e-3)
            assert face.crops.shape == (len(face.frames), 224, 224, 3) and face.matrices.shape == (len(face.frames), 2, 3)
            heat = face.explanation.heatmaps
            assert heat.shape == face.crops.shape[:3] and heat.min() >= 0 and heat.max() == pytest.approx(1)
            assert sum(face.explanation.attention) == pytest.approx(1)
        assert [f for f, _, _ in evidence.strip] == [0, 14]  # first and last sampled frame (stride 2, 15 frames)
        assert all(boxes for _, _, boxes in evidence.strip)


def test_gradcam_follows_the_evidence():
    """A model whose logit reads one region only: the heatmap's mass lies in that region."""
    cfg = config()
    torch.manual_seed(0)
    model = DualStreamNet.from_config({**cfg.model, **TINY}).eval()
    rng = np.random.default_rng(0)
    hq = rng.integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    lq = rng.integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    # the backbone's output is masked to its top-left quarter before anything downstream sees it
    keep = torch.zeros(1, 1, 7, 7)
    keep[..., :3, :3] = 1
    model.hq.backbone.register_forward_hook(lambda _m, _i, out: out * keep.to(out.dtype))
    explanation = explain_clip(model, hq, lq)
    region = np.zeros((224, 224))
    region[:96, :96] = 1
    assert mass_inside(explanation.heatmaps, np.broadcast_to(region, explanation.heatmaps.shape)) > 0.95


def test_heatmap_overlay_colours():
    crop = np.full((4, 4, 3), 128, np.uint8)
    hot = report_html.heatmap_overlay(crop, np.ones((4, 4), np.float32))
    cold = report_html.heatmap_overlay(crop, np.zeros((4, 4), np.float32))
    assert hot[0, 0, 0] > hot[0, 0, 2] and cold[0, 0, 2] > cold[0, 0, 0]  # jet: red hot, blue cold


def test_rerun_reuses_pages_and_a_setting_change_redoes_them(written, scores, checkpoint, tmp_path):
    _, out = written
    before = {p.name: p.read_bytes() for p in out.rglob("*.html")}
    again = report.write_report(scores, checkpoint, out, config(), progress=False)
    assert (again.pages, again.reused) == (0, 7)
    assert {p.name: p.read_bytes() for p in out.rglob("*.html")} == before
    # one video's scores in a file of their own, into a copy of the report: fewer faces redo its page only
    rows = pd.read_csv(scores, keep_default_na=False)
    fake = rows[rows.path.str.endswith("fake_000.mp4")]
    fake.to_csv(tmp_path / "one.csv", index=False)
    record = [line for line in scores.with_suffix(".jsonl").read_text().splitlines() if fake.path.iloc[0] in line]
    (tmp_path / "one.jsonl").write_text(record[0] + "\n")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    fewer = config()
    fewer["report"]["faces"] = 1
    redone = report.write_report(tmp_path / "one.csv", checkpoint, copy, fewer, progress=False)
    assert (redone.pages, redone.reused) == (1, 0)
    page = (copy / "videos" / f"{report.page_name(fake.path.iloc[0])}.html").read_text()
    assert page.count('alt="Grad-CAM heatmap"') == 1


def test_refusals_are_one_line(scores, checkpoint, root, tmp_path):
    other = tmp_path / "other.pt"
    torch.save({**torch.load(checkpoint, weights_only=True), "dfpipe_version": "other"}, other)
    with pytest.raises(report.ReportError, match="scored with another checkpoint"):
        report.write_report(scores, other, tmp_path / "r", config(), progress=False)
    with pytest.raises(report.ReportError, match="not a score-video output"):
        report.write_report(root / "labels.csv", checkpoint, tmp_path / "r", config(), progress=False)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(report.ReportError, match="empty.csv: not a score-video output"):
        report.write_report(tmp_path / "empty.csv", checkpoint, tmp_path / "r", config(), progress=False)
    lonely = tmp_path / "scores.csv"
    shutil.copy(scores, lonely)
    with pytest.raises(report.ReportError, match="clip scores score-video records"):
        report.write_report(lonely, checkpoint, tmp_path / "r", config(), progress=False)


def test_cli_report_and_its_errors(written, scores, checkpoint, tmp_path):
    _, out = written
    done = dfpipe("report", scores, "--checkpoint", checkpoint, "--out", out, "--quiet")
    assert "7 video pages (0 written, 7 already done)" in done.stdout  # the same inputs: every page reused
    bad = dfpipe("report", tmp_path / "missing.csv", "--checkpoint", checkpoint, "--out", tmp_path / "r",
                 check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    sharded = dfpipe("score-video", tmp_path / "none", "--checkpoint", checkpoint, "--shard", "0/2", "--report",
                     tmp_path / "r", check=False)
    assert sharded.returncode == 2 and "--report with --shard" in sharded.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith("missing.csv: not found (give the CSV `dfpipe score-video "
                                                        "--out` wrote)")


def test_a_real_video_with_several_faces(shared_data, checkpoint, tmp_path):
    """A real multi-face video: a timeline per face track, and the frame strip draws every track's boxes."""
    out = tmp_path / "scores.csv"
    run(checkpoint, [shared_data / "multiface" / "facenet_pytorch_example.mp4"], out)
    report.write_report(out, checkpoint, tmp_path / "r", config(), progress=False)
    (row,) = report.read_scores(out)
    assert row["status"] == "ok" and row["tracks"] >= 3
    page = (tmp_path / "r" / "videos" / f"{report.page_name(row['path'])}.html").read_text()
    assert page.count('alt="timeline of track') == row["tracks"]
    strip = re.findall(r"<figcaption>frame \d+: track ([\d, ]+)</figcaption>", page)
    assert len(strip) == 6 and max(len(s.split(",")) for s in strip) >= 3


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_pages_render_in_chromium(written, tmp_path):
    _, out = written
    shots = tmp_path / "shots"
    done = subprocess.run([sys.executable, REPO / "scripts" / "screenshot_report.py", out, shots, "--pages", "7"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    pngs = {Path(p).stem: cv2.imread(p) for p in done.stdout.split()}
    assert len(pngs) == 8 and all(im.shape[:2] == (1800, 1200) for im in pngs.values())
    hsv = {name: cv2.cvtColor(im, cv2.COLOR_BGR2HSV) for name, im in pngs.items()}
    drawn = {name: int((h[..., 1] > 100).sum()) for name, h in hsv.items()}  # saturated pixels: pictures, bars
    assert drawn["index"] > 5000
    assert sum(v > 50_000 for v in drawn.values()) >= 4  # the pages of the 4 videos with faces show pictures
