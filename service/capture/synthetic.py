"""The synthetic camera: 4 MP panels with scratches, dents and pinholes, at a set frame rate, base install only.

Rendering one 2688x1520 frame costs 100 ms or more of CPU, more than a frame period at line rates,
so this camera does not render while it streams: when it opens (in its own thread) it renders a
pool of ``pool_size`` frames from seeds ``seed .. seed + pool_size - 1`` and then plays them in
a loop at ``fps``. The stream therefore repeats every ``pool_size`` frames; each frame's
``source`` names its seed, so results can be matched with the generator's ground truth
(``engines.synthetic.render_frame(seed)``). A pool of 8 full frames holds about 98 MB.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from engines.synthetic import FRAME_HEIGHT, FRAME_WIDTH, MIN_PIXEL_SCALE, render_frame
from service.capture.base import CameraConfigBase

KEY = "synthetic"


class Config(CameraConfigBase):
    type: Literal["synthetic"] = Field(default="synthetic", title="Camera type", description="selects this plugin")
    fps: float = Field(
        default=25.0, gt=0, le=1000, title="Frames per second",
        description="rate the frames are streamed at (25: the line rate the engine must keep up with)",
    )
    pool_size: int = Field(
        default=4, ge=1, le=64, title="Pre-rendered frames",
        description="frames rendered when the camera opens and streamed in a loop (about 12 MB each at 4 MP)",
    )
    seed: int = Field(default=0, ge=0, title="First seed", description="the pool is seeds seed .. seed + pool_size - 1")
    width: int = Field(default=FRAME_WIDTH, ge=32, title="Frame width", description="pixels")
    height: int = Field(default=FRAME_HEIGHT, ge=32, title="Frame height", description="pixels")
    defect_free_prob: float = Field(
        default=0.15, ge=0, le=1, title="Share of defect-free panels", description="probability per frame"
    )
    max_defects: int = Field(default=6, ge=0, le=64, title="Most defects per panel", description="per frame")

    @model_validator(mode="after")
    def _at_most_4mp(self) -> Config:
        if self.width * self.height > FRAME_WIDTH * FRAME_HEIGHT:
            raise ValueError(
                f"width x height must be at most {FRAME_WIDTH}x{FRAME_HEIGHT} pixels, got {self.width}x{self.height}"
            )
        # The panel is drawn at the frame's scale of 2688x1520; below 5% of it on either side it cannot be
        # drawn, and a camera that validates but fails at every open would retry forever.
        if min(self.width / FRAME_WIDTH, self.height / FRAME_HEIGHT) < MIN_PIXEL_SCALE:
            raise ValueError(
                f"width x height must be at least {math.ceil(FRAME_WIDTH * MIN_PIXEL_SCALE)}x"
                f"{math.ceil(FRAME_HEIGHT * MIN_PIXEL_SCALE)} pixels, got {self.width}x{self.height}"
            )
        return self


class SyntheticSource:
    """Plays a pre-rendered pool of synthetic frames in a loop; the worker paces it at ``fps``."""

    def __init__(self, config: Config) -> None:
        scale = min(config.width / FRAME_WIDTH, config.height / FRAME_HEIGHT)
        self._pool: list[tuple[int, np.ndarray]] = []
        for seed in range(config.seed, config.seed + config.pool_size):
            frame = render_frame(
                seed, config.width, config.height, defect_free_prob=config.defect_free_prob,
                max_defects=config.max_defects, with_masks=False, pixel_scale=scale,
            )
            image = frame.image
            image.flags.writeable = False  # served again every pool_size frames
            self._pool.append((seed, image))
        self._index = 0
        self.pace_fps: float | None = config.fps
        self.description = f"synthetic:seed={config.seed}"

    def read(self) -> np.ndarray:
        seed, image = self._pool[self._index]
        self._index = (self._index + 1) % len(self._pool)
        self.description = f"synthetic:seed={seed}"
        return image

    def close(self) -> None:
        self._pool = []


def open_source(config: Config) -> SyntheticSource:
    return SyntheticSource(config)
