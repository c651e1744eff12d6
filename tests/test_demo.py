"""The demo set must decode, be detectable by the aligner's MTCNN, be fake only inside the face, and reproduce."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from facenet_pytorch import MTCNN

from dfpipe.pipeline.config import load_config
from dfpipe.stages.demo import make_demo_dataset

# The `demo:` section proposed for pipeline/defaults.yaml; replace with load_config().demo once it is there.
DEMO = {"n_real": 16, "n_fake": 16, "frames": 40, "width": 256, "height": 256, "fps": 30, "seed": 0}
SMALL = {**DEMO, "n_real": 2, "n_fake": 2, "frames": 12}


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> list[Path]:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), **SMALL)


@pytest.fixture(scope="module")
def detections(demo_set) -> dict[str, list[np.ndarray]]:
    """Per clip, the boxes MTCNN finds with the aligner's settings, keeping those it would keep."""
    align = load_config().align
    torch.set_num_threads(2)
    detector = MTCNN(keep_all=True, post_process=False, min_face_size=align.min_face_size,
                     thresholds=align.thresholds, device="cpu")
    out = {}
    for path in demo_set:
        per_frame = zip(*detector.detect(decode(path)))
        out[path.stem] = [np.zeros((0, 4)) if boxes is None
                          else np.asarray(boxes, float)[np.asarray(probs, float) >= align.min_prob]
                          for boxes, probs in per_frame]
    return out


def test_layout_and_decoding(demo_set):
    root = demo_set[0].parents[1]
    assert demo_set == [root / "real" / "real_000.mp4", root / "real" / "real_001.mp4",
                        root / "fake" / "fake_000.mp4", root / "fake" / "fake_001.mp4"]
    for path in demo_set:
        assert decode(path).shape == (SMALL["frames"], SMALL["height"], SMALL["width"], 3)


def test_one_face_of_usable_size_in_nearly_every_frame(detections):
    for stem, per_frame in detections.items():
        single = [boxes[0] for boxes in per_frame if len(boxes) == 1]
        assert len(single) >= 0.9 * len(per_frame), stem
        widths = np.array([box[2] - box[0] for box in single])
        assert widths.min() >= 0.3 * SMALL["width"] and widths.max() <= 0.6 * SMALL["width"], (stem, widths)


def test_fake_differs_from_its_real_inside_the_face(demo_set, detections):
    for k in range(SMALL["n_fake"]):
        real = decode(demo_set[k]).astype(np.float32)
        fake = decode(demo_set[SMALL["n_real"] + k]).astype(np.float32)
        diff = np.abs(real - fake).mean(axis=-1)
        inside = np.zeros(diff.shape, bool)
        for i, boxes in enumerate(detections[f"real_{k:03d}"]):
            for x0, y0, x1, y1 in boxes.round().astype(int):
                inside[i, max(y0, 0):y1, max(x0, 0):x1] = True
        assert inside.any(axis=(1, 2)).mean() >= 0.9
        assert diff[inside].mean() > 5.0
        assert diff[inside].mean() > 4 * diff[~inside].mean()


def test_same_seed_same_bytes_and_clips_independent_of_set_size(demo_set, tmp_path):
    again = make_demo_dataset(tmp_path, **{**SMALL, "n_real": 1, "n_fake": 1})
    first_pair = [demo_set[0], demo_set[SMALL["n_real"]]]
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first_pair]


def test_other_seed_other_clips(demo_set, tmp_path):
    other = make_demo_dataset(tmp_path, **{**SMALL, "n_real": 1, "n_fake": 0, "seed": SMALL["seed"] + 1})
    assert other[0].read_bytes() != demo_set[0].read_bytes()
    assert np.abs(decode(other[0]).astype(int) - decode(demo_set[0])).mean() > 10


@pytest.mark.parametrize("override", [{"n_real": 1, "n_fake": 2}, {"width": 255}])
def test_bad_request_is_refused_naming_the_folder(tmp_path, override):
    with pytest.raises(ValueError, match=str(tmp_path)):
        make_demo_dataset(tmp_path, **{**SMALL, **override})
