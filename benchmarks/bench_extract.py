"""Extract against the physical ceiling: the time to merely decode every frame of the same videos.

Goal: `dfpipe extract` with default settings takes at most 2x the bare decode of a 10 s 1080p30 H.264 set.
Usage: python benchmarks/bench_extract.py [VIDEO ...]   (default: generates 2 synthetic 10 s 1080p30 clips)
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from dfpipe.manifests.workspace import Workspace
from dfpipe.pipeline.config import load_config
from dfpipe.stages.extract import run_extract
from dfpipe.stages.video import write_video


def synthetic_clip(path: Path, seconds: int = 10, fps: int = 30, size=(1920, 1080), seed: int = 0) -> Path:
    """Camera-like content (moving gradients, texture and a bright blob) so the encoder works like on video."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    texture = rng.normal(0, 12, (h, w, 3)).astype(np.float32)

    def frames():
        for i in range(seconds * fps):
            t = i / fps
            img = 120 + 60 * np.sin(xx / 200 + t) [..., None] + 40 * np.cos(yy / 150 - 0.7 * t)[..., None]
            cx, cy = w / 2 + 500 * np.sin(t), h / 2 + 250 * np.cos(1.3 * t)
            img = img + 90 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 2e4)[..., None] + texture
            yield np.clip(img, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames(), fps=fps, crf=23, preset="veryfast", threads=0)
    return path


def bare_decode(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with av.open(str(p)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for _ in c.decode(stream):
                n += 1
    return n


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    if len(sys.argv) > 1:
        paths = [Path(p) for p in sys.argv[1:]]
    else:
        print("generating 2 synthetic 10 s 1080p30 H.264 clips ...", flush=True)
        paths = [synthetic_clip(tmp / "videos" / f"clip{i}.mp4", seed=i) for i in range(2)]
    listing = tmp / "videos.csv"
    listing.write_text("path,label\n" + "".join(f"{p.resolve()},real\n" for p in paths))
    bare_decode(paths)  # warm the page cache so both runs read from memory

    t0 = time.perf_counter()
    n = bare_decode(paths)
    ceiling = time.perf_counter() - t0

    cfg = load_config()
    t0 = time.perf_counter()
    _, summary = run_extract(Workspace(tmp / "ws"), listing, cfg, dataset="csv", progress=False)
    extract_s = time.perf_counter() - t0
    assert not summary.failed, summary.failed

    t0 = time.perf_counter()
    run_extract(Workspace(tmp / "ws"), listing, cfg, dataset="csv", progress=False)
    rerun_s = time.perf_counter() - t0

    print(f"videos: {len(paths)}, frames: {n}, stride {cfg.extract.stride}, workers {cfg.extract.workers}")
    print(f"bare decode of every frame : {ceiling:7.2f} s  ({n / ceiling:6.1f} frames/s)")
    print(f"dfpipe extract (defaults)  : {extract_s:7.2f} s")
    print(f"ratio extract / ceiling    : {extract_s / ceiling:7.2f}x   (goal <= 2x)")
    print(f"rerun of the finished stage: {rerun_s:7.3f} s = {100 * rerun_s / extract_s:.2f}% of the first run")


if __name__ == "__main__":
    main()
