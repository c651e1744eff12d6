"""Which decoder should `extract.decoder: auto` try first? Times FrameReader with PyAV and with decord.

    python benchmarks/bench_decode.py                 # a generated 10 s 1080p30 H.264 clip
    python benchmarks/bench_decode.py VIDEO [--stride 3] [--runs 3]

Runs alternate between the decoders so that load from other processes hits both alike; the best
run of each counts. On a shared machine wall time also measures how much CPU share each
decoder's threads win, so CPU time (all threads of this process) is printed too. Resident
memory growth, sampled at every frame, shows whether reading streams: it should stay far
below the size of all kept frames.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from dfpipe.stages.video import FrameReader, probe

WIDTH, HEIGHT, FPS, SECONDS = 1920, 1080, 30, 10


def dfdc_like_frames(n: int, seed: int = 0):
    """A panning blurred-noise texture with a moving bright patch: motion and detail that make
    x264 spend about the bitrate of a DFDC clip (~3 Mbit/s), unlike flat or pure-noise frames."""
    rng = np.random.default_rng(seed)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT + n, WIDTH + 2 * n, 3), dtype=np.uint8), (0, 0), 1)
    for i in range(n):
        frame = np.ascontiguousarray(texture[i:i + HEIGHT, 2 * i:2 * i + WIDTH])
        x = 300 + 4 * i
        frame[400:700, x:x + 360] = (205, 160, 130)
        yield frame


def generate(path: Path) -> None:
    """Encode with x264's veryfast preset: write_video's default (medium) needs minutes for
    300 1080p frames on two cores; veryfast keeps CABAC and B-frames, as DFDC's High profile does."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for image in dfdc_like_frames(FPS * SECONDS):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def rss_mb() -> float:
    """Current resident memory (Linux); ru_maxrss would mix the two decoders' peaks."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_decoder(path: Path, decoder: str, stride: int) -> tuple[int, float, float, float]:
    """Frames read, wall seconds, CPU seconds, and the largest growth of resident memory."""
    count, before = 0, rss_mb()
    peak, wall, cpu = before, time.perf_counter(), time.process_time()
    for _ in FrameReader(path, stride=stride, max_frames=None, decoder=decoder):
        count, peak = count + 1, max(peak, rss_mb())
    return count, time.perf_counter() - wall, time.process_time() - cpu, peak - before


def bench(path: Path, stride: int, runs: int) -> None:
    info = probe(path)
    megabits = path.stat().st_size * 8 / 1e6 / info["duration"]
    print(f"{path.name}: {info['width']}x{info['height']} {info['fps']:.2f} fps, {info['frames']} frames, "
          f"{info['codec']}, {megabits:.1f} Mbit/s; stride {stride}, best of {runs}")
    decoders = ("pyav", "decord")
    runs_of = {decoder: [] for decoder in decoders}
    for run in range(runs):
        for decoder in decoders:
            count, wall, cpu, growth = time_decoder(path, decoder, stride)
            runs_of[decoder].append((wall, cpu, growth))
            print(f"  run {run + 1} {decoder:6s}: {count} frames in {wall:.2f} s wall, {cpu:.2f} s CPU, "
                  f"memory +{growth:.0f} MB")
    all_frames_mb = len(range(0, info["frames"], stride)) * info["width"] * info["height"] * 3 / 2**20
    wall = {decoder: min(r[0] for r in runs_of[decoder]) for decoder in decoders}
    cpu = {decoder: min(r[1] for r in runs_of[decoder]) for decoder in decoders}
    for decoder in decoders:
        # Both decoders decode every frame; stride only saves the RGB conversion of the others.
        print(f"{decoder:6s}: {info['frames'] / wall[decoder]:6.1f} decoded frames/s wall, "
              f"{info['frames'] / cpu[decoder]:6.1f} per CPU-s, memory +{max(r[2] for r in runs_of[decoder]):.0f} MB "
              f"at most (all kept frames: {all_frames_mb:.0f} MB)")
    print(f"pyav / decord speed: {wall['decord'] / wall['pyav']:.2f}x wall, {cpu['decord'] / cpu['pyav']:.2f}x CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", type=Path, help="video to decode (default: generate a 1080p clip)")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.video is not None:
        bench(args.video, args.stride, args.runs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dfdc_like_1080p.mp4"
        start = time.perf_counter()
        generate(path)
        print(f"generated in {time.perf_counter() - start:.0f} s")
        bench(path, args.stride, args.runs)


if __name__ == "__main__":
    main()
