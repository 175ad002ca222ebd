"""Evaluation: the field's semantic metrics, image-level verdicts, detection by size (training.eval.evaluate)."""
