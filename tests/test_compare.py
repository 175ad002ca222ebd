"""``defectsam-train compare``: the default bundle at FP32 and INT8 and a recalibrated copy of it, sealed with
``defectsam bundle seal``, side by side on a few small synthetic frames; their figures are the eval's; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engines.bundle import DEFAULT_BUNDLE_DIR, load_bundle, seal_manifest
from service import cli as service_cli

from .support import run_command_module

pytest.importorskip("torch", reason="evaluating needs the 'train' extra (torch)")

from training.commands import compare as compare_command
from training.commands import eval as eval_command
from training.eval.compare_table import Compared, comparison_rows, format_markdown, format_text

# Small frames (defects scaled with them), half of them defect-free so the false-reject rate is defined.
DATA = "synthetic,n=4,seed=2000000,width=512,height=384,defect_free_prob=0.5"


def _edit_manifest(bundle: Path, change: Any) -> None:
    path = bundle / "manifest.json"
    fields = json.loads(path.read_text())
    change(fields)
    path.write_text(json.dumps(fields, indent=2) + "\n")


def _copy_default(target: Path) -> Path:
    shutil.copytree(DEFAULT_BUNDLE_DIR, target)
    return target


@pytest.fixture()
def recalibrated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """engines/default with lower calibrated thresholds, edited by hand and sealed with ``defectsam bundle seal``."""
    bundle = _copy_default(tmp_path / "recalibrated")

    def lower(fields: dict[str, Any]) -> None:
        fields["thresholds"].update(score_threshold=0.6, uncertain_threshold=0.4)

    _edit_manifest(bundle, lower)
    assert load_bundle(bundle).manifest_check == "edited"
    assert service_cli.main(["bundle", "seal", str(bundle)]) == 0
    capsys.readouterr()
    assert load_bundle(bundle).manifest_check == "intact"
    return bundle


def _eval_report(bundle: str, precision: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    out = tmp_path / f"eval-{Path(bundle).name}-{precision}.json"
    code, _, err = run_command_module(
        eval_command, ["eval", "--bundle", bundle, "--precision", precision, "--data", DATA, "--json", str(out)],
        capsys,
    )
    assert code == 0, err
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_compare_puts_the_default_bundle_at_fp32_and_int8_and_a_recalibrated_copy_side_by_side(
    recalibrated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = str(DEFAULT_BUNDLE_DIR)
    argv = ["compare", f"{default}@fp32", f"{default}@int8", str(recalibrated), "--precision", "fp32",
            "--data", DATA]
    out_file = tmp_path / "compare.json"
    code, out, err = run_command_module(compare_command, [*argv, "--json", "--out", str(out_file)], capsys)
    assert code == 0, err
    assert out == "" and f"comparison written to {out_file}" in err
    assert "compare: 3/3" in err  # progress goes to stderr, never into the JSON
    written = json.loads(out_file.read_text())
    assert written["dataset"] == "synthetic(n=4,seed=2000000,512x384)"
    columns = written["bundles"]
    assert [c["precision"] for c in columns] == ["fp32", "int8", "fp32"]
    assert [c["column"] for c in columns] == [
        "defectsam-synthetic (fp32) #1", "defectsam-synthetic (int8)", "defectsam-synthetic (fp32) #3"]
    default_hash = load_bundle(DEFAULT_BUNDLE_DIR).manifest.manifest_sha256
    assert columns[0]["manifest_sha256"] == columns[1]["manifest_sha256"] == default_hash
    assert columns[2]["manifest_sha256"] == load_bundle(recalibrated).manifest.manifest_sha256 != default_hash
    assert columns[2]["thresholds"] == {"score": 0.6, "uncertain": 0.4}

    # Each column's numbers are what 'defectsam-train eval' reports for that bundle, precision and data.
    for column, (bundle, precision) in zip(
        columns, [(default, "fp32"), (default, "int8"), (str(recalibrated), "fp32")], strict=True
    ):
        report = _eval_report(bundle, precision, tmp_path, capsys)
        figures = column["figures"]
        sem, auto = report["semantic"], report["automatic"]
        assert figures["n_images"] == report["n_images"] == 4
        assert (figures["good_images"], figures["defective_images"]) == (auto["good_images"], auto["defective_images"])
        assert auto["good_images"] > 0 and auto["defective_images"] > 0
        assert (figures["miou_fg"], figures["miou"], figures["iou"]) == (sem["miou_fg"], sem["miou"], sem["iou"])
        assert figures["defect_precision"] == auto["precision"] and figures["defect_recall"] == auto["recall"]
        for rate in ("false_reject_rate", "false_ng_rate", "miss_rate"):
            assert figures[rate] == auto[rate]
        for name, kinds in auto["by_size"].items():
            for kind, entry in kinds.items():
                assert [(label, b["n"], b["recall"]) for label, b in figures["recall_by_size"][name][kind].items()] \
                    == [(b["bucket"], b["n"], b["recall"]) for b in entry["buckets"]]
        timed = column["report"]
        assert {k: v for k, v in timed.items() if k not in ("timing", "seconds")} \
            == {k: v for k, v in report.items() if k not in ("timing", "seconds")}
        assert figures["fps"] == pytest.approx(1000.0 / timed["timing"]["median_ms"]) and figures["fps"] > 0
    assert columns[0]["report"]["model"] == "bundle:defectsam-synthetic (fp32)"
    assert columns[1]["report"]["model"] == "bundle:defectsam-synthetic (int8)"

    # The table: a column per bundle, a row per figure.
    code, out, err = run_command_module(compare_command, argv, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("3 bundle(s) on synthetic(n=4,seed=2000000,512x384), 4 image(s) each")
    header = lines[1].split("  ")
    assert header[0] == "figure" and lines[1].count("defectsam-synthetic") == 3
    row = {line.split("  ")[0]: line for line in lines[2:]}
    assert row["hash (manifest sha256)"].split()[-3:] == [default_hash[:12], default_hash[:12],
                                                           columns[2]["hash"]]
    assert row["precision"].split()[-3:] == ["fp32", "int8", "fp32"]
    thresholds = row["score / uncertain threshold"]
    assert thresholds.count("0.995 / 0.895") == 2 and thresholds.endswith("0.6 / 0.4")
    miou = f"{columns[0]['figures']['miou_fg']:.3f}"
    assert row["mIoU foreground"].split()[-3] == miou
    for name in ("background", "scratch", "dent", "pinhole"):
        assert f"IoU {name}" in row
    assert any(label.startswith("recall scratch width") for label in row)
    assert "FPS (1000 / median ms)" in row

    code, out, err = run_command_module(compare_command, [*argv, "--markdown"], capsys)
    assert code == 0, err
    table = out.splitlines()
    assert table[0] == ("| figure | defectsam-synthetic (fp32) #1 | defectsam-synthetic (int8) | "
                        "defectsam-synthetic (fp32) #3 |")
    assert table[1] == "| --- | ---: | ---: | ---: |"
    assert f"| mIoU foreground | {miou} |" in out
    assert "defectsam-train compare" in table[-1]


def test_compare_matches_classes_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle whose manifest lists the classes in another order is scored on the data by name, by eval and
    compare alike; a class the data has and a bundle lacks is refused before anything runs, naming the bundle."""
    reordered = _copy_default(tmp_path / "reordered")
    _edit_manifest(reordered, lambda f: f.update(classes=["pinhole", "scratch", "dent"]))
    seal_manifest(reordered)
    out_file = tmp_path / "compare.json"
    code, _, err = run_command_module(
        compare_command, ["compare", str(DEFAULT_BUNDLE_DIR), str(reordered), "--precision", "fp32", "--data", DATA,
                          "--limit", "2", "--json", "--out", str(out_file)], capsys,
    )
    assert code == 0, err
    columns = json.loads(out_file.read_text())["bundles"]
    assert [c["report"]["classes"] for c in columns] == [["scratch", "dent", "pinhole"], ["pinhole", "scratch", "dent"]]
    assert all(c["figures"]["n_images"] == 2 and set(c["figures"]["iou"]) == {"background", "scratch", "dent",
                                                                              "pinhole"} for c in columns)
    # The truth is the same for both (the same frames, classes matched by name): so are its size buckets.
    assert columns[0]["figures"]["recall_by_size"].keys() == columns[1]["figures"]["recall_by_size"].keys()
    report = tmp_path / "eval.json"
    code, _, err = run_command_module(
        eval_command, ["eval", "--bundle", str(reordered), "--precision", "fp32", "--data", DATA, "--limit", "2",
                       "--json", str(report)], capsys,
    )
    assert code == 0, err
    assert json.loads(report.read_text())["semantic"] == columns[1]["report"]["semantic"]

    code, out, err = run_command_module(
        compare_command, ["compare", str(DEFAULT_BUNDLE_DIR), str(reordered), "--data",
                          f"{DATA},class_map.dent=bump"], capsys,
    )
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{DEFAULT_BUNDLE_DIR}: " in err and "it has no 'bump'" in err and "class_map" in err


