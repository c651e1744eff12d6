"""`score-video` against the staged path on a synthetic 1080p30 face clip, and its peak memory on a short and a long
clip.

Staged path: `dfpipe extract` + `dfpipe align` (frames and crops written as JPEG) + the model over the crops in the
same non-overlapping clips. Goals: score-video is faster than the staged path, and its peak RSS does not grow with
the video's length (the long clip is the short one looped, so only the length differs).
Every measurement runs in a fresh process, so each peak RSS (VmHWM) is that measurement's alone.

Usage: python benchmarks/bench_score.py [--seconds 10] [--long-seconds 300] [--model default|tiny] [--stride N]
                                        [--batch-size B] [--clip-every N] [--clips N] [--repeats N]
  default: the configured model (efficientnet-b4 + b0, random init), T = dataset.clip_len, stride = extract.stride
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from dfpipe.manifests.table import read_table
from dfpipe.manifests.workspace import Shard
from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import load_config
from dfpipe.stages import score, score_store
from dfpipe.stages.clips import clip_positions, scoring_clips
from dfpipe.stages.dataset import face_rows, read_crops, track_segments
from dfpipe.stages.demo import head_motion, head_sprite, random_background
from dfpipe.stages.faces import resolve_device
from dfpipe.stages.checkpoint import load_checkpoint, model_from_checkpoint
from dfpipe.stages.inference import ClipModel, ClipQueue, amp_dtype, model_batch
from dfpipe.stages.video import write_video

CLI = [sys.executable, "-m", "dfpipe.pipeline.cli"]
TINY = {"hq_backbone": "test_efficientnet", "lq_backbone": "test_efficientnet", "convlstm_filters": [8, 8],
        "pretrained_hq": None, "pretrained_lq": None, "bottleneck": None,
        "mlp": [16, 8, 4], "dropout": [0.2, 0.2]}
SIZE, FPS = (1920, 1080), 30


def face_clip(path: Path, seconds: int, seed: int = 0) -> Path:
    """The demo set's moving astronaut head over a textured background, rendered one frame at a time."""
    rng = np.random.default_rng(seed)
    width, height = SIZE
    sprite = head_sprite()
    background = random_background(rng, height, width)
    motion = head_motion(rng, sprite, frames=seconds * FPS, width=width, height=height, fps=FPS)

    def frames():
        for matrix in motion:
            alpha = cv2.warpAffine(sprite.alpha, matrix[:2], SIZE)[..., None]
            head = cv2.warpAffine(sprite.rgb, matrix[:2], SIZE)
            yield np.clip(background * (1 - alpha) + head * alpha, 0, 255).astype(np.uint8)
    write_video(path, frames(), fps=FPS, crf=23)
    return path


def loop_clip(src: Path, dst: Path, times: int) -> Path:
    """`times` copies of src back to back, remuxed without re-encoding (seconds for a long clip, not minutes)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        packets = [(p.pts, p.dts, bytes(p), p.is_keyframe) for p in inp.demux(stream_in) if p.size]
        span = max(p[0] for p in packets) - min(p[0] for p in packets) + int(1 / (stream_in.time_base * FPS))
        for k in range(times):
            for pts, dts, data, key in packets:
                packet = av.Packet(data)
                packet.pts, packet.dts, packet.is_keyframe = pts + k * span, dts + k * span, key
                packet.time_base, packet.stream = stream_in.time_base, stream_out
                out.mux(packet)
    return dst


def make_checkpoint(path: Path, model_kind: str, stride: int) -> Path:
    cfg = load_config()
    model_cfg = {**cfg.model, **(TINY if model_kind == "tiny" else {})}
    model = DualStreamNet.from_config(model_cfg)
    torch.save({"model": model.state_dict(), "model_config": model_cfg, "config": cfg.to_dict(),
                "extract": {"stride": stride, "jpeg_quality": cfg.extract.jpeg_quality}, "align": cfg.align.to_dict(),
                "clip_len": cfg.dataset.clip_len,
                "calibration": {"temperature": 1.0, "threshold": 0.5, "aggregate": "mean"},
                "dfpipe_version": "bench", "pairs_digest": ""}, path)
    return path


def peak_rss_mb() -> float:
    """This process's own peak (VmHWM). Not ru_maxrss: Linux carries that across exec, so a child started by this
    benchmark would report the parent's size at the fork (the parent holds the model it has just saved)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(batch_size: str, clip_every: str):
    return load_config(overrides=[{"score": {"batch_size": None if batch_size == "auto" else int(batch_size),
                                             "clip_every": int(clip_every)}}])


def child_score(checkpoint: str, out: str, batch_size: str, clip_every: str, *videos: str) -> dict:
    summary = score_store.run_score(list(videos), checkpoint, config(batch_size, clip_every), out=out, labels=None,
                                    work=None, split=None, shard=Shard(), progress=False)
    rows = read_table(summary.csv, score_store.CSV_COLUMNS).to_dict("records")
    return {"video_seconds": sum(float(r["seconds"]) for r in rows) / len(rows),
            "clips": sum(int(r["clips"]) for r in rows),
            "status": ", ".join(sorted({f"{r['status']} {r['reason']}".strip() for r in rows})),
            "rss_mb": peak_rss_mb()}


