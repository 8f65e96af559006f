"""``PolicyModule``: PPO / APPO (and critic-free GRPO / RLOO) as a LightningModule.

One ``training_step`` = one PPO iteration on a batch of prompts:

1. **generation** — the rollout engine (``models.rollout_engine``: a preallocated KV cache, each
   prompt run once for its samples; transformers' ``generate`` as the fallback), FSDP2 weights
   gathered once (:func:`~equilibrate_pl.modules.rollout.gathered_for_generation`), on the module's
   own RNG stream;
2. **scoring** — actor and reference log-probs, critic values, reward-model scores at the last real
   token and per-prefix (dense) scores, all in one forward pass per model;
3. **advantages** — per-token rewards (score on the last token minus ``kl_coef * KL``), GAE or a
   group estimator, optional whitening, and the APPO mask (docs/METHOD.md section 3);
4. **update** — ``ppo_epochs`` passes over minibatches: clipped policy loss on the (APPO-)masked
   tokens, entropy bonus, clipped value loss on every response token, gradient clipping, separate
   actor and critic optimizers.

Each stage is a small method (``compute_scores``, ``compute_rewards``, ``compute_advantages``,
``token_signal``, ``policy_mask``) so a subclass changes one thing (e.g. adds a length penalty in
``compute_rewards``) without copying ``training_step``.

Distributed: every reduction that defines the update (whitening statistics, the batch-mean
baseline, loss normalisers, the KL fed to the adaptive controller) is taken over ALL ranks, so an
FSDP2/DDP run on N processes computes the same update as one process holding the global batch
(tested on CPU with gloo).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, NamedTuple, Optional, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import nn

from equilibrate_pl.algorithms.ama import APPOSettings, appo_mask
from equilibrate_pl.algorithms.kl import AdaptiveKLController, FixedKLController, kl_penalty
from equilibrate_pl.algorithms.lagrangian import LagrangeMultiplier, combine_advantages
from equilibrate_pl.algorithms.ppo import (
    gae,
    group_advantages,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from equilibrate_pl.algorithms.rewards import dense_rewards
from equilibrate_pl.data.schema import GROUP_NAMES
from equilibrate_pl.distributed import (
    all_gather_objects,
    all_ranks_agree,
    all_sum,
    destroy_process_group_at_exit,
    global_explained_variance,
    global_masked_stats,
    rank,
    world_size,
)
from equilibrate_pl.models.forward import rollout_scores, rollout_token_logprobs
from equilibrate_pl.models.loading import adapter_disabled, check_adapter_reference
from equilibrate_pl.models.rollout_engine import ENGINES, SamplingParams, generate_tokens
from equilibrate_pl.models.scalar_head import init_scalar_head
from equilibrate_pl.modules.common import (
    ModelSettings,
    NonFiniteGuard,
    OptimSettings,
    build_causal_lm,
    build_scalar_model,
    check_tokenizers_match,
    coerce_settings,
    configure_adamw,
    export_hf,
    save_plain_hyperparameters,
    step_is_logged,
)
from equilibrate_pl.modules.rollout import (
    Rollout,
    RolloutRNG,
    disable_dropout,
    gathered_for_generation,
    is_sharded,
    shard_module,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Sampling of rollouts.

    Args:
        max_new_tokens: responses longer than this are cut and flagged ``truncated``.
        do_sample: ``False`` is greedy decoding (deterministic; used by the distributed test).
        temperature, top_k, top_p: sampling filters (``top_k=0`` / ``top_p=1`` disable them). PPO's
            old log-probs are those of the unfiltered policy, so filtering makes rollouts slightly
            off-policy; keep the defaults unless you know you want that.
        missing_eos_penalty: subtracted from the score of a truncated response (docs/PPO.md: responses without EOS;
            torchtune uses 3.0). 0 scores truncated responses like any other.
        stop_strings: a response also ends (and is not truncated) once its text contains one of these;
            the tokens through the one that completes it are the response.
        engine: the rollout engine (``models.rollout_engine``): ``auto`` (the KV-cache engine where
            the actor allows, else transformers' ``generate``), ``kv`` or ``hf``.
    """

    max_new_tokens: int = 32
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    stop_strings: Optional[list[str]] = None
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0, got {self.temperature}")
        if self.engine != "auto" and self.engine not in ENGINES:
            raise ValueError(f"generation.engine must be 'auto' or one of {sorted(ENGINES)}, got {self.engine!r}")


@dataclass
class PPOSettings:
    """The PPO update (defaults from "The N+ Implementation Details of RLHF with PPO").

    Args:
        ppo_epochs: passes over each rollout batch.
        minibatch_size: rows per optimizer step, per process (the batch is split into
            ``ceil(batch / minibatch_size)`` minibatches, shuffled each epoch).
        clip: policy ratio clip epsilon.
        value_clip: value clip around the rollout values (``None``: no clipping).
        gamma, lam: GAE discount and lambda.
        whiten_advantages: normalise advantages over the batch (TRL, OpenRLHF) or not (safe-rlhf).
        value_coef: weight of the value loss when the critic shares the actor's backbone.
        entropy_coef: entropy bonus (0 = none).
        max_grad_norm: gradient clipping per optimizer (``None`` = off).
        reward_clip: clip sequence scores to ``[-reward_clip, reward_clip]`` (``None`` = off).
        reuse_rollout_forward: with one epoch over one minibatch (the usual GRPO / RLOO setting),
            run the actor's scoring forward with gradients and let the update reuse it, instead of
            a no-grad forward now and the same forward again in the update. The step is the same
            (dropout is off; the ratio is exactly 1 instead of 1 +- 1e-7), one actor forward
            cheaper; the price is holding the actor's activations while the reward model scores.
    """

    ppo_epochs: int = 2
    minibatch_size: int = 8
    clip: float = 0.2
    value_clip: Optional[float] = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    reward_clip: Optional[float] = None
    reuse_rollout_forward: bool = True

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1 or self.minibatch_size < 1:
            raise ValueError(f"ppo_epochs and minibatch_size must be >= 1, got {self.ppo_epochs}, {self.minibatch_size}")


@dataclass
class KLSettings:
    """KL penalty against the reference, in the per-token reward.

    Args:
        coef: the (initial) coefficient beta.
        estimator: ``k1`` (log-ratio; can be negative per token) or ``k3`` (non-negative).
        adaptive: Ziegler et al.'s controller towards ``target`` (per-sequence KL) over ``horizon``
            samples; otherwise beta stays fixed.
    """

    coef: float = 0.05
    estimator: Literal["k1", "k3"] = "k1"
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000


