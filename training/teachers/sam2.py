"""SAM 2 as teacher, through Hugging Face transformers' ``Sam2Model``, from a local directory only.

Nothing is downloaded: ``from_pretrained(local_dir, local_files_only=True)``; put a converted
checkpoint (``config.json`` + ``model.safetensors``, e.g. sam2.1-hiera-small saved with
``save_pretrained``) on disk first.

Mapping to the student's window (H x W, e.g. 160 x 160; SAM 2 input S x S, S = 1024):

* Pixels: the window is normalised with SAM's mean/std, which are SAM 2's (ImageNet statistics
  x 255). It is scaled by ``s = S / max(H, W)`` (bilinear) and zero-padded at the right and
  bottom to S x S, keeping its aspect ratio (SAM 2's own predictor stretches to a square).
* Embedding: SAM 2's last FPN level (256 ch at S/16) is cropped to the cells that hold the
  window, ceil(H*s/16) x ceil(W*s/16), and resized bilinearly to the student's H/16 x W/16 grid.
* Prompts: one positive point per ground-truth instance (its interior point), scaled by s.
  SAM 2 returns 3 multimask outputs at stride 4 of S; the one with the highest predicted IoU is
  kept, cropped to the content and resized to H x W. An image's foreground logits are the
  maximum over its instances' mask logits (``NO_DEFECT_LOGIT`` where it has none): SAM 2 is
  class-agnostic, so it teaches where the defects are and the ground truth teaches their class.
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
NO_DEFECT_LOGIT = -20.0  # the foreground logit of an image without instances


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
    def __init__(self, model: Any, *, digest: str, name: str = "sam2") -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.image_size = int(config.prompt_encoder_config.image_size)
        self.grid = int(config.vision_config.backbone_feature_sizes[-1][0])
        if self.grid * 16 != self.image_size:
            raise TeacherError(f"{name}: expected an embedding at stride 16 of {self.image_size}, got {self.grid}")
        self.channels = int(config.vision_config.fpn_hidden_size)
        self.teacher_id = f"sam2-{digest[:12]}"
        self.freeze()

    @classmethod
    def from_directory(cls, directory: Path | str) -> Sam2Teacher:
        directory = Path(directory)
        model = load_sam2(directory)
        return cls(model, digest=_digest(directory), name=str(directory))

    def _scale(self, images: torch.Tensor) -> float:
        return self.image_size / max(images.shape[-2], images.shape[-1])

    def _to_sam(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW (normalised) -> Bx3xSxS: scale by s, zero-pad right/bottom."""
        height, width = images.shape[-2:]
        scale = self._scale(images)
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        pad_h = self.image_size - images.shape[-2]
        pad_w = self.image_size - images.shape[-1]
        return F.pad(images, (0, pad_w, 0, pad_h))

    @staticmethod
    def _to_window(
        maps: torch.Tensor, stride: int, window: tuple[int, int], out: tuple[int, int], scale: float
    ) -> torch.Tensor:
        """BxCxS/stridexS/stride -> BxCx``out``: crop to the cells holding the ``window`` (H x W px), resize."""
        rows, cols = math.ceil(window[0] * scale / stride), math.ceil(window[1] * scale / stride)
        return F.interpolate(maps[..., :rows, :cols], size=out, mode="bilinear", align_corners=False)

    def predict(self, images: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> TeacherOutput:
        """images: Bx3xHxW, points Mx2, image_index M -> embedding BxCtxH/16xW/16, foreground BxHxW."""
        height, width = images.shape[-2:]
        scale = self._scale(images)
        features = list(self.model.get_image_embeddings(self._to_sam(images)))
        embedding = self._to_window(features[-1], 16, (height, width), (height // 16, width // 16), scale)
        foreground = images.new_full((images.shape[0], height, width), NO_DEFECT_LOGIT)
        if points.shape[0] == 0:
            return TeacherOutput(embedding=embedding, foreground=foreground)
        # One prompt set per row: gather each prompt's image features (Bx.. -> Mx..).
        per_prompt = [f.index_select(0, image_index) for f in features]
        coords = (points.to(embedding.dtype) * scale).reshape(-1, 1, 1, 2)  # Mx2 -> Mx1x1x2
        labels = torch.ones(coords.shape[:3], dtype=torch.long, device=coords.device)
        out = self.model(image_embeddings=per_prompt, input_points=coords, input_labels=labels, multimask_output=True)
        masks = out.pred_masks[:, 0]  # Mx1x3xS/4xS/4 -> Mx3xS/4xS/4
        best = out.iou_scores[:, 0].argmax(dim=1)  # Mx3 -> M
        logits = masks[torch.arange(masks.shape[0], device=masks.device), best]  # MxS/4xS/4
        logits = self._to_window(logits.unsqueeze(1), MASK_STRIDE, (height, width), (height, width), scale)[:, 0]
        for i in range(images.shape[0]):
            mine = logits[image_index == i]
            if mine.shape[0]:
                foreground[i] = mine.max(dim=0).values
        return TeacherOutput(embedding=embedding, foreground=foreground)

    def save(self, directory: Path | str) -> None:
        """``save_pretrained`` into ``directory`` (after fine-tuning)."""
        self.model.save_pretrained(str(directory))
