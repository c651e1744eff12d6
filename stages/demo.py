"""A labelled demo video set made from nothing, so dfpipe can be tried end to end without any dataset.

Real clips move the face of scikit-image's bundled ``astronaut`` photo (NASA, public domain) over random
backgrounds; each fake is its real clip with a Self-Blended-Images artifact (Shiohara & Yamasaki 2022): the face
blended with a colour-, scale- and shift-jittered copy of itself through a soft mask, so the only difference
between a pair is the kind of blending boundary a detector has to learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage.data import astronaut

from dfpipe.stages.video import write_video

from ..manifests.errors import InputError

# Where things are in the 512x512 astronaut photo (x, y pixels). The face box is what MTCNN reports on it, so
# sizes asked of the generator mean the same as sizes the aligner will measure.
FACE_BOX = (181.0, 62.0, 268.0, 172.0)
HEAD_CENTER = (227.0, 105.0)
HEAD_AXES = (76.0, 92.0)      # an ellipse holding hair, face and chin: the most the moving "head" may take
SPRITE_WINDOW = (141, 3, 313, 207)  # x0, y0, x1, y1: the head ellipse plus room for its soft edge
WALL_MAX_REDNESS = 30         # R - B of the studio wall is about 10, of skin and hair about 55
WALL_MIN_BRIGHTNESS = 150     # the wall is about 195 grey; darker pixels are hair or collar
HEAD_FEATHER = 1.5            # blur sigma of the cut-out, so it has no hard seam against the background
PAN = 16                      # pixels the background may slide over a clip, like a drifting camera


@dataclass(frozen=True)
class Sprite:
    rgb: np.ndarray           # float32 (h, w, 3) in 0..255
    alpha: np.ndarray         # float32 (h, w) in 0..1
    face_box: tuple[float, float, float, float]


def _head_matte(rgb: np.ndarray, ellipse: np.ndarray) -> np.ndarray:
    """Key out the photo's bright, nearly grey studio wall (skin and hair are reddish or dark) inside the head
    ellipse, so the head moves over new backgrounds without a halo of the old one; the largest outline, filled,
    keeps the grey-white teeth and eyes that keying alone would cut."""
    keep = ((rgb[..., 0] - rgb[..., 2]) > WALL_MAX_REDNESS) | (rgb.mean(axis=-1) < WALL_MIN_BRIGHTNESS)
    keep = (keep & (ellipse > 0)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    keep = cv2.morphologyEx(cv2.morphologyEx(keep, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    contours, _ = cv2.findContours(keep, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    matte = np.zeros(keep.shape, np.float32)
    cv2.drawContours(matte, [max(contours, key=cv2.contourArea)], -1, 1.0, thickness=-1)
    return cv2.GaussianBlur(matte, (0, 0), HEAD_FEATHER)


def head_sprite() -> Sprite:
    """The astronaut's head as an RGBA cut-out; computed once per data set and shared by every clip."""
    x0, y0, x1, y1 = SPRITE_WINDOW
    rgb = astronaut()[y0:y1, x0:x1].astype(np.float32)
    ellipse = np.zeros(rgb.shape[:2], np.uint8)
    centre = (round(HEAD_CENTER[0] - x0), round(HEAD_CENTER[1] - y0))
    cv2.ellipse(ellipse, centre, (round(HEAD_AXES[0]), round(HEAD_AXES[1])), 0, 0, 360, 1, -1)
    fx0, fy0, fx1, fy1 = FACE_BOX
    return Sprite(rgb, _head_matte(rgb, ellipse), (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0))


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gradient with colour blobs, low-frequency texture and grain: varied per clip, yet free of face-like
    structure that could give the detector a second face."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx / width + np.sin(direction) * yy / height)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    start, end = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    image = start + ramp[..., None] * (end - start)
    for _ in range(rng.integers(3, 9)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sigma = rng.uniform(0.08, 0.3) * max(height, width)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
        image += blob[..., None] * rng.uniform(-70, 70, size=3).astype(np.float32)
    grid = rng.normal(0, rng.uniform(5, 25), size=(rng.integers(4, 12), rng.integers(4, 12), 3))
    image += cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, rng.uniform(0, 12), size=(height, width, 1)).astype(np.float32)
    image += cv2.GaussianBlur(grain, (0, 0), rng.uniform(0.7, 2.0))[..., None]
    return np.clip(image, 0, 255)


