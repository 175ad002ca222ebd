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

from .conftest import REPO, TINY_MAX_WINDOWS, TINY_WINDOW
from .daemon_support import ng_bundle

pytestmark = pytest.mark.slow
REFERENCE_HW = (128, 256)  # the SAM 2 reference export's input in the last test (any multiples of 16)
FRAME_HW = (1520, 2688)  # the 4 MP synthetic test frames every bundle row inspects (engines.benchmark)


def _reference_graph(directory: Path, graph: Path, feeds: dict[str, np.ndarray], *, parameters: int,
                     model_input: tuple[int, int]) -> Path:
    """A reference graph directory around any ONNX file, as defectsam-train export-reference writes one."""
    directory.mkdir(parents=True)
    shutil.copy(graph, directory / "model.onnx")
    np.savez(directory / REFERENCE_INPUTS_FILE, **feeds)
    manifest = {
        "schema_version": 1, "name": "fake teacher", "arch": "sam2_small", "created": "2026-01-01T00:00:00Z",
        "graph": "model.onnx", "inputs": REFERENCE_INPUTS_FILE,
        "input": {"height": TINY_WINDOW, "width": TINY_WINDOW},
        "model_input": {"height": model_input[0], "width": model_input[1]},
        "K": 3, "parameters": parameters, "precision": "fp32", "weights": "untrained",
        "notes": "a stand-in graph: the tiny bundle's segment graph",
        "files": {name: sha256_file(directory / name) for name in ("model.onnx", REFERENCE_INPUTS_FILE)},
    }
    (directory / REFERENCE_FILE).write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def graphs(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-report")
    feeds = {"windows": np.zeros((1, 3, TINY_WINDOW, TINY_WINDOW), np.float32)}
    return {
        # the always-NG bundle: every candidate cell is open, so each frame gets its max_windows windows
        "student": ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp()),
        "teacher": _reference_graph(root / "teacher", tiny_bundle_master / "segment.onnx", feeds,
                                    parameters=1234, model_input=(2 * TINY_WINDOW, 2 * TINY_WINDOW)),
    }


