"""TensorBoard event files of a run (``OUT/tensorboard/``), when the ``tensorboard`` extra is installed.

Every numeric value of an epoch record is a scalar at that epoch, its tag the record's key with the
first underscore made a slash (``train_loss`` -> ``train/loss``, ``val_miou_fg`` -> ``val/miou_fg``);
the val overlays are an image at the run's last epoch. A run opens the directory with ``purge_step``
at its first new epoch, so epochs written after the checkpoint it resumes from (a crash between the
two), or by the run a ``--fresh`` one starts over, are discarded by TensorBoard, not shown twice.

    tensorboard --logdir runs/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIRECTORY = "tensorboard"
INSTALL_HINT = "pip install -e '.[tensorboard]'"


def tag(key: str) -> str:
    head, sep, rest = key.partition("_")
    return f"{head}/{rest}" if sep and head in ("train", "val") else key


class EventLog:
    """One SummaryWriter, or nothing when tensorboard is not installed (said once through ``log``)."""

    def __init__(self, out: Path, first_epoch: int, log: Any) -> None:
        self.writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises it when the tensorboard package is missing
            log(f"tensorboard is not installed: no event files ({INSTALL_HINT} for them); results.csv and "
                "results.png have every value")
            return
        self.writer = SummaryWriter(str(out / DIRECTORY), purge_step=first_epoch)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), float(value), epoch)
        self.writer.flush()

    def image(self, name: str, bgr: np.ndarray, epoch: int) -> None:
        """An HxWx3 uint8 BGR image (the PNG's pixels) at ``epoch``."""
        if self.writer is None:
            return
        self.writer.add_image(name, np.ascontiguousarray(bgr[..., ::-1]), epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
