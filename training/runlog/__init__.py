"""What a training run leaves in its directory for the engineer who reads it (docs/training.md, "The run directory").

    history.py      the epoch records: results.csv and metrics.jsonl, rewritten atomically each epoch from
                    the list last.pt carries, so a resumed run continues them without a lost or doubled row
    clock.py        epoch time, elapsed time and the run's ETA, for the progress bar and the epoch line
    plots.py        results.png (loss terms, val metrics, learning rate per epoch) and val_overlays.png
                    (a few val samples: image, ground truth, prediction), drawn at the end of a run and by
                    ``defectsam-train plots RUN_DIR``
    tensorboard.py  TensorBoard event files under tensorboard/ when the ``tensorboard`` extra is installed
"""
