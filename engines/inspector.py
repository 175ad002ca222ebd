"""One frame, end to end: preprocess -> engine.infer -> postprocess, with each stage timed.

The daemon's pipeline runs the same three stages on separate threads; this class chains them
for one-shot use (``defectsam infer``, evaluation, tests).
"""

from __future__ import annotations

import time

import numpy as np

from engines.engine import Engine
from engines.postprocess import PostprocessConfig, Postprocessor, with_calibrated
from engines.preprocess import Preprocessor
from engines.results import InspectionResult


class Inspector:
    def __init__(self, engine: Engine, config: PostprocessConfig | None = None) -> None:
        manifest = engine.bundle.manifest
        self.engine = engine
        self.preprocess = Preprocessor(manifest.input)
        resolved = with_calibrated(config, manifest.thresholds)
        self.postprocess = Postprocessor(manifest.classes, manifest.mask_stride, resolved)

    def inspect(self, frame: np.ndarray) -> InspectionResult:
        """uint8 frame (mono or BGR) -> InspectionResult with timings (seconds) per stage."""
        t0 = time.perf_counter()
        tensor, box = self.preprocess(frame)
        t1 = time.perf_counter()
        outputs = self.engine.infer(tensor)
        t2 = time.perf_counter()
        result = self.postprocess(outputs, box)
        t3 = time.perf_counter()
        result.timings.update(preprocess=t1 - t0, infer=t2 - t1, postprocess=t3 - t2, total=t3 - t0)
        return result
