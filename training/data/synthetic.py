"""Synthetic panels (engines.synthetic) as a dataset: sample ``i`` is ``render_frame(seed + i)``.

Deterministic by index and base seed, so every worker, rank and epoch sees the same frame for
the same index. ``pixel_scale`` defaults to the frame's size relative to 4 MP, so a 1024x576
set looks like full frames letterboxed to the engine input, at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

from engines.synthetic import CLASSES, FRAME_HEIGHT, FRAME_WIDTH, render_frame
from training.data.sample import Sample


class SyntheticDataset:
    """``n`` synthetic frames of ``width`` x ``height``; ``class_names`` are engines.synthetic.CLASSES."""

    class_names: Sequence[str] = CLASSES

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        width: int = FRAME_WIDTH,
        height: int = FRAME_HEIGHT,
        defect_free_prob: float = 0.15,
        max_defects: int = 6,
        pixel_scale: float | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"a synthetic dataset needs at least 1 frame, got n={n}")
        self.n = n
        self.name = f"synthetic(n={n},seed={seed},{width}x{height})"
        self.seed = seed
        self.width = width
        self.height = height
        self.defect_free_prob = defect_free_prob
        self.max_defects = max_defects
        auto_scale = min(max(min(width / FRAME_WIDTH, height / FRAME_HEIGHT), 0.05), 4.0)
        self.pixel_scale = auto_scale if pixel_scale is None else pixel_scale
        # Fail here, not later in a data-loader worker (render_frame checks the same on every call).
        if min(width, height) < 32 or width * height > FRAME_WIDTH * FRAME_HEIGHT:
            raise ValueError(
                f"synthetic frame size must be at least 32 px a side and at most {FRAME_WIDTH}x{FRAME_HEIGHT} "
                f"pixels in all, got {width}x{height}"
            )
        if not 0.0 <= defect_free_prob <= 1.0 or max_defects < 0 or not 0.05 <= self.pixel_scale <= 4.0:
            raise ValueError(
                "synthetic: defect_free_prob must be within 0..1, max_defects >= 0 and pixel_scale within "
                f"0.05..4, got {defect_free_prob}, {max_defects}, {self.pixel_scale}"
            )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        seed = self.seed + (index % self.n)
        frame = render_frame(
            seed,
            self.width,
            self.height,
            defect_free_prob=self.defect_free_prob,
            max_defects=self.max_defects,
            pixel_scale=self.pixel_scale,
        )
        return Sample(image=frame.image, masks=frame.masks, classes=frame.classes, source=f"synthetic:{seed}",
                      sizes=frame.sizes)
