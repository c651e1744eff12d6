"""Self-blended fakes (SBI, Shiohara & Yamasaki, CVPR 2022) made from real face clips, consistent over a clip.

A fake is a real crop blended with a slightly altered copy of itself inside a face-shaped mask. It carries what every
face swap leaves (a blending boundary, a colour and sharpness mismatch, a slightly misaligned face) and nothing of any
one generator, so a detector trained on it cannot get by on one method's fingerprint. Parameters are drawn once per
clip, as a face swap's artefact is steady over time; the mask is made per frame from that frame's face outline, so it
follows the face. The LQ stream is blended with the HQ source and mask shrunk the way align shrinks crops, so both
streams show the same fake, and each output equals its input wherever its mask is 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from skimage.transform import SimilarityTransform

from .faces import template_points

ELLIPSE_POINTS = 24  # outline points after the 5 landmarks: the ellipse inscribed in the MTCNN box
# SBI's draws: mostly an opaque paste; scale 0.95-1/0.95 and a shift of up to 3% (x) and 1.5% (y) of the side
BLEND_RATIOS = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
SCALE = (0.95, 1 / 0.95)
SHIFT = (0.03, 0.015)
# Colour: hue rotation (degrees), saturation, contrast and brightness changes, a per-channel shift (fraction of 255)
# with probability RGB_SHIFT_P; all small, so that colour alone rarely gives a fake away.
HUE, SATURATION, CONTRAST, BRIGHTNESS = 5.0, 0.1, 0.1, 0.1
RGB_SHIFT, RGB_SHIFT_P = 20 / 255, 0.3
LUMA = np.array([0.299, 0.587, 0.114])
# Detail: an unsharp mask (amount, at ~1 px of a 224 crop) or a Gaussian blur (sigma as a fraction of the side).
SHARPEN, SHARPEN_SIGMA = (0.5, 2.0), 1 / 224
BLUR = (0.5 / 224, 2.0 / 224)
# Mask, as fractions of the side: mean edge move out (+) or in (-), edge blur sigma, displacement per grid node.
GROW = 0.02
EDGE = (0.005, 0.03)
FIELD_GRID, FIELD = 4, 0.02
FILL_BIAS = 0.7       # pixels cv2's anti-aliased fillConvexPoly covers beyond the polygon on average
MASK_FLOOR = 1 / 512  # below this the blurred mask is 0, so nothing of the source leaks in through the blur tails
BROW_RAISE = 0.4      # hull 1 is cut this many eye distances above the eyes: roughly at the brows
INNER_SCALE = 1.6     # hull 2 is the landmarks' hull grown this much about their centre: eyes, nose and mouth


def crop_outline(landmarks: np.ndarray, box: np.ndarray, *, hq_size: int, margin: float) -> np.ndarray:
    """The face outline in HQ-crop pixels, from what align keeps per face: landmarks (..., 5, 2) and MTCNN box
    (..., 4) in frame pixels -> (..., 5 + ELLIPSE_POINTS, 2), the landmarks then the ellipse inscribed in the box.

    The crop is upright by construction while the box is axis-aligned in the frame, not along a tilted face, so the
    ellipse is built in the crop around the mapped box centre with the box's sides scaled by the warp."""
    marks = np.asarray(landmarks, float).reshape(-1, 5, 2)
    boxes = np.asarray(box, float).reshape(-1, 4)
    template = template_points(hq_size, margin)
    angles = np.linspace(0, 2 * np.pi, ELLIPSE_POINTS, endpoint=False)
    unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    outlines = []
    for points, (x1, y1, x2, y2) in zip(marks, boxes):
        transform = SimilarityTransform.from_estimate(points, template)  # exactly align_face's
        if not transform:
            raise ValueError(f"cannot map face outline: degenerate landmarks {np.round(points, 1).tolist()}")
        centre = transform(np.array([[(x1 + x2) / 2, (y1 + y2) / 2]]))
        axes = transform.scale * np.array([x2 - x1, y2 - y1]) / 2
        outlines.append(np.vstack([transform(points), centre + unit * axes]))
    return np.stack(outlines).reshape(*np.shape(landmarks)[:-2], 5 + ELLIPSE_POINTS, 2)


