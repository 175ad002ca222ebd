"""``defectsam bench report`` end to end on tiny graphs, and the SAM 2 teacher's reference export.

Structure and arithmetic only: no assertion here is about speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.benchmark import (
    REFERENCE_FILE,
    REFERENCE_INPUTS_FILE,
    BenchSubject,
    bench_engines,
    load_reference_graph,
)
from engines.bundle import sha256_file
from engines.errors import BundleError, DefectsamError

from .conftest import REPO, TINY_CLASSES, TINY_HW

pytestmark = pytest.mark.slow


def _export_student(out: Path, height: int, width: int, k: int) -> Path:
    import torch

    from training.export.onnx import export_bundle
    from training.model.build import build_model

    torch.manual_seed(0)
    model = build_model("student_cnn", height=height, width=width, num_classes=len(TINY_CLASSES), k=k)
    export_bundle(model, "student_cnn", out, name=f"tiny {height}x{width} K={k}", classes=TINY_CLASSES,
                  provenance={"weights": "untrained", "notes": "test fixture", "seed": 0})
    return out


def _reference_graph(directory: Path, graph: Path, feeds: dict[str, np.ndarray], *, parameters: int,
                     model_input: tuple[int, int]) -> Path:
    """A reference graph directory around any ONNX file, as defectsam-train export-reference writes one."""
    directory.mkdir(parents=True)
    shutil.copy(graph, directory / "model.onnx")
    np.savez(directory / REFERENCE_INPUTS_FILE, **feeds)
    manifest = {
        "schema_version": 1, "name": "fake teacher", "arch": "sam2_small", "created": "2026-01-01T00:00:00Z",
        "graph": "model.onnx", "inputs": REFERENCE_INPUTS_FILE,
        "input": {"height": TINY_HW[0], "width": TINY_HW[1]},
        "model_input": {"height": model_input[0], "width": model_input[1]},
        "K": 3, "parameters": parameters, "precision": "fp32", "weights": "untrained",
        "notes": "a stand-in graph: the tiny bundle's decoder",
        "files": {name: sha256_file(directory / name) for name in ("model.onnx", REFERENCE_INPUTS_FILE)},
    }
    (directory / REFERENCE_FILE).write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def graphs(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-report")
    height, width = TINY_HW
    decoder_feeds = {
        "image_embedding": np.zeros((1, 256, height // 16, width // 16), np.float32),
        "point_coords": np.asarray([[[10.0, 10.0], [40.0, 20.0], [0.0, 0.0]]], np.float32),
        "point_labels": np.asarray([[1.0, 1.0, -1.0]], np.float32),
    }
    return {
        "student": tiny_bundle_master,
        "mobilesam": tiny_bundle_master,  # any bundle at the student's size: the role comes from the flag
        "teacher": _reference_graph(root / "teacher", tiny_bundle_master / "decoder.onnx", decoder_feeds,
                                    parameters=1234, model_input=(width, width)),
        "small": _export_student(root / "small", height // 2, width // 2, 4),
        "k1": _export_student(root / "k1", height, width, 1),
    }


def test_report_runs_every_part_in_one_run_and_writes_json_and_markdown(graphs: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "report.json", tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "report", "--bundle", str(graphs["student"]),
         "--mobilesam", str(graphs["mobilesam"]), "--teacher", str(graphs["teacher"]),
         "--size-bundle", str(graphs["student"]), "--size-bundle", str(graphs["small"]),  # sorted by the report
         "--k-bundle", str(graphs["student"]), "--k-bundle", str(graphs["k1"]),
         "--iterations", "3", "--teacher-iterations", "2", "--scaling-iterations", "2", "--warmup", "1",
         "--frame", "512x288", "--camera-fps", "15", "--duration", "2", "--pipeline-warmup", "0.5", "--rounds", "2",
         "--engine-iterations", "3", "--providers", "cpu", "--threads", "1",
         "--json", str(out_json), "--markdown", str(out_md)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert set(report) >= {"schema_version", "generated", "machine", "settings", "engine", "pipeline", "scaling"}
    assert report["settings"]["threads"] == 1 and report["settings"]["teacher_iterations"] == 2

    engine = report["engine"]
    rows = engine["rows"]
    assert [r["role"] for r in rows] == ["student", "mobilesam", "teacher"]
    assert [r["iterations"] for r in rows] == [3, 3, 2]
    for r in rows:
        assert r["fps_median"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] > 0
        assert r["cpu_cores"] >= 0 and r["input_hw"] == list(TINY_HW)
    teacher = rows[2]
    assert teacher["parameters"] == 1234 and teacher["model_input_hw"] == [TINY_HW[1], TINY_HW[1]]
    assert teacher["backend"] == "onnxruntime:CPUExecutionProvider"
    # Ratios: the student's measured FPS over each reference's, nothing else.
    assert [(q["reference_role"], q["fps_ratio"]) for q in engine["ratios"]] == [
        ("mobilesam", round(rows[0]["fps_median"] / rows[1]["fps_median"], 2)),
        ("teacher", round(rows[0]["fps_median"] / rows[2]["fps_median"], 2)),
    ]

    pipeline = report["pipeline"]
    assert pipeline["frame"] == "512x288 synthetic" and pipeline["inspected"] > 0 and len(pipeline["rounds"]) == 2
    pair_ratios = sorted(fps / engine_fps for fps, engine_fps, _ in pipeline["rounds"])
    assert pipeline["ratio"] == pytest.approx(float(np.median(pair_ratios)), abs=2e-3)
    assert pipeline["plc_results"] > 0 and 0 < pipeline["plc_latency_ms_p50"] <= pipeline["plc_latency_ms_p99"]
    assert pipeline["cpu_cores"] == round(pipeline["cpu_percent"] / 100, 2)
    assert pipeline["rss_mb_peak"] >= pipeline["rss_mb_start"] > 0

    sizes, prompts = report["scaling"]["input_size"], report["scaling"]["prompts"]
    assert [r["input_hw"] for r in sizes] == [[TINY_HW[0] // 2, TINY_HW[1] // 2], list(TINY_HW)]
    assert [r["size_ratio"] for r in sizes] == [1.0, 4.0]
    assert [r["k"] for r in prompts] == [1, 4] and [r["size_ratio"] for r in prompts] == [1.0, 4.0]
    for series in (sizes, prompts):
        assert [r["latency_ratio"] for r in series] == [
            round(r["latency_ms_p50"] / series[0]["latency_ms_p50"], 3) for r in series
        ]

    markdown = out_md.read_text()
    assert markdown.startswith("# Benchmarks\n") and "make bench-report" in markdown
    assert report["machine"]["cpu"] in markdown
    for q in engine["ratios"]:
        assert f"{q['student']} / {q['reference']}: **{q['fps_ratio']:.2f}x**" in markdown
    assert f"({TINY_HW[1]}x{TINY_HW[1]} letterbox)" in markdown
    assert f"| pipeline / engine-only (median of the 2 pairs) | **{pipeline['ratio']:.3f}** |" in markdown
    assert "### Against input size" in markdown and "### Against K (prompts per frame)" in markdown
    assert markdown in done.stdout


def test_reference_graph_checksums_are_verified(graphs: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "teacher"
    shutil.copytree(graphs["teacher"], copy)
    assert load_reference_graph(copy).manifest.k == 3
    with (copy / REFERENCE_INPUTS_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_reference_graph(copy)
    with pytest.raises(BundleError, match="not a reference graph"):
        load_reference_graph(tmp_path)


def test_report_refuses_a_reference_at_another_input_size(graphs: dict[str, Path]) -> None:
    from service.bench_report import ReportPlan, run_report

    with pytest.raises(DefectsamError, match="compare at one size"):
        run_report(ReportPlan(student=graphs["student"], mobilesam=graphs["small"]), log=lambda _: None)


def test_sam2_small_reference_export_is_the_hiera_small_model(tmp_path: Path) -> None:
    """Random-weight SAM 2.1 hiera-small, exported at a small square (the parameters do not depend on it):
    image encoder + FPN neck + prompt encoder + mask decoder, about 38.5 M parameters (SAM 2.1 small's
    46 M counts the video memory modules too, which a single image does not run)."""
    pytest.importorskip("transformers")
    onnx = pytest.importorskip("onnx")
    from training.export.reference import export_reference

    out = tmp_path / "sam2_small"
    fields = export_reference("sam2_small", out, height=TINY_HW[0], width=TINY_HW[1], k=2, image_size=256)
    assert 37e6 < fields["parameters"] < 40e6
    graph = onnx.load(str(out / "model.onnx"))
    weights = sum(int(np.prod(init.dims)) for init in graph.graph.initializer)
    assert weights == pytest.approx(fields["parameters"], rel=0.05)
    assert [i.name for i in graph.graph.input] == ["image", "points"]

    reference = load_reference_graph(out)
    assert reference.manifest.model_input.height == 256 and "letterbox" in reference.manifest.notes
    (result,) = bench_engines([BenchSubject(reference)], warmup=0, iterations=1)
    assert result.parameters == fields["parameters"] and result.model_input_hw == (256, 256)
    assert result.input_hw == TINY_HW and result.k == 2
