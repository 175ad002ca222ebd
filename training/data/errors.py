"""The error every dataset reader raises for bad input: one line naming the file and the cause."""

from __future__ import annotations

from pathlib import Path

from engines.errors import DefectsamError


class DatasetError(DefectsamError):
    """A dataset that cannot be read: a missing split file, a mask that does not fit its image, no samples."""

    def __init__(self, path: Path | str, cause: str) -> None:
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")
