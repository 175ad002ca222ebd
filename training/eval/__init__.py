"""Evaluation of a PyTorch model or an exported bundle: prompted mask IoU/dice, automatic P/R and OK/NG."""

from training.eval.evaluate import EvalReport, evaluate_bundle, evaluate_model

__all__ = ["EvalReport", "evaluate_bundle", "evaluate_model"]
