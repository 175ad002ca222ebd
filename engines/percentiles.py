"""The one percentile of the project: every p50/p95/p99 the API, the metrics and the benches print.

``quantile`` interpolates linearly between the two nearest ranks (NumPy's default ``linear`` method,
Hyndman & Fan type 7, what Prometheus' ``histogram_quantile`` approximates), so a number in
``/api/status``, in ``defectsam bench plc`` and in ``bench report`` is the same number when the samples
are the same. ``LatencyLog`` is the bounded, thread-safe record of samples those read, with a cursor so
that a bench measures its own window without clearing the daemon's record.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from collections.abc import Iterable


def quantile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of ``values``, linear between closest ranks; None when there are none."""
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"quantile q must be within [0, 1], got {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def quantile_ms(seconds: Iterable[float], q: float, digits: int = 2) -> float | None:
    """``quantile`` of samples in seconds, in milliseconds rounded to ``digits``."""
    value = quantile(seconds, q)
    return None if value is None else round(value * 1000.0, digits)


class LatencyLog:
    """The last ``keep`` samples (seconds) and how many were ever added; appended from one thread, read by any."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._samples: collections.deque[float] = collections.deque(maxlen=keep)
        self._added = 0
        self._lock = threading.Lock()

    def append(self, seconds: float) -> None:
        with self._lock:
            self._samples.append(seconds)
            self._added += 1

    def cursor(self) -> int:
        """A mark: ``since(mark)`` returns the samples added after it."""
        with self._lock:
            return self._added

    def since(self, mark: int) -> list[float]:
        """The samples added after ``mark`` that are still kept (all of them unless more than ``keep`` came)."""
        with self._lock:
            wanted = min(self._added - mark, len(self._samples))
            newest_first = list(itertools.islice(reversed(self._samples), max(wanted, 0)))  # O(wanted), not O(keep)
            return newest_first[::-1]

    def recent(self) -> list[float]:
        """The samples kept, oldest first."""
        with self._lock:
            return list(self._samples)

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)
