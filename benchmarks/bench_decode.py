"""Which decoder should `extract.decoder: auto` try first? Times FrameReader with PyAV and with decord.

    python benchmarks/bench_decode.py                 # a generated 10 s 1080p30 H.264 clip
    python benchmarks/bench_decode.py VIDEO [--stride 3] [--runs 3]

Runs alternate between the decoders so that load from other processes hits both alike; the best
run of each counts. Peak memory growth shows whether reading streams (it should stay far below
the size of all decoded frames).
"""
from __future__ import annotations

import argparse
import resource
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
    texture = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT + n, WIDTH + 2 * n, 3), dtype=np.uint8), (0, 0), 3)
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


def time_decoder(path: Path, decoder: str, stride: int) -> tuple[int, float]:
    start = time.perf_counter()
    count = sum(1 for _ in FrameReader(path, stride=stride, max_frames=None, decoder=decoder))
    return count, time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(path: Path, stride: int, runs: int) -> None:
    info = probe(path)
    megabits = path.stat().st_size * 8 / 1e6 / info["duration"]
    print(f"{path.name}: {info['width']}x{info['height']} {info['fps']:.2f} fps, {info['frames']} frames, "
          f"{info['codec']}, {megabits:.1f} Mbit/s; stride {stride}, best of {runs}")
    rss_before = peak_rss_mb()
    best = {"pyav": float("inf"), "decord": float("inf")}
    for run in range(runs):
        for decoder in best:
            count, seconds = time_decoder(path, decoder, stride)
            best[decoder] = min(best[decoder], seconds)
            print(f"  run {run + 1} {decoder:6s}: {count} frames in {seconds:.2f} s")
    decoded = info["frames"]  # both decoders decode every frame; stride only skips the RGB conversion
    for decoder, seconds in best.items():
        print(f"{decoder:6s}: {decoded / seconds:6.1f} decoded frames/s (best {seconds:.2f} s)")
    print(f"pyav / decord speed: {best['decord'] / best['pyav']:.2f}x")
    all_frames_mb = info["frames"] // stride * info["width"] * info["height"] * 3 / 2**20
    print(f"peak RSS growth while decoding: {peak_rss_mb() - rss_before:.0f} MB "
          f"(holding every kept frame would need {all_frames_mb:.0f} MB)")


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
