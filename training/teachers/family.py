"""A checkpoint of the project's own window segmenters as teacher (e.g. ``teacher_seg`` trained first).

Fully convolutional like the student, on the same windows: its embedding (the neck's stride-16
output) is already on the student's grid, its foreground logit is that of "any defect class"
(training.model.segmenter.foreground_logit), and its neck features have the student's widths
(one family shares the decoder widths), so the transplant recipe can regress them and copy its decoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.bundle import sha256_file
from training.model.build import build_model
from training.model.checkpoint import CheckpointError, load_weights, read_checkpoint
from training.model.segmenter import WindowSegmenter, foreground_logit
from training.teachers.base import Teacher, TeacherOutput


class FamilyTeacher(Teacher):
    has_neck = True

    def __init__(self, model: WindowSegmenter, arch: str, digest: str) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.channels = model.embed_dim
        self.teacher_id = f"family-{arch}-{digest[:12]}"
        self.freeze()

    @classmethod
    def from_checkpoint(cls, path: Path | str, *, num_classes: int) -> FamilyTeacher:
        """Load a trainer or export checkpoint; raises CheckpointError naming the file."""
        payload = read_checkpoint(path)
        arch = payload["arch"]
        config = payload.get("config", {})
        classes = int(config.get("num_classes", num_classes))
        try:
            model = build_model(arch, num_classes=classes)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(path, f"cannot build teacher {arch!r}: {exc}") from None
        load_weights(model, path, arch)
        return cls(model, arch, sha256_file(Path(path)))

    def predict(self, images: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> TeacherOutput:
        """images: Bx3xHxW -> embedding, foreground BxHxW, neck (the prompts are not needed)."""
        out = self.model.run(images)
        return TeacherOutput(embedding=out.embedding, foreground=foreground_logit(out.logits), neck=out.neck)
