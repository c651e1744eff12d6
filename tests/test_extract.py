"""`dfpipe extract` end to end: crash safety, idempotence, invalidation, verify, bad inputs, locks, shards."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd

from conftest import CLI, dfpipe, kill_at_random_moments, make_clip, snapshot, timed_dfpipe
from dfpipe.manifests.workspace import Workspace
from dfpipe.pipeline.config import load_config
from dfpipe.stages import extract as extract_mod

def make_dataset(root: Path, n_real=3, n_fake=3, frames=12, size=(64, 48)) -> Path:
    for i in range(n_real):
        make_clip(root / "real" / f"real_{i}.mp4", n=frames, width=size[0], height=size[1], seed=i)
    for i in range(n_fake):
        make_clip(root / "fake" / f"fake_{i}.mp4", n=frames, width=size[0], height=size[1], seed=100 + i)
    return root


def frames_table(ws: Path) -> pd.DataFrame:
    return pd.read_csv(ws / "manifests" / "frames.csv", dtype={"video_id": str})


def test_extract_writes_sampled_frames_with_their_content(tmp_path):
    data = make_dataset(tmp_path / "data", n_real=1, n_fake=1, frames=10)
    ws = tmp_path / "ws"
    out = dfpipe("extract", data, "--work", ws, "--stride", 3, "--quiet")
    assert "dataset layout: folders" in out.stdout and "2 processed, 0 failed" in out.stdout
    frames = frames_table(ws)
    assert list(frames[frames.video_id == "real/real_0"].frame_index) == [0, 3, 6, 9]
    from conftest import pattern_frames
    truth = list(pattern_frames(10, 64, 48, seed=0))
    for _, row in frames[frames.video_id == "real/real_0"].iterrows():
        img = cv2.cvtColor(cv2.imread(str(ws / row.path)), cv2.COLOR_BGR2RGB).astype(float)
        errors = [np.abs(img - t).mean() for t in truth]
        assert int(np.argmin(errors)) == row.frame_index and min(errors) < 12
    videos = pd.read_csv(ws / "manifests" / "videos.csv", keep_default_na=False)
    fake = videos.set_index("video_id").loc["fake/fake_0"]
    assert fake.label == "fake" and fake.frames == 10 and fake.width == 64 and len(fake.sha256) == 64
    status = dfpipe("status", "--work", ws).stdout
    assert status.splitlines()[1].split() == ["extract", "2", "0", "0", "0", "0"]
    fake_path = data / "fake" / "fake_0.mp4"
    os.utime(fake_path, ns=(fake_path.stat().st_atime_ns, fake_path.stat().st_mtime_ns + 10**9))  # touched only
    status = dfpipe("status", "--work", ws).stdout
    assert status.splitlines()[1].split() == ["extract", "2", "0", "0", "0", "0"]
    make_clip(data / "real" / "real_0.mp4", n=12, seed=5)  # replaced on disk: stale before extract re-hashes it
    status = dfpipe("status", "--work", ws).stdout
    assert status.splitlines()[1].split() == ["extract", "1", "1", "0", "0", "0"]


def test_sigkill_at_random_moments_then_rerun_is_byte_identical(tmp_path):
    data = make_dataset(tmp_path / "data", n_real=4, n_fake=4, frames=60, size=(160, 120))
    clean = tmp_path / "clean"
    _, duration = timed_dfpipe("extract", data, "--work", clean, "--stride", 1, "--quiet")
    expected = snapshot(clean)
    ws = tmp_path / "killed"
    killed_mid_work = kill_at_random_moments(["extract", data, "--work", ws, "--stride", 1, "--quiet"],
                                             times=4, duration=duration, seed=1234)
    dfpipe("extract", data, "--work", ws, "--stride", 1, "--quiet")
    assert killed_mid_work >= 1, "no kill landed while extract was running; the test proved nothing"
    got = snapshot(ws)
    assert sorted(got) == sorted(expected)  # no temp, journal or orphan file left
    assert got == expected
    assert not (ws / "tmp").exists()


def test_second_run_does_no_decoding(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n_real=2, n_fake=1)
    ws = Workspace(tmp_path / "ws")
    cfg = load_config(overrides=[{"extract": {"workers": 0}}])
    _, first = extract_mod.run_extract(ws, data, cfg, progress=False)
    assert first.ran == 3
    before = snapshot(ws.root)

    def no_decoding(*a, **k):
        raise AssertionError("decoded on a rerun")
    monkeypatch.setattr(extract_mod, "FrameReader", no_decoding)
    monkeypatch.setattr(extract_mod, "probe", no_decoding)
    monkeypatch.setattr(extract_mod, "sha256_file", no_decoding)
    _, second = extract_mod.run_extract(ws, data, cfg, progress=False)
    assert (second.skipped, second.ran, second.failed) == (3, 0, [])
    assert snapshot(ws.root) == before


def test_stride_change_or_replaced_video_redo_exactly_those_units(tmp_path):
    data = make_dataset(tmp_path / "data", n_real=2, n_fake=0, frames=12)
    ws = tmp_path / "ws"
    dfpipe("extract", data, "--work", ws, "--stride", 3, "--quiet")
    out = dfpipe("extract", data, "--work", ws, "--stride", 2, "--quiet")
    assert "2 processed" in out.stdout
    frames = frames_table(ws)
    assert list(frames[frames.video_id == "real/real_0"].frame_index) == [0, 2, 4, 6, 8, 10]
    assert not (ws / "frames/real__real_0/000003.jpg").exists()  # stale outputs removed
    time.sleep(0.01)
    make_clip(data / "real" / "real_1.mp4", n=6, width=64, height=48, seed=77)  # replaced video
    out = dfpipe("extract", data, "--work", ws, "--stride", 2, "--quiet")
    assert "1 already done, 1 processed" in out.stdout
    frames = frames_table(ws)
    assert list(frames[frames.video_id == "real/real_1"].frame_index) == [0, 2, 4]


def test_verify_detects_deleted_and_modified_frames_and_rerun_repairs(tmp_path):
    data = make_dataset(tmp_path / "data", n_real=2, n_fake=1)
    ws = tmp_path / "ws"
    dfpipe("extract", data, "--work", ws, "--quiet")
    good = snapshot(ws)
    frames = frames_table(ws)
    deleted, modified = ws / frames.path[0], ws / frames.path[len(frames) - 1]
    deleted.unlink()
    modified.write_bytes(modified.read_bytes()[:-10] + b"0123456789")
    out = dfpipe("verify", "--work", ws, check=False)
    assert out.returncode == 1
    assert f"missing {frames.path[0]}" in out.stdout and f"changed {frames.path[len(frames) - 1]}" in out.stdout
    out = dfpipe("verify", "--work", ws, check=False)
    assert out.returncode == 1 and "2 video(s) still to redo (run `dfpipe extract`)" in out.stdout
    out = dfpipe("extract", data, "--work", ws, "--quiet")
    assert "2 processed" in out.stdout
    assert snapshot(ws) == good
    assert dfpipe("verify", "--work", ws).returncode == 0


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        t = np.linspace(0, 1, 16000, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(np.sin(2 * np.pi * 440 * t)[None, :], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_a_listed_file_that_is_not_on_disk_fails_with_its_reason(tmp_path):
    """It was a note at discovery, easy to miss, where score-video gives the same file a status."""
    make_clip(tmp_path / "here.mp4", n=9)
    (tmp_path / "list.csv").write_text("path,label\nhere.mp4,real\ngone.mp4,fake\n")
    _, summary = extract_mod.run_extract(Workspace(tmp_path / "ws"), tmp_path / "list.csv", load_config(),
                                         progress=False)
    assert summary.ran == 1 and [(v, "not found" in r) for v, r in summary.failed] == [("gone", True)]


def test_bad_inputs_fail_alone_with_one_line_reasons(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n_real=1, n_fake=0)
    real = data / "real"
    good_unicode = make_clip(real / "clip with space ünï.mp4", n=9)
    (real / "zero.mp4").write_bytes(b"")
    truncated = make_clip(real / "truncated.mp4", n=60, width=128, height=96)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (real / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    clip = make_clip(tmp_path / "clip.mp4", n=9).read_bytes()  # header cut before the track's codec description
    (real / "nocodec.mp4").write_bytes(clip[:clip.find(b"stsd") - 4])
    _audio_only(real / "audio.mp4")
    cv2.imwrite(str(real / "image.png"), np.full((48, 64, 3), 128, np.uint8))
    os.rename(real / "image.png", real / "image.mp4")
    os.symlink(real / "does-not-exist.mp4", real / "dangling.mp4")
    vanishing = make_clip(real / "vanishing.mp4", n=9)

    build = extract_mod.build_videos_table

    def build_then_delete(*a, **k):
        result = build(*a, **k)
        vanishing.unlink()  # the file disappears between discovery and decoding
        return result
    monkeypatch.setattr(extract_mod, "build_videos_table", build_then_delete)
    ws = Workspace(tmp_path / "ws")
    _, summary = extract_mod.run_extract(ws, data, load_config(), progress=False)
    reasons = dict(summary.failed)
    expected = {"zero": "empty", "truncated": "", "random": "", "audio": "no video stream",
                "image": "image", "dangling": "not found", "vanishing": "not found",
                "nocodec": "truncated header"}
    assert sorted(reasons) == sorted(f"real/{k}" for k in expected)
    for name, word in expected.items():
        reason = reasons[f"real/{name}"]
        assert "\n" not in reason and word in reason.lower() and len(reason) < 300, (name, reason)
    assert summary.ran == 2
    frames = pd.read_csv(ws.manifest("frames.csv"))
    assert set(frames.video_id) == {"real/real_0", f"real/{good_unicode.stem}"}
    units = pd.read_csv(ws.manifest("extract.csv"), keep_default_na=False).set_index("video_id")
    assert (units.loc[[f"real/{k}" for k in expected], "status"] == "failed").all()
    cli = dfpipe("extract", data, "--work", tmp_path / "ws2", "--quiet", check=False)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr and "failed real/zero:" in cli.stderr
    # align has not run: its 2 extracted videos are pending, the 7 that extract failed wait for it (the vanished
    # one is gone)
    rows = [line.split() for line in dfpipe("status", "--work", tmp_path / "ws2").stdout.splitlines()]
    assert rows[1:] == [["extract", "2", "0", "7", "0", "0"], ["align", "0", "0", "0", "2", "7"]]


def test_missing_input_is_a_one_line_error(tmp_path):
    out = dfpipe("extract", tmp_path, "--work", tmp_path / "ws", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and str(tmp_path) in out.stderr
    assert not (tmp_path / "ws").exists()  # a rejected input leaves no empty workspace for status/verify to accept


def test_concurrent_extracts_do_not_corrupt_the_workspace(tmp_path):
    data = make_dataset(tmp_path / "data", n_real=3, n_fake=3, frames=40, size=(160, 120))
    clean = tmp_path / "clean"
    dfpipe("extract", data, "--work", clean, "--quiet")
    ws = tmp_path / "ws"
    procs = [subprocess.Popen([*CLI, "extract", str(data), "--work", str(ws), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results
    if codes[1] != 0:  # the loser is refused with a clear message, not a traceback
        loser = [err for code, err in results if code != 0][0]
        assert "in use by pid" in loser and "Traceback" not in loser
    dfpipe("extract", data, "--work", ws, "--quiet")
    assert snapshot(ws) == snapshot(clean)
    assert dfpipe("verify", "--work", ws).returncode == 0


def test_two_shards_produce_the_same_frames_as_one_run(tmp_path):
    data = make_dataset(tmp_path / "data", n_real=4, n_fake=4)
    one, two = tmp_path / "one", tmp_path / "two"
    dfpipe("extract", data, "--work", one, "--quiet")
    a = dfpipe("extract", data, "--work", two, "--shard", "0/2", "--quiet")
    b = dfpipe("extract", data, "--work", two, "--shard", "1/2", "--quiet")
    assert "0 failed" in a.stdout and "0 failed" in b.stdout
    assert snapshot(one) == snapshot(two)
    out = dfpipe("extract", data, "--work", two, "--quiet")
    assert "8 already done, 0 processed" in out.stdout


def test_bad_shard_argument(tmp_path):
    out = dfpipe("extract", tmp_path, "--work", tmp_path / "w", "--shard", "2/2", check=False)
    assert out.returncode == 2 and "0 <= I < N" in out.stderr


def test_ffpp_c40_tree(shared_data, tmp_path):
    ws = tmp_path / "ws"
    out = dfpipe("extract", shared_data / "ffpp_c40", "--work", ws, "--max-frames", 2, "--quiet")
    assert "dataset layout: ffpp (50 videos)" in out.stdout and "50 processed, 0 failed" in out.stdout
    videos = pd.read_csv(ws / "manifests/videos.csv", keep_default_na=False).set_index("video_id")
    assert (videos.label == "real").sum() == 10 and (videos.label == "fake").sum() == 40
    assert videos.loc["Deepfakes/183_253", "source_id"] == "youtube/183"
    truth = pd.read_csv(shared_data / "videos.csv")
    truth = truth[truth.file.str.startswith("ffpp_c40/")]
    by_path = videos.reset_index().set_index("path")
    for _, t in truth.iterrows():
        row = by_path.loc[str(shared_data / t.file)]
        assert row.frames == t.frames and row.sha256 == t.sha256, t.file
        assert row.label == t.label.lower()
    frames = frames_table(ws)
    assert frames.groupby("video_id").size().eq(2).all() and len(frames) == 100


def test_a_narrower_input_keeps_finished_videos_unless_pruned(tmp_path):
    """A subfolder given by mistake must not delete the frames (and, through align, the crops) of the rest."""
    data = make_dataset(tmp_path / "data", n_real=2, n_fake=2, frames=6)
    ws = tmp_path / "ws"
    dfpipe("extract", data, "--work", ws, "--quiet")
    before = snapshot(ws)
    narrower = tmp_path / "narrower"
    shutil.copytree(data / "real", narrower / "real")
    out = dfpipe("extract", narrower, "--work", ws, "--quiet", check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "2 video(s) extracted earlier are not in" in out.stderr and "(e.g. fake/fake_0)" in out.stderr
    assert snapshot(ws) == before
    dfpipe("extract", narrower, "--work", ws, "--quiet", "--prune")
    assert sorted(p.name for p in (ws / "frames").iterdir()) == ["real__real_0", "real__real_1"]


def test_a_rows_table_that_lost_rows_makes_its_videos_stale(tmp_path):
    """A damaged or half-copied frames.csv: a video whose rows are gone (or some of them) is redone, not taken for
    a shorter video (align would then crop only the frames left, and delete the other crops)."""
    data = make_dataset(tmp_path / "data", n_real=1, n_fake=1, frames=12)
    ws = tmp_path / "ws"
    dfpipe("extract", data, "--work", ws, "--stride", 2, "--quiet")
    clean = snapshot(ws)
    table = ws / "manifests" / "frames.csv"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:-2]))  # the last video loses two of its six rows
    assert dfpipe("status", "--work", ws).stdout.splitlines()[1].split()[:3] == ["extract", "1", "1"]
    out = dfpipe("extract", data, "--work", ws, "--stride", 2, "--quiet")
    assert "1 already done, 1 processed" in out.stdout
    assert snapshot(ws) == clean
