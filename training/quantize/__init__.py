"""INT8 quantization of engine bundles, measured and gated (docs/quantization.md).

``quantize_bundle(DIR, QuantizeOptions(...))`` adds ``segment.int8.onnx`` (and ``find.int8.onnx``)
to a bundle when the INT8 graphs lose at most ``max_drop`` points against the FP32 graphs on held-out
frames, after per-layer fallback; otherwise it raises ``QuantizeGateError`` and leaves the bundle as it was.
"""

from training.quantize.bundle import (
    DEFAULT_KEEP_FP32,
    QuantizeGateError,
    QuantizeOptions,
    default_held_out,
    quantize_bundle,
)

__all__ = ["DEFAULT_KEEP_FP32", "QuantizeGateError", "QuantizeOptions", "default_held_out", "quantize_bundle"]
