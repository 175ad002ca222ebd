"""Epoch time, elapsed time and the run's ETA.

The ETA is what is left of the current epoch (its steps left at this epoch's mean step time) plus the
epochs left at the mean epoch time of the epochs done (validation and checkpoints included); before
the first epoch of an invocation ends, an epoch is estimated as its steps at the current step time.
``max_steps`` caps the epochs left as it caps the run.
"""

from __future__ import annotations

import math
import time


def format_duration(seconds: float) -> str:
    """'42 s', '7 min 05 s', '3 h 12 min'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class RunClock:
    """Times the epochs of one invocation of a run.

    ``epochs`` and ``steps_per_epoch`` describe the whole run, ``total_steps`` is its last step (max_steps
    or epochs x steps); ``elapsed_before`` and ``epoch_seconds`` are what a resumed run already spent.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, total_steps: int, *, elapsed_before: float = 0.0,
                 epoch_seconds: list[float] | None = None) -> None:
        self.epochs = epochs
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = total_steps
        self.elapsed_before = elapsed_before
        self.previous = list(epoch_seconds or [])  # epochs of earlier invocations: used until one of ours ends
        self.done: list[float] = []
        self.started = time.monotonic()
        self.epoch_started = self.started
        self.epoch = 0
        self.step_at_epoch_start = 0

    def start_epoch(self, epoch: int, step: int) -> None:
        """``epoch``: 0-based; ``step``: the global step it starts at."""
        self.epoch = epoch
        self.step_at_epoch_start = step
        self.epoch_started = time.monotonic()

    def end_epoch(self) -> float:
        """Seconds of the epoch just ended (kept for the mean)."""
        seconds = time.monotonic() - self.epoch_started
        self.done.append(seconds)
        return seconds

    @property
    def elapsed(self) -> float:
        """Training seconds of the run, earlier invocations included."""
        return self.elapsed_before + time.monotonic() - self.started

    def _epochs_after(self, epoch: int) -> int:
        """Whole epochs the run still trains after ``epoch`` (0-based)."""
        last = min(self.epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        return max(0, last - epoch - 1)

    def eta(self, step: int) -> float:
        """Seconds to the end of the run, at global ``step`` inside the current epoch."""
        in_epoch = step - self.step_at_epoch_start
        spent = time.monotonic() - self.epoch_started
        epoch_end = min(self.total_steps, self.step_at_epoch_start + self.steps_per_epoch)
        per_step = spent / in_epoch if in_epoch else 0.0
        current_left = per_step * max(0, epoch_end - step)
        history = self.done or self.previous
        per_epoch = sum(history) / len(history) if history else per_step * self.steps_per_epoch
        return current_left + per_epoch * self._epochs_after(self.epoch)

    def eta_after_epoch(self) -> float:
        """Seconds to the end of the run once the current epoch has ended."""
        history = self.done or self.previous
        per_epoch = sum(history) / len(history) if history else 0.0
        return per_epoch * self._epochs_after(self.epoch)