@dataclass
class ConstraintSettings:
    """PPO-Lagrangian (Safe RLHF, Dai et al., 2024): keep the mean episode cost of a cost model at or
    below ``threshold`` (docs/PPO.md: the cost constraint). The cost model itself is the module's
    ``cost_model`` argument, beside ``reward_model``.

    Args:
        threshold: the limit d on the mean episode cost (cost > 0 means unsafe, so 0 asks for a policy
            that is safe on average; a negative threshold asks for margin).
        lambda_init: the multiplier lambda at the start (> 0; safe-rlhf's default is 1).
        lambda_lr: SGD learning rate of ``log(lambda)``.
        lambda_max: cap on lambda (``None``: none). The step on ``log(lambda)`` is proportional to
            lambda, so a sustained violation grows lambda doubly exponentially: uncapped, it reaches
            float overflow within a few iterations. At lambda = 100 the combined advantage is 99% the
            cost's, so the default cap changes nothing a larger lambda would do.
        update_delay: PPO iterations before lambda starts moving.
        window: episodes in the moving mean cost lambda is updated on (0: this iteration's episodes).
        use_cost_critic: cost advantages from a cost critic (GAE on the per-token costs; a scalar
            model initialised from the cost model, or the module's ``cost_critic``) or critic-free
            (the group estimator on each prompt's samples: GRPO-normalised costs, or RLOO under
            ``advantage: rloo``; needs ``samples_per_prompt >= 2``). ``None``: a cost critic exactly
            when the reward side has a critic (``advantage: gae``).
        groups: FDC groups whose episodes enter the mean cost lambda is updated on (``None``: every
            episode). An FDC mix is mostly general prompts, whose safe answers would dilute the mean
            cost until no harmful prompt could move it; ``[EHD, IHD, MHD]`` constrains the safety
            prompts. Every episode's cost still enters its advantage.
    """

    threshold: float = 0.0
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: Optional[float] = 100.0
    update_delay: int = 0
    window: int = 0
    use_cost_critic: Optional[bool] = None
    groups: Optional[list[str]] = None

    def __post_init__(self) -> None:
        # The multiplier checks its own arguments; build one now so a bad setting fails at start-up.
        self.multiplier()
        if self.groups is not None:
            unknown = sorted(set(self.groups) - set(GROUP_NAMES))
            if unknown or not self.groups:
                raise ValueError(f"constraint.groups must be a non-empty list of {list(GROUP_NAMES)}, got {self.groups}")
            self.groups = list(self.groups)

    def multiplier(self) -> LagrangeMultiplier:
        return LagrangeMultiplier(self.threshold, self.lambda_init, self.lambda_lr, self.lambda_max, self.update_delay, self.window)


AdvantageEstimator = Literal["gae", "grpo", "rloo"]


class TokenRewards(NamedTuple):
    """What :meth:`PolicyModule.compute_rewards` returns; ``training_step`` stores each on the rollout."""

    rewards: torch.Tensor  # (B, R) per-token rewards (zero off the response)
    kl: torch.Tensor  # (B, R) the per-token KL estimate they contain (zero off the response)
    scores: torch.Tensor  # (B,) the sequence scores they contain (compute_scores)


