"""Teachers behind one interface (``Teacher``): the project's own family and SAM 2; their disk cache."""

from __future__ import annotations

from training.config import TeacherConfig
from training.teachers.base import Teacher, TeacherError, TeacherOutput

__all__ = ["Teacher", "TeacherError", "TeacherOutput", "build_teacher"]


def build_teacher(config: TeacherConfig, *, num_classes: int) -> Teacher:
    """Load the configured teacher (frozen, CPU)."""
    if config.checkpoint is None:
        raise TeacherError("teacher.checkpoint: a teacher needs its checkpoint (file for family, directory for sam2)")
    if config.kind == "family":
        from training.teachers.family import FamilyTeacher

        return FamilyTeacher.from_checkpoint(config.checkpoint, num_classes=num_classes)
    from training.teachers.sam2 import Sam2Teacher

    return Sam2Teacher.from_directory(config.checkpoint)
