"""`score-video` beside its floor, on a synthetic 1080p30 face clip: each of its parts alone (decoding the sampled
frames, the face path on those frames, the model on the clips they give), its wall time over a list of clips
(start-up included) and per 10 s over a long clip, its peak memory; for each model asked for, with the CPU's bf16
and AMX support and what the model runs in named (onnxruntime fp32 on CPUs without AMX, else torch: bf16 on CPUs
with bf16 instructions, fp32 without; see stages/onnx_model.py).

Goals (issue 18, on 2 cores): <= 5 s per 10 s clip over a list of 3 (start-up included), <= 1.25x the sum of its
parts measured alone, peak RSS < 1.2 GB and flat with length (<= 1.1x from the short clips to the long one).
`--staged` adds the staged path (`dfpipe extract` + `dfpipe align` + the model over the stored crops, in the clips
score-video cuts). Every measurement runs in a fresh process, so each peak RSS (VmHWM) is that measurement's alone.

Usage: python benchmarks/bench_score.py [--models default b4-b0] [--runtime auto|torch|onnx] [--amp auto|off]
           [--seconds 10] [--long-seconds 300] [--stride N] [--batch-size B] [--clip-every N] [--clips N]
           [--repeats N] [--staged]
  default: the configured model; b4-b0: configs/b4-b0.yaml (the card's); tiny: timm's test_efficientnet (all random
  init: speed does not depend on the weights). `--runtime torch --amp off` scores as dfpipe did before onnxruntime
  on a CPU without bf16 (torch fp32); on such a CPU without AMX, `auto` picks onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dfpipe.pipeline.config import load_config

# Everything else is imported where it is used: the "score" child is timed as a process, start-up included, so it
# must import what score-video imports and no more (the face path's and the model's modules, say, are not).
CLI = [sys.executable, "-m", "dfpipe.pipeline.cli"]
TINY = {"hq_backbone": "test_efficientnet", "lq_backbone": "test_efficientnet", "convlstm_filters": [8, 8],
        "pretrained_hq": None, "pretrained_lq": None, "bottleneck": None,
        "mlp": [16, 8, 4], "dropout": [0.2, 0.2]}
SIZE, FPS = (1920, 1080), 30
MODELS = {"default": {}, "tiny": TINY, "b4-b0": "configs/b4-b0.yaml"}
REPO = Path(__file__).resolve().parents[1]


def face_clip(path: Path, seconds: int, seed: int = 0) -> Path:
    """The demo set's moving astronaut head over a textured background, rendered one frame at a time."""
    import cv2
    import numpy as np
    from dfpipe.stages.demo import head_motion, head_sprite, random_background
    from dfpipe.stages.video import write_video
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
    import av
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
    import torch
    from dfpipe.models.dual_stream import DualStreamNet
    recipe = MODELS[model_kind]
    cfg = load_config(REPO / recipe) if isinstance(recipe, str) else load_config()
    model_cfg = {**cfg.model, **(recipe if isinstance(recipe, dict) else {}), "pretrained_hq": None,
                 "pretrained_lq": None}
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


def config(batch_size: str, clip_every: str, amp: str = "auto", runtime: str = "auto"):
    return load_config(overrides=[{"score": {"batch_size": None if batch_size == "auto" else int(batch_size),
                                             "clip_every": int(clip_every), "runtime": runtime},
                                   "train": {"amp": amp}}])


def cpu_line(amp: str, runtime: str) -> str:
    """The CPU, and what scoring runs in on it: onnxruntime or torch (`onnx_model.choose_runtime` decides), in bf16
    or fp32 (`inference.amp_dtype` decides; --amp off forces fp32)."""
    import torch
    from dfpipe.stages.faces import resolve_device
    from dfpipe.stages.inference import amp_dtype
    from dfpipe.stages.onnx_model import choose_runtime
    with open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    platform.processor() or "unknown CPU")
    bf16, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
    device = resolve_device("auto")
    chosen = choose_runtime(runtime, device.type, 0)
    scoring = "fp32" if chosen == "onnx" else {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[
        amp_dtype(amp, device)]
    gpu = f" on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"CPU: {name}, {torch.get_num_threads()} threads, AVX512-BF16 {'yes' if bf16 else 'no'}, AMX "
            f"{'yes' if amx else 'no'}; the model scores in {'onnxruntime' if chosen == 'onnx' else 'torch'} "
            f"{scoring}{gpu} (--runtime {runtime}{', --amp off' if amp == 'off' else ''})")