def test_report_runs_every_part_in_one_run_and_writes_json_and_markdown(graphs: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """Rows: the student (windows at its own side), one other window side, the teacher; the full tiling is
    left out (--no-tiles: thousands of 64 px tiles a 4 MP frame, minutes on a CI box)."""
    out_json, out_md = tmp_path / "report.json", tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "report", "--bundle", str(graphs["student"]),
         "--teacher", str(graphs["teacher"]), "--windows", f"{TINY_WINDOW},{2 * TINY_WINDOW}", "--no-tiles",
         "--iterations", "3", "--teacher-iterations", "2", "--scaling-iterations", "2", "--warmup", "1",
         "--frame", "512x288", "--camera-fps", "15", "--duration", "2", "--pipeline-warmup", "0.5", "--rounds", "2",
         "--engine-iterations", "3", "--providers", "cpu", "--threads", "1",
         "--json", str(out_json), "--markdown", str(out_md)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert set(report) >= {"schema_version", "generated", "machine", "settings", "engine", "pipeline", "scaling"}
    assert report["settings"]["threads"] == 1 and report["settings"]["teacher_iterations"] == 2

    engine = report["engine"]
    rows = engine["rows"]
    # the bundle's own side is the student row, not a design row of its own
    assert [r["role"] for r in rows] == ["student", "design", "teacher"]
    assert [r["iterations"] for r in rows] == [3, 3, 2]
    for r in rows:
        assert r["fps_median"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] > 0 and r["cpu_cores"] >= 0
    student, design, teacher = rows
    for r, side in ((student, TINY_WINDOW), (design, 2 * TINY_WINDOW)):
        assert r["name"] == "tiny-student-ng" and r["arch"] == "student_seg + finder" and r["precision"] == "fp32"
        assert r["mode"] == "windows" and r["window"] == side and r["input_hw"] == list(FRAME_HW)
        assert r["windows"] == TINY_MAX_WINDOWS  # every cell a candidate: the find pass asks for all it may
        assert set(r["steps_ms"]) >= {"preprocess", "find", "segment", "postprocess", "total"}
    assert teacher["parameters"] == 1234 and teacher["model_input_hw"] == [2 * TINY_WINDOW, 2 * TINY_WINDOW]
    assert teacher["input_hw"] == [TINY_WINDOW, TINY_WINDOW] and teacher["windows"] == 3 and teacher["mode"] == ""
    assert teacher["backend"] == "onnxruntime:CPUExecutionProvider"
    # Ratios: the student's measured FPS over each other row's, nothing else.
    assert [(q["other_role"], q["fps_ratio"]) for q in engine["ratios"]] == [
        ("design", round(student["fps_median"] / design["fps_median"], 2)),
        ("teacher", round(student["fps_median"] / teacher["fps_median"], 2)),
    ]

    pipeline = report["pipeline"]
    assert pipeline["frame"] == "512x288 synthetic" and pipeline["inspected"] > 0 and len(pipeline["rounds"]) == 2
    pair_ratios = sorted(fps / engine_fps for fps, engine_fps, _ in pipeline["rounds"])
    assert pipeline["ratio"] == pytest.approx(float(np.median(pair_ratios)), abs=2e-3)
    assert pipeline["plc_results"] > 0 and 0 < pipeline["plc_latency_ms_p50"] <= pipeline["plc_latency_ms_p99"]
    assert pipeline["cpu_cores"] == round(pipeline["cpu_percent"] / 100, 2)
    assert pipeline["rss_mb_peak"] >= pipeline["rss_mb_start"] > 0

    scaling = report["scaling"]
    assert scaling["window"] == TINY_WINDOW and [r["precision"] for r in scaling["rows"]] == ["fp32"]
    (costs,) = scaling["rows"]
    assert costs["find_ms"] > 0 and costs["find_input"] == [384, 672]  # 1520x2688 at 1/4, padded to multiples of 16
    assert list(costs["segment_ms"]) == ["1", "4", "8", "16", "24"] and min(costs["segment_ms"].values()) > 0
    segment = costs["segment_ms"]
    assert costs["ms_per_window"] == round((segment["24"] - segment["1"]) / 23, 3)

    markdown = out_md.read_text()
    assert markdown.startswith("# Benchmarks\n") and "make bench-report" in markdown
    assert report["machine"]["cpu"] in markdown
    for q in engine["ratios"]:
        assert f"- {q['student']} / {q['other']}: **{q['fps_ratio']:.2f}x**" in markdown
    assert f"| windows, {TINY_WINDOW} px | {FRAME_HW[1]}x{FRAME_HW[0]} |" in markdown
    assert f"| windows, {2 * TINY_WINDOW} px |" in markdown
    assert f"({2 * TINY_WINDOW}x{2 * TINY_WINDOW} letterbox)" in markdown  # the teacher's own input
    assert f"| pipeline / engine-only (median of the 2 pairs) | **{pipeline['ratio']:.3f}** |" in markdown
    assert "## How cost grows: the two graphs alone" in markdown and f"{costs['ms_per_window']:.2f} |" in markdown
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


def test_report_refuses_bad_plans_before_timing_anything(graphs: dict[str, Path], tmp_path: Path) -> None:
    from service.bench_report import ReportPlan, run_report

    with pytest.raises(DefectsamError, match="iterations must be >= 1"):
        run_report(ReportPlan(student=graphs["student"], iterations=0), log=lambda _: None)
    with pytest.raises(DefectsamError, match="teacher reference graph does not exist"):
        run_report(ReportPlan(student=graphs["student"], teacher=tmp_path / "nope"), log=lambda _: None)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "report", "--bundle", str(graphs["student"]),
         "--windows", "100", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "defectsam: error: --windows '100': expected window sides in pixels, multiples of 16")
    assert not (tmp_path / "r.json").exists()


def test_sam2_small_reference_export_is_the_hiera_small_model(tmp_path: Path) -> None:
    """Random-weight SAM 2.1 hiera-small, exported at a small square (the parameters do not depend on it):
    image encoder + FPN neck + prompt encoder + mask decoder, about 38.5 M parameters (SAM 2.1 small's
    46 M counts the video memory modules too, which a single image does not run)."""
    pytest.importorskip("transformers")
    onnx = pytest.importorskip("onnx")
    from training.export.reference import export_reference

    out = tmp_path / "sam2_small"
    fields = export_reference("sam2_small", out, height=REFERENCE_HW[0], width=REFERENCE_HW[1], k=2, image_size=256)
    assert 37e6 < fields["parameters"] < 40e6
    graph = onnx.load(str(out / "model.onnx"))
    weights = sum(int(np.prod(init.dims)) for init in graph.graph.initializer)
    assert weights == pytest.approx(fields["parameters"], rel=0.05)
    assert [i.name for i in graph.graph.input] == ["image", "points"]

    reference = load_reference_graph(out)
    assert reference.manifest.model_input.height == 256 and "letterbox" in reference.manifest.notes
    (result,) = bench_engines([BenchSubject(reference)], warmup=0, iterations=1)
    assert result.parameters == fields["parameters"] and result.model_input_hw == (256, 256)
    assert result.input_hw == REFERENCE_HW and result.windows == 2  # a reference graph's "windows": its prompts
