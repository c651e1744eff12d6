"""Shared fixtures: tiny synthetic clips made with PyAV, and the optional real data in ../shared/data."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from dfpipe.stages.video import write_video

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dfpipe.pipeline.cli"]
SHARED_DATA = REPO.parent / "shared" / "data"


def pattern_frames(n: int, width: int = 64, height: int = 48, seed: int = 0):
    """Frames whose content encodes their index (a moving bar and a grey level) over a smooth per-seed
    background: smooth so H.264 keeps it, distinct per frame so tests can tell which frame they got."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([127 + 100 * np.sin(xx / width * 3 + yy / height * 2 + p) for p in phase], -1)
    base = base.astype(np.uint8)
    for i in range(n):
        frame = base.copy()
        x = (i * 5) % max(width - 6, 1)
        frame[:, x:x + 6] = 255
        frame[: height // 4, : width // 4] = (i * 23) % 256
        yield frame


def make_clip(path: str | Path, n: int = 12, width: int = 64, height: int = 48, fps: float = 30,
              seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, pattern_frames(n, width, height, seed), fps=fps)
    return path


@pytest.fixture(autouse=True, scope="session")
def _onnx_cache(tmp_path_factory):
    """score-video's onnxruntime exports (stages/onnx_model.py) go to a folder of this run, not the user's cache;
    subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DFPIPE_CACHE", str(tmp_path_factory.mktemp("dfpipe-cache")))
        yield


@pytest.fixture
def clip_factory(tmp_path):
    def factory(name: str = "clip.mp4", **kw) -> Path:
        return make_clip(tmp_path / name, **kw)
    return factory


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not present at {SHARED_DATA}")
    return SHARED_DATA


def dfpipe(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in its own process."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"dfpipe {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def snapshot(ws: Path) -> dict[str, bytes]:
    """Every file a user would keep: manifests and outputs (lock files hold a pid, so they are left out)."""
    return {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted(ws.rglob("*"))
            if p.is_file() and "locks" not in p.parts}


def timed_dfpipe(*args, **kw) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = dfpipe(*args, **kw)
    return proc, time.perf_counter() - start


def kill_at_random_moments(args: list, *, times: int, duration: float, seed: int) -> int:
    """Start `dfpipe ARGS` `times` times and SIGKILL each at a random moment within the first 80% of
    `duration` (how long an uninterrupted run took); return how many kills landed while it was running."""
    rng, landed = random.Random(seed), 0
    for _ in range(times):
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.8) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        proc.wait()
    return landed


def moov_first(src, dst):
    """Remux with the index at the front, as streamed MP4s are, so a truncated copy still opens."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def one_thread():
    """For a module's training runs: two threads per process on a CPU shared with other jobs spin against each other
    (~30x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