@dataclass(frozen=True, eq=False)  # holds an array, whose == is elementwise: compare by identity
class BlendParams:
    """One clip's draw. Geometry is relative to the crop side, so HQ and LQ (and any crop size) get the same fake."""
    scale: float
    shift: tuple[float, float]              # x, y, fraction of the side
    hue: float                              # degrees
    saturation: float                       # factors
    contrast: float
    brightness: float                       # fraction of 255, like rgb_shift
    rgb_shift: tuple[float, float, float]
    sharpen: float                          # unsharp-mask amount; 0 when the source is blurred instead
    blur: float                             # sigma, fraction of the side; 0 when sharpened instead
    hull: int                               # 0 forehead to chin, 1 brows to chin, 2 eyes, nose and mouth
    grow: float                             # mean edge move, fraction of the side: outwards if > 0
    field: np.ndarray                       # (2, FIELD_GRID, FIELD_GRID) x, y displacement, fraction of the side
    edge: float                             # mask edge blur sigma, fraction of the side
    ratio: float                            # the mask's value inside: how much of the source shows

    @classmethod
    def sample(cls, gen: torch.Generator) -> BlendParams:
        """Every draw from `gen` alone, so a DataLoader worker reproduces it (see dataset.seeded_generator)."""
        def uniform(low: float, high: float) -> float:
            return low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64).item()

        def spread(width: float) -> float:
            return uniform(-width, width)

        scale, shift = uniform(*SCALE), (spread(SHIFT[0]), spread(SHIFT[1]))
        colour = dict(hue=spread(HUE), saturation=1 + spread(SATURATION), contrast=1 + spread(CONTRAST),
                      brightness=spread(BRIGHTNESS))
        rgb = tuple(spread(RGB_SHIFT) for _ in range(3))
        rgb_shift = rgb if uniform(0, 1) < RGB_SHIFT_P else (0.0, 0.0, 0.0)
        sharpen, blur = (uniform(*SHARPEN), 0.0) if uniform(0, 1) < 0.5 else (0.0, uniform(*BLUR))
        hull = int(torch.randint(3, (), generator=gen))
        field = (torch.rand((2, FIELD_GRID, FIELD_GRID), generator=gen, dtype=torch.float64) * 2 - 1) * FIELD
        ratio = BLEND_RATIOS[int(torch.randint(len(BLEND_RATIOS), (), generator=gen))]
        return cls(scale=scale, shift=shift, **colour, rgb_shift=rgb_shift, sharpen=sharpen, blur=blur, hull=hull,
                   grow=spread(GROW), field=field.numpy(), edge=uniform(*EDGE), ratio=ratio)


def _hull(outline: np.ndarray, variant: int, grow: float) -> np.ndarray:
    """SBI's several mask shapes, so the detector does not learn one boundary's place: the whole face, the face
    below the brows (crops are upright, so that is a cut along y), or just the eyes, nose and mouth. Grown (or shrunk)
    about its centre so that its edge moves by `grow` pixels on average: unlike a morphological kernel, whose radius
    is a whole number of pixels, that scales exactly with the crop size."""
    marks, ellipse = outline[:5], outline[5:]
    if variant == 0:
        points = outline
    elif variant == 1:
        brow = marks[:2, 1].mean() - BROW_RAISE * np.linalg.norm(marks[1] - marks[0])
        points = np.vstack([marks, ellipse[ellipse[:, 1] >= brow]])
    else:
        points = marks.mean(axis=0) + INNER_SCALE * (marks - marks.mean(axis=0))
    hull = cv2.convexHull(points.astype(np.float32))[:, 0].astype(float)
    spread = hull - hull.mean(axis=0)
    hull += spread * (grow / np.linalg.norm(spread, axis=1).mean())
    return np.round(hull * 16).astype(np.int32)  # 4 fractional bits for fillConvexPoly


