"""Evaluation: refusal detection, safety judges, torchmetrics metrics, generation and reports."""

from equilibrate_pl.eval.refusal import ClassifierRefusalDetector, RefusalDetector, RuleRefusalDetector, is_refusal

__all__ = ["ClassifierRefusalDetector", "RefusalDetector", "RuleRefusalDetector", "is_refusal"]
