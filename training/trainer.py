"""One training loop for every recipe and both models: single process, or under torchrun with no code change.

    python -m training.cli train --config cfg.yaml                       # one process
    torchrun --nproc_per_node 2 -m training.cli train --config cfg.yaml  # DDP (gloo on CPU, NCCL on GPUs)

A window segmenter (``model.arch`` student_seg, teacher_seg) trains on 1:1 windows of its data
with the configured recipe and is validated by semantic foreground mIoU; a finder
(``model.arch`` finder) trains on reduced 4 MP frames with the cell focal loss and is validated
by the average precision of its cells.

The device is chosen automatically (``cuda:LOCAL_RANK`` when CUDA is there, else CPU); autocast
(bf16, or fp16 with a gradient scaler) runs on CUDA only. Rank 0 alone writes: ``last.pt`` after
every epoch, ``best.pt`` when the validation metric improves, the resolved ``config.yaml``, the
epoch records (``results.csv``, ``metrics.jsonl``: training.runlog.history), TensorBoard events when
tensorboard is installed, and at the end ``results.png`` and ``val_overlays.png`` (training.runlog).
Checkpoints hold model, optimizer, scheduler, epoch, step, config and the epoch records, go to a
temporary name and are renamed into place, so a crash never leaves a partial file where a good
one was. A run directory that holds ``last.pt`` is resumed from it. The progress bar and the epoch
line give the epoch's time, the run's elapsed time and its ETA (training.runlog.clock).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from engines.atomic import write_text_atomic
from training.config import TrainConfig
from training.data.find import collate_find
from training.data.registry import MergedDataset, build_dataset, build_find_dataset
from training.data.sample import SampleDataset
from training.data.windows import WindowDataset, WindowExample, collate_windows, orient_tensor
from training.losses import focal_cell_loss
from training.model.build import build_finder, build_model, class_head_names
from training.model.checkpoint import CheckpointError, load_weights, save_checkpoint
from training.model.finder import CandidateFinder
from training.model.segmenter import WindowSegmenter
from training.recipes import Recipe, build_recipe
from training.runlog.clock import RunClock, format_duration
from training.runlog.history import RunHistory
from training.runlog.plots import OVERLAYS_PNG, write_run_plots
from training.runlog.tensorboard import EventLog
from training.teachers import Teacher, build_teacher
from training.teachers.cache import CacheError, TeacherCache, build_cache, open_cache

LAST = "last.pt"
BEST = "best.pt"


# -- processes and devices ------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_runtime() -> Runtime:
    """Join torchrun's process group when launched by it (RANK/WORLD_SIZE set); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device, precision: str) -> tuple[AbstractContextManager[Any], bool]:
    """(autocast context, needs a gradient scaler). CPU always runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext(), False
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.bfloat16), False
    return torch.autocast("cuda", dtype=torch.float16), True


# -- data -------------------------------------------------------------------------------------------
def load_datasets(config: TrainConfig) -> tuple[Any, Any, list[str]]:
    """Training and validation sets (SampleDataset) sharing one class list (config.data.classes or the union)."""
    train: Any = build_dataset(config.data.train)
    val: Any = build_dataset(config.data.val) if config.data.val else None
    classes = list(config.data.classes or dict.fromkeys([*train.class_names, *(val.class_names if val else ())]))
    if list(train.class_names) != classes:
        train = MergedDataset([train], classes)
    if val is not None and list(val.class_names) != classes:
        val = MergedDataset([val], classes)
    return train, val, classes


class WithTeacherTargets(Dataset[tuple[WindowExample, torch.Tensor, torch.Tensor]]):
    """Training windows paired with their cached teacher outputs, cropped and turned as the window was."""

    def __init__(self, windows: WindowDataset, cache: TeacherCache) -> None:
        self.windows = windows
        self.cache = cache

    def __len__(self) -> int:
        return len(self.windows)

    def set_epoch(self, epoch: int) -> None:
        self.windows.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[WindowExample, torch.Tensor, torch.Tensor]:
        example = self.windows[index]
        cached = self.cache.get(example.source)
        crop = example.crop
        size = crop.size or example.label.shape[0]
        foreground = cached.foreground[crop.y : crop.y + size, crop.x : crop.x + size]
        embedding = cached.embedding[:, crop.y // 16 : (crop.y + size) // 16, crop.x // 16 : (crop.x + size) // 16]
        if foreground.shape != example.label.shape:
            raise CacheError(
                f"{self.cache.path}: cached outputs of {example.source!r} are {tuple(cached.foreground.shape)}, "
                f"too small for its window at ({crop.x}, {crop.y}) (the data changed): delete the cache and run "
                "cache-teacher again"
            )
        return example, orient_tensor(foreground, crop), orient_tensor(embedding, crop)


def collate_with_targets(items: list[tuple[WindowExample, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = collate_windows([example for example, _, _ in items])
    batch["teacher_foreground"] = torch.stack([fg for _, fg, _ in items])
    batch["teacher_embedding"] = torch.stack([emb for _, _, emb in items])
    return batch


def ensure_cache(
    config: TrainConfig, teacher: Teacher, train: SampleDataset, classes: list[str], runtime: Runtime, log: Any
) -> TeacherCache:
    """Rank 0 computes what the cache lacks; every rank then opens it."""
    assert config.teacher is not None and config.teacher.cache is not None
    root = config.teacher.cache
    if runtime.is_main:
        sources = [train[i].source for i in range(len(train))]
        cache = open_cache(root, teacher.teacher_id)
        missing = sources if cache is None else cache.missing(sources)
        if missing:
            log(f"teacher cache: computing {len(missing)} of {len(sources)} samples for {teacher.teacher_id}")
            cache_teacher(config, teacher, train, classes, runtime.device)
    runtime.barrier()
    cache = open_cache(root, teacher.teacher_id)
    if cache is None:
        raise CacheError(f"{root}: no cache for {teacher.teacher_id}")
    return cache


def cache_teacher(
    config: TrainConfig, teacher: Teacher, samples: SampleDataset, classes: list[str], device: torch.device,
    progress: Any = None,
) -> TeacherCache:
    """Write (or extend) the cache of ``teacher`` for every sample of ``samples`` (whole, padded, un-augmented)."""
    assert config.teacher is not None and config.teacher.cache is not None
    whole = WindowDataset(samples, window=config.model.window, train=False, num_classes=len(classes))
    sources = [samples[i].source for i in range(len(samples))]
    return build_cache(
        config.teacher.cache, teacher, whole.__getitem__, sources,
        batch_size=config.teacher.batch_size, device=device, progress=progress,
    )


# -- checkpoints ------------------------------------------------------------------------------------
def save_training_checkpoint(
    path: Path, model: nn.Module, recipe: Recipe | None, arch: str, state: dict[str, Any]
) -> Path:
    """{"arch", "config", "model"} (export-compatible) + adapter, optimizer, scheduler, counters, config."""
    adapter = recipe.adapter.state_dict() if recipe is not None and recipe.adapter is not None else None
    return save_checkpoint(path, arch, model, adapter=adapter, **state)


class _FinderLoss(nn.Module):
    """The finder's step: the cell focal loss (the recipe of a finder run)."""

    def __init__(self, model: CandidateFinder) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = focal_cell_loss(self.model(batch["image"]), batch["cells"])
        return loss, {"focal": loss}


