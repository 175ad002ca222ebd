"""The engine bundle: the contract between training and the runtime.

A bundle is a directory::

    manifest.json      what the graphs are and how to feed them (``Manifest`` below)
    segment.onnx       the window segmenter (engines.contract), FP32
    find.onnx          the candidate finder (optional: without it a bundle inspects by tiles)
    *.int8.onnx        INT8 (QDQ) variants of both graphs (``variants`` in the manifest, written
                       by ``defectsam-train quantize``; optional)
    *.plan             TensorRT engines built on the target device: a cache, never listed in files

``load_bundle`` checks the schema and the SHA-256 of every listed file before anything runs;
``write_bundle`` writes into a temporary sibling directory and renames it into place, so a
reader never sees a half-written bundle and a failed write leaves the old one intact.

The manifest covers itself too: the writer stores ``manifest_sha256``, the SHA-256 of the rest of
the manifest as canonical JSON (``manifest_digest``), so ``load_bundle`` can tell a manifest edited
by hand since it was written (thresholds, metrics, specs) from an intact one (``Bundle.manifest_check``;
``bundle inspect`` says it, the daemon warns). A digest, not a signature: it shows an edit made
without the writer, not one made by someone who recomputes it.

Schema 3 is the native-resolution bundle (a find pass over the reduced frame, a segment pass over
1:1 windows). Versions 1 and 2 held one letterboxed single-pass graph with masks at stride 8; this
runtime cannot run them and says so (``read_manifest``): their models must be trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engines.atomic import replace_dir, staging_dir
from engines.contract import SIDE_MULTIPLE
from engines.errors import BundleError

SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (3,)
SINGLE_PASS_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)  # the letterboxed single-pass bundles before version 3
MANIFEST_NAME = "manifest.json"
DIGEST_KEY = "manifest_sha256"
# intact: the manifest is as its writer left it; edited: its content no longer matches the digest
# written with it; not recorded: written before manifests carried one
ManifestCheck = Literal["intact", "edited", "not recorded"]
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _positive_std(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if any(s <= 0 for s in value):
        raise ValueError("every std must be > 0")
    return value


class SegmentSpec(_Strict):
    """The window segmenter: how windows are cut and normalised, and the sizes it was trained for."""

    arch: str = Field(min_length=1, description="window segmenter name in training.model's registry")
    window: int = Field(
        ge=SIDE_MULTIPLE, multiple_of=SIDE_MULTIPLE, description="default window side, frame pixels (1:1)"
    )
    max_windows: int = Field(ge=1, le=256, description="most windows per frame in windows mode (default)")
    mean: tuple[float, float, float] = Field(description="per-channel mean subtracted from RGB in 0..255")
    std: tuple[float, float, float] = Field(description="per-channel std dividing RGB in 0..255")
    pad: Literal["edge", "constant"] = Field(
        default="edge",
        description="what fills a window beyond the frame: edge (the frame's last row / column repeated, as "
        "training pads) or constant (pad_value)",
    )
    pad_value: float = Field(
        default=0.0, description="with pad: constant, the value of padding beyond the frame, normalised"
    )
    parameters: int = Field(ge=0, description="trainable parameters of the segmenter")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        return _positive_std(value)


class FindSpec(_Strict):
    """The candidate finder: how the frame is reduced for it (engines.find)."""

    arch: str = Field(min_length=1, description="finder name in training.model's registry")
    reduction: int = Field(ge=1, le=16, description="frame pixels per find-input pixel, each way")
    mean: tuple[float, float, float] = Field(description="mean of the grey block mean, minimum, maximum channels")
    std: tuple[float, float, float] = Field(description="std of the grey block mean, minimum, maximum channels")
    parameters: int = Field(ge=0, description="trainable parameters of the finder")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        return _positive_std(value)


class Graphs(_Strict):
    segment: str = Field(description="file name of the window segmenter graph")
    find: str | None = Field(default=None, description="file name of the candidate finder graph")


class Variant(_Strict):
    """Another precision of the same models: their graphs, how they were made, whether they passed the gate."""

    segment: str = Field(description="file name of the segment graph at this precision")
    find: str | None = Field(default=None, description="file name of the find graph at this precision")
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
    """Thresholds calibrated for this model on held-out data (``defectsam-train calibrate``).

    The runtime uses them wherever its own configuration leaves a threshold unset: a service config,
    ``--score-threshold`` or an API caller that names a value wins.
    """

    score_threshold: float = Field(ge=0.0, le=1.0, description="a defect's peak probability that makes it count")
    uncertain_threshold: float = Field(ge=0.0, le=1.0, description="with no defect, a peak at or above it: UNCERTAIN")
    candidate_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="find-pass probability at which a cell gets a window"
    )
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
    finder_checkpoint_sha256: str | None = None
    seed: int | None = None
    tool_version: str | None = None
    torch_version: str | None = None


class Manifest(_Strict):
    schema_version: int
    name: str = Field(min_length=1)
    created: str
    classes: tuple[str, ...] = Field(min_length=1, description="defect classes; class_probs channel c+1 is class c")
    segment: SegmentSpec
    find: FindSpec | None = Field(default=None, description="the find pass; absent: the bundle inspects by tiles")
    precision: Literal["fp32", "fp16", "int8"]
    graphs: Graphs
    files: dict[str, str] = Field(description="file name -> sha256 hex digest")
    parameters: int = Field(ge=0, description="trainable parameters of both models together")
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance
    variants: dict[Literal["int8"], Variant] = Field(
        default_factory=dict, description="quantized variants of the graphs, by precision"
    )
    thresholds: Thresholds | None = Field(default=None, description="calibrated thresholds")
    manifest_sha256: str | None = Field(
        default=None, pattern="^[0-9a-f]{64}$",
        description="SHA-256 of the rest of this manifest as canonical JSON (manifest_digest), written with it; "
        "absent in bundles written before it existed",
    )

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value not in SUPPORTED_SCHEMA_VERSIONS:
            known = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
            raise ValueError(f"schema_version {value} is not supported (this runtime reads {known})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if (self.find is None) != (self.graphs.find is None):
            raise ValueError("'find' and 'graphs.find' come together: a find graph needs its spec and the reverse")
        for graph in (self.graphs.segment, self.graphs.find):
            if graph is not None and graph not in self.files:
                raise ValueError(f"graph file {graph!r} is not listed in 'files'")
        for precision, variant in self.variants.items():
            if precision == self.precision:
                raise ValueError(f"variants.{precision}: the main graphs already are {precision}")
            if (variant.find is None) != (self.graphs.find is None):
                raise ValueError(f"variants.{precision}: has a find graph exactly when 'graphs' has one")
            for graph in (variant.segment, variant.find):
                if graph is not None and graph not in self.files:
                    raise ValueError(f"variants.{precision}: graph file {graph!r} is not listed in 'files'")
        for name in self.files:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"file name {name!r} must be a plain name inside the bundle")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self, *, seal: bool = True) -> str:
        """The manifest file's text. ``seal``: with ``manifest_sha256`` computed for this content (what a
        writer stores); False: with the digest this manifest was read with, if any (what the file said)."""
        fields = self.model_dump(mode="json")
        for optional in ("variants", "thresholds", "find"):
            if not fields[optional]:
                del fields[optional]
        del fields[DIGEST_KEY]
        if seal:
            fields[DIGEST_KEY] = manifest_digest(fields)
        elif self.manifest_sha256 is not None:
            fields[DIGEST_KEY] = self.manifest_sha256
        return json.dumps(fields, indent=2) + "\n"

    def graph_files(self, precision: str | None = None) -> tuple[str, str | None]:
        """(segment, find) file names at ``precision`` (default: the main graphs' own)."""
        if precision is None or precision == self.precision:
            return self.graphs.segment, self.graphs.find
        variant = self.variants.get(precision)  # type: ignore[call-overload]
        if variant is None:
            have = ", ".join([self.precision, *self.variants])
            raise KeyError(f"no {precision} graphs (the bundle has {have})")
        return variant.segment, variant.find

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision the bundle carries graphs for, the main one first."""
        return (self.precision, *self.variants)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest
    manifest_check: ManifestCheck = "not recorded"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def segment_graph(self) -> Path:
        return self.path / self.manifest.graphs.segment

    @property
    def find_graph(self) -> Path | None:
        name = self.manifest.graphs.find
        return None if name is None else self.path / name

    def graphs_at(self, precision: str | None = None) -> tuple[Path, Path | None]:
        """(segment, find) paths at ``precision`` (default: the main graphs). BundleError if absent."""
        try:
            segment, find = self.manifest.graph_files(precision)
        except KeyError as exc:
            raise BundleError(self.path, str(exc.args[0])) from None
        return self.path / segment, None if find is None else self.path / find

    def size_bytes(self, name: str | None = None) -> int:
        """Size of one file, or of every listed file together."""
        names = [name] if name is not None else list(self.manifest.files)
        return sum((self.path / n).stat().st_size for n in names)


def manifest_digest(fields: Mapping[str, Any]) -> str:
    """SHA-256 hex of a manifest's JSON object without ``manifest_sha256``: keys sorted at every level, no
    whitespace, UTF-8. Layout and key order do not change it; any value, key added or key removed does."""
    content = {key: value for key, value in fields.items() if key != DIGEST_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_manifest(fields: Mapping[str, Any]) -> ManifestCheck:
    """Whether a manifest's JSON object (as read from its file) still matches the digest written with it."""
    recorded = fields.get(DIGEST_KEY)
    if recorded is None:
        return "not recorded"
    return "intact" if recorded == manifest_digest(fields) else "edited"


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
    return _read_manifest(bundle_dir)[0]


def _read_manifest(bundle_dir: Path | str) -> tuple[Manifest, ManifestCheck]:
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
    version = raw.get("schema_version")
    if version in SINGLE_PASS_SCHEMA_VERSIONS:
        raise BundleError(
            path,
            f"schema_version {version} is a single-pass bundle (the frame letterboxed to one input, masks at "
            f"stride 8), which this runtime no longer runs: it inspects at native resolution (schema_version "
            f"{SCHEMA_VERSION}); train and export the model again (docs/bundle.md)",
        )
    try:
        return Manifest.model_validate(raw), check_manifest(raw)
    except ValidationError as exc:
        raise BundleError(path, _validation_message(exc)) from None


def load_bundle(bundle_dir: Path | str) -> Bundle:
    """Read the manifest and verify every listed file's checksum. Raises BundleError. A manifest edited
    since it was written loads all the same: ``Bundle.manifest_check`` says so."""
    bundle_dir = Path(bundle_dir)
    manifest, check = _read_manifest(bundle_dir)
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
    return Bundle(path=bundle_dir.resolve(), manifest=manifest, manifest_check=check)


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
    staging = staging_dir(out_dir)  # 0777 less the umask: a bundle is read by the service user
    try:
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


def update_metrics(bundle_dir: Path | str, key: str, value: Any) -> Bundle:
    """Record ``value`` as ``metrics[key]`` in a bundle's manifest; the graphs stay byte for byte.

    The bundle is verified first and rewritten atomically (write_bundle), so a measurement is
    recorded only in the bundle that was measured, and a reader never sees a half-written manifest.
    """
    bundle = load_bundle(bundle_dir)
    if not key:
        raise BundleError(bundle.path / MANIFEST_NAME, "a metrics key must not be empty")
    fields = bundle.manifest.model_dump(mode="json")
    fields.pop("files")
    fields["metrics"] = {**fields["metrics"], key: value}
    return write_bundle(bundle.path, fields, {name: bundle.path / name for name in bundle.manifest.files})


def update_thresholds(bundle_dir: Path | str, thresholds: Thresholds) -> Bundle:
    """Store calibrated thresholds in a bundle's manifest; the graphs stay byte for byte."""
    bundle = load_bundle(bundle_dir)
    fields = bundle.manifest.model_dump(mode="json")
    fields.pop("files")
    fields["thresholds"] = thresholds.model_dump(mode="json")
    return write_bundle(bundle.path, fields, {name: bundle.path / name for name in bundle.manifest.files})


def seal_manifest(bundle_dir: Path | str) -> Bundle:
    """Record the digest of the manifest as it is now (a bundle written before digests, or an edit meant to
    stay); the graphs are verified first and stay byte for byte."""
    bundle = load_bundle(bundle_dir)
    fields = bundle.manifest.model_dump(mode="json")
    fields.pop("files")
    return write_bundle(bundle.path, fields, {name: bundle.path / name for name in bundle.manifest.files})
