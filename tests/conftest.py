"""Shared fixtures: tiny synthetic clips made with PyAV, and the optional real data in ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dfpipe.stages.video import write_video

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pattern_frames(n: int, width: int = 64, height: int = 48, seed: int = 0):
    """Frames whose content encodes their index (a moving bar plus noise), so tests can tell frames apart."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    for i in range(n):
        frame = base.copy()
        x = (i * 3) % width
        frame[:, x:x + 4] = 255
        frame[: height // 4, : width // 4] = (i * 7) % 256
        yield frame


def make_clip(path: str | Path, n: int = 12, width: int = 64, height: int = 48, fps: float = 30,
              seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, pattern_frames(n, width, height, seed), fps=fps)
    return path


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