def _figures(iou: dict[str, float | None], sizes: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": "d", "n_images": 2, "good_images": 1, "defective_images": 1, "mode": "windows", "window": 64,
            "miou_fg": 0.5, "miou": 0.6, "iou": iou, "defect_precision": 1.0, "defect_recall": 0.5,
            "iou_threshold": 0.5, "false_reject_rate": None, "false_ng_rate": 0.0, "miss_rate": 0.25,
            "recall_by_size": sizes, "median_ms": 20.0, "fps": 50.0}


def test_the_table_aligns_classes_and_size_buckets_by_name_blank_where_absent() -> None:
    a = Compared("a", "alpha", "1" * 64, "fp32", _figures(
        {"background": 0.99, "scratch": 0.7, "dent": None},
        {"scratch": {"width": {"1-2 px": {"from_px": 1.0, "n": 3, "recall": 0.5}}}}), (0.9, 0.8))
    b = Compared("b", "beta", "2" * 64, "int8", _figures(
        {"background": 0.98, "dent": 0.4, "stain": 0.25},
        {"scratch": {"width": {"0-1 px": {"from_px": 0.0, "n": 2, "recall": 0.0},
                               "1-2 px": {"from_px": 1.0, "n": 3, "recall": 1.0}}},
         "stain": {"diameter": {">= 50 px": {"from_px": 50.0, "n": 1, "recall": 1.0}}}}))
    rows = dict(comparison_rows([a, b]))
    assert rows["IoU scratch"] == ["0.700", None]  # beta has no scratch class: blank
    assert rows["IoU dent"] == ["-", "0.400"]  # alpha has the class, with no figure: "-"
    assert rows["IoU stain"] == [None, "0.250"]
    labels = list(rows)
    assert labels.index("IoU scratch") < labels.index("IoU dent") < labels.index("IoU stain")
    assert rows["recall scratch width 0-1 px (n 2)"] == [None, "0.000"]
    assert rows["recall scratch width 1-2 px (n 3)"] == ["0.500", "1.000"]
    assert labels.index("recall scratch width 0-1 px (n 2)") < labels.index("recall scratch width 1-2 px (n 3)")
    assert rows["recall stain diameter >= 50 px (n 1)"] == [None, "1.000"]
    assert rows["false reject: good judged NG or UNCERTAIN"] == ["-", "-"]
    assert rows["score / uncertain threshold"] == ["0.9 / 0.8", "not calibrated"]
    assert rows["hash (manifest sha256)"] == ["1" * 12, "2" * 12]
    assert rows["FPS (1000 / median ms)"] == ["50.0", "50.0"]
    text = format_text([a, b]).splitlines()
    assert text[0].split() == ["figure", "alpha", "(fp32)", "beta", "(int8)"]
    scratch = next(line for line in text if line.startswith("IoU scratch"))
    assert scratch.split() == ["IoU", "scratch", "0.700"]  # the blank cell leaves nothing behind
    markdown = format_markdown([a, b])
    assert "| IoU scratch | 0.700 |  |" in markdown and "| IoU stain |  | 0.250 |" in markdown


