"""Synthetic factory frames with exact ground truth: aluminium panels with scratches, dents, pinholes.

NumPy + OpenCV only, so both sides import it: the demo camera streams it, training learns from it,
tests measure against it. Deterministic per seed.

A panel is brushed (anisotropic streaks), painted (orange-peel texture) or bead-blasted (fine
isotropic grain), lit by a smooth gradient with vignetting and crossed by specular reflection
bands, which saturate like real highlights and, as the field report notes, fool teachers. Some
frames show the panel's edge with the dark fixture beyond it, or a stamped crease (a soft
ridge of light and shadow): neither is a defect, both look like one to a careless model.
Defects, sized in pixels of a 4 MP (2688 x 1520) frame:

* scratch: a thin curved stroke, 1-6 px wide (about a third are 1-2 px hairlines), darker or
  brighter than the metal, its contrast fading along its length, sometimes with a faint rim;
* dent: a soft elliptical deformation seen as shading (highlight on the lit side, shadow on the
  other), 15-80 px radius;
* pinhole: a dark pit 2-12 px across, sometimes with a bright rim.

Ground truth is geometric and exact: a scratch's mask is every pixel whose centre lies within
half its width of the stroke's centre line, a pinhole's every pixel centre within its radius, a
dent's where the depression is deeper than 30% of its depth. The image is drawn from the same
geometry (anti-aliased coverage), then blurred by the optics and noised by the sensor, as a
camera sees it; the masks are not blurred.

``pixel_scale`` renders the same optics at another resolution: ``render_frame(seed, 1344, 760,
pixel_scale=0.5)`` looks like a full frame shrunk by half, at a quarter of the cost.
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
# Generator version: part of every cache key built from these frames (training.data.synthetic_cache).
GENERATOR_VERSION = 2

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
HAIRLINE_SHARE = 0.35  # scratches 1-2 px wide; the rest are 2-6 px
SMALL_PINHOLE_SHARE = 0.2  # pinholes 2-3 px across; the rest are 3-12 px


@dataclass(frozen=True)
class SyntheticFrame:
    """image HxWx3 uint8 BGR; masks NxHxW bool, one per defect; classes N int64 into CLASSES.

    sizes N float64: each defect's nominal size in frame pixels (a scratch's width, a pinhole's
    diameter, a dent's radius), as drawn.
    """

    image: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    seed: int
    sizes: np.ndarray

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

    luminance, on_panel = _panel(rng, width, height, ps)

    count = 0 if (max_defects == 0 or rng.random() < defect_free_prob) else int(rng.integers(1, max_defects + 1))
    classes = rng.choice(len(CLASSES), size=count, p=_CLASS_WEIGHTS).astype(np.int64)
    masks = np.zeros((count if with_masks else 0, height, width), dtype=bool)
    sizes = np.zeros(count, dtype=np.float64)
    for index, class_id in enumerate(classes):
        draw = (_scratch, _dent, _pinhole)[int(class_id)]
        for _attempt in range(8):  # a defect lies on the panel, not on the fixture beyond its edge
            x0, y0, delta, mask, size = draw(rng, width, height, ps, light)
            h, w = delta.shape
            if on_panel is None or on_panel[y0 : y0 + h, x0 : x0 + w][mask].all():
                break
        luminance[y0 : y0 + h, x0 : x0 + w] += delta
        sizes[index] = size
        if with_masks:
            masks[index, y0 : y0 + h, x0 : x0 + w] = mask
            if on_panel is not None:
                masks[index] &= on_panel
                if not masks[index].any():  # the rare defect that never found the panel: keep its pixels
                    masks[index, y0 : y0 + h, x0 : x0 + w] = mask

    # The camera: optics blur (a little defocus), then shot and read noise, then 8-bit quantisation.
    if rng.random() < 0.7:
        sigma = rng.uniform(0.3, 0.8) * max(ps, 0.5)
        luminance = cv2.GaussianBlur(luminance, (0, 0), sigma)
    read_noise = rng.uniform(0.8, 2.5)
    noise = rng.standard_normal((height, width), dtype=np.float32)
    luminance += noise * (np.float32(read_noise) + np.float32(0.04) * np.sqrt(np.maximum(luminance, 0.0)))
    tint = _PAINTS[int(rng.integers(len(_PAINTS)))] if rng.random() < 0.5 else (1.02, 1.0, 0.97)
    image = np.empty((height, width, 3), np.uint8)
    for channel, gain in enumerate(tint):
        image[:, :, channel] = np.clip(luminance * np.float32(gain), 0, 255)
    return SyntheticFrame(image=image, masks=masks, classes=classes, seed=seed, sizes=sizes)


def _panel(rng: np.random.Generator, width: int, height: int, ps: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Defect-free metal (float32 luminance) and where the panel is (bool HxW; None: everywhere)."""
    kind = rng.choice(3, p=(0.55, 0.3, 0.15))  # brushed, painted, bead-blasted
    base = rng.uniform(120, 190) if kind == 0 else rng.uniform(60, 190)
    noise = rng.standard_normal((height, width), dtype=np.float32)
    if kind == 0:
        # Anisotropic streaks: noise averaged along the brushing direction, rescaled to unit std.
        length = max(3, int(rng.uniform(40, 140) * ps)) | 1
        kernel = (length, 1) if rng.random() < 0.7 else (1, length)
        texture = cv2.blur(noise, kernel) * (math.sqrt(length) * rng.uniform(2.0, 6.0))
        texture += noise * rng.uniform(0.5, 1.5)  # fine grain
    elif kind == 1:
        sigma = max(0.6, rng.uniform(1.5, 4.0) * ps)
        texture = cv2.GaussianBlur(noise, (0, 0), sigma) * (sigma * 2.0 * rng.uniform(1.5, 4.0))
    else:
        sigma = max(0.5, rng.uniform(0.6, 1.2) * ps)
        texture = cv2.GaussianBlur(noise, (0, 0), sigma) * (sigma * 2.0 * rng.uniform(1.5, 3.5))

    # Smooth lighting: a coarse random field, upsampled, and the lens's vignetting.
    coarse = rng.uniform(0.8, 1.15, size=(3, 5)).astype(np.float32)
    lighting = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    r2 = ((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2
    lighting = lighting * (np.float32(1.0) - np.float32(rng.uniform(0.0, 0.12)) * r2)
    panel = (texture + np.float32(base)) * lighting

    # Specular reflection bands: Gaussian ridges along random lines, strong enough to saturate.
    for _ in range(int(rng.integers(0, 3))):
        angle = rng.uniform(0.0, math.pi)
        offset = rng.uniform(-0.2, 1.2) * (abs(math.cos(angle)) * width + abs(math.sin(angle)) * height)
        sigma = rng.uniform(20, 150) * ps
        distance = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle)) - np.float32(offset)
        panel += np.float32(rng.uniform(25, 90)) * np.exp(-0.5 * (distance / np.float32(sigma)) ** 2)

    # A stamped crease: a long soft ridge, light on one flank and shadow on the other. Not a defect.
    if rng.random() < 0.2:
        angle = rng.uniform(0.0, math.pi)
        offset = rng.uniform(0.2, 0.8) * (abs(math.cos(angle)) * width + abs(math.sin(angle)) * height)
        sigma = rng.uniform(2.5, 7.0) * max(ps, 0.25)
        along = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle)) - np.float32(offset)
        d = along / np.float32(sigma)
        panel += np.float32(rng.uniform(10, 35)) * d * np.exp(np.float32(0.5) - np.float32(0.5) * d * d)

    # The panel's edge: beyond a straight line the dark fixture, with a bright bevel along the edge.
    on_panel: np.ndarray | None = None
    if rng.random() < 0.25:
        side = int(rng.integers(4))  # left, right, top, bottom
        tilt = math.radians(rng.uniform(-4, 4))
        span = width if side < 2 else height
        depth = rng.uniform(0.04, 0.25) * span
        if side < 2:
            edge = (ys - height / 2) * np.float32(math.tan(tilt)) + np.float32(depth if side == 0 else width - depth)
            signed = (xs - edge) * np.float32(1 if side == 0 else -1)
        else:
            edge = (xs - width / 2) * np.float32(math.tan(tilt)) + np.float32(depth if side == 2 else height - depth)
            signed = (ys - edge) * np.float32(1 if side == 2 else -1)
        inside = np.clip(signed + np.float32(0.5), 0.0, 1.0)  # anti-aliased edge, 1 on the panel
        fixture = np.float32(rng.uniform(15, 50)) + cv2.GaussianBlur(noise, (0, 0), 2.0) * np.float32(6.0)
        bevel = np.float32(rng.uniform(20, 70)) * np.exp(-0.5 * ((signed - 3.0 * ps) / np.float32(2.0 * ps + 0.5)) ** 2)
        panel = panel * inside + fixture * (np.float32(1.0) - inside) + bevel
        # Defects keep clear of the edge by a few pixels (the bevel is the part's own feature).
        on_panel = np.asarray(signed > 8.0 * ps + 2.0)
    return panel.astype(np.float32, copy=False), on_panel


