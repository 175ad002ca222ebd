"""Capped exponential backoff for reconnecting to a lost camera."""

from __future__ import annotations


class Backoff:
    """Delays ``initial, initial*factor, initial*factor**2, ...`` capped at ``maximum``; never gives up.

    ``next()`` returns the delay to wait before the next attempt and advances; ``reset()`` goes back to
    ``initial`` once the camera delivers again. No jitter: one daemon runs a handful of cameras, so
    there is no herd to spread, and deterministic delays are easier to read in logs and tests.
    """

    def __init__(self, initial: float, maximum: float, factor: float = 2.0) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError(f"need 0 < initial <= maximum and factor >= 1, got {initial}, {maximum}, {factor}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._current = initial
        self.attempts = 0  # consecutive failures since the last reset

    def next(self) -> float:
        delay = self._current
        self._current = min(self.maximum, self._current * self.factor)
        self.attempts += 1
        return delay

    def peek(self) -> float:
        """The delay the next call to ``next()`` will return."""
        return self._current

    def reset(self) -> None:
        self._current = self.initial
        self.attempts = 0