def _sealed_default(tmp_path: Path, name: str, change: Any) -> Path:
    bundle = _copy_default(tmp_path / name)
    _edit_manifest(bundle, change)
    seal_manifest(bundle)
    return bundle


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--data", DATA], "compare: no bundle given"),
        (["{tmp}/nope", "--data", DATA], "nope: bundle directory does not exist"),
        (["{default}", "{edited}", "--data", DATA], "edited/manifest.json: edited since it was written"),
        (["{unsealed}", "--data", DATA], "unsealed/manifest.json: not sealed"),
        (["{old}", "--data", DATA], "old/manifest.json: schema_version 2 is a single-pass bundle"),
        (["{fp32only}@int8", "--data", DATA], "fp32only: precision int8: the bundle has no int8 graphs"),
        (["{fp32only}", "--precision", "int8", "--data", DATA], "the bundle has no int8 graphs"),
        (["{default}@fp16", "--data", DATA], "'fp16' after '@' is not a precision"),
        (["{default}", "--data", "nosuch:test"], "nosuch:test: unknown dataset 'nosuch'"),
        (["{default}", "--data", "synthetic,n=0"], "bad dataset spec"),
        (["{default}", "--data", DATA, "--limit", "0"], "--limit must be at least 1"),
        (["{default}", "--data", DATA, "--out", "{tmp}"], "--out is a directory"),
    ],
)
def test_compare_bad_input_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    places = {"tmp": tmp_path, "default": DEFAULT_BUNDLE_DIR}
    if "{edited}" in argv:
        places["edited"] = _copy_default(tmp_path / "edited")
        _edit_manifest(places["edited"], lambda f: f.update(name="renamed by hand"))
    if "{unsealed}" in argv:
        places["unsealed"] = _copy_default(tmp_path / "unsealed")
        _edit_manifest(places["unsealed"], lambda f: f.pop("manifest_sha256"))
    if "{old}" in argv:
        places["old"] = _copy_default(tmp_path / "old")
        _edit_manifest(places["old"], lambda f: f.update(schema_version=2))
    if any("{fp32only}" in a for a in argv):
        places["fp32only"] = _sealed_default(tmp_path, "fp32only", lambda f: f.pop("variants"))
    filled = [a.format(**places) for a in argv]
    code, out, err = run_command_module(compare_command, ["compare", *filled], capsys)
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and expected in err, err  # one line: refused before any bundle was evaluated
