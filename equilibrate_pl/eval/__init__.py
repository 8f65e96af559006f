"""Evaluation: refusal detection, safety judges, torchmetrics metrics, generation and reports.

Entry points: `is_refusal`, the judges in `judges`, the metrics in `metrics`, `generate`,
`load_suite` and `evaluate_models` (the Python API behind `equilibrate eval`).
"""

from equilibrate_pl.eval.generation import generate
from equilibrate_pl.eval.judges import (
    HTTPJudge,
    Judge,
    LocalLLMJudge,
    RefusalJudge,
    RewardModelJudge,
    Verdict,
    build_judge,
    load_reward_scorer,
    parse_verdict,
)
from equilibrate_pl.eval.metrics import BalanceScore, Helpfulness, OverRefusalRate, SafetyRate
from equilibrate_pl.eval.refusal import ClassifierRefusalDetector, RefusalDetector, RuleRefusalDetector, is_refusal
from equilibrate_pl.eval.report import EvalResult, ModelResult, evaluate_models
from equilibrate_pl.eval.suites import EvalItem, Suite, load_suite

__all__ = [
    "BalanceScore",
    "ClassifierRefusalDetector",
    "EvalItem",
    "EvalResult",
    "HTTPJudge",
    "Helpfulness",
    "Judge",
    "LocalLLMJudge",
    "ModelResult",
    "OverRefusalRate",
    "RefusalDetector",
    "RefusalJudge",
    "RewardModelJudge",
    "RuleRefusalDetector",
    "SafetyRate",
    "Suite",
    "Verdict",
    "build_judge",
    "evaluate_models",
    "generate",
    "is_refusal",
    "load_reward_scorer",
    "load_suite",
    "parse_verdict",
]
