"""What every judge receives and returns, and how the cases are found.

A *case* is one defect instance where the student's mask and the teacher's mask disagree by more
than a threshold: the disagreement is ``1 - IoU(student, teacher)`` (two empty masks agree, IoU 1),
and an instance is a case when it is strictly greater than ``threshold`` (default 0.15, so an IoU
below 0.85). The case holds a crop of the image around both masks (with a margin of context) and
the two masks on that crop. A judge looks at the crop and the two masks only (never the ground
truth, which a case may carry for the audit) and says which mask follows the defect's contour
better: ``student``, ``teacher`` or ``tie``.

Everything here is NumPy + OpenCV; the judges are plain classes with a ``name`` and a
``judge(case) -> Verdict`` method (the ``Judge`` protocol).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import cv2
import numpy as np

from engines.errors import DefectsamError

Better = Literal["student", "teacher", "tie"]
BETTER: tuple[Better, ...] = ("student", "teacher", "tie")
DEFAULT_THRESHOLD = 0.15


class JudgeError(DefectsamError):
    """A judge that cannot give a verdict (an endpoint that keeps failing, a bad decisions file)."""


@dataclass(frozen=True)
class JudgeCase:
    """One disagreement, cropped.

    crop          h x w x 3 uint8, BGR (the training input's pixels around both masks)
    student       bool h x w, the student's mask on the crop
    teacher       bool h x w, the teacher's mask on the crop
    case_id       unique within a run: ``e<epoch>:<source>#<instance>``
    source        the sample's source (a path, "synthetic:12")
    instance      the instance's index in the sample (after preparation)
    class_name    the instance's ground-truth class ("" when unknown)
    disagreement  1 - IoU(student, teacher) on the whole input
    box           (x, y, w, h) of the crop in input pixels
    epoch         the epoch after which the case was found (0: offline)
    truth         bool h x w ground truth on the crop, for the audit only: judges never read it
    """

    case_id: str
    source: str
    instance: int
    crop: np.ndarray
    student: np.ndarray
    teacher: np.ndarray
    class_name: str = ""
    disagreement: float = 0.0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    epoch: int = 0
    truth: np.ndarray | None = None

    def __post_init__(self) -> None:
        h, w = self.crop.shape[:2]
        if self.crop.dtype != np.uint8 or self.crop.ndim != 3 or self.crop.shape[2] != 3:
            raise ValueError(f"{self.case_id}: crop must be HxWx3 uint8, got {self.crop.dtype} {self.crop.shape}")
        for name in ("student", "teacher", "truth"):
            mask = getattr(self, name)
            if mask is None and name == "truth":
                continue
            if mask.dtype != np.bool_ or mask.shape != (h, w):
                raise ValueError(f"{self.case_id}: {name} mask must be bool {h}x{w}, got {mask.dtype} {mask.shape}")

    def digest(self) -> str:
        """SHA-256 of what a judge sees: the crop's pixels and both masks (not the ids, not the truth)."""
        h = hashlib.sha256()
        for array in (self.crop, self.student, self.teacher):
            h.update(str(array.shape).encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Verdict:
    """A judge's answer about one case: which mask is better, how sure, who said so and why.

    ``abstain``: the judge has no answer yet (a case nobody reviewed); it counts as a tie in reports
    but changes no weight and is left out of audits.
    """

    case_id: str
    better: Better
    confidence: float
    judge: str
    reason: str = ""
    abstain: bool = False

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"{self.case_id}: verdict must be one of {', '.join(BETTER)}, got {self.better!r}")


class Judge(Protocol):
    """Picks the mask that better follows the defect's contour."""

    name: str

    def judge(self, case: JudgeCase) -> Verdict: ...


def case_id(source: str, instance: int, epoch: int) -> str:
    return f"e{epoch:03d}:{source}#{instance}"


def swap_for(case: JudgeCase) -> bool:
    """Whether mask A shows the teacher (True) or the student (False): a fixed pseudo-random bit per
    case, so neither side sits in the same place every time (position bias) and a repeat is identical."""
    return hashlib.sha256(case.case_id.encode()).digest()[0] & 1 == 1


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of one shape; two empty masks have IoU 1 (they agree)."""
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def crop_box(
    masks: Sequence[np.ndarray], shape: tuple[int, int], margin: int, min_size: int = 16
) -> tuple[int, int, int, int]:
    """(x, y, w, h): the bounding box of the union of ``masks`` grown by ``margin`` px on each side and
    to at least ``min_size`` a side (where the image allows), clipped to ``shape`` (H, W)."""
    height, width = shape
    union = np.zeros(shape, dtype=np.uint8)
    for mask in masks:
        union |= mask.view(np.uint8)
    x, y, w, h = cv2.boundingRect(union)
    if w == 0 or h == 0:
        x, y, w, h = width // 2, height // 2, 0, 0
    x0, y0, x1, y1 = x - margin, y - margin, x + w + margin, y + h + margin
    for lo, hi, limit, axis in ((x0, x1, width, 0), (y0, y1, height, 1)):
        grow = max(0, min(min_size, limit) - (hi - lo))
        lo, hi = lo - grow // 2, hi + grow - grow // 2
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > limit:
            lo, hi = max(0, lo - (hi - limit)), limit
        if axis == 0:
            x0, x1 = lo, hi
        else:
            y0, y1 = lo, hi
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def disagreements(
    image: np.ndarray,
    student_masks: np.ndarray,
    teacher_masks: np.ndarray,
    *,
    source: str,
    class_ids: Sequence[int] | np.ndarray | None = None,
    class_names: Sequence[str] = (),
    truths: np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    margin: int = 8,
    epoch: int = 0,
) -> list[JudgeCase]:
    """The cases of one image: the instances whose masks disagree by more than ``threshold``.

    image: HxWx3 uint8 BGR; student_masks, teacher_masks (and truths): NxHxW bool, row i the
    instance i of each; class_ids: N indices into ``class_names``. A case's disagreement is
    ``1 - IoU(student_i, teacher_i)``; it is a case when that is > threshold. Its crop is the box of
    the union of the two masks plus ``margin`` px (``crop_box``).
    """
    if student_masks.shape != teacher_masks.shape or student_masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"{source}: masks {student_masks.shape} / {teacher_masks.shape} do not fit the image {image.shape[:2]}"
        )
    cases = []
    for i, (student, teacher) in enumerate(zip(student_masks, teacher_masks, strict=True)):
        value = 1.0 - mask_iou(student, teacher)
        if value <= threshold:
            continue
        x, y, w, h = crop_box([student, teacher], image.shape[:2], margin)
        window = (slice(y, y + h), slice(x, x + w))
        class_id = int(class_ids[i]) if class_ids is not None else -1
        cases.append(
            JudgeCase(
                case_id=case_id(source, i, epoch), source=source, instance=i,
                crop=np.ascontiguousarray(image[window]),
                student=np.ascontiguousarray(student[window]), teacher=np.ascontiguousarray(teacher[window]),
                class_name=class_names[class_id] if 0 <= class_id < len(class_names) else "",
                disagreement=round(value, 4), box=(x, y, w, h), epoch=epoch,
                truth=np.ascontiguousarray(truths[i][window]) if truths is not None else None,
            )
        )  # fmt: skip
    return cases


def judge_all(
    judge: Judge, cases: Iterable[JudgeCase], *, on_error: Callable[[JudgeCase, JudgeError], None] | None = None
) -> list[Verdict]:
    """Verdicts for ``cases`` in order. A JudgeError stops the pass (an endpoint that is down stays down
    for the next case too): with ``on_error`` it is reported and the verdicts so far are returned,
    without it it is raised."""
    verdicts = []
    for case in cases:
        try:
            verdicts.append(judge.judge(case))
        except JudgeError as exc:
            if on_error is None:
                raise
            on_error(case, exc)
            break
    return verdicts
