"""Synthetic factory frames with exact ground truth: aluminium panels with scratches, dents, pinholes.

NumPy + OpenCV only, so both sides import it: the demo camera streams it, training learns from it,
tests measure against it. Deterministic per seed.

A panel is brushed (anisotropic streaks) or painted (orange-peel texture), lit by a smooth
gradient and crossed by specular reflection bands, which saturate like real highlights and,
as the field report notes, fool teachers. Defects:

* scratch: a thin curved line, 1-6 px wide, darker or brighter than the metal, its contrast
  fading along its length;
* dent: a soft elliptical deformation seen as shading (highlight on the lit side, shadow on the
  other), 15-80 px radius;
* pinhole: a dark dot 2-8 px across, sometimes with a bright rim.

Sizes are in pixels of a 4 MP (2688 x 1520) frame. ``pixel_scale`` renders the same optics at
another resolution: ``render_frame(seed, 1024, 576, pixel_scale=576 / 1520)`` looks like a full
frame letterboxed to the engine's input, at a fraction of the cost of rendering 4 MP and shrinking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

CLASSES: tuple[str, ...] = ("scratch", "dent", "pinhole")
SCRATCH, DENT, PINHOLE = 0, 1, 2
FRAME_WIDTH = 2688
FRAME_HEIGHT = 1520
_MIN_SIDE = 32
# Smallest pixel_scale render_frame draws at: a frame of at least 5% of 2688x1520 on its scaled side.
MIN_PIXEL_SCALE = 0.05

# BGR multipliers of paint colours (silver, white, graphite, blue, red, grey-green).
_PAINTS = (
    (1.00, 1.00, 1.00),
    (1.06, 1.06, 1.05),
    (0.55, 0.55, 0.57),
    (1.10, 0.80, 0.55),
    (0.50, 0.55, 1.05),
    (0.85, 0.92, 0.85),
)
_CLASS_WEIGHTS = np.array([0.45, 0.25, 0.30])  # scratch, dent, pinhole


@dataclass(frozen=True)
class SyntheticFrame:
    """image HxWx3 uint8 BGR; masks NxHxW bool, one per defect; classes N int64 into CLASSES."""

    image: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    seed: int

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASSES


def render_frame(
    seed: int,
    width: int = FRAME_WIDTH,
    height: int = FRAME_HEIGHT,
    *,
    defect_free_prob: float = 0.15,
    max_defects: int = 6,
    with_masks: bool = True,
    pixel_scale: float = 1.0,
) -> SyntheticFrame:
    """Render one panel. With ``with_masks=False`` the masks array is empty (0xHxW) but classes are kept."""
    if min(width, height) < _MIN_SIDE or width * height > FRAME_WIDTH * FRAME_HEIGHT:
        raise ValueError(
            f"frame size must be at least {_MIN_SIDE} px a side and at most {FRAME_WIDTH}x{FRAME_HEIGHT} "
            f"pixels in all, got {width}x{height}"
        )
    if not 0.0 <= defect_free_prob <= 1.0:
        raise ValueError(f"defect_free_prob must be within 0..1, got {defect_free_prob}")
    if max_defects < 0:
        raise ValueError(f"max_defects must be >= 0, got {max_defects}")
    if not MIN_PIXEL_SCALE <= pixel_scale <= 4.0:
        raise ValueError(f"pixel_scale must be within {MIN_PIXEL_SCALE}..4, got {pixel_scale}")

    rng = np.random.default_rng(seed)
    ps = pixel_scale
    light_angle = rng.uniform(0.0, 2.0 * math.pi)
    light = (math.cos(light_angle), math.sin(light_angle))

    luminance = _panel(rng, width, height, ps)

    count = 0 if (max_defects == 0 or rng.random() < defect_free_prob) else int(rng.integers(1, max_defects + 1))
    classes = rng.choice(len(CLASSES), size=count, p=_CLASS_WEIGHTS).astype(np.int64)
    masks = np.zeros((count if with_masks else 0, height, width), dtype=bool)
    for index, class_id in enumerate(classes):
        draw = (_scratch, _dent, _pinhole)[int(class_id)]
        x0, y0, delta, mask = draw(rng, width, height, ps, light)
        h, w = delta.shape
        luminance[y0 : y0 + h, x0 : x0 + w] += delta
        if with_masks:
            masks[index, y0 : y0 + h, x0 : x0 + w] = mask

    luminance += rng.normal(0.0, rng.uniform(0.8, 2.5), size=(height, width)).astype(np.float32)  # sensor noise
    tint = _PAINTS[int(rng.integers(len(_PAINTS)))] if rng.random() < 0.5 else (1.02, 1.0, 0.97)
    image = np.empty((height, width, 3), np.uint8)
    for channel, gain in enumerate(tint):
        image[:, :, channel] = np.clip(luminance * np.float32(gain), 0, 255)
    return SyntheticFrame(image=image, masks=masks, classes=classes, seed=seed)


def _panel(rng: np.random.Generator, width: int, height: int, ps: float) -> np.ndarray:
    """Defect-free metal: texture, lighting gradient and specular bands, float32 luminance."""
    brushed = rng.random() < 0.6
    base = rng.uniform(120, 190) if brushed else rng.uniform(70, 190)
    noise = rng.standard_normal((height, width), dtype=np.float32)
    if brushed:
        # Anisotropic streaks: noise averaged along the brushing direction, rescaled to unit std.
        length = max(3, int(rng.uniform(40, 140) * ps)) | 1
        kernel = (length, 1) if rng.random() < 0.7 else (1, length)
        texture = cv2.blur(noise, kernel) * (math.sqrt(length) * rng.uniform(2.0, 6.0))
        texture += noise * rng.uniform(0.5, 1.5)  # fine grain
    else:
        sigma = max(0.6, rng.uniform(1.5, 4.0) * ps)
        texture = cv2.GaussianBlur(noise, (0, 0), sigma) * (sigma * 2.0 * rng.uniform(1.5, 4.0))

    # Smooth lighting: a coarse random field, upsampled.
    coarse = rng.uniform(0.8, 1.15, size=(3, 5)).astype(np.float32)
    lighting = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    panel = (texture + np.float32(base)) * lighting

    # Specular reflection bands: Gaussian ridges along random lines, strong enough to saturate.
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    for _ in range(int(rng.integers(0, 3))):
        angle = rng.uniform(0.0, math.pi)
        offset = rng.uniform(-0.2, 1.2) * (abs(math.cos(angle)) * width + abs(math.sin(angle)) * height)
        sigma = rng.uniform(20, 150) * ps
        distance = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle)) - np.float32(offset)
        panel += np.float32(rng.uniform(25, 90)) * np.exp(-0.5 * (distance / np.float32(sigma)) ** 2)
    return panel


def _place(rng: np.random.Generator, width: int, height: int, extent: int) -> tuple[int, int]:
    """Top-left corner for a square ROI of ``extent`` pixels, clipped so the ROI fits in the frame."""
    x0 = int(rng.integers(0, max(1, width - extent)))
    y0 = int(rng.integers(0, max(1, height - extent)))
    return x0, y0


def _roi_size(width: int, height: int, extent: int) -> tuple[int, int]:
    return min(extent, width), min(extent, height)


def _scratch(
    rng: np.random.Generator, width: int, height: int, ps: float, light: tuple[float, float]
) -> tuple[int, int, np.ndarray, np.ndarray]:
    length = rng.uniform(60, 700) * ps
    extent = int(length) + 16
    x0, y0 = _place(rng, width, height, extent)
    w, h = _roi_size(width, height, extent)
    # A quadratic Bezier curve inside the ROI: start, bent control point, end.
    start = rng.uniform(0.1, 0.9, size=2) * (w, h)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    end = start + length * np.array([math.cos(angle), math.sin(angle)])
    end = np.clip(end, 0, (w - 1, h - 1))
    bend = rng.uniform(-0.3, 0.3) * length * np.array([-math.sin(angle), math.cos(angle)])
    control = (start + end) / 2 + bend
    t = np.linspace(0.0, 1.0, 48)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end

    width_px = rng.uniform(1.0, 6.0) * ps
    thickness = max(1, round(width_px))
    strength = min(1.0, width_px)  # a sub-pixel scratch shows as a faint 1 px line
    contrast = rng.uniform(18, 70) * strength * (-1.0 if rng.random() < 0.6 else 1.0)
    fade = np.clip(rng.uniform(0.3, 1.0) + rng.uniform(-0.6, 0.6) * np.linspace(0, 1, len(curve)), 0.25, 1.0)

    shade = np.zeros((h, w), np.float32)
    coverage = np.zeros((h, w), np.float32)
    shift = 4  # sub-pixel precision of cv2 drawing: coordinates in 1/16 px
    pts = np.round(curve * (1 << shift)).astype(np.int32)
    for i in range(len(pts) - 1):
        a, b = tuple(int(v) for v in pts[i]), tuple(int(v) for v in pts[i + 1])
        cv2.line(shade, a, b, float(fade[i]), thickness, cv2.LINE_AA, shift)
        cv2.line(coverage, a, b, 1.0, thickness, cv2.LINE_AA, shift)
    return x0, y0, shade * np.float32(contrast), coverage >= 0.5


def _dent(
    rng: np.random.Generator, width: int, height: int, ps: float, light: tuple[float, float]
) -> tuple[int, int, np.ndarray, np.ndarray]:
    radius = rng.uniform(15, 80) * ps
    extent = int(6 * radius) + 8
    x0, y0 = _place(rng, width, height, extent)
    w, h = _roi_size(width, height, extent)
    su, sv = radius / 1.5, radius / 1.5 * rng.uniform(0.5, 1.0)
    phi = rng.uniform(0.0, math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2.0, h / 2.0
    u = (xs - cx) * math.cos(phi) + (ys - cy) * math.sin(phi)
    v = -(xs - cx) * math.sin(phi) + (ys - cy) * math.cos(phi)
    bump = np.exp(-0.5 * ((u / su) ** 2 + (v / sv) ** 2))
    gy, gx = np.gradient(bump)
    # Shading of a depression: the slope facing the light brightens, the other darkens.
    amplitude = rng.uniform(20, 60)
    shade = amplitude * radius * (gx * light[0] + gy * light[1]) - 0.15 * amplitude * bump
    return x0, y0, shade.astype(np.float32), bump > 0.3


def _pinhole(
    rng: np.random.Generator, width: int, height: int, ps: float, light: tuple[float, float]
) -> tuple[int, int, np.ndarray, np.ndarray]:
    radius = rng.uniform(1.0, 4.0) * ps
    extent = int(2 * radius) + 8
    x0, y0 = _place(rng, width, height, extent)
    w, h = _roi_size(width, height, extent)
    shift = 4
    jitter = rng.uniform(-0.5, 0.5, size=2)
    centre = (int((w / 2 + jitter[0]) * (1 << shift)), int((h / 2 + jitter[1]) * (1 << shift)))
    r = max(1, int(radius * (1 << shift)))
    coverage = np.zeros((h, w), np.float32)
    cv2.circle(coverage, centre, r, 1.0, -1, cv2.LINE_AA, shift)
    strength = min(1.0, radius)  # a dot smaller than a pixel shows as a faint pixel
    shade = coverage * np.float32(-rng.uniform(50, 130) * strength)
    if rng.random() < 0.3:
        rim = np.zeros((h, w), np.float32)
        cv2.circle(rim, centre, r + (1 << shift), 1.0, 1, cv2.LINE_AA, shift)
        shade += rim * np.float32(rng.uniform(10, 35) * strength)
    mask = coverage >= 0.5
    if not mask.any():  # the darkest pixel always counts: a defect has at least one pixel
        mask[np.unravel_index(int(np.argmax(coverage)), coverage.shape)] = True
    return x0, y0, shade, mask
