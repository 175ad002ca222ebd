"""The judge loop for teacher mistakes (docs/judge.md).

After an epoch, the instances where the student's and the teacher's masks disagree by more than a
threshold are cropped and shown to a judge (``contour``: image gradients along each mask's
boundary; ``vlm``: a vision-language model behind an OpenAI-compatible endpoint; ``human``: a
review page), which picks the mask that better follows the defect's contour; instances judged in
the student's favour lean on ground truth instead of the teacher in the following epochs.

Modules: ``base`` (cases, verdicts, the Judge protocol, finding disagreements), ``contour``,
``vlm``, ``human``, ``audit``, ``store`` (the run directory's judge files), ``build`` (the
factory), ``weighting`` and ``loop`` (the trainer's hook; torch), ``cli`` (``defectsam-train judge``).
This package's top level imports no torch.
"""

from training.judge.base import BETTER, Judge, JudgeCase, JudgeError, Verdict, disagreements, mask_iou
from training.judge.config import JudgeConfig

__all__ = ["BETTER", "Judge", "JudgeCase", "JudgeConfig", "JudgeError", "Verdict", "disagreements", "mask_iou"]