def _similarity(scale: float, angle_deg: float, flip: bool, src: tuple[float, float],
                dst: tuple[float, float]) -> np.ndarray:
    """3x3 matrix taking point ``src`` to ``dst``, mirrored, scaled and rotated about it."""
    theta = np.deg2rad(angle_deg)
    mirror = -1.0 if flip else 1.0
    c, s = scale * np.cos(theta), scale * np.sin(theta)
    linear = np.array([[c * mirror, s], [-s * mirror, c]])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = np.asarray(dst) - linear @ np.asarray(src)
    return matrix


def _wave(rng: np.random.Generator, times: np.ndarray, amplitude: float, speed: float) -> np.ndarray:
    """Two sinusoids with random phases: a smooth, non-periodic-looking path in one coordinate."""
    freqs = speed * rng.uniform(0.5, 1.5, size=2)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    weights = rng.dirichlet([2.0, 2.0])
    return amplitude * sum(w * np.sin(2 * np.pi * f * times + p) for w, f, p in zip(weights, freqs, phases))


def head_motion(rng: np.random.Generator, sprite: Sprite, *, frames: int, width: int, height: int,
                fps: float) -> list[np.ndarray]:
    """Per-frame sprite-to-frame transforms: a face 34-44% of the frame wide, drifting in scale, rotating a
    few degrees and wandering on a smooth path that keeps the whole face box inside the frame."""
    fx0, fy0, fx1, fy1 = sprite.face_box
    face_w, face_h = fx1 - fx0, fy1 - fy0
    face_centre = ((fx0 + fx1) / 2, (fy0 + fy1) / 2)
    times = np.arange(frames) / fps
    speed = rng.uniform(0.15, 0.6)  # cycles per second
    base_scale = rng.uniform(0.34, 0.44) * min(width, height) / face_w
    scales = base_scale * (1 + rng.uniform(-0.08, 0.08) * times / max(times[-1], 1e-6))
    angles = rng.uniform(-5, 5) + _wave(rng, times, rng.uniform(0, 6), speed)
    flip = bool(rng.integers(2))
    half_extent = 0.5 * max(scales) * np.hypot(face_w, face_h)  # rotated face box stays inside
    room_x = max(width / 2 - half_extent - 2, 0.0)
    room_y = max(height / 2 - half_extent - 2, 0.0)
    xs = width / 2 + _wave(rng, times, rng.uniform(0.3, 1.0) * room_x, speed)
    ys = height / 2 + _wave(rng, times, rng.uniform(0.3, 1.0) * room_y, speed)
    return [_similarity(s, a, flip, face_centre, (x, y)) for s, a, x, y in zip(scales, angles, xs, ys)]


