"""Light augmentation with OpenCV and NumPy: crops, flips, brightness/contrast/gamma, sensor noise.

``training.data.prepare`` applies them where they are cheapest: the crop is a view of the source
image taken before its one resize; the photometric changes and flips run on the resized image
(engine resolution), before normalisation. Masks follow the geometric ones (crop, flips).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """Probabilities and ranges of each augmentation; the defaults are deliberately mild."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_prob: float = Field(default=0.3, ge=0.0, le=1.0, description="chance of a random crop (zoom in)")
    crop_min_scale: float = Field(
        default=0.6, gt=0.0, le=1.0, description="smallest crop side as a fraction of the image side"
    )
    hflip_prob: float = Field(default=0.5, ge=0.0, le=1.0, description="chance of a left-right flip")
    vflip_prob: float = Field(default=0.5, ge=0.0, le=1.0, description="chance of an up-down flip")
    brightness: float = Field(default=0.08, ge=0.0, le=1.0, description="additive shift, fraction of 255, +/-")
    contrast: float = Field(default=0.1, ge=0.0, le=1.0, description="gain 1 +/- this about mid-grey")
    gamma: float = Field(default=0.15, ge=0.0, le=1.0, description="gamma exp(+/- this)")
    noise_prob: float = Field(default=0.3, ge=0.0, le=1.0, description="chance of Gaussian sensor noise")
    noise_std: float = Field(default=3.0, ge=0.0, le=50.0, description="noise standard deviation in grey levels")


def sample_crop(
    height: int, width: int, rng: np.random.Generator, config: AugmentConfig
) -> tuple[int, int, int, int] | None:
    """A random crop (y0, y1, x0, x1) keeping the image's aspect ratio, or None for no crop."""
    if config.crop_prob <= 0.0 or rng.random() >= config.crop_prob:
        return None
    scale = rng.uniform(config.crop_min_scale, 1.0)
    ch, cw = max(1, round(height * scale)), max(1, round(width * scale))
    if (ch, cw) == (height, width):
        return None
    y0 = int(rng.integers(0, height - ch + 1))
    x0 = int(rng.integers(0, width - cw + 1))
    return y0, y0 + ch, x0, x0 + cw


def photometric_lut(rng: np.random.Generator, config: AugmentConfig) -> np.ndarray | None:
    """One 256-entry uint8 table applying gamma, contrast and brightness together, or None for identity."""
    gamma = math.exp(rng.uniform(-config.gamma, config.gamma)) if config.gamma else 1.0
    gain = 1.0 + rng.uniform(-config.contrast, config.contrast) if config.contrast else 1.0
    shift = 255.0 * rng.uniform(-config.brightness, config.brightness) if config.brightness else 0.0
    if gamma == 1.0 and gain == 1.0 and shift == 0.0:
        return None
    levels = np.arange(256, dtype=np.float64) / 255.0
    values = 255.0 * levels**gamma
    values = (values - 127.5) * gain + 127.5 + shift
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def photometric(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """uint8 HxWx3 -> uint8 HxWx3 with random brightness, contrast, gamma and (sometimes) noise.

    Returns a new array, or ``image`` itself when nothing was drawn.
    """
    lut = photometric_lut(rng, config)
    out = image if lut is None else cv2.LUT(image, lut)
    if config.noise_std > 0.0 and config.noise_prob > 0.0 and rng.random() < config.noise_prob:
        # OpenCV's generator, seeded from ours: 2-3x faster than NumPy's normal at engine resolution.
        cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
        # One noise plane for every channel: luminance noise, as a mono or a Bayer sensor's after demosaicing.
        plane = np.empty(out.shape[:2], dtype=np.int16)
        cv2.randn(plane, np.zeros(1), np.full(1, float(rng.uniform(0.3, 1.0) * config.noise_std)))
        noise = cv2.merge([plane] * out.shape[2]) if out.ndim == 3 else plane
        out = cv2.add(out, noise, dtype=cv2.CV_8U)
    return out


def sample_flips(rng: np.random.Generator, config: AugmentConfig) -> tuple[bool, bool]:
    """(left-right, up-down) flips to apply."""
    return bool(rng.random() < config.hflip_prob), bool(rng.random() < config.vflip_prob)


def flip(array: np.ndarray, horizontal: bool, vertical: bool, *, channels_last: bool) -> np.ndarray:
    """Flip an image (HxW[xC], ``channels_last``) or a stack of masks (NxHxW); returns a view, not a copy."""
    rows, cols = (0, 1) if channels_last else (array.ndim - 2, array.ndim - 1)
    if horizontal:
        array = np.flip(array, axis=cols)
    if vertical:
        array = np.flip(array, axis=rows)
    return array