def timed(call, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = call(*args)
    return time.perf_counter() - started, result


def child_parts(checkpoint: str, batch_size: str, clip_every: str, amp: str, runtime: str, video: str) -> dict:
    """score-video's parts, each alone and warmed up (oneDNN builds its kernels on first use): decoding the sampled
    frames, the face path on those frames held in memory (detect, track, align, JPEG round trips, clip cutting),
    the model on the clips it cut. Run first: it makes the onnxruntime export the score runs find cached."""
    from dfpipe.stages.clips import ClipCutter
    from dfpipe.stages.detector import Detector
    from dfpipe.stages.faces import FaceStream
    from dfpipe.stages.inference import ClipQueue
    from dfpipe.stages.video import FrameReader
    detector = Detector.from_checkpoint(checkpoint, config=config(batch_size, clip_every, amp, runtime))
    s = detector.scoring

    def decode() -> list:
        return list(FrameReader(video, stride=s.stride, max_frames=s.max_frames, decoder=s.decoder))

    def faces(frames: list) -> list:
        cutter = ClipCutter(s.clip_len, clip_every=s.clip_every, **s.align)
        stream = FaceStream(iter(frames), detector._faces, **s.align)
        return [c for position, frame in enumerate(stream) for c in cutter.add(position, frame)] + cutter.finish()

    def model(clips: list) -> None:
        queue = ClipQueue(detector._predict, detector.batch_size)
        for clip, hq, lq in clips:
            queue.put(clip, hq, lq)
        queue.flush()

    frames = decode()
    model(faces(frames[:2 * s.clip_len])[:2])
    seconds = {"decode": timed(decode)[0]}
    seconds["faces"], clips = timed(faces, frames)
    seconds["model"] = timed(model, clips)[0]
    return {**seconds, "frames": len(frames), "clips": len(clips)}


def child_score(checkpoint: str, out: str, batch_size: str, clip_every: str, amp: str, runtime: str,
                *videos: str) -> dict:
    from dfpipe.manifests.table import read_table
    from dfpipe.manifests.workspace import Shard
    from dfpipe.stages import score_store
    summary = score_store.run_score(list(videos), checkpoint, config(batch_size, clip_every, amp, runtime), out=out,
                                    labels=None, work=None, split=None, shard=Shard(), progress=False)
    rows = read_table(summary.csv, score_store.CSV_COLUMNS).to_dict("records")
    return {"video_seconds": sum(float(r["seconds"]) for r in rows) / len(rows),
            "loop_seconds": sum(float(r["seconds"]) for r in rows),
            "clips": sum(int(r["clips"]) for r in rows),
            "status": ", ".join(sorted({f"{r['status']} {r['reason']}".strip() for r in rows})),
            "rss_mb": peak_rss_mb(), "torch": "torch" in sys.modules}


def child_staged_model(checkpoint: str, ws: str, batch_size: str, clip_every: str, amp: str, runtime: str) -> dict:
    """The model (torch, as training's) over the staged JPEG crops, cut into the clips score-video cuts
    (`scoring_clips`)."""
    from dfpipe.manifests.table import read_table
    from dfpipe.stages import score
    from dfpipe.stages.checkpoint import load_checkpoint, model_from_checkpoint
    from dfpipe.stages.clips import clip_positions, scoring_clips
    from dfpipe.stages.dataset import face_rows, read_crops, track_segments
    from dfpipe.stages.faces import resolve_device
    from dfpipe.stages.inference import ClipModel, ClipQueue, amp_dtype, model_batch
    cfg = config(batch_size, clip_every, amp, runtime)
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
    queue = ClipQueue(predict, model_batch(cfg.score.batch_size, device.type))
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["default", "b4-b0"])
    parser.add_argument("--amp", choices=["auto", "off"], default="auto",
                        help="train.amp for scoring: auto (bf16 where the CPU has it), off (fp32, as without bf16)")
    parser.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                        help="score.runtime: auto (onnxruntime on CPUs without AMX), torch, onnx")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--long-seconds", type=int, default=300)
    parser.add_argument("--stride", type=int, default=load_config().extract.stride)
    parser.add_argument("--batch-size", default="auto",
                        help="clips per model call (auto: score.batch_size's default for this device); peak RSS "
                             "follows it (the model's activations)")
    parser.add_argument("--clip-every", type=int, default=load_config().score.clip_every,
                        help="score.clip_every: every Nth clip of each track goes to the model")
    parser.add_argument("--clips", type=int, default=3,
                        help="copies of the short clip per run: seconds per clip are a run's wall time over this, "
                             "so start-up (imports, model) is shared as in any real list of videos")
    parser.add_argument("--repeats", type=int, default=2, help="runs over the list of short clips; the best counts")
    parser.add_argument("--staged", action="store_true", help="also time the staged path (extract + align + model)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args()


def make_clips(tmp: Path, args: argparse.Namespace) -> tuple[list[Path], Path]:
    """`args.clips` copies of one short clip (a list of videos), and the long clip: the short one looped."""
    short = face_clip(tmp / "short.mp4", args.seconds)
    copies = [short] + [tmp / f"short-{k}.mp4" for k in range(1, args.clips)]
    for copy in copies[1:]:
        copy.write_bytes(short.read_bytes())
    (tmp / "staged.csv").write_text("path,label\n" + "".join(f"{c.name},real\n" for c in copies))
    return copies, loop_clip(short, tmp / "long.mp4", max(1, args.long_seconds // args.seconds))


def staged(tmp: Path, checkpoint: Path, args: argparse.Namespace, k: int, *rest: str) -> float:
    ws = tmp / f"ws-{k}"
    extract = timed_cli("extract", tmp / "staged.csv", "--work", ws, "--stride", args.stride)
    align = timed_cli("align", "--work", ws)
    model = in_child("staged", str(checkpoint), str(ws), *rest)
    print(f"  staged path {extract + align + model['wall']:.1f} s for {args.clips} clips: extract {extract:.1f} + "
          f"align {align:.1f} + model {model['wall']:.1f}", flush=True)
    return (extract + align + model["wall"]) / args.clips


def bench_model(kind: str, tmp: Path, copies: list[Path], long: Path, args: argparse.Namespace) -> None:
    import torch
    checkpoint = make_checkpoint(tmp / f"{kind}.pt", kind, args.stride)
    model_cfg = torch.load(checkpoint, weights_only=True, mmap=True)["model_config"]
    rest = (str(args.batch_size), str(args.clip_every), args.amp, args.runtime)
    print(f"\n== model {kind}: {model_cfg['hq_backbone']} + {model_cfg['lq_backbone']}, bottleneck "
          f"{model_cfg.get('bottleneck')}", flush=True)
    parts = in_child("parts", str(checkpoint), *rest, str(copies[0]))
    floor = parts["decode"] + parts["faces"] + parts["model"]
    print(f"  parts alone per {args.seconds} s clip: decode {parts['decode']:.2f} s ({parts['frames']} sampled frames) "
          f"+ face path {parts['faces']:.2f} s + model {parts['model']:.2f} s ({parts['clips']} clips) = "
          f"{floor:.2f} s", flush=True)
    runs = []
    for k in range(args.repeats):
        run = in_child("score", str(checkpoint), str(tmp / f"scores-{kind}-{k}" / "short.csv"), *rest,
                       *map(str, copies))
        runs.append(run)
        print(f"  run {k + 1}: score-video {run['wall']:.1f} s for {args.clips} clips (video loop "
              f"{run['loop_seconds']:.1f} s, start-up and the rest {run['wall'] - run['loop_seconds']:.1f} s; "
              f"{run['clips']} model clips, {run['status']}; peak RSS {run['rss_mb']:.0f} MB; "
              f"{'imported torch' if run['torch'] else 'never imported torch'})", flush=True)
        if args.staged:
            print(f"  staged / score-video = {staged(tmp, checkpoint, args, k, *rest) * args.clips / run['wall']:.2f}x")
    best = min(runs, key=lambda r: r["wall"])
    per_clip, rss = best["wall"] / args.clips, min(r["rss_mb"] for r in runs)
    long_run = in_child("score", str(checkpoint), str(tmp / f"scores-{kind}-long" / "long.csv"), *rest, str(long))
    pieces = max(1, args.long_seconds // args.seconds)
    print(f"  {kind}: score-video {per_clip:.2f} s per {args.seconds} s clip over a list of {args.clips} (start-up "
          f"included; goal <= 5 s: {'met' if per_clip <= 5 else 'NOT met'}); {per_clip / floor:.2f}x its parts alone "
          f"(goal <= 1.25x: {'met' if per_clip <= 1.25 * floor else 'NOT met'}); its video loop "
          f"{best['video_seconds']:.2f} s per clip = {best['video_seconds'] / floor:.2f}x the parts", flush=True)
    print(f"  {kind}: over {pieces * args.seconds} s of video {long_run['wall'] / pieces:.2f} s per {args.seconds} s "
          f"(start-up included), {long_run['status']}; peak RSS {rss:.0f} MB over the list, {long_run['rss_mb']:.0f} "
          f"MB over the long clip = {long_run['rss_mb'] / rss:.2f}x (goals < 1200 MB: "
          f"{'met' if max(rss, long_run['rss_mb']) < 1200 else 'NOT met'}; <= 1.1x: "
          f"{'met' if long_run['rss_mb'] <= 1.1 * rss else 'NOT met'})", flush=True)


def main() -> None:
    args = parse_args()
    if args.child:
        kind, *rest = args.child
        children = {"score": child_score, "staged": child_staged_model, "parts": child_parts}
        print(json.dumps(children[kind](*rest)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["DFPIPE_CACHE"] = str(tmp / "cache")  # the onnxruntime exports: made by the parts run
        started = time.perf_counter()
        copies, long = make_clips(tmp, args)
        print(f"clips made in {time.perf_counter() - started:.0f} s: {args.seconds} s and "
              f"{args.long_seconds // args.seconds * args.seconds} s of {SIZE[0]}x{SIZE[1]}@{FPS}; stride "
              f"{args.stride}, T={load_config().dataset.clip_len}, batch {args.batch_size} clips, clip_every "
              f"{args.clip_every}\n{cpu_line(args.amp, args.runtime)}", flush=True)
        for kind in args.models:
            bench_model(kind, tmp, copies, long, args)


if __name__ == "__main__":
    main()
