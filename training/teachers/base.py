"""The one interface every teacher implements, and what it returns.

A teacher sees exactly what the student sees: the normalised, letterboxed input image
(Bx3xHxW, SAM's mean/std, padding 0) and point prompts in input pixels. It returns its image
embedding on the student's grid (BxCtxH/16xW/16; Ct may differ from the student's 256, the
recipes then map the student with an EmbeddingAdapter) and one mask-logit map per prompt on the
input's grid at the teacher's ``mask_stride``. How a teacher gets there (resizing, padding to
its own input size) is its own business and documented in its module.
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
    """embedding BxCtxhxw (h = H/16, w = W/16); mask_logits MxH/sxW/s, one per prompt (s = mask_stride)."""

    embedding: torch.Tensor
    mask_logits: torch.Tensor


class Teacher(nn.Module, abc.ABC):
    """Frozen by default (eval mode, no gradients); fine-tuning unfreezes what it trains."""

    #: Stable identity for the cache: kind, weights digest and input size.
    teacher_id: str
    #: Channels of the embedding (Ct).
    channels: int
    #: Stride of the mask logits relative to the student's input.
    mask_stride: int
    #: The student's input size (H, W) this teacher was set up for.
    input_size: tuple[int, int]

    @abc.abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW -> embedding BxCtxH/16xW/16."""

    @abc.abstractmethod
    def predict(self, images: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> TeacherOutput:
        """images: Bx3xHxW; points: Mx2 (x, y) input pixels, one positive point per prompt;
        image_index: M int64, the image of each prompt. Returns the embedding and MxH/sxW/s logits.
        """

    def check_input(self, images: torch.Tensor) -> None:
        if tuple(images.shape[-2:]) != self.input_size:
            raise TeacherError(
                f"teacher {self.teacher_id} was set up for {self.input_size[0]}x{self.input_size[1]} inputs, "
                f"got {images.shape[-2]}x{images.shape[-1]}"
            )

    def freeze(self) -> Teacher:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self
