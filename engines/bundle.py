"""The engine bundle: the contract between training and the runtime.

A bundle is a directory::

    manifest.json    what the graphs are and how to feed them (``Manifest`` below)
    model.onnx       the fused graph (engines.contract), FP32
    decoder.onnx     the decoder-only graph for interactive point prompts (optional)
    model.int8.onnx  an INT8 (QDQ) variant of the fused graph, with decoder.int8.onnx (optional;
                     ``variants`` in the manifest, written by ``defectsam-train quantize``)
    model.*.plan     TensorRT engines built on the target device: a cache, never listed in files

``load_bundle`` checks the schema and the SHA-256 of every listed file before anything runs;
``write_bundle`` writes into a temporary sibling directory and renames it into place, so a
reader never sees a half-written bundle and a failed write leaves the old one intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engines.atomic import replace_dir
from engines.contract import FUSED_OUTPUT_NAMES, GraphShape
from engines.errors import BundleError

# What exporters write: a bundle with FP32 graphs only stays at version 1, so that runtimes which
# predate version 2 keep reading it. Version 2 adds ``variants`` (quantized graphs); a manifest
# that carries variants must say 2, so an older runtime refuses it with a clear message instead
# of an unknown-key error.
SCHEMA_VERSION = 1
VARIANTS_SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)
MANIFEST_NAME = "manifest.json"
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    height: int = Field(gt=0, multiple_of=16, description="engine input height in pixels")
    width: int = Field(gt=0, multiple_of=16, description="engine input width in pixels")
    mean: tuple[float, float, float] = Field(description="per-channel mean subtracted from RGB in 0..255")
    std: tuple[float, float, float] = Field(description="per-channel std dividing RGB in 0..255")
    channel_order: Literal["rgb"] = "rgb"
    pad_value: float = Field(default=0.0, description="value of letterbox padding after normalisation")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in value):
            raise ValueError("every std must be > 0")
        return value


class OutputSpec(_Strict):
    shape: tuple[int, ...]
    dtype: Literal["float32", "int64"]


class Graphs(_Strict):
    fused: str = Field(description="file name of the fused graph (image -> masks)")
    decoder: str | None = Field(default=None, description="file name of the decoder-only graph")


class Variant(_Strict):
    """Another precision of the same model: its graphs, how they were made, whether they passed the gate."""

    fused: str = Field(description="file name of the fused graph at this precision")
    decoder: str | None = Field(default=None, description="file name of the decoder-only graph at this precision")
    mode: Literal["static", "weight_only"] = Field(
        description="static: weights and activations INT8 (QDQ, calibrated); weight_only: INT8 weights, FP32 compute"
    )
    target: Literal["cpu", "tensorrt"] = Field(
        description="cpu: uint8 asymmetric activations (ONNX Runtime CPU kernels); "
        "tensorrt: int8 symmetric activations (TensorRT explicit quantization)"
    )
    gate: Literal["passed", "pending"] = Field(
        description="passed: measured against the FP32 graphs within the bound (metrics.quantization); "
        "pending: not measured (never selected automatically)"
    )


class Thresholds(_Strict):
    """Post-processing thresholds calibrated for this model on held-out data (``defectsam-train calibrate``).

    The runtime uses them wherever its own configuration leaves a threshold unset: a service config,
    ``--score-threshold`` or an API caller that names a value wins.
    """

    score_threshold: float = Field(ge=0.0, le=1.0, description="saliency peak probability that makes a defect")
    uncertain_threshold: float = Field(ge=0.0, le=1.0, description="with no defect, a peak at or above it: UNCERTAIN")
    calibration: dict[str, Any] = Field(default_factory=dict, description="data, objective and the sweep behind them")

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.uncertain_threshold > self.score_threshold:
            raise ValueError("uncertain_threshold must not exceed score_threshold")
        return self


class Provenance(_Strict):
    weights: Literal["trained", "untrained"]
    notes: str = ""
    teacher: str | None = None
    recipe: str | None = None
    checkpoint_sha256: str | None = None
    seed: int | None = None
    tool_version: str | None = None
    torch_version: str | None = None


class Manifest(_Strict):
    schema_version: int
    name: str = Field(min_length=1)
    created: str
    arch: str = Field(min_length=1, description="model family name in training.model's registry")
    input: InputSpec
    outputs: dict[str, OutputSpec]
    k: int = Field(alias="K", ge=1)
    mask_stride: Literal[4, 8]
    classes: tuple[str, ...] = Field(min_length=1)
    precision: Literal["fp32", "fp16", "int8"]
    graphs: Graphs
    files: dict[str, str] = Field(description="file name -> sha256 hex digest")
    parameters: int = Field(ge=0, description="trainable parameters of the exported model")
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance
    variants: dict[Literal["int8"], Variant] = Field(
        default_factory=dict, description="quantized variants of the graphs, by precision (schema_version 2)"
    )
    thresholds: Thresholds | None = Field(
        default=None, description="calibrated post-processing thresholds (schema_version 2)"
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value not in SUPPORTED_SCHEMA_VERSIONS:
            known = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
            raise ValueError(f"schema_version {value} is not supported (this runtime reads {known})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for graph in (self.graphs.fused, self.graphs.decoder):
            if graph is not None and graph not in self.files:
                raise ValueError(f"graph file {graph!r} is not listed in 'files'")
        if self.variants and self.schema_version < VARIANTS_SCHEMA_VERSION:
            raise ValueError(f"'variants' needs schema_version {VARIANTS_SCHEMA_VERSION} (got {self.schema_version})")
        if self.thresholds is not None and self.schema_version < VARIANTS_SCHEMA_VERSION:
            raise ValueError(f"'thresholds' needs schema_version {VARIANTS_SCHEMA_VERSION} (got {self.schema_version})")
        for precision, variant in self.variants.items():
            if precision == self.precision:
                raise ValueError(f"variants.{precision}: the main graphs already are {precision}")
            if (variant.decoder is None) != (self.graphs.decoder is None):
                raise ValueError(f"variants.{precision}: has a decoder graph exactly when 'graphs' has one")
            for graph in (variant.fused, variant.decoder):
                if graph is not None and graph not in self.files:
                    raise ValueError(f"variants.{precision}: graph file {graph!r} is not listed in 'files'")
        for name in self.files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"file name {name!r} must be a plain name inside the bundle")
        expected = {spec.name: spec for spec in self.graph_shape.fused_outputs()}
        if set(self.outputs) != set(FUSED_OUTPUT_NAMES):
            raise ValueError(f"'outputs' must name exactly {list(FUSED_OUTPUT_NAMES)}, got {sorted(self.outputs)}")
        for name, spec in self.outputs.items():
            want = expected[name]
            if tuple(spec.shape) != want.shape or spec.dtype != want.dtype:
                raise ValueError(
                    f"outputs.{name} is {list(spec.shape)} {spec.dtype}, but input, K, classes and "
                    f"mask_stride imply {list(want.shape)} {want.dtype}"
                )
        return self

    @property
    def graph_shape(self) -> GraphShape:
        return GraphShape(
            height=self.input.height,
            width=self.input.width,
            k=self.k,
            num_classes=len(self.classes),
            mask_stride=self.mask_stride,
        )

    def to_json(self) -> str:
        fields = self.model_dump(mode="json", by_alias=True)
        if not fields["variants"]:
            del fields["variants"]  # a version-1 manifest stays readable by runtimes that predate 'variants'
        if fields["thresholds"] is None:
            del fields["thresholds"]
        return json.dumps(fields, indent=2) + "\n"

    def graph_files(self, precision: str | None = None) -> tuple[str, str | None]:
        """(fused, decoder) file names at ``precision`` (default: the main graphs' own)."""
        if precision is None or precision == self.precision:
            return self.graphs.fused, self.graphs.decoder
        variant = self.variants.get(precision)  # type: ignore[call-overload]
        if variant is None:
            have = ", ".join([self.precision, *self.variants])
            raise KeyError(f"no {precision} graphs (the bundle has {have})")
        return variant.fused, variant.decoder

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision the bundle carries graphs for, the main one first."""
        return (self.precision, *self.variants)


def outputs_for(shape: GraphShape) -> dict[str, OutputSpec]:
    """The ``outputs`` table of a manifest, derived from the contract."""
    return {spec.name: OutputSpec(shape=tuple(int(d) for d in spec.shape), dtype=spec.dtype)  # type: ignore[arg-type]
            for spec in shape.fused_outputs()}


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def fused_graph(self) -> Path:
        return self.path / self.manifest.graphs.fused

    @property
    def decoder_graph(self) -> Path | None:
        name = self.manifest.graphs.decoder
        return None if name is None else self.path / name

    def graphs_at(self, precision: str | None = None) -> tuple[Path, Path | None]:
        """(fused, decoder) paths at ``precision`` (default: the main graphs). BundleError if absent."""
        try:
            fused, decoder = self.manifest.graph_files(precision)
        except KeyError as exc:
            raise BundleError(self.path, str(exc.args[0])) from None
        return self.path / fused, None if decoder is None else self.path / decoder

    def size_bytes(self, name: str | None = None) -> int:
        """Size of one file, or of every listed file together."""
        names = [name] if name is not None else list(self.manifest.files)
        return sum((self.path / n).stat().st_size for n in names)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"key '{key}': {first['msg']}{more}"


def read_manifest(bundle_dir: Path | str) -> Manifest:
    """Parse and validate ``manifest.json``; no checksum is verified here."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        raise BundleError(bundle_dir, "bundle directory does not exist")
    if not bundle_dir.is_dir():
        raise BundleError(bundle_dir, "is not a directory (a bundle is a directory with manifest.json)")
    path = bundle_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(path, "missing: not an engine bundle") from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise BundleError(path, f"cannot be read: {exc.__class__.__name__}: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise BundleError(path, "must hold a JSON object")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(path, _validation_message(exc)) from None


def load_bundle(bundle_dir: Path | str) -> Bundle:
    """Read the manifest and verify every listed file's checksum. Raises BundleError."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(path, "listed in manifest.json but missing")
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise BundleError(path, f"cannot be read: {exc.strerror or exc}") from None
        if actual != expected.lower():
            raise BundleError(
                path, f"checksum mismatch: manifest says sha256 {expected[:12]}..., file has {actual[:12]}..."
            )
    return Bundle(path=bundle_dir.resolve(), manifest=manifest)


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_bundle(out_dir: Path | str, manifest_fields: Mapping[str, Any], files: Mapping[str, Path]) -> Bundle:
    """Write a bundle atomically and return it, verified.

    ``files`` maps a name inside the bundle to a source path; the checksums are computed here
    and ``manifest_fields`` must not carry ``files``. The new bundle is assembled in a temporary
    sibling directory, then renamed over ``out_dir``: readers see the old bundle or the new one.
    """
    out_dir = Path(out_dir).resolve()
    if "files" in manifest_fields:
        raise ValueError("write_bundle computes 'files' itself")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a bundle is read by the service user
        digests: dict[str, str] = {}
        for name, source in files.items():
            target = staging / name
            shutil.copyfile(source, target)
            digests[name] = sha256_file(target)
        try:
            manifest = Manifest.model_validate({**manifest_fields, "files": digests})
        except ValidationError as exc:
            raise BundleError(out_dir / MANIFEST_NAME, _validation_message(exc)) from None
        manifest_path = staging / MANIFEST_NAME
        with manifest_path.open("w", encoding="utf-8") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            replace_dir(staging, out_dir)
        except NotADirectoryError:
            raise BundleError(out_dir, "exists and is not a directory; refusing to replace it") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(out_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def update_metrics(bundle_dir: Path | str, key: str, value: Any) -> Bundle:
    """Record ``value`` as ``metrics[key]`` in a bundle's manifest; the graphs stay byte for byte.

    The bundle is verified first and rewritten atomically (write_bundle), so a measurement is
    recorded only in the bundle that was measured, and a reader never sees a half-written manifest.
    """
    bundle = load_bundle(bundle_dir)
    if not key:
        raise BundleError(bundle.path / MANIFEST_NAME, "a metrics key must not be empty")
    fields = bundle.manifest.model_dump(mode="json", by_alias=True)
    fields.pop("files")
    fields["metrics"] = {**fields["metrics"], key: value}
    return write_bundle(bundle.path, fields, {name: bundle.path / name for name in bundle.manifest.files})


def update_thresholds(bundle_dir: Path | str, thresholds: Thresholds) -> Bundle:
    """Store calibrated thresholds in a bundle's manifest (schema_version 2); the graphs stay byte for byte."""
    bundle = load_bundle(bundle_dir)
    fields = bundle.manifest.model_dump(mode="json", by_alias=True)
    fields.pop("files")
    fields["thresholds"] = thresholds.model_dump(mode="json")
    fields["schema_version"] = max(int(fields["schema_version"]), VARIANTS_SCHEMA_VERSION)
    return write_bundle(bundle.path, fields, {name: bundle.path / name for name in bundle.manifest.files})
