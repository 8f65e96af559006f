"""Evaluation: refusal detection, safety judges, torchmetrics metrics, generation and reports.

Entry points: `is_refusal` (and `get_detector`), the judges in `judges` (guard-model formats in
`guards`), the metrics in `metrics`, `generate`, `load_suite`, `evaluate_models` (the Python API
behind `equilibrate eval`) and the preference-pair suite in `pairs`.
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
from equilibrate_pl.eval.metrics import (
    BalanceScore,
    HarmfulContentRate,
    Helpfulness,
    OverRefusalRate,
    RefusalRate,
    SafetyRate,
)
from equilibrate_pl.eval.refusal import (
    ClassifierRefusalDetector,
    EncoderRefusalDetector,
    HybridRefusalDetector,
    RefusalDetector,
    RuleRefusalDetector,
    get_detector,
    is_refusal,
)
from equilibrate_pl.eval.report import EvalResult, ModelResult, evaluate_models
from equilibrate_pl.eval.suites import EvalItem, Suite, load_suite

__all__ = [
    "BalanceScore",
    "ClassifierRefusalDetector",
    "EncoderRefusalDetector",
    "EvalItem",
    "EvalResult",
    "HTTPJudge",
    "HarmfulContentRate",
    "Helpfulness",
    "HybridRefusalDetector",
    "Judge",
    "LocalLLMJudge",
    "ModelResult",
    "OverRefusalRate",
    "RefusalDetector",
    "RefusalJudge",
    "RefusalRate",
    "RewardModelJudge",
    "RuleRefusalDetector",
    "SafetyRate",
    "Suite",
    "Verdict",
    "build_judge",
    "evaluate_models",
    "generate",
    "get_detector",
    "is_refusal",
    "load_reward_scorer",
    "load_suite",
    "parse_verdict",
]
