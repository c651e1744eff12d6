"""Augmentation of a training clip: one draw of parameters per clip, applied alike to every frame and to both
streams (`ClipAugment`, RandAugment included), and MixUp / CutMix with a partner clip (`ClipMix`). The dataset
(stages/dataset.py) draws them from its seeded generators, so an epoch is reproducible whatever the worker count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torchvision.transforms.v2 import RandAugment
from torchvision.transforms.v2 import functional as F

# Augmentation ranges: mild on purpose, strong geometric or colour changes would hide the blending artefacts.
ROTATION_DEG = 10.0
TRANSLATE = 0.05                 # fraction of the crop side
SCALE = (0.9, 1.1)
JITTER = (0.2, 0.2, 0.2, 0.05)   # max change of brightness, contrast, saturation factors; max hue shift
JPEG_QUALITY = (40, 90)
BLUR_SIGMA = (0.1 / 224, 2.0 / 224)  # fraction of the crop width: 0.1-2 px on the HQ crop
NOISE_STD = (0.01, 0.05)         # on the [0, 1] intensity scale
CUTOUT_SIDE = (0.1, 0.4)         # fraction of the crop side


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64).item()


@dataclass(frozen=True)
class ClipAugment:
    """One draw of augmentation parameters, applied alike to every frame of a clip and to both streams.

    Geometric parameters are stored relative to the crop size so the HQ and LQ crops stay pixel-aligned; a default
    instance changes nothing (validation).
    """
    flip: bool = False
    affine: tuple[float, float, float, float] | None = None   # angle (deg), dx, dy (fraction of side), scale
    jitter: tuple[float, float, float, float] | None = None   # brightness, contrast, saturation factors, hue shift
    jpeg: int | None = None                                    # quality
    blur: float | None = None                                  # sigma as a fraction of the width
    noise: float | None = None                                 # standard deviation on [0, 1]
    cutout: tuple[float, float, float, float] | None = None   # top, left, height, width (fractions)
    randaugment: tuple[int, int, int] | None = None            # ops, magnitude, seed of torchvision's op draw

    @classmethod
    def sample(cls, augment: Mapping[str, float], gen: torch.Generator) -> ClipAugment:
        """Draw each augmentation with its probability from ``augment`` (the yaml's ``dataset.augment``)."""
        def chance(name: str) -> bool:
            return torch.rand((), generator=gen).item() < augment[name]

        def spread(width: float) -> float:
            return _uniform(gen, -width, width)

        params = {}
        if chance("flip"):
            params["flip"] = True
        if chance("affine"):
            params["affine"] = (spread(ROTATION_DEG), spread(TRANSLATE), spread(TRANSLATE), _uniform(gen, *SCALE))
        if chance("color_jitter"):
            b, c, s, h = JITTER
            params["jitter"] = (1 + spread(b), 1 + spread(c), 1 + spread(s), spread(h))
        if chance("jpeg"):
            params["jpeg"] = int(torch.randint(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, (), generator=gen))
        if chance("blur"):
            params["blur"] = _uniform(gen, *BLUR_SIGMA)
        if chance("noise"):
            params["noise"] = _uniform(gen, *NOISE_STD)
        if chance("cutout"):
            height, width = _uniform(gen, *CUTOUT_SIDE), _uniform(gen, *CUTOUT_SIDE)
            params["cutout"] = (_uniform(gen, 0, 1 - height), _uniform(gen, 0, 1 - width), height, width)
        # drawn last and only when enabled, so configs without it draw exactly what they drew before it existed
        if augment.get("randaugment", 0) > 0 and chance("randaugment"):
            params["randaugment"] = (int(augment["randaugment_ops"]), int(augment["randaugment_magnitude"]),
                                     int(torch.randint(2 ** 31, (), generator=gen)))
        return cls(**params)

    def __call__(self, clip: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (T, 3, H, W) -> float32 in [0, 1]. Noise is drawn per pixel from ``gen``; only its strength is shared.

        Colour and blur work in float: torchvision's uint8 hue path is about twice as slow, and hue dominates the cost.
        """
        h, w = clip.shape[-2:]
        if self.randaugment:
            clip = rand_augment(clip, *self.randaugment)
        if self.flip:
            clip = F.horizontal_flip(clip)
        if self.affine:
            angle, dx, dy, scale = self.affine
            clip = F.affine(clip, angle=angle, translate=[dx * w, dy * h], scale=scale, shear=[0.0, 0.0],
                            interpolation=F.InterpolationMode.BILINEAR)
        out = F.to_dtype(clip, torch.float32, scale=True)
        if self.jitter:
            brightness, contrast, saturation, hue = self.jitter
            out = F.adjust_brightness(out, brightness)
            out = F.adjust_contrast(out, contrast)
            out = F.adjust_saturation(out, saturation)
            out = F.adjust_hue(out, hue)
        if self.blur:
            sigma = self.blur * w
            kernel = 2 * math.ceil(3 * sigma) + 1
            out = F.gaussian_blur(out, [kernel, kernel], [sigma, sigma])
        if self.jpeg:
            out = F.to_dtype(F.jpeg(F.to_dtype(out, torch.uint8, scale=True), self.jpeg), torch.float32, scale=True)
        if self.noise:
            out = (out + self.noise * torch.randn(out.shape, generator=gen)).clamp_(0, 1)
        if self.cutout:
            top, left, height, width = self.cutout
            out = F.erase(out, round(top * h), round(left * w), max(1, round(height * h)), max(1, round(width * w)),
                          v=torch.tensor(0.0))
        return out


def rand_augment(clip: torch.Tensor, ops: int, magnitude: int, seed: int) -> torch.Tensor:
    """torchvision's RandAugment, one draw for the whole clip: given a (T, 3, H, W) tensor it picks its ops, signs and
    magnitudes once per call and applies them to every frame. It draws from torch's global generator, so that is
    seeded from the clip's draw (and restored after): the other stream replays the same ops, whose geometric
    magnitudes are relative to the image size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RandAugment(num_ops=ops, magnitude=magnitude)(clip)


@dataclass(frozen=True)
class ClipMix:
    """MixUp or CutMix of a clip with a partner clip, one draw for every frame and both streams.

    ``ratio`` is the share of the clip's own pixels, so the target is ratio * y + (1 - ratio) * y_partner. CutMix's
    ``box`` (top, left, height, width) is in pixels of a ``grid``-sized crop, the smallest stream's: each stream
    scales it to its own size, so with sizes that are multiples of it (224 and 112) every stream's box covers
    exactly the same share of its pixels.
    """
    partner: int                    # index of the partner in the dataset's clips
    ratio: float
    box: tuple[int, int, int, int] | None = None
    grid: int = 1

    @classmethod
    def sample(cls, augment: Mapping[str, float], clips: int, grid: int, rng: np.random.Generator) -> ClipMix | None:
        """MixUp with probability ``mixup``, else CutMix with probability ``cutmix``; their ratios Beta(alpha, alpha)
        as in the papers (CutMix's box of area 1 - ratio, centred anywhere and clipped to the crop)."""
        mixup, cutmix = augment.get("mixup", 0), augment.get("cutmix", 0)
        draw = rng.random()
        if draw >= mixup + cutmix:
            return None
        partner = int(rng.integers(clips))
        if draw < mixup:
            return cls(partner, float(rng.beta(augment["mixup_alpha"], augment["mixup_alpha"])))
        side = round(grid * math.sqrt(1 - rng.beta(augment["cutmix_alpha"], augment["cutmix_alpha"])))
        cy, cx = rng.integers(grid, size=2)
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        height, width = min(grid, cy - side // 2 + side) - top, min(grid, cx - side // 2 + side) - left
        return cls(partner, 1 - height * width / grid ** 2, (int(top), int(left), int(height), int(width)), grid)

    def __call__(self, clip: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Float clips (T, 3, H, W) of one stream -> the mixed clip."""
        if self.box is None:
            return clip * self.ratio + other * (1 - self.ratio)
        h, w = clip.shape[-2:]
        top, left, height, width = self.box
        rows = slice(round(top * h / self.grid), round((top + height) * h / self.grid))
        cols = slice(round(left * w / self.grid), round((left + width) * w / self.grid))
        out = clip.clone()
        out[..., rows, cols] = other[..., rows, cols]
        return out
