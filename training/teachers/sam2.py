"""SAM 2 as teacher, through Hugging Face transformers' ``Sam2Model``, from a local directory only.

Nothing is downloaded: ``from_pretrained(local_dir, local_files_only=True)``; put a converted
checkpoint (``config.json`` + ``model.safetensors``, e.g. sam2.1-hiera-small saved with
``save_pretrained``) on disk first.

Mapping to the student's grid (input H x W, e.g. 576 x 1024; SAM 2 input S x S, S = 1024):

* Pixels: the student's input is already normalised with SAM's mean/std, which are SAM 2's
  (ImageNet statistics x 255), and its letterbox padding is 0 after normalisation, which is what
  SAM pads with. The image is scaled by ``s = S / max(H, W)`` (bilinear; s = 1 for 576x1024)
  and zero-padded at the right and bottom to S x S, the same top-left letterbox as the runtime.
  Aspect ratio is kept (SAM 2's own predictor stretches to a square; stretching would move
  our stride-16 cells off the teacher's).
* Embedding: SAM 2's last FPN level (256 ch at S/16, plus its "no memory" embedding, as for a
  single image) is cropped to the cells that hold the image, ceil(H*s/16) x ceil(W*s/16); for
  s = 1 that is exactly the student's H/16 x W/16 grid (36 x 64 of 64 x 64). Otherwise it is
  resized bilinearly to H/16 x W/16.
* Prompts: points scale by s. SAM 2 returns 3 multimask outputs at stride 4 of S; the one with
  the highest predicted IoU is kept (as the mobilesam decoder does), cropped to the content and
  resized to the student's input at stride 4 (``mask_stride`` = 4).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.teachers.base import Teacher, TeacherError, TeacherOutput

MASK_STRIDE = 4


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.suffix in {".json", ".safetensors", ".bin"}):
            h.update(path.name.encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def load_sam2(directory: Path | str) -> Any:
    """``Sam2Model`` from a local directory; TeacherError naming it when it cannot be loaded."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise TeacherError(f"{directory}: not a SAM 2 checkpoint directory (no config.json); nothing is downloaded")
    try:
        from transformers import Sam2Model
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise TeacherError(f"the SAM 2 teacher needs transformers (pip install -e '.[train]'): {exc}") from None
    hf_logging.disable_progress_bar()
    try:
        return Sam2Model.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherError(f"{directory}: cannot load SAM 2: {first}") from None


class Sam2Teacher(Teacher):
    def __init__(self, model: Any, *, input_size: tuple[int, int], digest: str, name: str = "sam2") -> None:
        super().__init__()
        self.model = model
        self.input_size = input_size
        config = model.config
        self.image_size = int(config.prompt_encoder_config.image_size)
        self.grid = int(config.vision_config.backbone_feature_sizes[-1][0])
        if self.grid * 16 != self.image_size:
            raise TeacherError(f"{name}: expected an embedding at stride 16 of {self.image_size}, got {self.grid}")
        self.channels = int(config.vision_config.fpn_hidden_size)
        self.mask_stride = MASK_STRIDE
        height, width = input_size
        self.scale = self.image_size / max(height, width)
        self.teacher_id = f"sam2-{digest[:12]}-{height}x{width}"
        self.freeze()

    @classmethod
    def from_directory(cls, directory: Path | str, *, height: int, width: int) -> Sam2Teacher:
        directory = Path(directory)
        model = load_sam2(directory)
        return cls(model, input_size=(height, width), digest=_digest(directory), name=str(directory))

    def _to_sam(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW (normalised, letterboxed) -> Bx3xSxS: scale by s, zero-pad right/bottom."""
        height, width = self.input_size
        if self.scale != 1.0:
            size = (max(1, round(height * self.scale)), max(1, round(width * self.scale)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        pad_h = self.image_size - images.shape[-2]
        pad_w = self.image_size - images.shape[-1]
        return F.pad(images, (0, pad_w, 0, pad_h))

    def _content(self, stride: int) -> tuple[int, int]:
        """Cells of SAM 2's grid at ``stride`` that hold the image (rows, cols)."""
        height, width = self.input_size
        return math.ceil(height * self.scale / stride), math.ceil(width * self.scale / stride)

    def _to_student(self, maps: torch.Tensor, stride: int) -> torch.Tensor:
        """BxCxS/stridexS/stride -> BxCxH/stridexW/stride: crop to the content, resize if s != 1."""
        rows, cols = self._content(stride)
        maps = maps[..., :rows, :cols]
        target = (self.input_size[0] // stride, self.input_size[1] // stride)
        if tuple(maps.shape[-2:]) != target:
            maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        return maps

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(images)
        return list(self.model.get_image_embeddings(self._to_sam(images)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: Bx3xHxW -> BxCtxH/16xW/16."""
        return self._to_student(self._features(images)[-1], 16)

    def predict(self, images: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> TeacherOutput:
        """images: Bx3xHxW, points Mx2, image_index M -> embedding, MxH/4xW/4 logits."""
        features = self._features(images)
        embedding = self._to_student(features[-1], 16)
        height, width = self.input_size
        if points.shape[0] == 0:
            empty = embedding.new_zeros((0, height // MASK_STRIDE, width // MASK_STRIDE))
            return TeacherOutput(embedding=embedding, mask_logits=empty)
        # One prompt set per row: gather each prompt's image features (Bx.. -> Mx..).
        per_prompt = [f.index_select(0, image_index) for f in features]
        coords = (points.to(embedding.dtype) * self.scale).reshape(-1, 1, 1, 2)  # Mx2 -> Mx1x1x2
        labels = torch.ones(coords.shape[:3], dtype=torch.long, device=coords.device)
        out = self.model(image_embeddings=per_prompt, input_points=coords, input_labels=labels, multimask_output=True)
        masks = out.pred_masks[:, 0]  # Mx1x3xS/4xS/4 -> Mx3xS/4xS/4
        best = out.iou_scores[:, 0].argmax(dim=1)  # Mx3 -> M
        logits = masks[torch.arange(masks.shape[0], device=masks.device), best]  # MxS/4xS/4
        logits = self._to_student(logits.unsqueeze(1), MASK_STRIDE).squeeze(1)
        return TeacherOutput(embedding=embedding, mask_logits=logits)

    def save(self, directory: Path | str) -> None:
        """``save_pretrained`` into ``directory`` (after fine-tuning)."""
        self.model.save_pretrained(str(directory))
