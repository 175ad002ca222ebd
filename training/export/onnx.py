"""ONNX export of a DefectSegmenter: the fused graph, the decoder-only graph, the engine bundle.

Tensor names, shapes and dtypes come from engines.contract; every exported graph is checked
against it. The graphs take the normalised image (the runtime normalises with the manifest's
mean/std), so nothing here normalises. Weights are stored inside each .onnx file.

Exporter: torch.onnx's default torch.export-based exporter (``dynamo=True``) at its native
opset 18. It gives a static, constant-folded graph; on this project's models ONNX Runtime runs
it about 3x faster than the TorchScript exporter's graph, whose window arithmetic left shapes
unknown. (Asking it for opset 17 fails in the ONNX version converter.)
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from engines.bundle import SCHEMA_VERSION, Bundle, outputs_for, utc_now, write_bundle
from engines.contract import (
    DECODER_INPUT_NAMES,
    DECODER_OUTPUT_NAMES,
    FUSED_OUTPUT_NAMES,
    INPUT_NAME,
    PIXEL_MEAN,
    PIXEL_STD,
    GraphShape,
    TensorSpec,
)
from engines.errors import DefectsamError
from training.model.build import parameter_counts
from training.model.segmenter import DefectSegmenter

# SAM's pixel statistics (RGB, 0..255); the runtime applies them before the graph.
FUSED_FILE = "model.onnx"
DECODER_FILE = "decoder.onnx"
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}


class ExportError(DefectsamError):
    """An export that cannot be done or whose graph breaks the contract."""

    def __init__(self, path: Path | str, cause: str) -> None:
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class _FusedGraph(nn.Module):
    def __init__(self, model: DefectSegmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """image: 1x3xHxW -> the seven fused outputs of engines.contract."""
        return self.model.forward_fused(image)


class _DecoderGraph(nn.Module):
    def __init__(self, model: DefectSegmenter) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image_embedding: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding: 1x256xhxw, point_coords: 1xPx2, point_labels: 1xP -> (1xH/sxW/s, 1)."""
        masks, iou = self.model.decode(image_embedding, None, point_coords, point_labels)
        mh, mw = masks.shape[-2:]
        # Pin the batch axis to 1: the tracer cannot tell it from the dynamic prompt axis.
        return masks.reshape(1, int(mh), int(mw)), iou.reshape(1)


def graph_shape(model: DefectSegmenter) -> GraphShape:
    """The contract numbers of a model as built."""
    height, width = model.input_size
    return GraphShape(
        height=height, width=width, k=model.k, num_classes=model.num_classes, mask_stride=model.mask_stride
    )


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    dynamic_shapes: Mapping[str, Mapping[int, Any] | None] | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter logs a warning per missing torchvision op; this project never uses torchvision.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                dynamic_shapes=None if dynamic_shapes is None else dict(dynamic_shapes),
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ExportError(path, f"torch.onnx export failed: {first}") from exc
    if program is None:
        raise ExportError(path, "torch.onnx export returned no program")
    program.save(str(path), external_data=False)


