"""Errors the runtime raises for bad input. The CLI prints them as one line and exits with 2."""

from __future__ import annotations

from pathlib import Path


class DefectsamError(Exception):
    """A problem with something the user gave us (a file, a flag, a config value).

    ``str(error)`` is one line that names the thing and the cause.
    """


class BundleError(DefectsamError):
    """An engine bundle that cannot be used: missing, malformed, tampered with, or inconsistent."""

    def __init__(self, path: Path | str, cause: str) -> None:
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class InputImageError(DefectsamError):
    """An image that cannot be read or does not fit the engine."""

    def __init__(self, path: Path | str, cause: str) -> None:
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class BackendUnavailableError(DefectsamError):
    """A backend whose optional package or hardware is missing."""


class FrameGeometryError(DefectsamError):
    """A frame the bundle cannot inspect as configured: smaller than a window or the find pass's input."""
