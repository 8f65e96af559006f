"""Lightning modules composing `algorithms/` and `models/`: one per training stage.

- :class:`SFTModule` — supervised fine-tuning (response tokens only; full / LoRA / QLoRA).
- :class:`RewardModule` — Bradley-Terry reward model with dense per-token rewards.
- :class:`CostModule` — Safe RLHF's cost model (a reward model whose score is a cost, > 0 unsafe).
- :class:`PreferenceModule` — DPO and ADPO (DPO with the AMA token mask).
- ``PolicyModule`` (``equilibrate_pl.modules.policy``) — PPO / APPO / GRPO / RLOO.

Shared pieces (settings, non-finite guard, atomic checkpoints, RNG resume) are in
:mod:`equilibrate_pl.modules.common`.
"""

from equilibrate_pl.algorithms.ama import ADPOSettings, AMASettings, APPOSettings
from equilibrate_pl.modules.common import (
    AtomicCheckpointIO,
    ModelSettings,
    NonFiniteGuard,
    OptimSettings,
    RNGStateCallback,
    check_tokenizers_match,
)
from equilibrate_pl.modules.cost import CostModule
from equilibrate_pl.modules.preference import PreferenceModule
from equilibrate_pl.modules.reward import RewardModule
from equilibrate_pl.modules.sft import SFTModule

__all__ = [
    "ADPOSettings",
    "AMASettings",
    "APPOSettings",
    "AtomicCheckpointIO",
    "CostModule",
    "ModelSettings",
    "NonFiniteGuard",
    "OptimSettings",
    "PreferenceModule",
    "RNGStateCallback",
    "RewardModule",
    "SFTModule",
    "check_tokenizers_match",
]