def face_mask(outline: np.ndarray, size: int, params: BlendParams, *, hq_size: int = 224) -> np.ndarray:
    """float32 (size, size) in [0, 1] for an outline (K, 2) in HQ pixels, or (T, size, size) for (T, K, 2).

    The hull, grown or shrunk, is filled and deformed by the clip's low-frequency displacement field (the same in
    every frame, so the boundary's shape is steady while the outline moves it), blurred at the edge and scaled by the
    blend ratio; blur tails below MASK_FLOOR are cut to exactly 0. Outlines are rescaled about pixel corners, as
    INTER_AREA shrinks: in pixel-centre coordinates HQ x is LQ (x + 0.5) * s / S - 0.5."""
    outlines = (np.asarray(outline, float).reshape(-1, *np.shape(outline)[-2:]) + 0.5) * (size / hq_size) - 0.5
    field = cv2.resize(params.field.transpose(1, 2, 0).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC) * size
    grid = np.arange(size, dtype=np.float32)
    map_x, map_y = grid[None, :] + field[..., 0], grid[:, None] + field[..., 1]
    masks = np.empty((len(outlines), size, size), np.float32)
    for mask, points in zip(masks, outlines):
        hull = _hull(points, params.hull, params.grow * size - FILL_BIAS)
        filled = cv2.fillConvexPoly(np.zeros((size, size), np.uint8), hull, 255, lineType=cv2.LINE_AA, shift=4)
        filled = cv2.remap(filled, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask[:] = cv2.GaussianBlur(filled.astype(np.float32) / 255, (0, 0), params.edge * size)
    masks[masks < MASK_FLOOR] = 0
    masks *= params.ratio
    return masks if np.ndim(outline) == 3 else masks[0]


def _colour_matrix(params: BlendParams) -> np.ndarray:
    """(3, 4) for cv2.transform: hue as a rotation about the grey axis, saturation as a mix with luma, then
    contrast, brightness and per-channel shift, composed into one pass over the pixels."""
    angle, axis = math.radians(params.hue), np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotate = math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)
    saturate = params.saturation * np.eye(3) + (1 - params.saturation) * np.outer(np.ones(3), LUMA)
    offset = 255 * (params.brightness + np.array(params.rgb_shift))
    return np.hstack([params.contrast * rotate @ saturate, offset[:, None]])


def _source(frames: np.ndarray, params: BlendParams) -> np.ndarray:
    """SBI's source, (T, S, S, 3) uint8 in and out: colour, then sharpen or blur, then a small scale and shift
    about the centre, which misaligns the pasted face against the target by a pixel or a few."""
    side = frames.shape[1]
    out = cv2.transform(frames.reshape(-1, side, 3), _colour_matrix(params)).reshape(frames.shape)
    centre = (side - 1) / 2
    matrix = np.array([[params.scale, 0, (1 - params.scale) * centre + params.shift[0] * side],
                       [0, params.scale, (1 - params.scale) * centre + params.shift[1] * side]])
    for frame in out:  # one frame at a time: warpAffine rounds differently with more than 4 channels
        if params.sharpen:
            soft = cv2.GaussianBlur(frame, (0, 0), SHARPEN_SIGMA * side)
            frame[:] = cv2.addWeighted(frame, 1 + params.sharpen, soft, -params.sharpen, 0)
        else:
            frame[:] = cv2.GaussianBlur(frame, (0, 0), params.blur * side)
        frame[:] = cv2.warpAffine(frame, matrix, (side, side), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REFLECT_101)
    return out


def _blend(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """mask * source + (1 - mask) * target, rounded; exactly the target where the mask is 0."""
    base, out = target.astype(np.float32), source.astype(np.float32)
    out -= base
    out *= mask[..., None]
    out += base
    return np.rint(out, out=out).astype(np.uint8)


def self_blend(hq: torch.Tensor, lq: torch.Tensor, outlines: np.ndarray,
               params: BlendParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A real clip's fake: uint8 (T, 3, S, S) HQ and (T, 3, s, s) LQ crops with outlines (T, K, 2) in HQ pixels ->
    (HQ fake, LQ fake, float32 (T, S, S) HQ masks). The LQ fake blends the input LQ crops with the HQ source and
    mask shrunk by INTER_AREA (align's shrink), rather than shrinking the HQ fake: the stored LQ crops are their own
    JPEGs, and must stay untouched outside the mask."""
    side, small = hq.shape[-1], lq.shape[-1]
    target, target_lq = (x.permute(0, 2, 3, 1).numpy() for x in (hq, lq))
    source = _source(np.ascontiguousarray(target), params)
    masks = face_mask(outlines, side, params, hq_size=side)
    shrink = lambda image: cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA)  # noqa: E731
    fake = _blend(target, source, masks)
    fake_lq = _blend(target_lq, np.stack([shrink(s) for s in source]), np.stack([shrink(m) for m in masks]))
    as_clip = lambda frames: torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return as_clip(fake), as_clip(fake_lq), torch.from_numpy(masks)
