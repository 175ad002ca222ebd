"""The one interface every teacher implements, and what it returns.

A teacher sees exactly what the student sees: the normalised window (Bx3xHxW, SAM's mean/std,
the runtime's normalisation). It returns its image embedding on the student's stride-16 grid
(BxCtxH/16xW/16; Ct may differ from the student's, the recipes then map the student with an
EmbeddingAdapter) and its foreground logits at the window's own resolution (BxHxW: the logit of
"any defect" per pixel). A family teacher also returns its neck features (the transplant and KD
SAM recipes regress them). A promptable teacher (SAM 2) is prompted at each ground-truth
instance's interior point and its instance masks are united (max of the logits). How a teacher
gets there (resizing, padding to its own input size) is its own business and documented in its module.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from engines.errors import DefectsamError


class TeacherError(DefectsamError):
    """A teacher that cannot be loaded or does not fit the student."""


@dataclass(frozen=True)
class TeacherOutput:
    """embedding BxCtxH/16xW/16; foreground BxHxW logits; neck [n2, n4, n8, n16] (family teachers) or None."""

    embedding: torch.Tensor
    foreground: torch.Tensor
    neck: list[torch.Tensor] | None = None


class Teacher(nn.Module, abc.ABC):
    """Frozen by default (eval mode, no gradients)."""

    #: Stable identity for the cache: kind and weights digest.
    teacher_id: str
    #: Channels of the embedding (Ct).
    channels: int
    #: Whether ``predict`` returns neck features (family teachers).
    has_neck: bool = False

    @abc.abstractmethod
    def predict(self, images: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> TeacherOutput:
        """images: Bx3xHxW (H, W multiples of 16); points: Mx2 (x, y) pixel centres, one positive point per
        ground-truth instance; image_index: M int64, the image of each point (a promptable teacher's
        prompts; a family teacher ignores them)."""

    def freeze(self) -> Teacher:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self