def add_teacher_targets(batch: dict[str, Any], teacher: Teacher, amp: Any) -> None:
    """The teacher's outputs for the batch's windows, computed now (no cache): prompts at each instance."""
    from training.teachers.cache import instance_points

    points: list[tuple[float, float]] = []
    index: list[int] = []
    for j, label in enumerate(batch["label"].cpu().numpy()):
        mine = instance_points(label)
        points.extend(mine)
        index.extend([j] * len(mine))
    device = batch["image"].device
    with torch.no_grad(), amp:
        out = teacher.predict(
            batch["image"], torch.tensor(points, dtype=torch.float32, device=device).reshape(-1, 2),
            torch.tensor(index, dtype=torch.int64, device=device),
        )
    batch["teacher_embedding"] = out.embedding.float()
    batch["teacher_foreground"] = out.foreground.float()
    if out.neck is not None:
        batch["teacher_neck"] = [n.float() for n in out.neck]


def _lr_lambda(total: int, warmup: int, min_ratio: float) -> Any:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- the loop ---------------------------------------------------------------------------------------
def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar updated by hand (its postfix carries the run's ETA), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def validate_segmenter(
    model: WindowSegmenter, val: SampleDataset, classes: list[str], limit: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Semantic metrics (training.eval.semantic) of ``model`` on whole, padded samples of ``val``."""
    from training.data.registry import evenly_spaced
    from training.eval.semantic import ConfusionMatrix

    device = device or torch.device("cpu")
    whole = WindowDataset(val, train=False, num_classes=len(classes))
    matrix = ConfusionMatrix(len(classes))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in evenly_spaced(len(whole), limit):
            example = whole[i]
            logits = model(torch.from_numpy(example.image)[None].to(device))
            matrix.add(example.label, logits[0].argmax(0).cpu().numpy())
    model.train(was_training)
    return matrix.summary(classes)


def validate_finder(model: CandidateFinder, val: Any, limit: int | None = None,
                    device: torch.device | None = None) -> dict[str, Any]:
    """Average precision of the finder's cells over whole frames, and cell recall at probability 0.3 and 0.5."""
    from training.data.registry import evenly_spaced

    device = device or torch.device("cpu")
    scores: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in evenly_spaced(len(val), limit):
            example = val[i]
            probs = torch.sigmoid(model(torch.from_numpy(example.image)[None].to(device)))[0, 0].cpu().numpy()
            scores.append(probs.ravel())
            targets.append(example.cells[0].ravel())
    model.train(was_training)
    score, target = np.concatenate(scores), np.concatenate(targets) > 0.5
    order = np.argsort(-score, kind="stable")
    hits = target[order]
    positives = int(hits.sum())
    if positives == 0:
        return {"ap": None, "recall_0.3": None, "recall_0.5": None, "cells": int(score.size)}
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    ap = float((precision * hits).sum() / positives)
    return {
        "ap": round(ap, 6),
        "recall_0.3": round(float((score[target] >= 0.3).mean()), 6),
        "recall_0.5": round(float((score[target] >= 0.5).mean()), 6),
        "positive_share_0.3": round(float((score >= 0.3).mean()), 6),
        "cells": int(score.size),
    }


def _validate(model: nn.Module, val: Any, classes: list[str], config: TrainConfig, train_loss: float,
              device: torch.device) -> dict[str, Any]:
    """Validation metrics; ``score`` is what picks best.pt (higher is better)."""
    if val is None or config.eval.metric == "loss":
        return {"score": -train_loss}
    if isinstance(model, CandidateFinder):
        metrics = validate_finder(model, val, config.eval.limit, device)
        value = metrics.get("ap")
    else:
        summary = validate_segmenter(model, val, classes, config.eval.limit, device)  # type: ignore[arg-type]
        metrics = {"miou_fg": summary["miou_fg"], "miou": summary["miou"], "aacc": summary["aacc"],
                   **{f"iou_{k}": v for k, v in summary["iou"].items()}}
        value = summary["miou_fg"]
    metrics["score"] = float(value) if isinstance(value, int | float) else -train_loss
    return metrics


def train(config: TrainConfig, *, fresh: bool = False, log: Any = None) -> dict[str, Any]:
    """Run (or resume) the training run of ``config``; returns the final summary (rank 0)."""
    runtime = setup_runtime()
    try:
        return _train(config, runtime, fresh=fresh, log=log)
    finally:
        teardown_runtime(runtime)


def _train(config: TrainConfig, runtime: Runtime, *, fresh: bool, log: Any) -> dict[str, Any]:
    def say(message: str) -> None:
        if runtime.is_main:
            (log or (lambda m: print(m, file=sys.stderr)))(message)

    out = config.out
    sched = config.schedule
    torch.manual_seed(config.seed)
    m = config.model
    teacher: Teacher | None = None
    cache: TeacherCache | None = None
    recipe: Recipe | None = None
    dataset: Any
    val_data: Any
    collate_fn: Any
    model: nn.Module
    if config.task == "find":
        classes = ["defect"]
        model = build_finder(m.arch)
        dataset = build_find_dataset(config.data.train, crop=m.window, train=True, seed=config.seed)
        val_data = build_find_dataset(config.data.val, crop=None, train=False) if config.data.val else None
        collate_fn = collate_find
    else:
        train_samples, val_data, classes = load_datasets(config)
        model = build_model(m.arch, num_classes=len(classes))
        if config.teacher is not None and config.recipe.name != "supervised":
            teacher = build_teacher(config.teacher, num_classes=len(classes))
            if config.teacher.cache is not None:
                cache = ensure_cache(config, teacher, train_samples, classes, runtime, say)
        recipe = build_recipe(config.recipe.name, model, config.recipe, teacher)
        if cache is not None:
            teacher = None  # every target comes from the cache: free the teacher
        elif teacher is not None:
            teacher = teacher.to(runtime.device)
        windows = WindowDataset(
            train_samples, window=m.window, train=True, augment=config.data.augment_config if config.data.augment
            else False, positive_fraction=config.data.positive_fraction, seed=config.seed, num_classes=len(classes),
        )
        dataset = WithTeacherTargets(windows, cache) if cache is not None else windows
        collate_fn = collate_with_targets if cache is not None else collate_windows
    if m.init is not None:
        load_weights(model, m.init, m.arch, skip=() if m.init_head else class_head_names(m.arch))
    trainable: nn.Module = recipe if recipe is not None else model
    trainable.to(runtime.device)
    sampler: Any
    if runtime.distributed:
        sampler = DistributedSampler(dataset, runtime.world_size, runtime.rank, shuffle=True, seed=config.seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(config.seed))
    loader = DataLoader(
        dataset, batch_size=sched.batch_size, sampler=sampler, num_workers=config.data.workers,
        collate_fn=collate_fn, drop_last=False,
        pin_memory=runtime.device.type == "cuda",
    )
    steps_per_epoch = len(loader)
    # Every rank reports itself once (torchrun prefixes the line with the rank's number).
    print(
        f"rank {runtime.rank}/{runtime.world_size} on {runtime.device}: {len(sampler)} of {len(dataset)} "
        f"samples per epoch, {config.task} model {m.arch}, {describe_recipe(config)}",
        file=sys.stderr, flush=True,
    )
    total_steps = min(sched.max_steps or sys.maxsize, sched.epochs * steps_per_epoch)
    params = list(trainable.parameters())
    optimizer = torch.optim.AdamW(params, lr=sched.lr, weight_decay=sched.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, sched.warmup_steps, sched.min_lr_ratio)
    )
    amp, needs_scaler = autocast(runtime.device, sched.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)

    start_epoch, step, best = 0, 0, -math.inf
    last_path, best_path = out / LAST, out / BEST
    payload: dict[str, Any] | None = None
    if last_path.is_file() and not fresh:
        payload = load_weights(model, last_path, m.arch)
        try:
            if recipe is not None and recipe.adapter is not None and payload.get("adapter") is not None:
                recipe.adapter.load_state_dict(payload["adapter"])
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            if needs_scaler and payload.get("scaler"):
                scaler.load_state_dict(payload["scaler"])
            start_epoch, step = int(payload["epoch"]), int(payload["step"])
            best = float(payload.get("best", -math.inf))
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(last_path, f"cannot resume from it: {str(exc).splitlines()[0]}") from None
        say(f"resuming {out} at epoch {start_epoch}, step {step}")
    history = RunHistory.resume(out, payload)
    events: EventLog | None = None
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", _yaml(config))
        history.write()  # the files hold the checkpoint's epochs, no later ones
        events = EventLog(out, start_epoch + 1, say)

    teacher_id = getattr(teacher, "teacher_id", None) or (cache.teacher_id if cache is not None else None)
    common = {
        "world_size": runtime.world_size,
        "recipe": config.recipe.name,
        "teacher": teacher_id or "none",
        "classes": classes,
        "seed": config.seed,
        "train_config": json.loads(config.model_dump_json()),
    }
    summary: dict[str, Any] = {"out": str(out), "epochs": sched.epochs, "world_size": runtime.world_size}
    phase = -1
    step_module: nn.Module = recipe if recipe is not None else _FinderLoss(model)  # type: ignore[arg-type]
    wrapped: nn.Module = step_module
    clock = RunClock(sched.epochs, steps_per_epoch, total_steps, elapsed_before=history.elapsed_before,
                     epoch_seconds=history.epoch_seconds())
    for epoch in range(start_epoch, sched.epochs):
        if step >= total_steps:
            break
        clock.start_epoch(epoch, step)
        new_phase = recipe.phase(epoch, sched.epochs) if recipe is not None else 0
        if new_phase != phase:
            phase = new_phase
            if recipe is not None:
                recipe.apply_phase(phase)
            if runtime.distributed:  # re-wrap: DDP registers the parameters that train in this phase
                wrapped = DistributedDataParallel(
                    step_module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                    find_unused_parameters=True,
                )
        step_module.train()
        dataset.set_epoch(epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        totals: dict[str, float] = {}
        batches = 0
        bar = _progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{sched.epochs}", runtime.is_main and _tty())
        for raw in loader:
            if step >= total_steps:
                break
            batch = _to(raw, runtime.device)
            if teacher is not None and recipe is not None and getattr(recipe, "needs_teacher_now", True):
                add_teacher_targets(batch, teacher, amp)
            with amp:
                loss, parts = wrapped(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if sched.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], sched.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            batches += 1
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {totals['loss'] / batches:.4f}, run ETA {format_duration(clock.eta(step))}",
                                    refresh=False)
            elif runtime.is_main and batches % _LOG_EVERY == 0:
                say(_progress_line(epoch, sched.epochs, batches, steps_per_epoch, totals["loss"] / batches, clock,
                                   step))
        if bar is not None:
            bar.close()
        means = {k: v / max(1, batches) for k, v in totals.items()}
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "phase": phase}
        record.update({f"train_{k}": round(v, 5) for k, v in means.items()})
        last_epoch = epoch + 1 == sched.epochs or step >= total_steps
        if runtime.is_main:
            improved = False
            metrics: dict[str, Any] = {}
            if (epoch + 1) % config.eval.every == 0 or last_epoch:
                metrics = _validate(model, val_data, classes, config, means.get("loss", 0.0), runtime.device)
                improved = metrics["score"] > best
                best = max(best, metrics["score"])
                record.update({f"val_{k}": v for k, v in metrics.items()})
            record["lr"] = float(f"{scheduler.get_last_lr()[0]:.6g}")
            record["epoch_seconds"] = round(clock.end_epoch(), 2)
            record["elapsed_seconds"] = round(clock.elapsed, 2)
            history.add(record)
            state = {
                **common, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if needs_scaler else None, "epoch": epoch + 1, "step": step,
                "best": best, "metrics": {k: v for k, v in metrics.items() if v is not None},
                "history": history.records,
            }  # fmt: skip
            save_training_checkpoint(last_path, model, recipe, m.arch, state)
            if improved:
                save_training_checkpoint(best_path, model, recipe, m.arch, state)
            history.write()
            if events is not None:
                events.epoch(record)
            say(_line(record, sched.epochs, clock))
        runtime.barrier()
        summary.update(record)
    if runtime.is_main:
        if not best_path.exists() and last_path.exists():
            _copy_checkpoint(last_path, best_path)
        if best_path.exists():
            load_weights(model, best_path, m.arch)  # the figures show the checkpoint a bundle is made from
        written = write_run_plots(out, history.records, model, val_data, classes, title=run_title(config),
                                  device=runtime.device)
        if events is not None:
            if OVERLAYS_PNG in written and history.records:
                events.image("val_overlays", written[OVERLAYS_PNG], int(history.records[-1]["epoch"]))
            events.close()
        say(f"{out}: {', '.join(['results.csv', *written])} written")
    summary["checkpoint"] = str(best_path)
    return summary


