"""dfpipe's face path against out-of-the-box facenet-pytorch, on the same frames, in one run.

Baseline: `MTCNN(keep_all=True)` called on each full-resolution frame, crops cut from its boxes (what most
notebooks do). dfpipe: its face path with the default settings (full detection on a downscaled copy of every
align.detect_every-th sampled frame, each tracked face re-found in between, smoothing, 5-point alignment to HQ and
LQ crops), over 16 consecutive sampled frames per clip (1.6 s of video at stride 3). Goal: >= 20x faster while
finding >= 99% of the faces the baseline finds (box IoU >= 0.5). Recall is printed twice: over every baseline
face, and over the faces at least as large as the smallest face dfpipe is set to find (align.min_face_size at the
detection scale); the full-resolution baseline also reports 20 px background faces.
Usage: python benchmarks/bench_align.py [--set align.KEY=VALUE ...] [VIDEO ...]
  (default videos: 1080p/720p clips from ../shared/data; --set measures another trade-off, e.g. align.detect_every=1)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from facenet_pytorch import MTCNN
from torchvision.ops import box_iou

from dfpipe.pipeline.config import load_config, parse_override
from dfpipe.stages.faces import FaceDetector, FaceStream
from dfpipe.stages.video import FrameReader

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_VIDEOS = ["dfdc_sample/abqwwspghj.mp4", "dfdc_sample/abofeumbvv.mp4",
                  "ffpp_c40/original_sequences/youtube/c40/videos/183.mp4", "multiface/facenet_pytorch_example.mp4"]
FRAMES_PER_VIDEO = 16


def frames_of(path: Path, stride: int):
    """The measured frames, and the ones after them for warming both detectors up: oneDNN builds its kernels per
    input shape once, and warming up on the measured frames themselves would pre-build exactly the shapes (number
    of face candidates) the measurement then meets, which a real video does not do."""
    frames = list(FrameReader(path, stride=stride, max_frames=2 * FRAMES_PER_VIDEO, decoder="pyav"))
    return frames[:FRAMES_PER_VIDEO], frames[FRAMES_PER_VIDEO:]


def baseline(mtcnn: MTCNN, frames) -> list[np.ndarray]:
    boxes_per_frame = []
    for f in frames:
        boxes, _ = mtcnn.detect(f.image)
        boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=float).reshape(-1, 4)
        for x1, y1, x2, y2 in boxes.astype(int):  # the crops a notebook would cut and resize
            crop = f.image[max(y1, 0):y2, max(x1, 0):x2]
            if crop.size:
                cv2.resize(crop, (224, 224))
        boxes_per_frame.append(boxes)
    return boxes_per_frame


def dfpipe_faces(detector: FaceDetector, frames, align_cfg) -> list[np.ndarray]:
    out = []
    for ff in FaceStream(frames, detector, **align_cfg):
        out.append(np.array([f.box for f in ff.faces]).reshape(-1, 4))
    return out


def recall(reference: list[np.ndarray], found: list[np.ndarray]) -> tuple[int, int]:
    hits = total = 0
    for ref, got in zip(reference, found):
        total += len(ref)
        if len(ref) and len(got):
            iou = box_iou(torch.as_tensor(ref, dtype=torch.float32), torch.as_tensor(got, dtype=torch.float32))
            hits += int((iou.max(dim=1).values >= 0.5).sum())
    return hits, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for dfpipe's side, as `dfpipe align --set`")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    paths = args.videos or [SHARED / v for v in DEFAULT_VIDEOS if (SHARED / v).exists()]
    if not paths:
        parser.exit(1, "no videos: pass some, or provide ../shared/data\n")
    cfg = load_config(overrides=[parse_override(o) for o in args.overrides])
    align_cfg = dict(cfg.align)
    detector = FaceDetector(**align_cfg)
    mtcnn = MTCNN(keep_all=True, device=detector.device)
    t_base = t_ours = 0.0
    hits = total = big_hits = big_total = n_frames = 0
    for path in paths:
        frames, warm_up = frames_of(path, cfg.extract.stride)
        n_frames += len(frames)
        dfpipe_faces(detector, warm_up, align_cfg)
        baseline(mtcnn, warm_up[:2])
        t0 = time.perf_counter()
        ours = dfpipe_faces(detector, frames, align_cfg)
        t1 = time.perf_counter()
        ref = baseline(mtcnn, frames)
        t2 = time.perf_counter()
        t_ours += t1 - t0
        t_base += t2 - t1
        h, t = recall(ref, ours)
        hits, total = hits + h, total + t
        h_, w_ = frames[0].image.shape[:2]
        smallest = cfg.align.min_face_size / min(1.0, cfg.align.detect_max_side / max(h_, w_))
        bh, bt = recall([r[(r[:, 2] - r[:, 0]) >= smallest] for r in ref], ours)
        big_hits, big_total = big_hits + bh, big_total + bt
        print(f"{path.name:32s} {w_}x{h_}  baseline {1000 * (t2 - t1) / len(frames):7.0f} ms/frame  "
              f"dfpipe {1000 * (t1 - t0) / len(frames):6.0f} ms/frame  faces found {h}/{t}")
    print(f"frames: {n_frames}  device: {detector.device}  detect_every: {cfg.align.detect_every}  "
          f"detect_max_side: {cfg.align.detect_max_side}  min_face_size: {cfg.align.min_face_size}")
    print(f"speed-up dfpipe vs out-of-the-box MTCNN: {t_base / t_ours:.1f}x   (goal >= 20x)")
    print(f"faces found of the baseline's (IoU >= 0.5): {hits}/{total} = {100 * hits / max(total, 1):.1f}%"
          f"   (goal >= 99%)")
    print(f"  of those >= the configured smallest face: {big_hits}/{big_total} = "
          f"{100 * big_hits / max(big_total, 1):.1f}%")


if __name__ == "__main__":
    main()
