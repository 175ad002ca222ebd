"""Fine-tuning a teacher on labelled defects: dice + BCE of its masks against ground truth.

A family teacher (``teacher.kind: family``) is trained by the ordinary trainer with the
``supervised`` recipe (its saliency head too); see ``family_finetune_config``. A SAM 2 teacher
has its mask decoder trained here (the image encoder stays frozen: it is the part worth
distilling, and the part too large to fine-tune on a few hundred images), and the result is
written with ``save_pretrained`` to ``<out>/sam2`` (a temporary directory renamed into place),
ready to be the ``teacher.checkpoint`` of a distillation run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from engines.atomic import replace_dir
from training.config import TrainConfig
from training.data.prepare import PreparedDataset, collate
from training.losses import dice_loss, focal_mask_loss, upsample_logits
from training.model.checkpoint import read_checkpoint
from training.teachers.base import TeacherError


def family_finetune_config(config: TrainConfig) -> TrainConfig:
    """The trainer config that fine-tunes a family teacher: its arch, its weights, recipe supervised."""
    teacher = config.teacher
    if teacher is None or teacher.kind != "family":
        raise TeacherError("finetune-teacher: this is for teacher.kind family")
    arch = teacher.arch
    if teacher.checkpoint is not None:
        found = read_checkpoint(teacher.checkpoint)["arch"]
        if arch is not None and arch != found:
            raise TeacherError(f"teacher.arch is {arch!r} but {teacher.checkpoint} holds {found!r}")
        arch = found
    if arch is None:
        raise TeacherError("teacher.arch: name the registry model to train as teacher (e.g. teacher_cnn)")
    model = config.model.model_copy(update={"arch": arch, "init": teacher.checkpoint})
    recipe = config.recipe.model_copy(update={"name": "supervised"})
    return config.model_copy(update={"model": model, "recipe": recipe, "teacher": None})


def finetune_sam2(config: TrainConfig, log: Any = None) -> Path:
    """Train a SAM 2 teacher's mask decoder with dice + BCE on ground truth; returns ``<out>/sam2``."""
    from training.teachers.sam2 import Sam2Teacher
    from training.trainer import flatten_prompts, load_datasets

    say = log or (lambda message: print(message, file=sys.stderr))
    assert config.teacher is not None and config.teacher.checkpoint is not None
    torch.manual_seed(config.seed)
    train, _, classes = load_datasets(config)
    m = config.model
    teacher = Sam2Teacher.from_directory(config.teacher.checkpoint, height=m.height, width=m.width)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device)
    decoder = teacher.model.mask_decoder
    decoder.requires_grad_(True)
    schedule = config.schedule
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    data = PreparedDataset(
        train, height=m.height, width=m.width, num_classes=len(classes), train=True, augment=config.data.augment,
        seed=config.seed,
    )
    loader = torch.utils.data.DataLoader(
        data, batch_size=config.schedule.batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )
    step = 0
    for epoch in range(config.schedule.epochs):
        data.set_epoch(epoch)
        decoder.train()
        total, batches = 0.0, 0
        for raw in loader:
            batch = {k: v.to(device) for k, v in raw.items()}
            flatten_prompts(batch)
            if batch["prompts"].shape[0] == 0:
                continue
            logits = teacher.predict(batch["image"], batch["prompts"], batch["image_index"]).mask_logits
            gt = batch["targets"].float()
            full = upsample_logits(logits, (gt.shape[-2], gt.shape[-1]))
            recipe = config.recipe
            loss = recipe.focal_weight * focal_mask_loss(full, gt) + recipe.dice_weight * dice_loss(full, gt)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            step += 1
            if config.schedule.max_steps and step >= config.schedule.max_steps:
                break
        say(f"epoch {epoch + 1}  step {step}  train_loss {total / max(1, batches):.4f}")
        if config.schedule.max_steps and step >= config.schedule.max_steps:
            break
    return _save_pretrained(teacher, config.out / "sam2")


def _save_pretrained(teacher: Any, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        teacher.eval()
        teacher.save(tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
