"""A checkpoint of the project's own model family as teacher (e.g. ``teacher_vit`` trained first).

It is rebuilt at the student's input size (only the prompt encoder's grid depends on it, and it
has no weights), so its embedding is already on the student's grid: 256 channels at stride 16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engines.bundle import sha256_file
from training.model.build import build_model
from training.model.checkpoint import CheckpointError, load_weights, read_checkpoint
from training.model.segmenter import DefectSegmenter
from training.teachers.base import Teacher, TeacherOutput


class FamilyTeacher(Teacher):
    def __init__(self, model: DefectSegmenter, arch: str, digest: str) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.input_size = model.input_size
        self.channels = 256
        self.mask_stride = model.mask_stride
        height, width = self.input_size
        self.teacher_id = f"family-{arch}-{digest[:12]}-{height}x{width}"
        self.freeze()

    @classmethod
    def from_checkpoint(
        cls, path: Path | str, *, height: int, width: int, num_classes: int, k: int = 1
    ) -> FamilyTeacher:
        """Load a trainer or export checkpoint; raises CheckpointError naming the file."""
        payload = read_checkpoint(path)
        arch = payload["arch"]
        config = payload.get("config", {})
        classes = int(config.get("num_classes", num_classes))
        try:
            model = build_model(arch, height=height, width=width, num_classes=classes, k=k)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(path, f"cannot build teacher {arch!r}: {exc}") from None
        load_weights(model, path, arch)
        return cls(model, arch, sha256_file(Path(path)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW -> Bx256xH/16xW/16."""
        self.check_input(images)
        return self.model.embed(images)[0]

    def predict(self, images: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> TeacherOutput:
        """images: Bx3xHxW, points Mx2, image_index M -> embedding, MxH/sxW/s logits."""
        self.check_input(images)
        embedding, skip = self.model.embed(images)
        logits = decode_points(self.model, embedding, skip, points, image_index)
        return TeacherOutput(embedding=embedding, mask_logits=logits)


def decode_points(
    model: DefectSegmenter,
    embedding: torch.Tensor,
    skip: torch.Tensor | None,
    points: torch.Tensor,
    image_index: torch.Tensor,
) -> torch.Tensor:
    """One single-positive-point prompt per row: embedding Bx256xhxw, points Mx2, image_index M
    -> mask logits MxH/sxW/s (M may be 0)."""
    height, width = model.input_size
    s = model.mask_stride
    if points.shape[0] == 0:
        return embedding.new_zeros((0, height // s, width // s))
    coords = points.reshape(-1, 1, 2).to(embedding.dtype)  # Mx2 -> Mx1x2
    labels = torch.ones(coords.shape[0], 1, dtype=embedding.dtype, device=embedding.device)
    # The decoder takes one embedding per prompt set: gather each prompt's image (Bx.. -> Mx..).
    per_prompt = embedding.index_select(0, image_index)
    per_skip = skip.index_select(0, image_index) if model.mask_decoder.uses_skip and skip is not None else None
    logits, _ = model.decode(per_prompt, per_skip, coords, labels)
    return logits
