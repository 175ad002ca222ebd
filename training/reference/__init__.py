"""The reference run: the field report's table reproduced on NEU-Seg, as one command.

    defectsam-train reference --config training/configs/reference/reduced.yaml --out reports/reference

Train a teacher of the project's family (teacher_seg, supervised, long enough that its validation
curve is flat), cache its outputs, train one student per row (supervised baseline, the
MobileSAM-style transplant, the blog recipe without and with the cosine feature term), export and
calibrate bundles (no finder: they inspect whole images), add a gated INT8 variant, evaluate every
row on the test sets through engines/ in inspection mode whole (semantic foreground mIoU, per-class
IoU, defect precision/recall, image-level rates), time every row on ONNX Runtime CPU in one run,
and write results.json, README.md and the plots. docs/reference.md has the details.

    config.py      the reference config (training/configs/reference/*.yaml)
    driver.py      the steps, each skipped when its output is there
    thresholds.py  the calibrate step: the score threshold chosen on val in inspection mode whole
    bench.py       the bench step: whole images and windows, every row in one run
    report.py      results.json and the reading, computed from what the steps left
    markdown.py    README.md from results.json
    plots.py       training curves, the teacher's val curve, IoU per class, example overlays
    command.py     the ``reference`` subcommand
"""