class MinibatchLoss(NamedTuple):
    """What :meth:`PolicyModule.minibatch_loss` returns."""

    actor: torch.Tensor  # what the actor's optimizer steps on (with the value loss when the critic shares the actor)
    critic: torch.Tensor  # the value loss (the separate critic's optimizer steps on it; zero without a critic)
    stats: dict[str, torch.Tensor]  # per-minibatch diagnostics, averaged over minibatches and ranks for logging
    cost_critic: Optional[torch.Tensor] = None  # the cost critic's value loss (with a constraint and a cost critic)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class PolicyModule(LightningModule):
    """PPO / APPO / GRPO / RLOO over an actor, a critic, a frozen reward model and a reference.

    Args:
        actor: the policy to train (usually the SFT model; LoRA through ``actor.lora``).
        reward_model: a scalar-head model (``equilibrate rm`` output); frozen.
        critic: scalar-head model for the values; ``None`` initialises it from the reward model
            (common practice: the critic starts knowing what scores well). Ignored for
            ``critic_mode="shared"`` and for critic-free advantages.
        critic_mode: ``separate`` model, or ``shared``: a value head on the actor's last hidden
            state (one backbone, one optimizer with the critic's learning rate on the head).
        reference: ``copy`` (a frozen copy of the initial actor), ``adapter_disabled`` (the actor with its
            LoRA adapter disabled: no second copy in memory; checked per docs/MODELS.md: the LoRA reference) or ``auto``
            (``adapter_disabled`` when the actor has LoRA, else ``copy``).
        advantage: ``gae`` (needs a critic) or critic-free ``grpo`` / ``rloo`` with
            ``samples_per_prompt >= 2`` responses per prompt.
        actor_optim, critic_optim: AdamW settings; the schedule steps once per rollout batch.
        max_nonfinite_steps: consecutive non-finite batches (scores or losses) before stopping.
        log_refusals: decode responses and log the per-group refusal rate (``eval.refusal``).
        seed: seed of the rollout sampling stream (rank r uses ``seed + r``).
        share_prompt: with ``samples_per_prompt`` k > 1, the scoring forwards (actor, reference,
            reward model, critic) run each prompt once and its k responses on its repeated KV cache
            (``models.forward.shared_prompt_forward``): the same log-probs, values and scores, the
            prompt's cost divided by k. Needs a model whose forward takes a cache and gradient
            checkpointing off (otherwise, or with ``False``, every row runs whole).
        cost_model: a scalar-head cost model (``equilibrate cost`` output; > 0 = unsafe); frozen.
            Scored like the reward model (at the last real token) and logged; it steers the update
            only with a ``constraint``.
        cost_critic: scalar-head model for the cost values when the constraint uses a cost critic;
            ``None`` initialises it from the cost model.
        constraint: PPO-Lagrangian settings (:class:`ConstraintSettings`); ``None``: plain PPO.

    Pre-built models (tests, notebooks) go through :meth:`from_models`.
    """

    def __init__(
        self,
        actor: ModelSettings = ModelSettings(),  # noqa: B008 - a dataclass default, copied below
        reward_model: Optional[ModelSettings] = None,
        critic: Optional[ModelSettings] = None,
        critic_mode: Literal["separate", "shared"] = "separate",
        reference: Literal["auto", "copy", "adapter_disabled"] = "auto",
        generation: Optional[GenerationSettings] = None,
        ppo: Optional[PPOSettings] = None,
        kl: Optional[KLSettings] = None,
        ama: Optional[APPOSettings] = None,
        advantage: AdvantageEstimator = "gae",
        samples_per_prompt: int = 1,
        actor_optim: Optional[OptimSettings] = None,
        critic_optim: Optional[OptimSettings] = None,
        max_nonfinite_steps: int = 3,
        log_refusals: bool = True,
        seed: int = 0,
        share_prompt: bool = True,
        cost_model: Optional[ModelSettings] = None,
        cost_critic: Optional[ModelSettings] = None,
        constraint: Optional[ConstraintSettings] = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if isinstance(ppo, Mapping) and "share_prompt_cache" in ppo:  # the name before share_prompt
            warnings.warn("ppo.share_prompt_cache is now share_prompt, an argument of PolicyModule as of the DPO and "
                          "reward stages; the old name will be refused in a later release", FutureWarning, stacklevel=2)
            ppo = dict(ppo)
            share_prompt = bool(ppo.pop("share_prompt_cache"))
        self.actor_settings = dataclasses.replace(coerce_settings(ModelSettings, actor) or ModelSettings())
        self.reward_settings = coerce_settings(ModelSettings, reward_model)
        self.critic_settings = coerce_settings(ModelSettings, critic)
        self.generation = coerce_settings(GenerationSettings, generation) or GenerationSettings()
        self.ppo = coerce_settings(PPOSettings, ppo) or PPOSettings()
        self.kl = coerce_settings(KLSettings, kl) or KLSettings()
        self.ama = coerce_settings(APPOSettings, ama) or APPOSettings()
        self.actor_optim = coerce_settings(OptimSettings, actor_optim) or OptimSettings(lr=1e-5, scheduler="constant")
        self.critic_optim = coerce_settings(OptimSettings, critic_optim) or OptimSettings(lr=1e-5, scheduler="constant")
        if advantage not in ("gae", "grpo", "rloo"):
            raise ValueError(f"advantage must be 'gae', 'grpo' or 'rloo', got {advantage!r}")
        if advantage != "gae" and samples_per_prompt < 2:
            raise ValueError(f"advantage={advantage!r} compares samples of a prompt: set samples_per_prompt >= 2")
        if advantage != "gae" and self.ama.enabled and self.ama.token_signal == "value":
            raise ValueError(
                f"advantage={advantage!r} has no critic, so APPO cannot use token_signal='value'; use 'dense_reward'"
            )
        if critic_mode not in ("separate", "shared"):
            raise ValueError(f"critic_mode must be 'separate' or 'shared', got {critic_mode!r}")
        if reference not in ("auto", "copy", "adapter_disabled"):
            raise ValueError(f"reference must be 'auto', 'copy' or 'adapter_disabled', got {reference!r}")
        self.cost_settings = coerce_settings(ModelSettings, cost_model)
        self.cost_critic_settings = coerce_settings(ModelSettings, cost_critic)
        self.constraint = coerce_settings(ConstraintSettings, constraint)
        if self.constraint is not None:
            _check_constraint(self.constraint, advantage, samples_per_prompt, self.ama)
        self.critic_mode = critic_mode
        self.reference_mode = reference
        self.advantage = advantage
        self.samples_per_prompt = samples_per_prompt
        self.log_refusals = log_refusals
        self.seed = seed
        self.share_prompt = share_prompt
        save_plain_hyperparameters(
            self, actor=self.actor_settings, reward_model=self.reward_settings, critic=self.critic_settings,
            critic_mode=critic_mode, reference=reference, generation=self.generation, ppo=self.ppo, kl=self.kl,
            ama=self.ama, advantage=advantage, samples_per_prompt=samples_per_prompt, actor_optim=self.actor_optim,
            critic_optim=self.critic_optim, max_nonfinite_steps=max_nonfinite_steps, log_refusals=log_refusals, seed=seed,
            share_prompt=share_prompt, cost_model=self.cost_settings, cost_critic=self.cost_critic_settings,
            constraint=self.constraint,
        )

        self.actor: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        self.reward_model: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.cost_model: nn.Module | None = None
        self.cost_critic: nn.Module | None = None
        self.multiplier: LagrangeMultiplier | None = self.constraint.multiplier() if self.constraint is not None else None
        self.tokenizer: Any = None
        self._configured = False
        self.kl_controller: FixedKLController | AdaptiveKLController = (
            AdaptiveKLController(self.kl.coef, self.kl.target, self.kl.horizon) if self.kl.adaptive
            else FixedKLController(self.kl.coef)
        )
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps)
        self.rollout_rng: RolloutRNG | None = None
        self._pending_rng_state: dict[str, torch.Tensor] | None = None
        self._warned_constant_reward = False

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_models(
        cls,
        actor: nn.Module,
        tokenizer: Any,
        reward_model: nn.Module,
        critic: nn.Module | None = None,
        reference_model: nn.Module | None = None,
        cost_model: nn.Module | None = None,
        cost_critic: nn.Module | None = None,
        **settings: Any,
    ) -> "PolicyModule":
        """A module around models built elsewhere (notebooks, tests). ``settings`` are the
        constructor's keyword arguments (``reference="copy"|...``, ``constraint={...}`` among them); a
        ``reference_model`` given here is used as is (frozen); a ``cost_model`` is frozen, and a missing
        ``cost_critic`` starts as a copy of it."""
        module = cls(**settings)
        module.actor, module.tokenizer, module.reward_model = actor, tokenizer, reward_model
        module.critic = critic
        module.cost_model, module.cost_critic = cost_model, cost_critic
        if reference_model is not None:
            module.reference = reference_model
        return module

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def uses_cost_critic(self) -> bool:
        """Cost advantages from a cost critic (GAE on costs), rather than the group estimator."""
        if self.constraint is None:
            return False
        use = self.constraint.use_cost_critic
        return self.uses_critic if use is None else use

    @property
    def optimizer_roles(self) -> tuple[str, ...]:
        """What each optimizer of :meth:`configure_optimizers` trains, in order."""
        roles = ["actor"]
        if self.uses_critic and self.critic_mode == "separate":
            roles.append("critic")
        if self.uses_cost_critic:
            roles.append("cost_critic")
        return tuple(roles)

    def build_models(self) -> None:
        """Load whatever :meth:`from_models` did not provide, from the settings."""
        if self.actor is None:
            self.actor, self.tokenizer = build_causal_lm(self.actor_settings)
        if self.reward_model is None:
            if self.reward_settings is None:
                raise ValueError("PolicyModule needs a reward model: set reward_model.name_or_path (an `equilibrate rm` output)")
            self.reward_model, rm_tokenizer = build_scalar_model(self.reward_settings)
            check_tokenizers_match(self.tokenizer, rm_tokenizer, ("policy", "reward model"))
        if self.uses_critic and self.critic_mode == "separate" and self.critic is None:
            settings = self.critic_settings or ModelSettings(
                name_or_path=(self.reward_settings or self.actor_settings).name_or_path,
                dtype=self.actor_settings.dtype, lora=self.actor_settings.lora,
                gradient_checkpointing=self.actor_settings.gradient_checkpointing,
            )
            self.critic, critic_tokenizer = build_scalar_model(settings)
            check_tokenizers_match(self.tokenizer, critic_tokenizer, ("policy", "critic"))
        self._build_cost_models()

    def _build_cost_models(self) -> None:
        """The cost model (frozen) and, with a cost critic, the critic: from its settings, else from the
        cost model's path, else (a cost model built elsewhere) a copy of the cost model."""
        if self.cost_model is None and self.cost_settings is not None:
            self.cost_model, cost_tokenizer = build_scalar_model(self.cost_settings)
            check_tokenizers_match(self.tokenizer, cost_tokenizer, ("policy", "cost model"))
        if self.constraint is not None and self.cost_model is None:
            raise ValueError("a constraint needs a cost model: set cost_model.name_or_path (an `equilibrate cost` output)")
        if not self.uses_cost_critic or self.cost_critic is not None:
            return
        if self.cost_critic_settings is None and self.cost_settings is None:
            self.cost_critic = copy.deepcopy(self.cost_model).requires_grad_(True)
            return
        settings = self.cost_critic_settings or ModelSettings(
            name_or_path=self.cost_settings.name_or_path, dtype=self.actor_settings.dtype, lora=self.actor_settings.lora,
            gradient_checkpointing=self.actor_settings.gradient_checkpointing,
        )
        self.cost_critic, critic_tokenizer = build_scalar_model(settings)
        check_tokenizers_match(self.tokenizer, critic_tokenizer, ("policy", "cost critic"))

    def configure_model(self) -> None:
        """Build models, freeze reward/reference, remove dropout, and shard with FSDP2 when the
        strategy gives a device mesh (``ModelParallelStrategy``)."""
        if self._configured:
            return
        self.build_models()
        if self.tokenizer is None:
            raise ValueError("PolicyModule has no tokenizer (pass one to from_models)")
        if self.tokenizer.pad_token_id is None or self.tokenizer.pad_token_id == self.tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from eos (docs/DATA.md: EOS is not padding)")
        # Train mode (gradient checkpointing needs it) with every dropout probability at zero.
        disable_dropout(self.actor).train()
        self._freeze(self.reward_model)
        if self.critic is not None:
            disable_dropout(self.critic).train()
        if self.cost_model is not None:
            self._freeze(self.cost_model)
        if self.cost_critic is not None:
            disable_dropout(self.cost_critic).train()
        if self.uses_critic and self.critic_mode == "shared" and self.value_head is None:
            hidden = self.actor.config.hidden_size
            self.value_head = nn.Linear(hidden, 1).to(next(self.actor.parameters()).dtype)
            init_scalar_head(self.value_head, seed=self.seed)
        if self.reference is None:
            mode = self.reference_mode
            if mode == "auto":
                mode = "adapter_disabled" if _is_peft(self.actor) else "copy"
            if mode == "adapter_disabled":
                check_adapter_reference(self.actor)
            else:
                self.reference = self._freeze(copy.deepcopy(self.actor))
        else:
            self._freeze(self.reference)

        mesh = self.device_mesh
        if mesh is not None:
            dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
            if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
                raise ValueError("PolicyModule supports data-parallel FSDP2 only: set tensor_parallel_size=1")
            for model in (self.actor, self.critic, self.value_head, self.reward_model, self.reference, self.cost_model,
                          self.cost_critic):
                if model is not None and not is_sharded(model):
                    shard_module(model, dp_mesh)
        self._configured = True

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        strategy = type(self.trainer.strategy).__name__
        if strategy in ("FSDPStrategy", "DeepSpeedStrategy") and self.trainer.world_size > 1:
            # These shard or wrap the whole LightningModule as one unit (FSDP1 flat parameters, ZeRO
            # partitions): `generate` and the per-model passes of a PPO iteration need per-model sharding.
            raise ValueError(
                f"PolicyModule does not run under {strategy}: use "
                "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2, sharded per model; "
                "configs/ppo/qwen2.5-0.5b.yaml, configs/ppo/tiny_fsdp_cpu.yaml), ddp_find_unused_parameters_true "
                "or a single device"
            )
        if strategy == "DDPStrategy" and self.trainer.world_size > 1:
            if not getattr(self.trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False):
                # Actor and critic losses are separate backward passes, each leaving the other
                # model's parameters unused; DDP must be told, or its reducer waits for them.
                raise ValueError("PolicyModule under DDP needs strategy: ddp_find_unused_parameters_true")
        precision = str(getattr(self.trainer, "precision", ""))
        if precision.startswith("16"):
            raise ValueError(
                f"PolicyModule does not support precision={precision!r} (fp16 needs a gradient scaler on every "
                "PPO minibatch step); use 'bf16-mixed', 'bf16-true' or 32"
            )

    @staticmethod
    def _freeze(model: nn.Module) -> nn.Module:
        model.eval()
        model.requires_grad_(False)
        return model

    def configure_optimizers(self) -> list[dict[str, Any]]:
        actor_params = [p for p in self.actor.parameters() if p.requires_grad]
        if not actor_params:
            raise ValueError("the actor has no trainable parameters")
        if self.value_head is not None:
            groups = [
                {"params": actor_params, "lr": self.actor_optim.lr, "weight_decay": self.actor_optim.weight_decay},
                {"params": list(self.value_head.parameters()), "lr": self.critic_optim.lr, "weight_decay": 0.0},
            ]
            return [configure_adamw(self, groups, self.actor_optim), *self._cost_critic_optimizer()]
        configs = [configure_adamw(self, [{"params": actor_params, "weight_decay": self.actor_optim.weight_decay}], self.actor_optim)]
        if self.uses_critic:
            critic_params = [p for p in self.critic.parameters() if p.requires_grad]
            configs.append(configure_adamw(self, [{"params": critic_params, "weight_decay": self.critic_optim.weight_decay}], self.critic_optim))
        return configs + self._cost_critic_optimizer()

    def _cost_critic_optimizer(self) -> list[dict[str, Any]]:
        # The cost critic learns at the critic's rate (safe-rlhf trains both critics with critic_lr).
        if not self.uses_cost_critic:
            return []
        params = [p for p in self.cost_critic.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the cost critic has no trainable parameters (a copy of a cost model without any?): pass a "
                             "scalar-head cost_critic")
        return [configure_adamw(self, [{"params": params, "weight_decay": self.critic_optim.weight_decay}], self.critic_optim)]

    # ----------------------------------------------------------------------------- forward passes

    def _reference_context(self) -> Any:
        if self.reference is not None:
            return contextlib.nullcontext(self.reference)
        return adapter_disabled(self.actor)

    def actor_forward(
        self, model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
        with_values: bool = False, with_entropy: bool = False, group: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Log-probs of the response tokens (B, R) under the sampling temperature
        (:func:`~equilibrate_pl.models.forward.rollout_token_logprobs`), optionally entropy and the
        shared value head's values. ``group`` as there."""
        # Rollouts were sampled from softmax(logits / T): old and new log-probs are of that policy.
        temperature = self.generation.temperature if self.generation.do_sample else 1.0
        out = rollout_token_logprobs(model, sequences, attention_mask, prompt_length, group=group, temperature=temperature,
                                     with_entropy=with_entropy, with_hidden=with_values)
        hidden = out.pop("hidden", None)
        if hidden is not None:
            out["values"] = self.value_head(hidden).squeeze(-1).float()
        return out

    @staticmethod
    def scalar_forward(
        model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0, group: int = 1,
    ) -> torch.Tensor:
        """(B, L) per-position scores of a scalar-head model (critic or reward;
        :func:`~equilibrate_pl.models.forward.rollout_scores`)."""
        return rollout_scores(model, sequences, attention_mask, prompt_length, group)

    def prompt_group(self, rollout: Rollout, index: torch.Tensor) -> int:
        """``samples_per_prompt`` when rows ``index`` are whole blocks of the same prompt (so the
        scoring forwards can run each prompt once; ``share_prompt``), else 1."""
        k = self.samples_per_prompt
        if not self.share_prompt or k < 2:
            return 1
        ok = index.shape[0] % k == 0
        if ok:
            blocks = index.view(-1, k)
            ok = bool(((blocks[:, 0] % k == 0) & (blocks == blocks[:, :1] + torch.arange(k, device=index.device)).all(1)).all())
        if ok:
            p = rollout.prompt_length
            prompts = torch.stack([rollout.sequences[index, :p], rollout.attention_mask[index, :p]]).view(2, -1, k, p)
            ok = bool((prompts == prompts[:, :, :1]).all())
        # The shared path runs two forwards per model: under FSDP (an all-gather in each) every
        # rank must take the same path.
        return k if all_ranks_agree(ok, self.device) else 1

    # ----------------------------------------------------------------------------- rollout phases

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> Rollout:
        """Sample responses for the batch's (left-padded) prompts; ``samples_per_prompt`` each."""
        input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        groups = [str(g) for g in batch.get("group", ["general"] * input_ids.shape[0])]
        k = self.samples_per_prompt
        if k > 1:
            input_ids = input_ids.repeat_interleave(k, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
            groups = [g for g in groups for _ in range(k)]
        g = self.generation
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        params = SamplingParams(
            max_new_tokens=g.max_new_tokens, eos_token_ids=(eos_id,), pad_token_id=pad_id, do_sample=g.do_sample,
            temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, stop_strings=tuple(g.stop_strings or ()),
        )
        if self.rollout_rng is None:
            self._init_rng()
        with self.rollout_rng.fork(), gathered_for_generation(self.actor):
            out = generate_tokens(self.actor, input_ids, prompt_mask, params, engine=g.engine, tokenizer=self.tokenizer,
                                  group=k if self.share_prompt else 1)
        prompt_length = input_ids.shape[1]
        mask, truncated = out.response_mask, ~out.finished
        responses = out.responses.masked_fill(~mask, pad_id)
        return Rollout(
            prompt_length=prompt_length,
            sequences=torch.cat([input_ids, responses], dim=1),
            attention_mask=torch.cat([prompt_mask.long(), mask.long()], dim=1),
            response_mask=mask,
            truncated=truncated,
            groups=groups,
        )

    def single_pass(self, n_rows: int) -> bool:
        """Whether the update is one optimizer step on the whole rollout batch, so the scoring
        forward of the actor can be the update's forward (``PPOSettings.reuse_rollout_forward``)."""
        return self.ppo.reuse_rollout_forward and self.ppo.ppo_epochs == 1 and n_rows <= self.ppo.minibatch_size

    def score(self, rollout: Rollout) -> Rollout:
        """Old log-probs, reference log-probs, values, scores and dense rewards (no gradients;
        in single-pass mode the actor's forward keeps its graph for :meth:`update`)."""
        seq, attn, p = rollout.sequences, rollout.attention_mask, rollout.prompt_length
        chunks = _chunks(seq.shape[0], self.ppo.minibatch_size)
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref": [], "values": [], "rm": []}
        shared = self.uses_critic and self.value_head is not None
        # Only inside a training step (grad mode on): a caller scoring for evaluation gets no graph.
        single = self.single_pass(seq.shape[0]) and torch.is_grad_enabled()
        for idx in chunks:
            s, a = seq[idx], attn[idx]
            k = self.prompt_group(rollout, idx)
            # Reference first: with an adapter-disabled reference, the actor's graph below must not
            # see its own module run again (adapter off, FSDP2 hooks) between forward and backward.
            with torch.no_grad(), self._reference_context() as ref:
                parts["ref"].append(self.actor_forward(ref, s, a, p, group=k)["logprobs"])
            if single:
                with torch.enable_grad():
                    rollout.update_forward = self.actor_forward(self.actor, s, a, p, with_values=shared, with_entropy=True,
                                                                group=k)
                out = {key: value.detach() for key, value in rollout.update_forward.items()}
            else:
                with torch.no_grad():
                    out = self.actor_forward(self.actor, s, a, p, with_values=shared, group=k)
            parts["logprobs"].append(out["logprobs"])
            if shared:
                parts["values"].append(out["values"])
            with torch.no_grad():
                if self.uses_critic and not shared:
                    parts["values"].append(self.scalar_forward(self.critic, s, a, p, k)[:, p - 1:-1])
                parts["rm"].append(self.scalar_forward(self.reward_model, s, a, p, k))
        mask = rollout.response_mask
        rollout.logprobs = torch.cat(parts["logprobs"]) * mask
        rollout.ref_logprobs = torch.cat(parts["ref"]) * mask
        if parts["values"]:
            rollout.values = torch.cat(parts["values"]) * mask
        rollout.scores, rollout.dense_rewards = _sequence_and_dense(torch.cat(parts["rm"]), rollout)
        return rollout

    @torch.no_grad()
    def score_costs(self, rollout: Rollout) -> Rollout:
        """The cost model's sequence costs (at the last real token, like the reward) and dense costs,
        and the cost critic's values; nothing without a cost model. Same chunks and shared-prompt
        path as :meth:`score`."""
        if self.cost_model is None:
            return rollout
        seq, attn, p = rollout.sequences, rollout.attention_mask, rollout.prompt_length
        prefix: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for idx in _chunks(seq.shape[0], self.ppo.minibatch_size):
            k = self.prompt_group(rollout, idx)
            prefix.append(self.scalar_forward(self.cost_model, seq[idx], attn[idx], p, k))
            if self.uses_cost_critic:
                values.append(self.scalar_forward(self.cost_critic, seq[idx], attn[idx], p, k)[:, p - 1:-1])
        rollout.cost_scores, rollout.cost_dense = _sequence_and_dense(torch.cat(prefix), rollout)
        if values:
            rollout.cost_values = torch.cat(values) * rollout.response_mask
        return rollout

    def compute_scores(self, batch: dict[str, Any], rollout: Rollout) -> torch.Tensor:
        """(B,) sequence scores: the reward model at the last real token, minus the missing-EOS
        penalty, clipped. Override to reshape the score (e.g. a length penalty)."""
        scores = rollout.scores.float()
        if self.generation.missing_eos_penalty:
            scores = scores - self.generation.missing_eos_penalty * rollout.truncated.float()
        if self.ppo.reward_clip is not None:
            scores = scores.clamp(-self.ppo.reward_clip, self.ppo.reward_clip)
        return scores

    def compute_rewards(self, batch: dict[str, Any], rollout: Rollout) -> TokenRewards:
        """Per-token rewards: ``-kl_coef * KL_t`` on every response token plus the sequence score
        (:meth:`compute_scores`) on the last one (the EOS or the cut, never a pad after it), returned
        with the KL and the scores they contain (logged, and the KL feeds the adaptive controller)."""
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, self.kl.estimator) * rollout.response_mask
        scores = self.compute_scores(batch, rollout)
        return TokenRewards(_token_rewards(scores, -self.kl_controller.value * kl, rollout), kl, scores)

    def compute_costs(self, batch: dict[str, Any], rollout: Rollout) -> torch.Tensor:
        """(B,) episode costs: the cost model at the last real token, clipped like the scores
        (``ppo.reward_clip``). No missing-EOS term: a cut response is not more harmful for being cut.
        Override to reshape the cost."""
        costs = rollout.cost_scores.float()
        if self.ppo.reward_clip is not None:
            costs = costs.clamp(-self.ppo.reward_clip, self.ppo.reward_clip)
        return costs

    def compute_cost_rewards(self, batch: dict[str, Any], rollout: Rollout) -> TokenRewards:
        """Per-token costs: the episode cost (:meth:`compute_costs`) on the last token plus
        ``+kl_coef * KL_t`` on every token, as safe-rlhf does: in ``(A_r - lambda A_c) / (1 + lambda)``
        the KL term then counts ``-kl_coef * KL_t`` once, whatever lambda (GAE is linear in the rewards).
        Needs ``rollout.kl`` (:meth:`compute_rewards`)."""
        costs = self.compute_costs(batch, rollout)
        return TokenRewards(_token_rewards(costs, self.kl_controller.value * rollout.kl, rollout), rollout.kl, costs)

    def estimate_advantages(self, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor,
                            critic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns) of per-token ``rewards``, not whitened: GAE with a critic's ``values``,
        or the group estimator (``advantage``; GRPO when that is ``gae``) on their per-sequence sums,
        broadcast to every response token (returns are then zero)."""
        if critic:
            return gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)
        sequence_rewards = (rewards * mask).sum(-1)
        method = "grpo" if self.advantage == "gae" else self.advantage
        advantages = group_advantages(sequence_rewards, self.samples_per_prompt, method).unsqueeze(1) * mask
        return advantages, torch.zeros_like(advantages)

    def compute_advantages(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns), each (B, R). GAE with the critic, or a group estimator on the
        summed per-token rewards (score minus KL), broadcast to every response token. With a
        constraint the reward and cost advantages are combined as ``(A_r - lambda A_c) / (1 + lambda)``
        (:func:`~equilibrate_pl.algorithms.lagrangian.combine_advantages`) before whitening, so
        whitening rescales what the policy loss pushes without changing lambda's weight; the cost
        critic's returns go to ``rollout.cost_returns``."""
        mask = rollout.response_mask
        advantages, returns = self.estimate_advantages(rollout.rewards, rollout.values, mask, self.uses_critic)
        if self.constraint is not None:
            cost_advantages, rollout.cost_returns = self.estimate_advantages(rollout.cost_rewards, rollout.cost_values, mask,
                                                                             self.uses_cost_critic)
            rollout.extras["reward_advantages"], rollout.extras["cost_advantages"] = advantages, cost_advantages
            advantages = combine_advantages(advantages, cost_advantages, self.multiplier.value) * mask
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask, stats=global_masked_stats(advantages, mask))
        return advantages, returns

    def token_signal(self, rollout: Rollout) -> torch.Tensor:
        """(B, R) per-token signal r_t of the APPO mask. With a constraint, the reward and cost signals
        (values, or dense rewards and dense costs) combined like the advantages (docs/PPO.md)."""
        if self.ama.token_signal == "value":
            signal, cost_signal = rollout.values, rollout.cost_values
        else:
            signal, cost_signal = rollout.dense_rewards, rollout.cost_dense
        if self.constraint is None:
            return signal
        return combine_advantages(signal, cost_signal, self.multiplier.value)

    def update_multiplier(self, rollout: Rollout) -> None:
        """Add this iteration's episode costs (every rank's; those of ``constraint.groups``) to the
        multiplier's window and step lambda (``algorithms.lagrangian.LagrangeMultiplier``); every rank
        takes the same step. An iteration without such episodes leaves lambda as it is."""
        mine = rollout.shaped_costs.tolist()
        if self.constraint.groups is not None:
            mine = [c for c, g in zip(mine, rollout.groups) if g in self.constraint.groups]
        costs = [c for rank_costs in all_gather_objects(mine) for c in rank_costs]
        self.multiplier.update(costs, iteration=self.global_step)

    def policy_mask(self, rollout: Rollout) -> torch.Tensor:
        """Tokens that enter the policy loss: the APPO mask, or every response token (plain PPO)."""
        mask = rollout.response_mask
        if not self.ama.enabled:
            return mask
        signal = self.token_signal(rollout)
        if self.ama.baseline == "batch_mean":
            baseline: Any = float(global_masked_stats(signal, mask)[0])
        else:
            baseline = "zero"
        keep, fallback = appo_mask(rollout.advantages, signal, mask, baseline=baseline, return_fallbacks=True)
        rollout.extras["ama_fallbacks"] = fallback
        return keep

    # ----------------------------------------------------------------------------- the step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        timings: dict[str, float] = {}
        with _timed(timings, "generation"):
            rollout = self.generate(batch)
        with _timed(timings, "scoring"):
            self.score(rollout)
            rollout.rewards, rollout.kl, rollout.shaped_scores = self.compute_rewards(batch, rollout)
            self.score_costs(rollout)
            if self.constraint is not None:
                rollout.cost_rewards, _, rollout.shaped_costs = self.compute_cost_rewards(batch, rollout)
            elif rollout.cost_scores is not None:  # monitored only: a bad cost must not stop training
                rollout.shaped_costs = self.compute_costs(batch, rollout)
        finite = torch.isfinite(rollout.rewards).all() & torch.isfinite(rollout.logprobs).all()
        for extra in (rollout.values, rollout.cost_rewards, rollout.cost_values):
            if extra is not None:
                finite &= torch.isfinite(extra).all()
        if not self._check_finite(finite, "rewards"):
            return None  # a skipped iteration advances neither global_step nor the LR schedule
        if self.constraint is not None:
            self.update_multiplier(rollout)
        rollout.advantages, rollout.returns = self.compute_advantages(rollout)
        rollout.policy_mask = self.policy_mask(rollout)
        with _timed(timings, "update"):
            stats = self.update(rollout)
        if stats is None:
            return None
        self._step_schedulers()
        kl_sum, rows = all_sum(torch.stack([(rollout.kl * rollout.response_mask).sum(), torch.tensor(float(len(rollout.groups)), device=self.device)]))
        self.kl_controller.update(float(kl_sum / rows), n_steps=int(rows))
        self._log_step(batch, rollout, stats, timings)
        return None

    def minibatch_loss(self, mb: dict[str, torch.Tensor], prompt_length: int, forward: dict[str, torch.Tensor] | None = None) -> MinibatchLoss:
        """Clipped policy loss on the (APPO-)masked tokens minus the entropy bonus, and the clipped
        value loss on every response token, of one minibatch (:meth:`Rollout.select`).

        ``forward`` is the actor's forward over these rows when :meth:`score` already ran it with
        gradients (``PPOSettings.reuse_rollout_forward``); otherwise it runs here. Losses are divided
        by the minibatch's token counts over ALL ranks (times the world size): with gradients averaged
        over ranks, N processes then take exactly the step of one process holding every row.
        """
        p, shared = prompt_length, self.value_head is not None and self.uses_critic
        world = world_size()
        counts = all_sum(torch.stack([mb["policy_mask"].sum(), mb["response_mask"].sum()]).float().to(self.device))
        policy_norm, token_norm = counts[0].clamp(min=1) / world, counts[1].clamp(min=1) / world
        if forward is None:
            forward = self.actor_forward(self.actor, mb["sequences"], mb["attention_mask"], p, with_values=shared, with_entropy=True)
        pg_loss, pg_stats = policy_loss(forward["logprobs"], mb["logprobs"], mb["advantages"], mb["policy_mask"], self.ppo.clip, normalizer=policy_norm)
        entropy = masked_mean(forward["entropy"], mb["response_mask"], normalizer=token_norm)
        actor_loss = pg_loss - self.ppo.entropy_coef * entropy
        vf_loss, vf_stats = torch.zeros((), device=self.device), {}
        if self.uses_critic:
            values = forward["values"] if shared else self.scalar_forward(self.critic, mb["sequences"], mb["attention_mask"])[:, p - 1:-1]
            vf_loss, vf_stats = value_loss(values, mb["values"], mb["returns"], mb["response_mask"], self.ppo.value_clip, normalizer=token_norm)
        cost_vf_loss = None
        if self.uses_cost_critic:
            cost_values = self.scalar_forward(self.cost_critic, mb["sequences"], mb["attention_mask"])[:, p - 1:-1]
            cost_vf_loss, _ = value_loss(cost_values, mb["cost_values"], mb["cost_returns"], mb["response_mask"],
                                         self.ppo.value_clip, normalizer=token_norm)
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "ppo/entropy": entropy.detach(),
            "ppo/clip_fraction": pg_stats["clip_fraction"],
            "ppo/approx_kl": pg_stats["approx_kl"],
            "ppo/ratio_mean": pg_stats["ratio_mean"],
            # Before any step this is 0 up to rounding: rollout and update log-probs agree.
            "ppo/ratio_max_deviation": ((forward["logprobs"].detach() - mb["logprobs"]).abs() * mb["response_mask"]).max(),
        }
        if vf_stats:
            stats["ppo/value_clip_fraction"] = vf_stats["value_clip_fraction"]
        if cost_vf_loss is not None:
            stats["loss/cost_value"] = cost_vf_loss.detach()
        return MinibatchLoss(actor_loss + self.ppo.value_coef * vf_loss if shared else actor_loss, vf_loss, stats, cost_vf_loss)

    def update(self, rollout: Rollout) -> dict[str, torch.Tensor] | None:
        """``ppo_epochs`` passes of :meth:`minibatch_loss` over shuffled minibatches, an actor (and
        critic) optimizer step each. Returns the statistics averaged over minibatches and ranks, or
        ``None`` if a non-finite loss made this batch be skipped."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        roles = dict(zip(self.optimizer_roles, optimizers))
        actor_opt, critic_opt, cost_opt = roles["actor"], roles.get("critic"), roles.get("cost_critic")
        n = rollout.sequences.shape[0]
        minibatches = [idx for epoch in range(self.ppo.ppo_epochs) for idx in _chunks(n, self.ppo.minibatch_size, self._shuffled(n, epoch))]
        sums: dict[str, float] = {}
        first_deviation = 0.0
        for i, idx in enumerate(minibatches):
            forward = None
            if rollout.update_forward is not None:  # one minibatch, one epoch: used exactly once
                forward = {key: value[idx] for key, value in rollout.update_forward.items()}
                rollout.update_forward = None
            loss = self.minibatch_loss(rollout.select(idx), rollout.prompt_length, forward)
            finite = torch.isfinite(loss.actor.detach()) & torch.isfinite(loss.critic.detach())
            if loss.cost_critic is not None:
                finite &= torch.isfinite(loss.cost_critic.detach())
            if not self._check_finite(finite, "loss"):
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                return None
            # Lightning counts every optimizer step of manual optimization as a global step;
            # count one per PPO iteration so `max_steps` and checkpoint intervals mean rollouts.
            step = {"grad_norm/actor": self._backward_and_step(actor_opt, loss.actor, count=i == len(minibatches) - 1)}
            if critic_opt is not None:
                step["grad_norm/critic"] = self._backward_and_step(critic_opt, loss.critic, count=False)
            if cost_opt is not None:
                step["grad_norm/cost_critic"] = self._backward_and_step(cost_opt, loss.cost_critic, count=False)
            deviation = loss.stats.pop("ppo/ratio_max_deviation")
            if i == 0:
                first_deviation = float(deviation)
            for key, value in {**loss.stats, **step}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        keys = sorted(sums)
        # Losses normalised by global counts sum over ranks to the global loss, divided by `world`
        # because each was multiplied by it; plain statistics are averaged: both are sum / world.
        reduced = all_sum(torch.tensor([sums[k] / len(minibatches) for k in keys], device=self.device)) / world_size()
        out: dict[str, torch.Tensor] = {key: reduced[i] for i, key in enumerate(keys)}
        out["ppo/first_ratio_max_deviation"] = torch.tensor(first_deviation)
        return out

    def _shuffled(self, n: int, epoch: int) -> torch.Tensor:
        # Same permutation on every rank (seeded by step and epoch): shards stay aligned.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step * 1009 + epoch)
        return torch.randperm(n, generator=gen)

    def _backward_and_step(self, optimizer: Any, loss: torch.Tensor, count: bool) -> float:
        """Backward, gradient clipping, step; returns the gradient norm before clipping."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        norm = self._clip(optimizer)
        _optimizer_step(optimizer, count=count)
        return norm

    def _clip(self, optimizer: Any) -> float:
        if self.ppo.max_grad_norm is None:
            return 0.0
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.ppo.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    def _check_finite(self, finite: torch.Tensor, what: str) -> bool:
        """Skip (all ranks together) on a non-finite batch; the guard raises after N in a row."""
        bad = all_sum((~finite.bool()).float().reshape(()).to(self.device))
        marker = torch.where(bad > 0, torch.tensor(float("nan"), device=self.device), torch.zeros((), device=self.device))
        ok = self.nonfinite_guard.check(marker, step=self.global_step)
        if not ok:
            log.warning("non-finite %s at step %d: batch skipped", what, self.global_step)
            self.log("nonfinite/skipped_total", float(self.nonfinite_guard.total_skipped), on_step=True, rank_zero_only=True)
        return ok

    # ----------------------------------------------------------------------------- logging

    def _log_step(self, batch: dict[str, Any], rollout: Rollout, stats: dict[str, torch.Tensor], timings: dict[str, float]) -> None:
        m = rollout.response_mask
        scores = (rollout.shaped_scores if rollout.shaped_scores is not None else rollout.scores).float()
        refusals = self._refusals(rollout) if self.log_refusals else None
        columns = {
            "rows": torch.ones_like(scores),
            "score": scores,
            "score_sq": scores**2,
            "kl": (rollout.kl * m).sum(-1),
            "k1": (kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * m).sum(-1),
            "k3": (kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k3") * m).sum(-1),
            "length": m.sum(-1),
            "kept": (rollout.policy_mask.bool() & m).sum(-1),
            "truncated": rollout.truncated,
            "fallbacks": rollout.extras.get("ama_fallbacks", torch.zeros_like(scores, dtype=torch.bool)),
        }
        if refusals is not None:
            columns["refusals"] = refusals
        costs = rollout.shaped_costs if rollout.shaped_costs is not None else rollout.cost_scores
        if costs is not None:
            columns["cost"], columns["unsafe"] = costs.float(), costs > 0
        groups = group_sums(columns, rollout.groups)  # {name: (groups,)}, every rank's rows
        total = {name: value.sum() for name, value in groups.items()}
        rows = total["rows"].clamp(min=1)
        mean_score = total["score"] / rows
        metrics: dict[str, Any] = {
            "reward/mean": mean_score,
            "reward/std": (total["score_sq"] / rows - mean_score**2).clamp(min=0).sqrt(),
            "kl/coef": self.kl_controller.value,
            "kl/k1": total["k1"] / rows,
            "kl/k3": total["k3"] / rows,
            "kl/sequence": total["kl"] / rows,
            "response/length": total["length"] / rows,
            "response/truncated_fraction": total["truncated"] / rows,
            "ama/kept_fraction": total["kept"] / total["length"].clamp(min=1),
            "ama/fallbacks": total["fallbacks"],
        }
        if refusals is not None:
            metrics["response/refusal_rate"] = total["refusals"] / rows
        if rollout.values is not None:
            metrics["ppo/value_explained_variance"] = global_explained_variance(rollout.values, rollout.returns, m)
        if costs is not None:
            metrics["cost/mean"] = total["cost"] / rows
            metrics["cost/unsafe_fraction"] = total["unsafe"] / rows
        if self.multiplier is not None:
            metrics.update(self._constraint_metrics(rollout))
        metrics.update(stats)
        for i, name in enumerate(GROUP_LOG_NAMES):
            n_rows = groups["rows"][i]
            if n_rows <= 0:
                continue
            metrics[f"group/{name}/reward"] = groups["score"][i] / n_rows
            metrics[f"group/{name}/kl"] = groups["kl"][i] / n_rows
            metrics[f"group/{name}/length"] = groups["length"][i] / n_rows
            metrics[f"group/{name}/kept_fraction"] = groups["kept"][i] / groups["length"][i].clamp(min=1)
            if refusals is not None:
                metrics[f"group/{name}/refusal_rate"] = groups["refusals"][i] / n_rows
            if costs is not None:
                metrics[f"group/{name}/cost"] = groups["cost"][i] / n_rows
                metrics[f"group/{name}/unsafe_fraction"] = groups["unsafe"][i] / n_rows
                if self.constraint is not None:
                    metrics[f"group/{name}/violation"] = groups["cost"][i] / n_rows - self.constraint.threshold
        step_time = sum(timings.values())
        for phase, seconds in timings.items():
            metrics[f"time/{phase}_s"] = seconds
            metrics[f"time/{phase}_share"] = seconds / max(step_time, 1e-12)
        metrics["time/step_s"] = step_time
        if rows > 1 and metrics["reward/std"] < 1e-6 and not self._warned_constant_reward:
            self._warned_constant_reward = True
            warnings.warn(
                f"the reward model gave the same score ({float(mean_score):.4g}) to all {int(rows)} responses of step "
                f"{self.global_step}: a constant reward model gives no learning signal (untrained head? wrong checkpoint?)",
                RuntimeWarning, stacklevel=2,
            )
        # One host transfer for every tensor value (each float() would be a device sync).
        tensors = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in tensors]).tolist() if tensors else []
        self.last_metrics = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        self.last_metrics.update(zip(tensors, values))
        # ~40 values: Lightning's per-call bookkeeping cost ~8% of a tiny-model GRPO step, so they go
        # to the loggers only on the steps Lightning writes (last_metrics has every step's).
        if step_is_logged(self):
            self.log_dict(dict(self.last_metrics), on_step=True, on_epoch=False, prog_bar=False,
                          batch_size=len(rollout.groups), rank_zero_only=True)

    def _constraint_metrics(self, rollout: Rollout) -> dict[str, Any]:
        """lambda, the windowed mean cost it was stepped on and its violation of the threshold, the
        cost critic's explained variance, and the mean reward / cost advantages before combining."""
        assert self.multiplier is not None and self.constraint is not None
        window_cost = self.multiplier.mean_cost()
        out: dict[str, Any] = {
            "lagrangian/lambda": self.multiplier.value,
            "lagrangian/window_cost": window_cost,
            "lagrangian/violation": window_cost - self.constraint.threshold,
        }
        m = rollout.response_mask
        for name in ("reward_advantages", "cost_advantages"):
            if name in rollout.extras:
                out[f"lagrangian/{name.replace('_advantages', '')}_advantage_std"] = global_masked_stats(rollout.extras[name], m)[1].sqrt()
        if rollout.cost_values is not None:
            out["ppo/cost_value_explained_variance"] = global_explained_variance(rollout.cost_values, rollout.cost_returns, m)
        return out

    def _refusals(self, rollout: Rollout) -> torch.Tensor | None:
        try:
            from equilibrate_pl.eval.refusal import is_refusal
        except ImportError:  # the detector is optional for training
            return None
        texts = self.tokenizer.batch_decode(rollout.response_ids.masked_fill(~rollout.response_mask, self.tokenizer.pad_token_id), skip_special_tokens=True)
        return torch.tensor([is_refusal(t) for t in texts], device=rollout.sequences.device)

    # ----------------------------------------------------------------------------- state

    def _init_rng(self) -> None:
        self.rollout_rng = RolloutRNG(self.seed + rank(), self.device)
        if self._pending_rng_state is not None:
            self.rollout_rng.load_state_dict(self._pending_rng_state)
            self._pending_rng_state = None

    def export(self, directory: str, merge_lora: bool = True) -> None:
        """The actor as a Hugging Face directory (safetensors + tokenizer), LoRA merged unless asked not to."""
        export_hf(self.actor, self.tokenizer, directory, merge_lora=merge_lora)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.rollout_rng is None:
            self._init_rng()
        checkpoint["policy_state"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "nonfinite_guard": self.nonfinite_guard.state_dict(),
            "rollout_rng": all_gather_objects(self.rollout_rng.state_dict()),
        }
        if self.multiplier is not None:  # lambda, its optimizer and the cost window: the next step's lambda
            checkpoint["policy_state"]["lagrange_multiplier"] = self.multiplier.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("policy_state")
        if state is None:
            return
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.nonfinite_guard.load_state_dict(state["nonfinite_guard"])
        if self.multiplier is not None:
            if "lagrange_multiplier" not in state:
                raise ValueError("this checkpoint was written without a constraint: a constrained run cannot resume from "
                                 "it (its Lagrange multiplier is missing); start a new run from its exported policy")
            self.multiplier.load_state_dict(state["lagrange_multiplier"])
        states, this_rank = state["rollout_rng"], rank()
        if this_rank < len(states):
            self._pending_rng_state = states[this_rank]
            self.rollout_rng = None
        else:
            log.warning("checkpoint has rollout RNG states of %d rank(s); rank %d starts a fresh stream", len(states), this_rank)


