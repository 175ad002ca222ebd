"""The bundle contract: schema and checksum checks before anything runs, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.backends import open_engine
from engines.bundle import MANIFEST_NAME, load_bundle, outputs_for, read_manifest, write_bundle
from engines.contract import FUSED_OUTPUT_NAMES, GraphShape
from engines.errors import BundleError, DefectsamError
from engines.inspector import Inspector
from engines.results import Verdict

from .conftest import TINY_CLASSES, TINY_HW, TINY_K


def _edit_manifest(bundle: Path, **changes: object) -> None:
    path = bundle / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_a_good_bundle_loads_with_its_checksums_verified(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    assert (m.input.height, m.input.width) == TINY_HW
    assert m.k == TINY_K and m.classes == TINY_CLASSES and m.mask_stride == 8
    assert set(m.files) == {"model.onnx", "decoder.onnx"}
    assert m.provenance.weights == "untrained"
    assert set(m.outputs) == set(FUSED_OUTPUT_NAMES)
    assert json.loads(m.to_json())["K"] == TINY_K  # the manifest key is "K", as the brief writes it


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda b: (b / MANIFEST_NAME).unlink(), "manifest.json: missing: not an engine bundle"),
        (lambda b: (b / MANIFEST_NAME).write_text("{not json"), "malformed JSON at line 1"),
        (lambda b: (b / MANIFEST_NAME).write_text("[1, 2]"), "must hold a JSON object"),
        (lambda b: _edit_manifest(b, bogus=1), "key 'bogus': Extra inputs are not permitted"),
        (lambda b: _edit_manifest(b, schema_version=99), "schema_version 99 is not supported"),
        (lambda b: _edit_manifest(b, K=0), "key 'K'"),
        (lambda b: _edit_manifest(b, files={}), "graph file 'model.onnx' is not listed"),
        (lambda b: (b / "decoder.onnx").unlink(), "decoder.onnx: listed in manifest.json but missing"),
        (lambda b: (b / "model.onnx").open("ab").write(b"\0"), "model.onnx: checksum mismatch"),
    ],
)
def test_a_broken_bundle_is_refused_naming_the_file_and_cause(tiny_bundle: Path, breakage, message: str) -> None:
    breakage(tiny_bundle)
    with pytest.raises(BundleError) as caught:
        load_bundle(tiny_bundle)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_or_non_directory_bundles(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle directory does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "file")


def test_outputs_that_contradict_input_size_are_refused(tiny_bundle: Path) -> None:
    raw = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    raw["input"]["height"] = 256
    (tiny_bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"outputs.heatmap is .* imply"):
        read_manifest(tiny_bundle)


def test_an_onnx_whose_input_shape_differs_from_the_manifest_is_refused(tiny_bundle: Path) -> None:
    # A manifest consistent in itself, but claiming a size the graph was not exported at.
    raw = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    raw["input"].update(height=256, width=512)
    shape = GraphShape(256, 512, TINY_K, len(TINY_CLASSES), 8)
    raw["outputs"] = {k: v.model_dump() for k, v in outputs_for(shape).items()}
    (tiny_bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError) as caught:
        open_engine(tiny_bundle)
    assert "model.onnx" in str(caught.value)
    assert "input 'image' has shape [1, 3, 128, 256] but the manifest implies [1, 3, 256, 512]" in str(caught.value)


def test_write_bundle_replaces_atomically_and_a_failed_write_keeps_the_old(tiny_bundle: Path, tmp_path: Path) -> None:
    good = load_bundle(tiny_bundle)
    fields = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    del fields["files"]
    files = {name: tiny_bundle / name for name in good.manifest.files}
    target = tmp_path / "out" / "bundle"
    write_bundle(target, {**fields, "name": "first"}, files)
    (target / "model.fp16.trt10.gpu.plan").write_bytes(b"stale plan")  # a cache beside the bundle
    write_bundle(target, {**fields, "name": "second"}, files)
    assert load_bundle(target).manifest.name == "second"
    assert not (target / "model.fp16.trt10.gpu.plan").exists()  # a plan of old weights is never reused
    with pytest.raises(BundleError, match="key 'precision'"):
        write_bundle(target, {**fields, "name": "third", "precision": "fp8"}, files)
    assert load_bundle(target).manifest.name == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["bundle"]  # no staging left behind


def test_onnxruntime_engine_runs_both_graphs_to_the_contract(tiny_bundle: Path) -> None:
    engine = open_engine(tiny_bundle)
    shape = engine.bundle.manifest.graph_shape
    image = np.random.default_rng(0).standard_normal((1, 3, *TINY_HW), dtype=np.float32)
    out = engine.infer(image, with_embedding=True)
    specs = {spec.name: spec for spec in shape.fused_outputs()}
    assert out.heatmap.shape == specs["heatmap"].shape[1:]
    for name in ("points", "point_scores", "point_classes", "mask_logits", "iou", "image_embedding"):
        value = getattr(out, name)
        assert value.shape == specs[name].shape, name
        assert value.dtype == np.dtype(specs[name].dtype), name
    assert engine.infer(image).image_embedding is None
    coords = np.array([[[40.0, 30.0], [100.0, 60.0]]], np.float32)
    masks, iou = engine.prompt(out.image_embedding, coords, np.array([[1.0, 0.0]], np.float32))
    assert masks.shape == (1, *shape.mask_hw) and iou.shape == (1,)
    with pytest.raises(DefectsamError, match="engine input must be float32"):
        engine.infer(image.astype(np.float64))


def test_inspector_on_a_real_defect_image(tiny_bundle: Path, dataset_images: list[Path]) -> None:
    import cv2

    frame = cv2.imread(str(dataset_images[0]), cv2.IMREAD_COLOR)
    result = Inspector(open_engine(tiny_bundle)).inspect(frame)
    assert (result.frame_width, result.frame_height) == (frame.shape[1], frame.shape[0])
    assert result.verdict in (Verdict.OK, Verdict.NG, Verdict.UNCERTAIN)
    assert set(result.timings) == {"preprocess", "infer", "postprocess", "total"}
    for defect in result.defects:
        x, y, w, h = defect.bbox
        assert x >= 0 and x + w <= frame.shape[1] and y >= 0 and y + h <= frame.shape[0]


def test_update_metrics_records_figures_and_keeps_the_graphs(tiny_bundle: Path) -> None:
    from engines.bundle import update_metrics

    before = load_bundle(tiny_bundle).manifest
    graph = (tiny_bundle / "model.onnx").read_bytes()
    updated = update_metrics(tiny_bundle, "synthetic_test", {"prompted": {"miou": 0.5}})
    assert updated.manifest.metrics["synthetic_test"] == {"prompted": {"miou": 0.5}}
    assert updated.manifest.files == before.files  # same checksums: the graphs were not touched
    assert (tiny_bundle / "model.onnx").read_bytes() == graph
    again = update_metrics(tiny_bundle, "magnetic_tile_test", {"n_images": 3})
    assert set(again.manifest.metrics) >= {"synthetic_test", "magnetic_tile_test"}
    with pytest.raises(BundleError, match="must not be empty"):
        update_metrics(tiny_bundle, "", 1)
