"""Evaluation of the global adapter."""

from fedit.evaluate.loss import EvalSet, evaluate_loss

__all__ = ["EvalSet", "evaluate_loss"]
