"""The reference run: the field report's table reproduced on real defect data, as one command.

    defectsam-train reference --config training/configs/reference/reduced.yaml --out reports/reference

Fine-tune a teacher of the project's own family (or a local SAM 2 checkpoint), cache its outputs,
distill one student per row (the MobileSAM-style transplant, the blog recipe without and with the
cosine feature term, optionally with the judge loop), export and calibrate bundles, add a gated INT8
variant, evaluate every row on the test sets through engines/, time every row's graph on ONNX Runtime
CPU in one run, and write results.json, README.md and the plots. docs/reference.md has the details.

    config.py   the reference config (training/configs/reference/*.yaml)
    driver.py   the steps, each skipped when its output is there
    report.py   results.json and README.md, computed from what the steps left
    plots.py    loss curves, IoU per class, example overlays
    command.py  the ``reference`` subcommand
"""