def _place(rng: np.random.Generator, width: int, height: int, extent: int) -> tuple[int, int]:
    """Top-left corner for a square ROI of ``extent`` pixels, clipped so the ROI fits in the frame."""
    x0 = int(rng.integers(0, max(1, width - extent)))
    y0 = int(rng.integers(0, max(1, height - extent)))
    return x0, y0


def _roi_size(width: int, height: int, extent: int) -> tuple[int, int]:
    return min(extent, width), min(extent, height)


def _distance_to_polyline(curve: np.ndarray, shape: tuple[int, int], reach: float) -> np.ndarray:
    """Distance (float32 HxW, px) from each pixel centre to a polyline, exact within ``reach`` of it.

    Pixels farther than ``reach`` get a large value. curve: Px2 (x, y) in ROI pixels.
    """
    h, w = shape
    band = np.zeros((h, w), np.uint8)
    pts = np.round(curve).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(band, [pts], False, 1, max(1, math.ceil(2 * reach + 2)))
    ys, xs = np.nonzero(band)
    distance = np.full((h, w), 1e6, np.float32)
    if ys.size == 0:
        return distance
    px = xs.astype(np.float32) + 0.5
    py = ys.astype(np.float32) + 0.5
    best = np.full(ys.size, np.inf, np.float32)
    a, b = curve[:-1].astype(np.float32), curve[1:].astype(np.float32)
    for (ax, ay), (bx, by) in zip(a, b, strict=True):
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / max(length2, 1e-9), 0.0, 1.0)
        np.minimum(best, np.hypot(px - (ax + t * dx), py - (ay + t * dy)), out=best)
    distance[ys, xs] = best
    return distance