def _warp(image: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.warpAffine(image, matrix[:2], (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def render_real(rng: np.random.Generator, sprite: Sprite, motion: list[np.ndarray], *, width: int,
                height: int) -> list[np.ndarray]:
    """Composite the lit, tinted head over a slowly panning background, one uint8 RGB frame per transform."""
    background = random_background(rng, height + 2 * PAN, width + 2 * PAN)
    pan = rng.uniform(-1, 1, size=2) * PAN / max(len(motion) - 1, 1)
    tint = rng.uniform(0.88, 1.12, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:sprite.alpha.shape[0], 0:sprite.alpha.shape[1]].astype(np.float32)
    light_dir = rng.uniform(0, 2 * np.pi)
    shading = 1 + rng.uniform(0, 0.35) * (np.cos(light_dir) * (xx / xx.max() - 0.5)
                                          + np.sin(light_dir) * (yy / yy.max() - 0.5))
    head = np.clip(sprite.rgb * tint * shading[..., None], 0, 255)
    flicker = 1 + _wave(rng, np.arange(len(motion)) / len(motion), rng.uniform(0, 0.08), 1.0)
    frames = []
    for i, matrix in enumerate(motion):
        shift = np.array([[1, 0, -PAN + pan[0] * i], [0, 1, -PAN + pan[1] * i], [0, 0, 1]])
        scene = _warp(background, shift, width, height)
        alpha = _warp(sprite.alpha, matrix, width, height)[..., None]
        frame = scene * (1 - alpha) + _warp(head, matrix, width, height) * alpha
        frames.append(np.clip(frame * flicker[i], 0, 255).round().astype(np.uint8))
    return frames


def blend_fake(rng: np.random.Generator, sprite: Sprite, motion: list[np.ndarray],
               real: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Self-blend every real frame: one set of jitter parameters per clip, so the artifact is consistent over
    time like a face swap's, and a mask that follows the face through the known transforms. Returns the fake
    frames and each frame's blend weight (float32 0..1, frame-sized): where the fake differs from its real."""
    fx0, fy0, fx1, fy1 = sprite.face_box
    face_w, face_h = fx1 - fx0, fy1 - fy0
    face_centre = np.array([(fx0 + fx1) / 2, (fy0 + fy1) / 2, 1.0])
    mask = np.zeros(sprite.alpha.shape, np.float32)
    axes = (round(face_w / 2 * rng.uniform(0.75, 0.95)), round(face_h / 2 * rng.uniform(0.8, 1.0)))
    cv2.ellipse(mask, (round(face_centre[0]), round(face_centre[1] + rng.uniform(0, 0.08) * face_h)), axes,
                0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(0.05, 0.1) * face_w) * rng.uniform(0.75, 1.0)
    zoom = 1 + rng.choice([-1, 1]) * rng.uniform(0.04, 0.09)
    offset = rng.uniform(-0.04, 0.04, size=2) * face_w
    gain = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    direction = rng.normal(size=3)
    shift = (direction / np.linalg.norm(direction) * rng.uniform(15, 32)).astype(np.float32)
    blur = rng.uniform(0.8, 1.5) if rng.random() < 0.5 else 0.0
    height, width = real[0].shape[:2]
    fakes, alphas = [], []
    for frame, matrix in zip(real, motion):
        centre = (matrix @ face_centre)[:2]
        scale = float(np.hypot(*matrix[:2, 0]))
        jitter = _similarity(zoom, 0.0, False, tuple(centre), tuple(centre + offset * scale))
        source = _warp(frame.astype(np.float32), jitter, width, height)
        if blur:
            source = cv2.GaussianBlur(source, (0, 0), blur * scale)
        source = source * gain + shift
        alpha = _warp(mask, matrix, width, height)[..., None]
        fake = frame * (1 - alpha) + source * alpha
        fakes.append(np.clip(fake, 0, 255).round().astype(np.uint8))
        alphas.append(alpha[..., 0])
    return fakes, alphas


def mask_path(out_dir: str | Path, k: int) -> Path:
    """Where `make_demo_dataset(masks=True)` keeps fake k's blend weights: beside the videos, as .npz, which no
    video discovery picks up."""
    return Path(out_dir) / "masks" / f"fake_{k:03d}.npz"


def read_mask(path: str | Path) -> np.ndarray:
    """(frames, H, W) float32 blend weights in 0..1 of one demo fake."""
    with np.load(path) as data:
        return data["alpha"].astype(np.float32) / 255


def make_demo_dataset(out_dir: str | Path, *, n_real: int, n_fake: int, frames: int, width: int, height: int,
                      fps: float, seed: int, masks: bool = False) -> list[Path]:
    """Write ``out_dir/real/real_KKK.mp4`` and ``out_dir/fake/fake_KKK.mp4`` (fake k made from real k, so the
    discovery adapter pairs them by stem) and return the paths, reals first. Each clip draws from its own
    ``(seed, k)`` stream, so a clip does not change when the set grows. ``masks`` also writes each fake's blend
    weights per frame (`mask_path`): the ground truth of where a fake is fake, which explanations are tested on."""
    out_dir = Path(out_dir)
    if n_fake < 0 or n_fake > n_real:
        raise InputError(f"{out_dir}: n_fake={n_fake} must be within 0..n_real={n_real} (fake k comes from real k)")
    if min(n_real, frames, width, height) < 1 or fps <= 0:
        raise InputError(f"{out_dir}: n_real, frames, width, height and fps must be positive")
    if width % 2 or height % 2:
        raise InputError(f"{out_dir}: width and height must be even for yuv420p H.264, got {width}x{height}")
    sprite = head_sprite()
    (out_dir / "real").mkdir(parents=True, exist_ok=True)
    if n_fake:
        (out_dir / "fake").mkdir(parents=True, exist_ok=True)
    reals, fakes = [], []
    for k in range(n_real):
        rng = np.random.default_rng([seed, k, 0])
        motion = head_motion(rng, sprite, frames=frames, width=width, height=height, fps=fps)
        real = render_real(rng, sprite, motion, width=width, height=height)
        reals.append(out_dir / "real" / f"real_{k:03d}.mp4")
        write_video(reals[-1], real, fps=fps)
        if k < n_fake:
            fakes.append(out_dir / "fake" / f"fake_{k:03d}.mp4")
            fake, alpha = blend_fake(np.random.default_rng([seed, k, 1]), sprite, motion, real)
            write_video(fakes[-1], fake, fps=fps)
            if masks:
                mask_path(out_dir, k).parent.mkdir(exist_ok=True)
                np.savez_compressed(mask_path(out_dir, k), alpha=np.round(np.stack(alpha) * 255).astype(np.uint8))
    return reals + fakes