def _check_graph(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """onnx.checker plus names, shapes and dtypes of every input and output against the contract."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(path, f"onnx.checker failed: {str(exc).splitlines()[0]}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    actual_inputs = [value for value in graph.input if value.name not in initializers]
    for kind, specs, values in (("input", inputs, actual_inputs), ("output", outputs, list(graph.output))):
        names = [value.name for value in values]
        if names != [spec.name for spec in specs]:
            raise ExportError(path, f"graph {kind}s are {names}, the contract says {[s.name for s in specs]}")
        for spec, value in zip(specs, values, strict=True):
            tensor_type = value.type.tensor_type
            dtype = _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type))
            shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim)
            if dtype != spec.dtype or shape != spec.shape:
                want = f"{list(spec.shape)} {spec.dtype}"
                raise ExportError(path, f"{kind} {spec.name} is {list(shape)} {dtype}, the contract says {want}")


def export_fused(model: DefectSegmenter, path: Path | str, *, opset: int = 18) -> Path:
    """Export image 1x3xHxW -> the fused outputs (static shapes) and check them against the contract."""
    path = Path(path)
    shape = graph_shape(model)
    image = torch.zeros(1, 3, shape.height, shape.width)
    _export(_FusedGraph(model.eval()), (image,), path, [INPUT_NAME], FUSED_OUTPUT_NAMES, opset)
    _check_graph(path, [shape.input_spec()], shape.fused_outputs())
    return path


def export_decoder(model: DefectSegmenter, path: Path | str, *, opset: int = 18) -> Path:
    """Export the decoder-only graph: (image_embedding, point_coords 1xPx2, point_labels 1xP) -> (mask, iou).

    P is dynamic. Raises ExportError for a model that fuses the encoder's stride-8 feature: the
    contract's decoder graph has no input for it.
    """
    path = Path(path)
    if model.mask_decoder.uses_skip:
        raise ExportError(
            path, "this model fuses a stride-8 encoder feature; the decoder-only graph has no input for it"
        )
    shape = graph_shape(model)
    eh, ew = shape.embed_hw
    args = (
        torch.zeros(1, 256, eh, ew),
        torch.tensor([[[shape.width / 2, shape.height / 2], [8.0, 8.0], [0.0, 0.0]]]),
        torch.tensor([[1.0, 0.0, -1.0]]),
    )
    num_points = torch.export.Dim("num_points", min=1, max=1024)
    dynamic = {"image_embedding": None, "point_coords": {1: num_points}, "point_labels": {1: num_points}}
    _export(_DecoderGraph(model.eval()), args, path, DECODER_INPUT_NAMES, DECODER_OUTPUT_NAMES, opset, dynamic)
    _check_graph(path, shape.decoder_inputs(), shape.decoder_outputs())
    return path


def _tool_version() -> str:
    try:
        return importlib.metadata.version("defectsam")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def export_bundle(
    model: DefectSegmenter,
    arch_name: str,
    out_dir: Path | str,
    *,
    name: str,
    classes: Sequence[str],
    provenance: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    opset: int = 18,
) -> Bundle:
    """Export the fused graph (and the decoder graph where the model allows) and write a verified bundle.

    ``provenance`` must give ``weights`` ("trained" or "untrained") and may give notes, seed,
    teacher, recipe, checkpoint_sha256; tool and torch versions are filled in.
    """
    out_dir = Path(out_dir)
    if len(classes) != model.num_classes:
        raise ExportError(out_dir, f"{len(classes)} class names given, the model has {model.num_classes} classes")
    shape = graph_shape(model)
    height, width = model.input_size
    with tempfile.TemporaryDirectory(prefix="defectsam-export-") as tmp:
        files = {FUSED_FILE: export_fused(model, Path(tmp) / FUSED_FILE, opset=opset)}
        if not model.mask_decoder.uses_skip:
            files[DECODER_FILE] = export_decoder(model, Path(tmp) / DECODER_FILE, opset=opset)
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "created": utc_now(),
            "arch": arch_name,
            "input": {"height": height, "width": width, "mean": PIXEL_MEAN, "std": PIXEL_STD},
            "outputs": {key: spec.model_dump() for key, spec in outputs_for(shape).items()},
            "K": shape.k,
            "mask_stride": shape.mask_stride,
            "classes": list(classes),
            "precision": "fp32",
            "graphs": {"fused": FUSED_FILE, "decoder": DECODER_FILE if DECODER_FILE in files else None},
            "parameters": parameter_counts(model)["total"],
            "metrics": dict(metrics or {}),
            "provenance": {"tool_version": _tool_version(), "torch_version": torch.__version__, **provenance},
        }
        return write_bundle(out_dir, manifest, files)