def _scratch(
    rng: np.random.Generator, width: int, height: int, ps: float, light: tuple[float, float]
) -> tuple[int, int, np.ndarray, np.ndarray, float]:
    length = rng.uniform(40, 700) * ps
    hairline = rng.random() < HAIRLINE_SHARE
    width_px = (rng.uniform(1.0, 2.0) if hairline else rng.uniform(2.0, 6.0)) * ps
    extent = int(length + 4 * width_px) + 16
    x0, y0 = _place(rng, width, height, extent)
    w, h = _roi_size(width, height, extent)
    # A cubic Bezier inside the ROI: start, two bent control points, end.
    start = rng.uniform(0.1, 0.9, size=2) * (w, h)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    end = np.clip(start + length * np.array([math.cos(angle), math.sin(angle)]), 2, (w - 3, h - 3))
    normal = np.array([-math.sin(angle), math.cos(angle)])
    c1 = start + (end - start) / 3 + rng.uniform(-0.25, 0.25) * length * normal
    c2 = start + 2 * (end - start) / 3 + rng.uniform(-0.25, 0.25) * length * normal
    t = np.linspace(0.0, 1.0, 64)[:, None]
    curve = (1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * end
    curve = np.clip(curve, 0, (w - 1, h - 1))

    half = width_px / 2.0
    distance = _distance_to_polyline(curve, (h, w), half + 3.0)
    coverage = np.clip(half + 0.5 - distance, 0.0, 1.0)  # anti-aliased stroke of the nominal width
    # The fade along the stroke, looked up through the nearest curve point of each pixel (cheap: by ROI blur).
    fade_along = np.clip(rng.uniform(0.55, 1.0) + rng.uniform(-0.4, 0.4) * np.linspace(0, 1, len(curve)), 0.4, 1.0)
    fade = np.zeros((h, w), np.float32)
    weight = np.zeros((h, w), np.float32)
    pts = np.round(curve).astype(np.int32)
    for i in range(len(pts) - 1):
        cv2.line(fade, tuple(int(v) for v in pts[i]), tuple(int(v) for v in pts[i + 1]), float(fade_along[i]),
                 max(1, math.ceil(2 * half + 6)))
        cv2.line(weight, tuple(int(v) for v in pts[i]), tuple(int(v) for v in pts[i + 1]), 1.0,
                 max(1, math.ceil(2 * half + 6)))
    fade = np.where(weight > 0, fade, 1.0).astype(np.float32)

    # Contrast: hairlines need more to be seen at all; a scratch under 1 px wide would be fainter still.
    magnitude = rng.uniform(22, 55) if hairline else rng.uniform(15, 60)
    sign = -1.0 if rng.random() < 0.6 else 1.0
    # A groove is deepest on its centre line: the profile dips there, within the anti-aliased stroke.
    profile = coverage * (0.75 + 0.25 * np.clip(1.0 - distance / max(half, 0.5), 0.0, 1.0))
    shade = profile * fade * np.float32(magnitude * sign * min(1.0, width_px))
    if rng.random() < 0.3:  # the groove's lit lip: a faint line of the other polarity beside it
        lip = np.clip(1.0 - np.abs(distance - (half + 1.0)), 0.0, 1.0) * (distance > half)
        shade -= lip * fade * np.float32(0.35 * magnitude * sign)
    mask = distance <= half
    if not mask.any():
        mask[np.unravel_index(int(np.argmin(distance)), distance.shape)] = True
    return x0, y0, shade.astype(np.float32), mask, float(width_px)


def _dent(
    rng: np.random.Generator, width: int, height: int, ps: float, light: tuple[float, float]
) -> tuple[int, int, np.ndarray, np.ndarray, float]:
    radius = rng.uniform(15, 80) * ps
    extent = int(6 * radius) + 8
    x0, y0 = _place(rng, width, height, extent)
    w, h = _roi_size(width, height, extent)
    su, sv = radius / 1.5, radius / 1.5 * rng.uniform(0.5, 1.0)
    phi = rng.uniform(0.0, math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2.0, h / 2.0
    u = (xs + 0.5 - cx) * math.cos(phi) + (ys + 0.5 - cy) * math.sin(phi)
    v = -(xs + 0.5 - cx) * math.sin(phi) + (ys + 0.5 - cy) * math.cos(phi)
    bump = np.exp(-0.5 * ((u / su) ** 2 + (v / sv) ** 2))
    gy, gx = np.gradient(bump)
    # Shading of a depression: the slope facing the light brightens, the other darkens.
    amplitude = rng.uniform(20, 60)
    shade = amplitude * radius * (gx * light[0] + gy * light[1]) - 0.15 * amplitude * bump
    return x0, y0, shade.astype(np.float32), bump > 0.3, float(radius)


def _pinhole(
    rng: np.random.Generator, width: int, height: int, ps: float, light: tuple[float, float]
) -> tuple[int, int, np.ndarray, np.ndarray, float]:
    small = rng.random() < SMALL_PINHOLE_SHARE
    diameter = (rng.uniform(2.0, 3.0) if small else rng.uniform(3.0, 12.0)) * ps
    radius = diameter / 2.0
    extent = int(diameter) + 12
    x0, y0 = _place(rng, width, height, extent)
    w, h = _roi_size(width, height, extent)
    cx = w / 2 + rng.uniform(-0.5, 0.5)
    cy = h / 2 + rng.uniform(-0.5, 0.5)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    distance = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
    coverage = np.clip(radius + 0.5 - distance, 0.0, 1.0)
    strength = min(1.0, diameter)  # a pit smaller than a pixel shows as a faint pixel
    # A pit is darkest at its centre (a shadowed bowl), its edge anti-aliased.
    bowl = coverage * (0.7 + 0.3 * np.clip(1.0 - distance / max(radius, 0.5), 0.0, 1.0))
    shade = bowl * np.float32(-rng.uniform(50, 130) * strength)
    if rng.random() < 0.3:
        rim = np.clip(1.0 - np.abs(distance - (radius + 1.0)), 0.0, 1.0)
        shade += rim * np.float32(rng.uniform(10, 35) * strength)
    mask = distance <= radius
    if not mask.any():  # the darkest pixel always counts: a defect has at least one pixel
        mask[np.unravel_index(int(np.argmax(coverage)), coverage.shape)] = True
    return x0, y0, shade.astype(np.float32), mask, float(diameter)