def child_staged_model(checkpoint: str, ws: str, batch_size: str, clip_every: str) -> dict:
    """The model over the staged JPEG crops, cut into the clips score-video cuts (`scoring_clips`)."""
    cfg = config(batch_size, clip_every)
    ckpt = load_checkpoint(checkpoint)
    settings = score.scoring_settings(ckpt, cfg, checkpoint)
    device = resolve_device(cfg.score.device)
    predict = ClipModel(model_from_checkpoint(ckpt, device), device=device,
                              dtype=amp_dtype(cfg.train.amp, device), temperature=settings.temperature,
                              tta_flip=False)
    faces = read_table(Path(ws) / "manifests/faces.csv", ["video_id", "frame_index", "status", "track_id",
                                                           "hq_path", "lq_path"])
    faces = faces.assign(frame_index=faces.frame_index.astype(int), track_id=faces.track_id.astype(int))
    labels = dict.fromkeys(faces.video_id, 0)
    queue = ClipQueue(predict, model_batch(cfg.score.batch_size, device))
    segments = track_segments(face_rows(faces, labels), labels)
    chosen = scoring_clips(segments, settings.clip_len, cfg.score.clip_every)
    for i, start in chosen:
        positions = clip_positions(len(segments[i].frames), start, settings.clip_len)
        hq, lq = (read_crops(Path(ws), [paths[p] for p in positions]).permute(0, 2, 3, 1).numpy()
                  for paths in (segments[i].hq_paths, segments[i].lq_paths))
        queue.put(start, hq, lq)
    queue.flush()
    return {"clips": len(chosen), "rss_mb": peak_rss_mb()}


def in_child(*args: str) -> dict:
    """The child's report plus its wall time as a process (start-up and imports included, like the CLI's)."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - started}


def timed_cli(*args) -> float:
    started = time.perf_counter()
    subprocess.run([*CLI, *map(str, args), "--quiet"], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--long-seconds", type=int, default=300)
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--stride", type=int, default=load_config().extract.stride)
    parser.add_argument("--batch-size", default="auto",
                        help="clips per model call (auto: score.batch_size's default for this device); peak RSS "
                             "follows it (the model's activations)")
    parser.add_argument("--clip-every", type=int, default=load_config().score.clip_every,
                        help="score.clip_every for both paths: every Nth clip of each track goes to the model")
    parser.add_argument("--clips", type=int, default=3,
                        help="copies of the short clip per run: seconds per clip are a run's wall time over this, "
                             "so start-up (imports, model) is shared as in any real list of videos")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of both paths on the short clip")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_score(*rest) if kind == "score" else child_staged_model(*rest)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        short = face_clip(tmp / "short.mp4", args.seconds)
        copies = [short] + [tmp / f"short-{k}.mp4" for k in range(1, args.clips)]
        for copy in copies[1:]:
            copy.write_bytes(short.read_bytes())
        # the staged path's input list
        (tmp / "staged.csv").write_text("path,label\n" + "".join(f"{c.name},real\n" for c in copies))
        long = loop_clip(short, tmp / "long.mp4", max(1, args.long_seconds // args.seconds))
        checkpoint = make_checkpoint(tmp / "model.pt", args.model, args.stride)
        print(f"clips made in {time.perf_counter() - started:.0f} s: {args.seconds} s and "
              f"{args.long_seconds // args.seconds * args.seconds} s of {SIZE[0]}x{SIZE[1]}@{FPS}; "
              f"model {args.model}, stride {args.stride}, T={load_config().dataset.clip_len}, "
              f"batch {args.batch_size} clips, clip_every {args.clip_every}, {torch.get_num_threads()} threads, "
              f"cuda {torch.cuda.is_available()}",
              flush=True)

        batch, every = str(args.batch_size), str(args.clip_every)
        runs = []
        for k in range(args.repeats):  # alternated, so both paths see the same machine load; the best of each counts
            streaming = in_child("score", str(checkpoint), str(tmp / f"scores-{k}" / "short.csv"), batch, every,
                                 *map(str, copies))
            ws = tmp / f"ws-{k}"
            extract = timed_cli("extract", tmp / "staged.csv", "--work", ws, "--stride", args.stride)
            align = timed_cli("align", "--work", ws)
            model = in_child("staged", str(checkpoint), str(ws), batch, every)
            n = args.clips
            runs.append((streaming["wall"] / n, (extract + align + model["wall"]) / n, streaming["rss_mb"]))
            print(f"run {k + 1}: score-video {streaming['wall']:.1f} s for {n} clips ({streaming['video_seconds']:.1f} "
                  f"s per clip in its video loop, {streaming['clips']} model clips, {streaming['status']}, peak RSS "
                  f"{streaming['rss_mb']:.0f} MB); staged {extract + align + model['wall']:.1f} s: extract "
                  f"{extract:.1f} + align {align:.1f} + model {model['wall']:.1f} ({model['clips']} model clips)",
                  flush=True)
        best_streaming, best_staged, short_rss = (min(column) for column in zip(*runs))
        print(f"best: score-video {best_streaming:.1f} s, staged {best_staged:.1f} s per {args.seconds} s clip "
              f"(process wall time over {args.clips} clips, start-up included): staged / score-video = "
              f"{best_staged / best_streaming:.2f}x   (goals: <= {args.seconds / 2:.0f} s, >= 2x)", flush=True)

        long_run = in_child("score", str(checkpoint), str(tmp / "scores-long" / "long.csv"), batch, every, str(long))
        pieces = max(1, args.long_seconds // args.seconds)
        print(f"long clip: score-video {long_run['wall']:.1f} s = {long_run['wall'] / pieces:.1f} s per "
              f"{args.seconds} s of video (start-up included), {long_run['clips']} clips, {long_run['status']}; "
              f"peak RSS {long_run['rss_mb']:.0f} MB = {long_run['rss_mb'] / short_rss:.2f}x the short clips' "
              f"{short_rss:.0f} MB   (goals: < 1500 MB, <= 1.2x)")


if __name__ == "__main__":
    main()