def _optimizer_step(optimizer: Any, count: bool) -> None:
    """Step a ``LightningOptimizer`` (counted in ``global_step``) or its wrapped optimizer (not).

    Mixed precision with a gradient scaler (``16-mixed``) needs Lightning's counted path for every
    step; :meth:`PolicyModule.setup` refuses it. bf16 needs no scaler."""
    if count or not hasattr(optimizer, "optimizer"):
        optimizer.step()
    else:
        optimizer.optimizer.step()


def _sequence_and_dense(prefix: torch.Tensor, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """From a scalar model's (B, P + R) prefix scores over the rollout: the (B,) score at each row's
    last real token and the (B, R) dense per-token differences on the response."""
    p = rollout.prompt_length
    scores = prefix.gather(1, rollout.last_token_index.unsqueeze(1)).squeeze(1)
    # Dense rewards need the score at the end of the prompt: start one column before the response.
    dense_mask = rollout.attention_mask[:, p - 1:].bool().clone()
    dense_mask[:, 0] = False
    return scores, dense_rewards(prefix[:, p - 1:], dense_mask)[:, 1:]


def _token_rewards(scores: torch.Tensor, per_token: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """(B, R): ``per_token`` on every response token plus the (B,) ``scores`` on the last one (the
    EOS or the cut, never a pad after it)."""
    last = (rollout.response_lengths - 1).clamp(min=0)
    return per_token.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(per_token.dtype)) * rollout.response_mask


def _check_constraint(constraint: ConstraintSettings, advantage: str, samples_per_prompt: int, ama: APPOSettings) -> None:
    critic = advantage == "gae" if constraint.use_cost_critic is None else constraint.use_cost_critic
    if critic and advantage != "gae":
        raise ValueError(f"constraint.use_cost_critic: true needs advantage='gae' (advantage={advantage!r} has no critic)")
    if not critic and samples_per_prompt < 2:
        raise ValueError("critic-free cost advantages compare the samples of a prompt: set samples_per_prompt >= 2 "
                         "(or constraint.use_cost_critic: true under advantage='gae')")
    if not critic and ama.enabled and ama.token_signal == "value":
        raise ValueError("APPO's value signal with a constraint needs a cost critic's values; use "
                         "ama.token_signal='dense_reward' or constraint.use_cost_critic: true")


def _chunks(n: int, size: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    order = torch.arange(n) if order is None else order
    return [order[i:i + size] for i in range(0, n, size)]


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


# FDC groups in logged metric names; rows of any other group count as "other".
GROUP_LOG_NAMES: tuple[str, ...] = (*GROUP_NAMES, "other")


def group_sums(columns: dict[str, torch.Tensor], groups: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-row (B,) ``columns`` summed per FDC group over every rank: ``{name: (len(GROUP_LOG_NAMES),)}``
    in the order of :data:`GROUP_LOG_NAMES`. One all-reduce for all of them."""
    names = list(columns)
    per_row = torch.stack([columns[name].float() for name in names], dim=1)
    index = torch.tensor([GROUP_NAMES.index(g) if g in GROUP_NAMES else len(GROUP_NAMES) for g in groups], device=per_row.device)
    sums = torch.zeros(len(GROUP_LOG_NAMES), len(names), device=per_row.device).index_add_(0, index, per_row)
    sums = all_sum(sums)
    return {name: sums[:, j] for j, name in enumerate(names)}


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = time.perf_counter() - start


__all__ = ["PolicyModule", "GenerationSettings", "PPOSettings", "KLSettings", "APPOSettings", "ConstraintSettings", "Rollout",
           "TokenRewards", "MinibatchLoss"]
