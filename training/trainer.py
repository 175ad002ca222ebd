"""One training loop for every recipe: single process, or under torchrun with no code change.

    python -m training.cli distill --config cfg.yaml                       # one process
    torchrun --nproc_per_node 2 -m training.cli distill --config cfg.yaml  # DDP (gloo on CPU, NCCL on GPUs)

The device is chosen automatically (``cuda:LOCAL_RANK`` when CUDA is there, else CPU); autocast
(bf16, or fp16 with a gradient scaler) runs on CUDA only. Rank 0 alone writes: ``last.pt`` after
every epoch, ``best.pt`` when the validation metric improves, ``metrics.jsonl`` and the resolved
``config.yaml``. Checkpoints hold model, optimizer, scheduler, epoch, step and config, go to a
temporary name and are renamed into place, so a crash never leaves a partial file where a good
one was. A run directory that holds ``last.pt`` is resumed from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from engines.atomic import write_text_atomic
from training.config import TrainConfig
from training.data.prepare import PreparedDataset, TrainExample, collate
from training.data.registry import MergedDataset, build_dataset
from training.data.sample import SampleDataset
from training.model.build import build_model
from training.model.checkpoint import CheckpointError, load_weights, save_checkpoint
from training.model.segmenter import DefectSegmenter
from training.recipes import Recipe, build_recipe
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


class WithTeacherTargets(Dataset[tuple[TrainExample, Any]]):
    """Examples (un-augmented, prompted at their anchors) paired with their cached teacher outputs."""

    def __init__(self, examples: PreparedDataset, cache: TeacherCache) -> None:
        self.examples = examples
        self.cache = cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[TrainExample, Any]:
        example = self.examples[index]
        cached = self.cache.get(example.source)
        if cached.points.shape[0] != example.anchors.shape[0]:
            raise CacheError(
                f"{self.cache.path}: {cached.points.shape[0]} cached instances of {example.source!r}, the data has "
                f"{example.anchors.shape[0]} (the data or its preparation changed): delete the cache and run "
                "cache-teacher again"
            )
        # Prompt the student exactly where the teacher was prompted. (The interior point can move by a
        # pixel between processes where the distance transform has ties.)
        return dataclasses.replace(example, anchors=cached.points.numpy()), cached


def collate_with_targets(items: list[tuple[TrainExample, Any]]) -> dict[str, torch.Tensor]:
    batch = collate([example for example, _ in items])
    batch["teacher_embedding"] = torch.stack([cached.embedding for _, cached in items])
    batch["teacher_logits"] = torch.cat([cached.mask_logits for _, cached in items])
    batch["cached"] = torch.ones(())
    return batch


def flatten_prompts(batch: dict[str, torch.Tensor]) -> None:
    """Add prompts Mx2, image_index M and targets MxHxW (the valid instances, batch-major)."""
    valid = batch["instance_valid"]
    # Cached teacher logits were computed at the anchors: prompt the student there too.
    key = "anchors" if "cached" in batch else "points"
    batch["image_index"] = valid.nonzero()[:, 0]
    batch["prompts"] = batch[key][valid]  # BxNx2 -> Mx2
    batch["targets"] = batch["masks"][valid].float()  # BxNxHxW -> MxHxW


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
    """Write (or extend) the cache of ``teacher`` for every sample of ``samples``."""
    assert config.teacher is not None and config.teacher.cache is not None
    examples = PreparedDataset(
        samples, height=config.model.height, width=config.model.width, num_classes=len(classes), train=False,
        heatmap_sigma=config.data.heatmap_sigma,
    )
    sources = [samples[i].source for i in range(len(samples))]
    return build_cache(
        config.teacher.cache, teacher, examples.__getitem__, sources,
        batch_size=config.teacher.batch_size, device=device, progress=progress,
    )


# -- checkpoints ------------------------------------------------------------------------------------
def save_training_checkpoint(path: Path, recipe: Recipe, arch: str, state: dict[str, Any]) -> Path:
    """{"arch", "config", "model"} (export-compatible) + adapter, optimizer, scheduler, counters, config."""
    extra = {"adapter": recipe.adapter.state_dict() if recipe.adapter is not None else None, **state}
    return save_checkpoint(path, arch, recipe.student, **extra)


def _lr_lambda(total: int, warmup: int, min_ratio: float) -> Any:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- the loop ---------------------------------------------------------------------------------------
def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _validate(
    model: DefectSegmenter, val: Any, classes: list[str], config: TrainConfig, train_loss: float
) -> dict[str, Any]:
    """Validation metrics; ``score`` is what picks best.pt (higher is better)."""
    if val is None or config.eval.metric == "loss":
        return {"score": -train_loss}
    from training.eval.evaluate import evaluate_model

    report = evaluate_model(model, val, limit=config.eval.limit, class_names=classes)
    prompted, automatic = report["prompted"] or {}, report["automatic"]
    metrics = {
        "miou": prompted.get("miou"),
        "mdice": prompted.get("mdice"),
        "f1": automatic.get("f1"),
        "precision": automatic.get("precision"),
        "recall": automatic.get("recall"),
    }
    value = metrics.get(config.eval.metric)
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
    train_samples, val_samples, classes = load_datasets(config)
    m = config.model
    student = build_model(m.arch, height=m.height, width=m.width, num_classes=len(classes), k=m.k)
    if m.init is not None:
        load_weights(student, m.init, m.arch)

    teacher: Teacher | None = None
    cache: TeacherCache | None = None
    if config.teacher is not None and config.recipe.name != "supervised":
        teacher = build_teacher(config.teacher, height=m.height, width=m.width, num_classes=len(classes))
        if config.teacher.cache is not None:
            cache = ensure_cache(config, teacher, train_samples, classes, runtime, say)
    recipe = build_recipe(config.recipe.name, student, config.recipe, teacher)
    judge = None
    if config.judge.kind != "none":  # the judge loop for teacher mistakes (docs/judge.md)
        from training.judge.loop import JudgeLoop

        judge = JudgeLoop(config, classes, fresh=fresh, log=say)
        recipe = judge.wrap_recipe(recipe)
    if cache is not None:
        teacher = None  # every target comes from the cache: free the teacher
    elif teacher is not None:
        teacher = teacher.to(runtime.device)
    recipe.to(runtime.device)

    prepared = PreparedDataset(
        train_samples, height=m.height, width=m.width, num_classes=len(classes), train=cache is None,
        augment=config.data.augment, heatmap_sigma=config.data.heatmap_sigma, seed=config.seed,
    )
    dataset: Any = WithTeacherTargets(prepared, cache) if cache is not None else prepared
    collate_fn: Any = collate_with_targets if cache is not None else collate
    if judge is not None:
        dataset, collate_fn = judge.wrap_data(dataset, collate_fn)
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
        f"samples per epoch, recipe {config.recipe.name}",
        file=sys.stderr, flush=True,
    )
    total_steps = min(sched.max_steps or sys.maxsize, sched.epochs * steps_per_epoch)
    params = list(recipe.parameters())
    optimizer = torch.optim.AdamW(params, lr=sched.lr, weight_decay=sched.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, sched.warmup_steps, sched.min_lr_ratio)
    )
    amp, needs_scaler = autocast(runtime.device, sched.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)

    start_epoch, step, best = 0, 0, -math.inf
    last_path, best_path = out / LAST, out / BEST
    if last_path.is_file() and not fresh:
        payload = load_weights(student, last_path, m.arch)
        try:
            if recipe.adapter is not None and payload.get("adapter") is not None:
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
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", _yaml(config))

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
    wrapped: nn.Module = recipe
    started = time.monotonic()
    for epoch in range(start_epoch, sched.epochs):
        if step >= total_steps:
            break
        new_phase = recipe.phase(epoch, sched.epochs)
        if new_phase != phase:
            phase = new_phase
            recipe.apply_phase(phase)
            if runtime.distributed:  # re-wrap: DDP registers the parameters that train in this phase
                wrapped = DistributedDataParallel(
                    recipe, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                    find_unused_parameters=True,
                )
        recipe.train()
        prepared.set_epoch(epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        totals: dict[str, float] = {}
        batches = 0
        bar = _progress(loader, steps_per_epoch, f"epoch {epoch + 1}/{sched.epochs}", runtime.is_main and _tty())
        for raw in bar:
            if step >= total_steps:
                break
            batch = _to(raw, runtime.device)
            flatten_prompts(batch)
            if teacher is not None:
                with torch.no_grad(), amp:
                    if recipe.needs_teacher_logits:
                        result = teacher.predict(batch["image"], batch["prompts"], batch["image_index"])
                        batch["teacher_embedding"] = result.embedding.float()
                        batch["teacher_logits"] = result.mask_logits.float()
                    else:
                        batch["teacher_embedding"] = teacher.embed(batch["image"]).float()
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
        means = {k: v / max(1, batches) for k, v in totals.items()}
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "phase": phase, "lr": scheduler.get_last_lr()[0]}
        record.update({f"train_{k}": round(v, 5) for k, v in means.items()})
        last_epoch = epoch + 1 == sched.epochs or step >= total_steps
        if runtime.is_main:
            improved = False
            metrics: dict[str, Any] = {}
            if (epoch + 1) % config.eval.every == 0 or last_epoch:
                metrics = _validate(student, val_samples, classes, config, means.get("loss", 0.0))
                improved = metrics["score"] > best
                best = max(best, metrics["score"])
                record.update({f"val_{k}": v for k, v in metrics.items()})
            if judge is not None and judge.due(epoch + 1, sched.epochs) and not last_epoch:
                record.update(judge.run(epoch + 1, student, train_samples, cache=cache, teacher=teacher,
                                        device=runtime.device))
            state = {
                **common, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if needs_scaler else None, "epoch": epoch + 1, "step": step,
                "best": best, "metrics": {k: v for k, v in metrics.items() if v is not None},
            }  # fmt: skip
            save_training_checkpoint(last_path, recipe, m.arch, state)
            if improved:
                save_training_checkpoint(best_path, recipe, m.arch, state)
            record["seconds"] = round(time.monotonic() - started, 1)
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            say(_line(record))
        runtime.barrier()
        if judge is not None and not runtime.is_main:
            judge.reload()
        summary.update(record)
    if runtime.is_main and not best_path.exists() and last_path.exists():
        _copy_checkpoint(last_path, best_path)
    summary["checkpoint"] = str(best_path)
    return summary


def _copy_checkpoint(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _line(record: dict[str, Any]) -> str:
    shown = [f"epoch {record['epoch']}", f"step {record['step']}"]
    for key, value in record.items():
        if key.startswith(("train_", "val_")) and isinstance(value, float):
            shown.append(f"{key} {value:.4f}")
    return "  ".join(shown)


def _tty() -> bool:
    return sys.stderr.isatty()


def _yaml(config: TrainConfig) -> str:
    import yaml

    return str(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
