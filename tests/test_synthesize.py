"""Self-blended fakes on real crops: the astronaut photo aligned by align_face with MTCNN's landmarks on it."""
from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from dfpipe.stages.dataset import seeded_generator
from dfpipe.stages.faces import align_face, template_points
from dfpipe.stages.synthesize import (BLEND_RATIOS, FIELD, FIELD_GRID, BlendParams, crop_outline, face_mask,
                                      self_blend)

# What MTCNN reports on skimage's 512x512 astronaut (the box stages/demo.py calls FACE_BOX).
LANDMARKS = np.array([[205.5, 100.7], [248.3, 103.3], [225.6, 128.9], [202.1, 139.3], [246.2, 141.8]])
BOX = np.array([179.9, 58.6, 269.3, 173.2])
HQ, LQ, MARGIN = 224, 112, 1.3
T = 4


def params(seed: int) -> BlendParams:
    return BlendParams.sample(seeded_generator(seed))


def pixels(clip: torch.Tensor) -> np.ndarray:
    return clip.permute(0, 2, 3, 1).numpy()


def shrink(images: np.ndarray) -> np.ndarray:
    return np.stack([cv2.resize(i, (LQ, LQ), interpolation=cv2.INTER_AREA) for i in images])


def centroid_and_area(mask: np.ndarray) -> tuple[np.ndarray, float]:
    ys, xs = np.mgrid[:mask.shape[0], :mask.shape[1]]
    area = mask.sum()
    return np.array([(xs * mask).sum(), (ys * mask).sum()]) / area, float(area)


@pytest.fixture(scope="module")
def clip():
    """T crops of the astronaut drifting over the photo, with landmark jitter like a tracker's: a real clip."""
    rng = np.random.default_rng(0)
    hq, lq, outlines = [], [], []
    for k in range(T):
        shift = np.array([3.0 * k, -2.0 * k])
        frame = cv2.warpAffine(data.astronaut(), np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (512, 512),
                               borderMode=cv2.BORDER_REFLECT_101)
        marks = LANDMARKS + shift + rng.normal(0, 0.7, (5, 2))
        crop, small, _ = align_face(frame, marks, margin=MARGIN, hq_size=HQ, lq_size=LQ)
        hq.append(crop)
        lq.append(small)
        outlines.append(crop_outline(marks, BOX + np.tile(shift, 2), hq_size=HQ, margin=MARGIN))
    as_clip = lambda frames: torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return SimpleNamespace(hq=as_clip(hq), lq=as_clip(lq), outlines=np.stack(outlines))


def test_crop_outline_maps_through_aligns_transform():
    outline = crop_outline(LANDMARKS, BOX, hq_size=HQ, margin=MARGIN)
    _, _, matrix = align_face(data.astronaut(), LANDMARKS, margin=MARGIN, hq_size=HQ, lq_size=LQ)
    assert outline.shape == (5 + 24, 2)
    np.testing.assert_allclose(outline[:5], LANDMARKS @ matrix[:, :2].T + matrix[:, 2], atol=1e-6)
    # a 5-point similarity fit is not exact (her smile is wider than the template's), but the eyes sit in place
    assert np.abs(outline[:2] - template_points(HQ, MARGIN)[:2]).max() < 5
    ellipse = outline[5:].astype(np.float32)
    assert all(cv2.pointPolygonTest(ellipse, (float(x), float(y)), True) > 10 for x, y in outline[:5])
    assert ellipse.min() > 0 and ellipse.max() < HQ - 1
    # batched alike, and a face moved in the frame has the same outline in its crop
    moved = np.array([20.0, -10.0])
    both = crop_outline(np.stack([LANDMARKS, LANDMARKS + moved]), np.stack([BOX, BOX + np.tile(moved, 2)]),
                        hq_size=HQ, margin=MARGIN)
    np.testing.assert_allclose(both, np.stack([outline, outline]), atol=1e-6)


def test_sample_draws_within_sbi_ranges_from_the_generator_only():
    draws = [params(seed) for seed in range(200)]
    assert {p.ratio for p in draws} == set(BLEND_RATIOS)
    assert {p.hull for p in draws} == {0, 1, 2}
    assert all(0.95 <= p.scale <= 1 / 0.95 and abs(p.shift[0]) <= 0.03 and abs(p.shift[1]) <= 0.015 for p in draws)
    assert all((p.sharpen > 0) != (p.blur > 0) for p in draws)
    assert all(p.field.shape == (2, FIELD_GRID, FIELD_GRID) and np.abs(p.field).max() <= FIELD for p in draws)
    assert 0.15 < np.mean([any(p.rgb_shift) for p in draws]) < 0.45
    torch.manual_seed(123)
    again = params(7)
    torch.manual_seed(456)
    for f in fields(BlendParams):
        np.testing.assert_array_equal(getattr(again, f.name), getattr(params(7), f.name))