def describe_recipe(config: TrainConfig) -> str:
    """'recipe supervised (ground truth only, no teacher)' or 'recipe blog, distilled from teacher family (t.pt)'."""
    if config.teacher is None or config.recipe.name == "supervised":
        return f"recipe {config.recipe.name} (ground truth only, no teacher)"
    return f"recipe {config.recipe.name}, distilled from a {config.teacher.kind} teacher ({config.teacher.checkpoint})"


def run_title(config: TrainConfig) -> str:
    return f"{config.name}: {config.model.arch}, {describe_recipe(config)}"


def _copy_checkpoint(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


_LOG_EVERY = 50  # steps between progress lines when stderr is not a terminal (no progress bar)


def _progress_line(epoch: int, epochs: int, batch: int, batches: int, loss: float, clock: RunClock,
                   step: int) -> str:
    """'epoch 2/6 step 150/750 loss 0.4123 (0.61 s/step, elapsed 4 min 10 s, ETA 41 min 02 s)': what a log
    file shows between epochs (no progress bar there)."""
    per_step = (time.monotonic() - clock.epoch_started) / max(1, batch)
    return (f"epoch {epoch + 1}/{epochs} step {batch}/{batches} loss {loss:.4f} ({per_step:.2f} s/step, "
            f"elapsed {format_duration(clock.elapsed)}, ETA {format_duration(clock.eta(step))})")


def _line(record: dict[str, Any], epochs: int, clock: RunClock) -> str:
    """The epoch's line: its losses and val metrics, then its time, the run's elapsed time and ETA."""
    shown = [f"epoch {record['epoch']}/{epochs}", f"step {record['step']}"]
    for key, value in record.items():
        if key.startswith(("train_", "val_")) and isinstance(value, float):
            shown.append(f"{key} {value:.4f}")
    shown.append(f"{format_duration(record['epoch_seconds'])} (elapsed {format_duration(record['elapsed_seconds'])}, "
                 f"ETA {format_duration(clock.eta_after_epoch())})")
    return "  ".join(shown)


def _tty() -> bool:
    return sys.stderr.isatty()


def _yaml(config: TrainConfig) -> str:
    import yaml

    return str(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
