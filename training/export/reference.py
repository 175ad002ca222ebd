"""Reference architectures that are not students: a SAM 2 teacher as one timed ONNX graph.

``defectsam-train export-reference --arch sam2_small --out DIR`` builds a SAM 2.1 hiera-small-sized
``Sam2Model`` (Hugging Face transformers) with random weights from its config numbers alone (nothing
is downloaded; random weights run exactly as fast as trained ones) and exports what the teacher runs
for one frame and K point prompts, as ``training/teachers/sam2.py`` runs it:

    image 1x3xHxW (normalised like the student's, e.g. 576x1024)
      -> scale by S / max(H, W), zero-pad right and bottom to SxS (S = 1024: a letterbox)
      -> Hiera image encoder + FPN neck -> prompt encoder (one positive point per prompt)
      -> mask decoder (3 masks per prompt, the best by predicted IoU) -> crop to the image
    points Kx2 (x, y in input pixels) -> mask_logits KxH/4xW/4

The directory is not an engine bundle (no contract outputs, no post-processing): it holds
``model.onnx``, ``inputs.npz`` (the image and points it is timed with) and ``reference.json``
(what it is, its parameter count, the SHA-256 of both files), which ``engines.benchmark`` reads.
The video model's memory modules (memory attention and encoder, about 7 M of SAM 2.1 small's 46 M
parameters) take no part in a single image and are not built.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from engines.atomic import replace_dir
from engines.benchmark import REFERENCE_FILE, REFERENCE_INPUTS_FILE, REFERENCE_SCHEMA_VERSION
from engines.bundle import sha256_file, utc_now
from engines.errors import DefectsamError

if TYPE_CHECKING:  # both import more than the command line needs to start
    from training.teachers.sam2 import Sam2Teacher

GRAPH_FILE = "model.onnx"
INPUT_NAME = "image"
POINTS_NAME = "points"
OUTPUT_NAME = "foreground"

# Hiera trunks of SAM 2.1 (sam2/configs/sam2.1/sam2.1_hiera_{t,s}.yaml): blocks per stage and the
# blocks with global attention. Both: embed_dim 96, 1 head, window sizes (8, 4, 14, 7), backbone
# channels (768, 384, 192, 96), FPN 256, which are transformers' Sam2 config defaults.
_HIERA: dict[str, tuple[list[int], list[int]]] = {
    "sam2_tiny": ([1, 2, 7, 2], [5, 7, 9]),
    "sam2_small": ([1, 2, 11, 2], [7, 10, 13]),
}
_NAMES = {"sam2_tiny": "sam2.1-hiera-tiny-sized", "sam2_small": "sam2.1-hiera-small-sized"}


def list_references() -> list[str]:
    return list(_HIERA)


def build_sam2(arch: str, *, image_size: int = 1024, seed: int = 0) -> Any:
    """A random-weight ``Sam2Model`` with the SAM 2.1 trunk ``arch`` at an SxS input (S = ``image_size``).

    The parameter count does not depend on S (positional embeddings are interpolated), so a small S
    gives the same model, only cheaper to run; S must be a multiple of 32 (the last stage's stride).
    """
    if arch not in _HIERA:
        raise ValueError(f"unknown reference {arch!r}; expected one of {', '.join(_HIERA)}")
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    from transformers import Sam2Config, Sam2Model
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    grid = image_size // 4  # the FPN levels sit at strides 4, 8 and 16
    blocks, global_blocks = _HIERA[arch]
    backbone = Sam2HieraDetConfig(
        image_size=[image_size, image_size], blocks_per_stage=blocks, global_attention_blocks=global_blocks
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone, backbone_feature_sizes=[[grid, grid], [grid // 2, grid // 2], [grid // 4, grid // 4]]
    )
    config = Sam2Config(vision_config=vision, prompt_encoder_config=Sam2PromptEncoderConfig(image_size=image_size))
    torch.manual_seed(seed)
    return Sam2Model(config).eval()


class _TeacherGraph(nn.Module):
    """The SAM 2 teacher's forward for one frame and K prompts, as training/teachers/sam2.py runs it."""

    def __init__(self, teacher: Sam2Teacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """image: 1x3xHxW, points: Kx2 (x, y input pixels) -> foreground logits 1xHxW (the K masks united)."""
        image_index = torch.zeros(points.shape[0], dtype=torch.long)  # every prompt on the one image
        return self.teacher.predict(image, points, image_index).foreground


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int) -> str:
    """torch.onnx's dynamo exporter, else the TorchScript one; returns which exported the graph."""
    from training.export.onnx import ExportError

    names = {"input_names": [INPUT_NAME, POINTS_NAME], "output_names": [OUTPUT_NAME]}
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    failures = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, optimize=True,
                                        verbose=False, **names)  # type: ignore[arg-type]
            if program is not None:
                program.save(str(path), external_data=False)
                return "dynamo"
            failures.append("dynamo: no program")
        except Exception as exc:  # the exporters raise many types; keep one line of each
            failures.append(f"dynamo: {_first_line(exc)}")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, **names)  # type: ignore[arg-type]
            return "torchscript"
        except Exception as exc:
            failures.append(f"torchscript: {_first_line(exc)}")
    raise ExportError(path, "torch.onnx export failed: " + "; ".join(failures))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def export_reference(
    arch: str, out_dir: Path | str, *, height: int = 576, width: int = 1024, k: int = 8, image_size: int = 1024,
    seed: int = 0, opset: int = 18,
) -> dict[str, Any]:
    """Export the random-weight SAM 2 teacher graph of ``arch`` to ``out_dir`` (replaced atomically).

    Returns the ``reference.json`` fields. Raises ExportError (a DefectsamError) when no exporter manages,
    ValueError for sizes it cannot take.
    """
    from training.teachers.sam2 import MASK_STRIDE, Sam2Teacher

    out_dir = Path(out_dir)
    if height <= 0 or width <= 0 or height % 16 or width % 16 or k < 1:
        raise ValueError(f"input {height}x{width} must be positive multiples of 16 and K >= 1")
    model = build_sam2(arch, image_size=image_size, seed=seed)
    parameters = sum(p.numel() for p in model.parameters())
    teacher = Sam2Teacher(model, digest="random-init", name=arch)
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((1, 3, height, width), dtype=np.float32)
    points = (rng.random((k, 2)) * (width, height)).astype(np.float32)  # Kx2 inside the frame
    scale = image_size / max(height, width)
    fields: dict[str, Any] = {
        "schema_version": REFERENCE_SCHEMA_VERSION,
        "name": f"{_NAMES[arch]} (random weights)",
        "arch": arch,
        "created": utc_now(),
        "graph": GRAPH_FILE,
        "inputs": REFERENCE_INPUTS_FILE,
        "input": {"height": height, "width": width},
        "model_input": {"height": image_size, "width": image_size},
        "K": k,
        "parameters": parameters,
        "precision": "fp32",
        "weights": "untrained",
        "notes": (
            f"SAM 2 takes a {image_size}x{image_size} square: the {height}x{width} input is "
            + ("" if scale == 1 else f"scaled by {scale:.3g}, ")
            + f"zero-padded right and bottom (a letterbox, as training/teachers/sam2.py does); image encoder, "
            f"prompt encoder and mask decoder for K={k} one-point prompts; masks at stride {MASK_STRIDE}. "
            f"Parameters: those parts only (SAM 2.1 small's 46 M also count the video memory modules, which a "
            f"single image does not run)"
        ),
        "provenance": {"torch_version": torch.__version__, "transformers_version": _version("transformers"),
                       "seed": seed, "opset": opset},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as scratch:
        staging = Path(scratch) / "reference"
        staging.mkdir()
        fields["provenance"]["exporter"] = _export(
            _TeacherGraph(teacher), (torch.from_numpy(image), torch.from_numpy(points)), staging / GRAPH_FILE, opset
        )
        feeds: dict[str, Any] = {INPUT_NAME: image, POINTS_NAME: points}
        np.savez(staging / REFERENCE_INPUTS_FILE, **feeds)
        fields["files"] = {name: sha256_file(staging / name) for name in (GRAPH_FILE, REFERENCE_INPUTS_FILE)}
        (staging / REFERENCE_FILE).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
        replace_dir(staging, out_dir)
    return fields


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "export-reference",
        help="export a reference architecture (SAM 2 teacher, random weights) as one ONNX graph for benchmarks",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--arch", choices=list_references(), default="sam2_small",
                        help="SAM 2.1 trunk size (default sam2_small)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (replaced atomically)")
    parser.add_argument("--height", type=int, default=576, help="input height, as the student's (default 576)")
    parser.add_argument("--width", type=int, default=1024, help="input width, as the student's (default 1024)")
    parser.add_argument("--k", type=int, default=8, help="point prompts per frame (default 8)")
    parser.add_argument("--image-size", type=int, default=1024,
                        help="SAM 2's square input side S (default 1024, SAM 2's own; smaller only for tests)")
    parser.add_argument("--seed", type=int, default=0, help="random weights and timing inputs (default 0)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        fields = export_reference(args.arch, args.out, height=args.height, width=args.width, k=args.k,
                                  image_size=args.image_size, seed=args.seed)
    except ValueError as exc:
        raise DefectsamError(f"export-reference: {exc}") from None
    size = (Path(args.out) / GRAPH_FILE).stat().st_size
    print(f"wrote {args.out} ({fields['name']}, {fields['parameters']:,} parameters, graph {size / 1e6:.1f} MB, "
          f"{fields['provenance']['exporter']} exporter)")
    return 0