def test_mask_covers_eyes_nose_and_mouth_for_every_draw():
    outline = crop_outline(LANDMARKS, BOX, hq_size=HQ, margin=MARGIN)
    x, y = np.round(template_points(HQ, MARGIN)).astype(int).T
    for seed in range(30):
        p = params(seed)
        mask = face_mask(outline, HQ, p, hq_size=HQ)
        assert mask.shape == (HQ, HQ) and mask.dtype == np.float32
        assert mask.max() == pytest.approx(p.ratio, abs=1e-6)
        assert (mask[y, x] > 0.5 * p.ratio).all(), (seed, p.hull, mask[y, x])
        for corner in (mask[:20, :20], mask[:20, -20:], mask[-20:, :20], mask[-20:, -20:]):
            assert (corner == 0).all()


def test_same_params_give_the_same_mask_at_any_crop_size():
    outline = crop_outline(LANDMARKS, BOX, hq_size=HQ, margin=MARGIN)
    for seed in range(10):
        p = params(seed)
        big, small = face_mask(outline, HQ, p, hq_size=HQ), face_mask(outline, LQ, p, hq_size=HQ)
        shrunk = cv2.resize(big, (LQ, LQ), interpolation=cv2.INTER_AREA)
        assert np.abs(small - shrunk).mean() < 0.005 * p.ratio
        (c_small, a_small), (c_shrunk, a_shrunk) = centroid_and_area(small), centroid_and_area(shrunk)
        np.testing.assert_allclose(c_small, c_shrunk, atol=0.2)  # LQ pixels
        assert a_small == pytest.approx(a_shrunk, rel=0.02)


def test_fake_differs_from_real_only_inside_its_mask(clip):
    for seed in range(6):
        p = params(seed)
        hq_fake, lq_fake, masks = self_blend(clip.hq, clip.lq, clip.outlines, p)
        assert hq_fake.shape == clip.hq.shape and lq_fake.shape == clip.lq.shape and masks.shape == (T, HQ, HQ)
        assert hq_fake.dtype == lq_fake.dtype == torch.uint8 and masks.dtype == torch.float32
        masks = masks.numpy()
        outside, lq_outside = masks == 0, shrink(masks) == 0
        assert 0.3 < outside.mean() < 0.9 and 0.3 < lq_outside.mean() < 0.9
        np.testing.assert_array_equal(pixels(hq_fake)[outside], pixels(clip.hq)[outside])
        np.testing.assert_array_equal(pixels(lq_fake)[lq_outside], pixels(clip.lq)[lq_outside])
        inside = masks >= 0.9 * p.ratio
        change = np.abs(pixels(hq_fake).astype(float) - pixels(clip.hq))[inside].mean()
        assert change > 1.0, (seed, change)


def test_mask_follows_the_face_through_the_clip(clip):
    shifts = np.array([[0, 0], [4, -3], [-6, 2], [9, 5]], float)
    outlines = clip.outlines[:1] + shifts[:, None]
    for seed in range(6):
        p = params(seed)
        _, _, masks = self_blend(clip.hq, clip.lq, outlines, p)
        np.testing.assert_array_equal(masks.numpy(), face_mask(outlines, HQ, p, hq_size=HQ))
        centroids, areas = zip(*(centroid_and_area(m) for m in masks.numpy()))
        np.testing.assert_allclose(np.array(centroids) - centroids[0], shifts, atol=1.0)
        np.testing.assert_allclose(np.array(areas) / areas[0], 1.0, atol=0.03)


def test_both_streams_get_the_same_blend(clip):
    for seed in range(6):
        hq_fake, lq_fake, _ = self_blend(clip.hq, clip.lq, clip.outlines, params(seed))
        expected = shrink(pixels(hq_fake).astype(np.float32) - pixels(clip.hq))
        got = pixels(lq_fake).astype(np.float32) - pixels(clip.lq)
        assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.9
        assert np.abs(expected - got).mean() < 0.1 * np.abs(expected).mean()


def test_one_draw_per_clip_and_reproducible(clip):
    still = SimpleNamespace(hq=clip.hq[:1].repeat(T, 1, 1, 1), lq=clip.lq[:1].repeat(T, 1, 1, 1),
                            outlines=np.repeat(clip.outlines[:1], T, axis=0))
    for out in self_blend(still.hq, still.lq, still.outlines, params(3)):
        assert all(torch.equal(frame, out[0]) for frame in out)
    first, again, other = (self_blend(clip.hq, clip.lq, clip.outlines, params(seed)) for seed in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
