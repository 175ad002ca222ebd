"""The bundle contract (schema 3): schema and checksum checks before anything runs, old schemas refused,
atomic writes, and the ONNX Runtime engine running both graphs to the contract."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OrtConfig
from engines.bundle import (
    DEFAULT_BUNDLE_DIR,
    DIGEST_KEY,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Thresholds,
    load_bundle,
    manifest_digest,
    read_manifest,
    seal_manifest,
    update_metrics,
    update_thresholds,
    write_bundle,
)
from engines.contract import FIND_MEAN, FIND_STD, PIXEL_MEAN, PIXEL_STD
from engines.errors import BundleError, DefectsamError

from .conftest import TINY_CLASSES, TINY_MAX_WINDOWS, TINY_WINDOW


def _raw(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def _edit_manifest(bundle: Path, **changes: object) -> None:
    raw = _raw(bundle)
    raw.update(changes)
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))


def _edit_section(bundle: Path, section: str, **changes: object) -> None:
    raw = _raw(bundle)
    raw[section] = {**raw[section], **changes}
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))


def _fields(bundle: Path) -> dict[str, Any]:
    fields = _raw(bundle)
    del fields["files"]
    return fields


def test_a_good_bundle_loads_with_its_checksums_verified(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.schema_version == SCHEMA_VERSION == 3 and m.precision == "fp32" and m.name == "tiny-student"
    assert m.classes == TINY_CLASSES and m.num_classes == 3
    assert (m.segment.arch, m.segment.window, m.segment.max_windows) == ("student_seg", TINY_WINDOW, TINY_MAX_WINDOWS)
    assert m.segment.mean == PIXEL_MEAN and m.segment.std == PIXEL_STD and m.segment.pad_value == 0.0
    assert m.find is not None and (m.find.arch, m.find.reduction) == ("finder", 4)
    assert m.find.mean == FIND_MEAN and m.find.std == FIND_STD
    assert m.parameters == m.segment.parameters + m.find.parameters > 0
    assert (m.graphs.segment, m.graphs.find) == ("segment.onnx", "find.onnx")
    assert set(m.files) == {"segment.onnx", "find.onnx"}
    assert m.provenance.weights == "untrained" and m.provenance.seed == 0
    assert bundle.segment_graph == bundle.path / "segment.onnx" and bundle.find_graph == bundle.path / "find.onnx"
    assert bundle.graphs_at() == (bundle.segment_graph, bundle.find_graph) == bundle.graphs_at("fp32")
    assert m.precisions == ("fp32",)
    with pytest.raises(BundleError, match=r"no int8 graphs \(the bundle has fp32\)"):
        bundle.graphs_at("int8")
    written = json.loads(m.to_json())
    assert "variants" not in written and "thresholds" not in written and written["find"]["reduction"] == 4
    assert bundle.size_bytes() == bundle.size_bytes("segment.onnx") + bundle.size_bytes("find.onnx")


def _drop_find_graph(b: Path) -> None:
    raw = _raw(b)
    raw["graphs"]["find"] = None
    (b / MANIFEST_NAME).write_text(json.dumps(raw))


def _pending_variant_without_find(b: Path) -> None:
    raw = _raw(b)
    raw["variants"] = {"int8": {"segment": "segment.onnx", "mode": "static", "target": "cpu", "gate": "pending"}}
    (b / MANIFEST_NAME).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda b: (b / MANIFEST_NAME).unlink(), "manifest.json: missing: not an engine bundle"),
        (lambda b: (b / MANIFEST_NAME).write_text("{not json"), "malformed JSON at line 1"),
        (lambda b: (b / MANIFEST_NAME).write_text("[1, 2]"), "must hold a JSON object"),
        (lambda b: _edit_manifest(b, bogus=1), "key 'bogus': Extra inputs are not permitted"),
        (lambda b: _edit_manifest(b, schema_version=99), "schema_version 99 is not supported (this runtime reads 3)"),
        (lambda b: _edit_section(b, "segment", window=100), "key 'segment.window'"),
        (lambda b: _edit_section(b, "segment", std=[1.0, 0.0, 1.0]), "every std must be > 0"),
        (lambda b: _edit_section(b, "find", reduction=0), "key 'find.reduction'"),
        (lambda b: _edit_manifest(b, classes=[]), "key 'classes'"),
        (lambda b: _edit_manifest(b, files={}), "graph file 'segment.onnx' is not listed in 'files'"),
        (_drop_find_graph, "'find' and 'graphs.find' come together"),
        (_pending_variant_without_find, "variants.int8: has a find graph exactly when 'graphs' has one"),
        (lambda b: _edit_manifest(b, files={**_raw(b)["files"], "../x.onnx": "0" * 64}), "must be a plain name"),
        (lambda b: (b / "find.onnx").unlink(), "find.onnx: listed in manifest.json but missing"),
        (lambda b: (b / "segment.onnx").open("ab").write(b"\0"), "segment.onnx: checksum mismatch"),
    ],
)
def test_a_broken_bundle_is_refused_naming_the_file_and_cause(tiny_bundle: Path, breakage, message: str) -> None:
    breakage(tiny_bundle)
    with pytest.raises(BundleError) as caught:
        load_bundle(tiny_bundle)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# What the letterboxed single-pass runtime wrote (schema 1; schema 2 added variants and thresholds).
SINGLE_PASS_MANIFEST: dict[str, Any] = {
    "schema_version": 1, "name": "defectsam-student-cnn-synthetic", "created": "2026-11-22T09:55:49Z",
    "arch": "student_cnn_lite",
    "input": {"height": 576, "width": 1024, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
    "outputs": {"heatmap": {"shape": [1, 3, 36, 64], "dtype": "float32"}}, "K": 8, "mask_stride": 8,
    "classes": ["scratch", "dent", "pinhole"], "precision": "fp32",
    "graphs": {"fused": "model.onnx", "decoder": "decoder.onnx"}, "files": {}, "parameters": 1375060,
    "provenance": {"weights": "trained"},
}  # fmt: skip


@pytest.mark.parametrize("version", [1, 2])
def test_a_single_pass_bundle_is_refused_saying_it_must_be_retrained(tmp_path: Path, version: int) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / MANIFEST_NAME).write_text(json.dumps({**SINGLE_PASS_MANIFEST, "schema_version": version}))
    with pytest.raises(BundleError) as caught:
        load_bundle(old)
    message = str(caught.value)
    assert "\n" not in message and str(old / MANIFEST_NAME) in message
    assert f"schema_version {version} is a single-pass bundle" in message
    assert "no longer runs" in message and "schema_version 3" in message
    assert "train and export the model again" in message
    with pytest.raises(BundleError, match="single-pass"):
        open_engine(old)


def test_the_embedded_default_bundle_loads_or_is_refused_as_single_pass() -> None:
    version = json.loads((DEFAULT_BUNDLE_DIR / MANIFEST_NAME).read_text()).get("schema_version")
    if version in (1, 2):  # the embedded bundle still predates schema 3: refused, with the reason
        with pytest.raises(BundleError, match=f"schema_version {version} is a single-pass bundle"):
            load_bundle(DEFAULT_BUNDLE_DIR)
    else:
        assert load_bundle(DEFAULT_BUNDLE_DIR).manifest.schema_version == SCHEMA_VERSION


def test_missing_or_non_directory_bundles(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle directory does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "file")


def test_a_graph_that_breaks_the_contract_is_refused_when_the_engine_opens(tiny_bundle: Path, tmp_path: Path) -> None:
    # Checksums right, manifest valid, but the file called segment.onnx is the find graph.
    swapped = write_bundle(tmp_path / "swapped", _fields(tiny_bundle),
                           {"segment.onnx": tiny_bundle / "find.onnx", "find.onnx": tiny_bundle / "find.onnx"})
    with pytest.raises(BundleError) as caught:
        open_engine(swapped)
    message = str(caught.value)
    assert "segment.onnx" in message and "graph has no input named 'windows'" in message and "\n" not in message
    # A manifest that names two classes for a graph with three: the output channels do not match.
    fewer = write_bundle(tmp_path / "fewer", {**_fields(tiny_bundle), "classes": ["scratch", "dent"]},
                         {name: tiny_bundle / name for name in ("segment.onnx", "find.onnx")})
    with pytest.raises(BundleError, match=r"output 'class_probs' has shape \[.*4.*\] but the contract says"):
        open_engine(fewer)


def test_write_bundle_replaces_atomically_and_a_failed_write_keeps_the_old(tiny_bundle: Path, tmp_path: Path) -> None:
    good = load_bundle(tiny_bundle)
    fields = _fields(tiny_bundle)
    files = {name: tiny_bundle / name for name in good.manifest.files}
    target = tmp_path / "out" / "bundle"
    write_bundle(target, {**fields, "name": "first"}, files)
    (target / "segment.abc.fp16.trt10.gpu.plan").write_bytes(b"stale plan")  # a cache beside the bundle
    write_bundle(target, {**fields, "name": "second"}, files)
    assert load_bundle(target).manifest.name == "second"
    assert not (target / "segment.abc.fp16.trt10.gpu.plan").exists()  # a plan of old weights is never reused
    with pytest.raises(BundleError, match="key 'precision'"):
        write_bundle(target, {**fields, "name": "third", "precision": "fp8"}, files)
    with pytest.raises(ValueError, match="computes 'files' itself"):
        write_bundle(target, {**fields, "files": {}}, files)
    assert load_bundle(target).manifest.name == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["bundle"]  # no staging left behind


def test_onnxruntime_engine_runs_both_graphs_to_the_contract(tiny_bundle: Path) -> None:
    engine = open_engine(tiny_bundle, OrtConfig(providers=["cpu"]))
    try:
        assert engine.backend_name == "onnxruntime:CPUExecutionProvider" and engine.has_find
        assert engine.precision == "fp32"  # type: ignore[attr-defined]
        rng = np.random.default_rng(0)
        windows = rng.standard_normal((2, 3, 48, 80), dtype=np.float32)  # any batch and sides of 16
        probs = engine.segment(windows)
        assert probs.shape == (2, len(TINY_CLASSES) + 1, 48, 80) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        assert engine.segment(windows[:1]).shape == (1, 4, 48, 80)
        candidates = engine.find(rng.standard_normal((1, 3, 64, 96), dtype=np.float32))
        assert candidates.shape == (8, 12) and candidates.dtype == np.float32
        assert float(candidates.min()) >= 0.0 and float(candidates.max()) <= 1.0
        bad = [
            (lambda: engine.segment(windows.astype(np.float64)), "windows must be float32 B x 3 x H x W"),
            (lambda: engine.segment(windows[:, :, :40]), "multiples of 16"),
            (lambda: engine.segment(windows[:, :2]), "got float32 [2, 2, 48, 80]"),
            (lambda: engine.find(windows[:, :, :32, :32].copy()), "find input must be float32 1 x 3 x H x W"),
        ]
        for call, message in bad:
            with pytest.raises(DefectsamError) as caught:
                call()
            assert message in str(caught.value) and "\n" not in str(caught.value)
    finally:
        engine.close()
    engine.close()  # closing twice is harmless


def test_update_metrics_records_figures_and_keeps_the_graphs(tiny_bundle: Path) -> None:
    before = load_bundle(tiny_bundle).manifest
    graph = (tiny_bundle / "segment.onnx").read_bytes()
    updated = update_metrics(tiny_bundle, "synthetic_test", {"semantic": {"miou_fg": 0.5}})
    assert updated.manifest.metrics["synthetic_test"] == {"semantic": {"miou_fg": 0.5}}
    assert updated.manifest.files == before.files  # same checksums: the graphs were not touched
    assert (tiny_bundle / "segment.onnx").read_bytes() == graph
    again = update_metrics(tiny_bundle, "magnetic_tile_test", {"n_images": 3})
    assert set(again.manifest.metrics) >= {"synthetic_test", "magnetic_tile_test"}
    with pytest.raises(BundleError, match="must not be empty"):
        update_metrics(tiny_bundle, "", 1)


def test_update_thresholds_stores_them_and_keeps_the_graphs(tiny_bundle: Path) -> None:
    before = load_bundle(tiny_bundle).manifest.files
    chosen = Thresholds(score_threshold=0.6, uncertain_threshold=0.4, candidate_threshold=0.2,
                        calibration={"data": "synthetic"})
    updated = update_thresholds(tiny_bundle, chosen)
    assert updated.manifest.thresholds == chosen and updated.manifest.files == before
    assert read_manifest(tiny_bundle).thresholds == chosen
    with pytest.raises(ValueError, match="uncertain_threshold must not exceed score_threshold"):
        Thresholds(score_threshold=0.2, uncertain_threshold=0.3)
    with pytest.raises(ValueError, match="candidate_threshold"):
        Thresholds(score_threshold=0.5, uncertain_threshold=0.3, candidate_threshold=1.5)


def test_the_manifest_carries_its_own_digest_and_an_edit_shows(tiny_bundle: Path) -> None:
    """Issue 16, item 8: the manifest was covered by no checksum, so thresholds could be edited unnoticed.
    The writer stores manifest_sha256 (the SHA-256 of the rest, canonical JSON); load_bundle says whether
    the file still matches it, and loads the bundle either way."""
    raw = _raw(tiny_bundle)
    assert raw[DIGEST_KEY] == manifest_digest(raw) and load_bundle(tiny_bundle).manifest_check == "intact"
    graphs = {name: (tiny_bundle / name).read_bytes() for name in raw["files"]}
    # Layout and key order are not content: still intact.
    (tiny_bundle / MANIFEST_NAME).write_text(json.dumps(dict(reversed(list(raw.items()))), indent=4))
    assert load_bundle(tiny_bundle).manifest_check == "intact"
    # A threshold raised by hand: loaded, the graphs verified, but edited.
    update_thresholds(tiny_bundle, Thresholds(score_threshold=0.6, uncertain_threshold=0.4))
    assert load_bundle(tiny_bundle).manifest_check == "intact"  # the updater keeps the digest current
    _edit_section(tiny_bundle, "thresholds", score_threshold=0.95)
    edited = load_bundle(tiny_bundle)
    assert edited.manifest_check == "edited" and edited.manifest.thresholds is not None
    assert edited.manifest.thresholds.score_threshold == 0.95
    for change in ({"name": "renamed"}, {"metrics": {"training": {"miou": 0.99}}}, {"extra_digest_free": None}):
        seal_manifest(tiny_bundle)
        if "extra_digest_free" in change:  # a key added (here one the schema refuses: refused, not just edited)
            _edit_manifest(tiny_bundle, **change)
            with pytest.raises(BundleError, match="extra_digest_free"):
                load_bundle(tiny_bundle)
            continue
        _edit_manifest(tiny_bundle, **change)
        assert load_bundle(tiny_bundle).manifest_check == "edited", change
    # A bundle written before the digest existed: not recorded; sealing records it, graphs byte for byte.
    old = _raw(tiny_bundle)
    del old["extra_digest_free"], old[DIGEST_KEY]
    (tiny_bundle / MANIFEST_NAME).write_text(json.dumps(old, indent=2))
    assert load_bundle(tiny_bundle).manifest_check == "not recorded"
    assert read_manifest(tiny_bundle).manifest_sha256 is None
    sealed = seal_manifest(tiny_bundle)
    assert sealed.manifest_check == "intact" and load_bundle(tiny_bundle).manifest_check == "intact"
    assert {name: (tiny_bundle / name).read_bytes() for name in raw["files"]} == graphs
    update_metrics(tiny_bundle, "synthetic_test", {"n": 1})
    assert load_bundle(tiny_bundle).manifest_check == "intact"
    # A digest that is not one is a schema error, naming the key.
    _edit_manifest(tiny_bundle, **{DIGEST_KEY: "not-hex"})
    with pytest.raises(BundleError, match=DIGEST_KEY):
        load_bundle(tiny_bundle)


def test_the_committed_default_bundle_carries_a_matching_digest() -> None:
    assert _raw(DEFAULT_BUNDLE_DIR).get(DIGEST_KEY) and load_bundle(DEFAULT_BUNDLE_DIR).manifest_check == "intact"


def test_the_daemon_warns_at_load_when_the_manifest_was_edited(tiny_bundle: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A real daemon on a bundle whose threshold was raised by hand: it inspects, and says so once at load;
    on the intact bundle it says nothing of the kind."""
    from .daemon_support import make_config, running_daemon

    caplog.set_level(logging.WARNING, logger="service.app")
    for name, edit in (("intact", False), ("edited", True)):
        if edit:
            update_thresholds(tiny_bundle, Thresholds(score_threshold=0.6, uncertain_threshold=0.4))
            _edit_section(tiny_bundle, "thresholds", score_threshold=0.99)
        caplog.clear()
        with running_daemon(make_config(tmp_path / name, tiny_bundle)) as daemon:
            assert daemon.wait_engine(10) == "ready"
        warned = [r.getMessage() for r in caplog.records if "was edited since it was written" in r.getMessage()]
        if edit:
            assert len(warned) == 1 and "tiny-student" in warned[0] and str(tiny_bundle) in warned[0], warned
        else:
            assert not warned
