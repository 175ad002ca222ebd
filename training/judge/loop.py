"""The judge loop inside training: after an epoch, find where student and teacher disagree, judge,
re-weight.

After epoch e (every ``judge.every`` epochs, not after the last; rank 0 only) the loop

1. prompts the student and the teacher at every training instance's anchor point (the teacher's
   logits come from the teacher cache when there is one), on ``judge.samples`` training samples
   (a new random subset each pass) or all of them, un-augmented;
2. thresholds both at logit 0 at input resolution (the runtime's upsampling) and keeps the
   instances with ``1 - IoU(student, teacher) > judge.threshold`` as cases, cropped with
   ``judge.margin`` px of context (``training.judge.base.disagreements``);
3. judges the ``judge.max_cases`` largest disagreements (``judge.kind``: contour, vlm or human);
4. re-weights: an instance judged in the student's favour gets weight ``judge.weight`` (its dice
   to ground truth x w, its teacher soft-mask term / w) for the following epochs; one judged for
   the teacher or a tie goes back to 1; instances not judged in this pass keep their weight;
5. writes OUT/judge/ (``training.judge.store``): the log line of every verdict (with the ground
   truth's own preference, for the audit), the cases, the weights, and for ``human`` the review page.

Other ranks wait at the trainer's barrier and re-read the weights. A judge that fails (an
endpoint down) ends the pass early with one line in the log: training goes on with the verdicts so far.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig
from training.data.prepare import collate, prepare_example, resize_image
from training.data.sample import SampleDataset
from training.judge.audit import truth_label
from training.judge.base import Judge, JudgeCase, JudgeError, disagreements, judge_all, mask_iou
from training.judge.build import build_judge
from training.judge.human import export_review
from training.judge.store import LOG, WEIGHTS, JudgeWeights, append_jsonl, cases_path, judge_dir, save_cases
from training.judge.weighting import WeightedCollate, WeightedExamples, judged_recipe
from training.losses import upsample_logits
from training.model.segmenter import DefectSegmenter
from training.recipes import Recipe
from training.teachers.base import Teacher
from training.teachers.cache import TeacherCache
from training.teachers.family import decode_points

_BATCH = 8


class JudgeLoop:
    """The trainer's hook: wraps the recipe and the data once, then ``run`` after the epochs it is due."""

    def __init__(
        self, config: TrainConfig, classes: list[str], *, fresh: bool, log: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self.judge_config = config.judge
        self.classes = list(classes)
        self.dir = judge_dir(config.out)
        self.weights = JudgeWeights() if fresh else JudgeWeights.load(self.dir / WEIGHTS)
        self.log = log or (lambda message: None)

    # -- hooks ----------------------------------------------------------------------------------
    def wrap_recipe(self, recipe: Recipe) -> Recipe:
        return judged_recipe(recipe)

    def wrap_data(self, dataset: Any, collate_fn: Callable[..., Any]) -> tuple[Any, Callable[..., Any]]:
        return WeightedExamples(dataset, self.weights), WeightedCollate(collate_fn)

    def due(self, epoch: int, epochs: int) -> bool:
        """After epoch ``epoch`` (1-based) of ``epochs``: every ``every`` epochs, never after the last."""
        return epoch % self.judge_config.every == 0 and epoch < epochs

    def reload(self) -> None:
        """Re-read the weights rank 0 wrote (in place: the data set holds this object)."""
        self.weights.entries = JudgeWeights.load(self.dir / WEIGHTS).entries

    # -- one pass -------------------------------------------------------------------------------
    def run(
        self,
        epoch: int,
        student: DefectSegmenter,
        samples: SampleDataset,
        *,
        cache: TeacherCache | None,
        teacher: Teacher | None,
        device: torch.device,
    ) -> dict[str, Any]:
        """Judge after ``epoch`` (1-based); returns the figures for metrics.jsonl."""
        started = time.monotonic()
        cfg = self.judge_config
        cases, truth = self.find_cases(epoch, student, samples, cache=cache, teacher=teacher, device=device)
        found = len(cases)
        cases = sorted(cases, key=lambda c: -c.disagreement)[: cfg.max_cases]
        judge: Judge = build_judge(cfg, self.config.out)
        errors: list[str] = []
        verdicts = judge_all(judge, cases, on_error=lambda case, exc: errors.append(f"{case.case_id}: {exc}"))
        if errors:
            self.log(f"judge after epoch {epoch}: stopped after {len(verdicts)} of {len(cases)} cases: {errors[0]}")
        by_id = {c.case_id: c for c in cases}
        self.weights.apply(verdicts, by_id, cfg.weight)

        self.dir.mkdir(parents=True, exist_ok=True)
        if cases:
            save_cases(cases_path(self.config.out, epoch), cases)
        records = []
        for v in verdicts:
            case = by_id[v.case_id]
            record: dict[str, Any] = {
                "epoch": epoch, "case_id": v.case_id, "source": case.source, "instance": case.instance,
                "class": case.class_name, "disagreement": case.disagreement, "box": list(case.box),
                "judge": v.judge, "better": v.better, "confidence": v.confidence, "reason": v.reason,
                "weight": cfg.weight if v.better == "student" else 1.0,
            }  # fmt: skip
            if v.abstain:
                record.update(abstain=True, weight=None)
            if v.case_id in truth:
                record.update(truth[v.case_id])
            records.append(record)
        append_jsonl(self.dir / LOG, records)
        self.weights.save(self.dir / WEIGHTS)
        if cfg.kind == "human" and cases:
            page = export_review(cases, self.dir / f"review-e{epoch:03d}.html")
            self.log(f"judge after epoch {epoch}: review page {page} ({len(cases)} cases)")

        counts = Counter("abstain" if v.abstain else v.better for v in verdicts)
        with_truth = [r for r in records if "truth_better" in r and not r.get("abstain")]
        agreed = sum(r["better"] == r["truth_better"] for r in with_truth)
        return {
            "judge_cases": found,
            "judge_judged": len(verdicts),
            "judge_student": counts["student"],
            "judge_teacher": counts["teacher"],
            "judge_tie": counts["tie"],
            "judge_abstain": counts["abstain"],
            "judge_weighted": len(self.weights),
            "judge_truth_agreement": round(agreed / len(with_truth), 4) if with_truth else None,
            "judge_seconds": round(time.monotonic() - started, 2),
        }

    def find_cases(
        self,
        epoch: int,
        student: DefectSegmenter,
        samples: SampleDataset,
        *,
        cache: TeacherCache | None,
        teacher: Teacher | None,
        device: torch.device,
    ) -> tuple[list[JudgeCase], dict[str, dict[str, Any]]]:
        """The cases of this pass, and per case what the ground truth says (IoUs at input resolution)."""
        if cache is None and teacher is None:
            raise JudgeError("the judge loop needs the teacher's mask logits: a teacher or its cache")
        cfg = self.judge_config
        indices = list(range(len(samples)))
        if cfg.samples is not None and cfg.samples < len(indices):
            rng = np.random.default_rng([self.config.seed, epoch])
            indices = sorted(int(i) for i in rng.choice(len(indices), cfg.samples, replace=False))
        cases: list[JudgeCase] = []
        truth: dict[str, dict[str, Any]] = {}
        was_training = student.training
        student.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(indices), _BATCH):
                    chunk = [samples[i] for i in indices[start : start + _BATCH]]
                    self._chunk(epoch, student, chunk, cache, teacher, device, cases, truth)
        finally:
            student.train(was_training)
        return cases, truth

    def _chunk(
        self,
        epoch: int,
        student: DefectSegmenter,
        chunk: list[Any],
        cache: TeacherCache | None,
        teacher: Teacher | None,
        device: torch.device,
        cases: list[JudgeCase],
        truth: dict[str, dict[str, Any]],
    ) -> None:
        cfg, m = self.judge_config, self.config.model
        examples = [
            prepare_example(
                s, height=m.height, width=m.width, num_classes=len(self.classes),
                heatmap_sigma=self.config.data.heatmap_sigma,
            )
            for s in chunk
        ]
        cached_logits = None
        if cache is not None:
            cached = [cache.get(e.source) for e in examples]
            # Prompt where the teacher was prompted (as the trainer does with a cache).
            examples = [dataclasses.replace(e, anchors=c.points.numpy()) for e, c in zip(examples, cached, strict=True)]
            cached_logits = torch.cat([c.mask_logits for c in cached])
        batch = collate(examples)
        valid = batch["instance_valid"]
        if not bool(valid.any()):
            return
        image_index = valid.nonzero()[:, 0].to(device)
        points = batch["anchors"][valid].to(device)  # BxNx2 -> Mx2
        images = batch["image"].to(device)
        if cached_logits is not None:
            teacher_logits = cached_logits.to(device)
        elif teacher is not None:
            teacher_logits = teacher.predict(images, points, image_index).mask_logits
        else:
            raise JudgeError("the judge loop needs the teacher's mask logits: a teacher or its cache")
        embedding, skip = student.embed(images)
        student_logits = decode_points(student, embedding, skip, points, image_index)
        size = (m.height, m.width)
        student_masks = (upsample_logits(student_logits.float(), size) > 0).cpu().numpy()
        teacher_masks = (upsample_logits(teacher_logits.float(), size) > 0).cpu().numpy()
        cursor = 0
        for sample, example in zip(chunk, examples, strict=True):
            n = int(example.classes.shape[0])
            box = example.letterbox
            ch, cw = box.content_height, box.content_width
            s_masks = student_masks[cursor : cursor + n, :ch, :cw]
            t_masks = teacher_masks[cursor : cursor + n, :ch, :cw]
            g_masks = example.masks[:, :ch, :cw]
            cursor += n
            found = disagreements(
                resize_image(sample.image, box), s_masks, t_masks, source=example.source,
                class_ids=example.classes, class_names=self.classes, truths=g_masks,
                threshold=cfg.threshold, margin=cfg.margin, epoch=epoch,
            )  # fmt: skip
            for case in found:
                i = case.instance
                truth[case.case_id] = {
                    "iou_student_gt": round(mask_iou(s_masks[i], g_masks[i]), 4),
                    "iou_teacher_gt": round(mask_iou(t_masks[i], g_masks[i]), 4),
                    "truth_better": truth_label(s_masks[i], t_masks[i], g_masks[i]),
                }
            cases.extend(found)
