"""DPO and ADPO (DPO with the AMA token mask).

One step, :meth:`PreferenceModule.compute_loss`, reads like a DPO recipe:

1. :meth:`stack` — chosen rows then rejected rows, one (2B, L) batch;
2. :meth:`reference_values` — the frozen side: reference log-probs (a frozen copy, or the policy
   with its LoRA adapter disabled) and, for ADPO with a model-made signal, the token signal (a
   reward model's dense rewards, or a frozen DPO model's implicit rewards); from the
   :class:`~equilibrate_pl.modules.reference_cache.ReferenceCache` when ``precompute_reference``
   is on. Every token signal is frozen: it never depends on the policy being trained;
3. :meth:`policy_token_logprobs` — the policy's log-probs, with gradients;
4. ADPO only: :meth:`compute_token_signal` (r_t per response token) and :meth:`compute_masks`
   (``algorithms.ama.adpo_masks``: chosen keeps r_t > b, rejected r_t < b);
5. ``algorithms.dpo.dpo_loss`` on the (masked) per-token sums of policy AND reference, plus an
   optional NLL term on the chosen responses.

Each step is a method a subclass can override. Every forward over pairs goes through
:func:`~equilibrate_pl.models.forward.forward_token_logprobs` (each pair one packed row, its prompt
computed once; the LM head only over scored positions).

Alignment of positions (the easy place for an off-by-one): log-prob entry t is the log-prob of
token t+1, while ``dense_rewards`` and the data's ``*_token_signal`` hold token t's value at
position t; both are therefore shifted by one (``[:, 1:]``) before they meet the log-probs. Every
per-token tensor here is (2B, L-1) in that layout, zero over the prompt and padding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from equilibrate_pl.algorithms.ama import ADPOSettings, adpo_masks, kept_fraction
from equilibrate_pl.algorithms.dpo import dpo_loss, implicit_rewards
from equilibrate_pl.algorithms.logprobs import sequence_logprobs
from equilibrate_pl.algorithms.rewards import dense_rewards
from equilibrate_pl.data.schema import IGNORE_INDEX
from equilibrate_pl.models import check_adapter_reference, freeze, load_causal_lm, load_scalar_model, position_scores
from equilibrate_pl.models.forward import forward_token_logprobs, stack_pairs
from equilibrate_pl.modules.common import (
    ModelSettings,
    NonFiniteGuard,
    OptimSettings,
    SingleModelHooks,
    build_causal_lm,
    check_tokenizers_match,
    coerce_settings,
    log_per_group,
    rank_max,
    save_plain_hyperparameters,
)
from equilibrate_pl.modules.reference_cache import ReferenceCache, fingerprint, weights_id

log = logging.getLogger(__name__)

# Frozen models a checkpoint does not store: they are reloaded from their paths.
_FROZEN = ("reference", "reward_model", "implicit_model")


class PreferenceModule(SingleModelHooks, LightningModule):
    """DPO / ADPO on preference batches (``chosen_*`` / ``rejected_*``, right padded).

    Args:
        model: the policy to load (``ModelSettings``); usually the SFT output.
        optim: AdamW and schedule.
        beta: DPO temperature.
        label_smoothing: conservative-DPO label noise (0 = plain DPO).
        nll_weight: weight of an added NLL loss on the chosen responses (per-token mean, all chosen
            tokens, never masked): RPO (Pang et al., 2024; TRL's ``rpo_alpha``). DPO alone can lower
            the likelihood of the chosen answers too ("likelihood displacement"); small models then
            drift to a third kind of answer. 0 = plain DPO / ADPO.
        ama: ADPO settings (``algorithms.ama.ADPOSettings``); disabled = DPO.
        reference: ``copy`` (a frozen second copy of the starting weights) or
            ``adapter_disabled`` (the policy's base with its LoRA adapter switched off; needs
            ``model.lora``; no second copy in memory).
        reward_model: a saved scalar-head model (``equilibrate export`` of the RM stage); needed for
            ``ama.token_signal: dense_reward`` (the default signal). Its tokenizer must match the
            policy's. Train it with ``prefix_weight`` > 0 (the RM recipes do) so that its prefix
            scores, whose differences are the token rewards, mean something.
        implicit_model: a saved causal LM pi* (e.g. an earlier DPO run from the same starting model);
            needed for ``ama.token_signal: implicit``, whose token signal is beta*(log pi*(y_t) -
            log pi_ref(y_t)). Frozen: the policy being trained never provides its own signal.
        precompute_reference: compute reference log-probs (and dense rewards) for every train and
            validation row once before training and keep them on disk; the reference model is then
            not run in the training steps.
        cache_dir: where the cache lives (default ``<trainer.default_root_dir>/reference_cache``).
        max_nonfinite_steps: stop after this many non-finite losses in a row.
        share_prompt: run each pair as one packed row, its prompt computed once (same log-probs), where
            the model takes a 4-D mask and position ids (sdpa or eager attention) and rows are right
            padded; otherwise, or with ``False``, chosen and rejected run as stacked rows.
        length_groups: packed rows run in up to this many forwards of rows of similar length, each
            cut to its longest row (a split is made only when it saves more than 10% of the padded
            positions per extra forward); 1 = one forward. Always 1 with several processes (under
            FSDP every rank must run the same forwards).
    """

    def __init__(
        self,
        model: ModelSettings | None = None,
        optim: OptimSettings | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        ama: ADPOSettings | None = None,
        reference: Literal["copy", "adapter_disabled"] = "copy",
        reward_model: str | None = None,
        implicit_model: str | None = None,
        precompute_reference: bool = False,
        cache_dir: str | None = None,
        max_nonfinite_steps: int = 3,
        share_prompt: bool = True,
        length_groups: int = 2,
    ) -> None:
        super().__init__()
        self.model_settings: ModelSettings = coerce_settings(ModelSettings, model) or ModelSettings()
        self.optim: OptimSettings = coerce_settings(OptimSettings, optim) or OptimSettings(lr=1e-5)
        self.ama: ADPOSettings = coerce_settings(ADPOSettings, ama) or ADPOSettings()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if reference not in ("copy", "adapter_disabled"):
            raise ValueError(f"reference must be 'copy' or 'adapter_disabled', got {reference!r}")
        if reference == "adapter_disabled" and self.model_settings.lora is None:
            raise ValueError("reference='adapter_disabled' needs a LoRA policy (model.lora); use reference='copy'")
        uses_rm = self.ama.enabled and self.ama.token_signal == "dense_reward"
        if uses_rm and not reward_model:
            raise ValueError("ama.token_signal='dense_reward' needs reward_model: the path of a trained reward model")
        uses_implicit = self.ama.enabled and self.ama.token_signal == "implicit"
        if uses_implicit and not implicit_model:
            raise ValueError(
                "ama.token_signal='implicit' needs implicit_model: a frozen DPO model whose token rewards mark the key "
                "tokens. The policy's own log-ratio cannot serve: a mask built from it keeps the tokens that already moved "
                "the right way, so the loss falls whatever the labels (docs/METHOD.md)")
        if nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
        self.beta, self.label_smoothing, self.nll_weight = beta, label_smoothing, nll_weight
        self.reference_mode, self.reward_model_path, self.implicit_model_path = reference, reward_model, implicit_model
        self.precompute_reference, self.cache_dir = precompute_reference, cache_dir
        save_plain_hyperparameters(
            self, model=self.model_settings, optim=self.optim, beta=beta, label_smoothing=label_smoothing, nll_weight=nll_weight,
            ama=self.ama, reference=reference, reward_model=reward_model, implicit_model=implicit_model,
            precompute_reference=precompute_reference, cache_dir=cache_dir, max_nonfinite_steps=max_nonfinite_steps,
            share_prompt=share_prompt, length_groups=length_groups,
        )
        if length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        self.share_prompt, self.length_groups = share_prompt, length_groups

        self.model, self.tokenizer = build_causal_lm(self.model_settings)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        self.reference: torch.nn.Module | None = None
        if reference == "copy":
            self.reference = self._load_frozen_reference()
        else:
            check_adapter_reference(self.model)  # fails now, not after hours, if disabling is not the base
        self.reward_model: torch.nn.Module | None = None
        if uses_rm:
            self.reward_model = self._load_reward_model(reward_model)  # type: ignore[arg-type]
        self.implicit_model: torch.nn.Module | None = None
        if uses_implicit:
            self.implicit_model = self._load_implicit_model(implicit_model)  # type: ignore[arg-type]
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        # The file is named in on_fit_start (it lives under the Trainer's root directory by default).
        self.reference_cache = ReferenceCache(self._frozen_values()) if precompute_reference else None

    # -- models ----------------------------------------------------------------------------

    def _load_frozen_reference(self) -> torch.nn.Module:
        s = self.model_settings
        reference, _ = load_causal_lm(s.name_or_path, dtype=s.dtype, quant=s.quant, trust_remote_code=s.trust_remote_code)
        return freeze(reference)

    def _load_reward_model(self, path: str) -> torch.nn.Module:
        reward_model, reward_tokenizer = load_scalar_model(
            path, dtype=self.model_settings.dtype, init_from_causal_lm=False,
            trust_remote_code=self.model_settings.trust_remote_code,
        )
        check_tokenizers_match(self.tokenizer, reward_tokenizer, names=("policy", "reward model"))
        return freeze(reward_model)

    def _load_implicit_model(self, path: str) -> torch.nn.Module:
        s = self.model_settings
        model, tokenizer = load_causal_lm(path, dtype=s.dtype, quant=s.quant, trust_remote_code=s.trust_remote_code)
        check_tokenizers_match(self.tokenizer, tokenizer, names=("policy", "implicit model"))
        return freeze(model)

    def train(self, mode: bool = True) -> "PreferenceModule":
        """Lightning puts the whole module in train mode; the frozen models stay in eval (no dropout)."""
        super().train(mode)
        for frozen in (self.reference, self.reward_model, self.implicit_model):
            if frozen is not None:
                frozen.eval()
        return self

    # -- the step, piece by piece ----------------------------------------------------------

    def stack(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows as one (2B, L) batch (``models.forward.stack_pairs``)."""
        keys = ("input_ids", "attention_mask", "labels")
        if "chosen_token_signal" in batch:
            keys += ("token_signal",)
        return stack_pairs(batch, self.tokenizer.pad_token_id, keys=keys)

    def token_logprobs(self, model: torch.nn.Module, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) log-probs of the response tokens under ``model`` (entry t: token t+1)."""
        return forward_token_logprobs(model, pairs, self.tokenizer.pad_token_id, self.share_prompt, self.length_groups)

    def policy_token_logprobs(self, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) policy log-probs of the response tokens (entry t: token t+1)."""
        return self.token_logprobs(self.model, pairs)

    @torch.no_grad()
    def reference_token_logprobs(self, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) reference log-probs, same layout as :meth:`policy_token_logprobs`."""
        if self.reference is not None:
            return self.token_logprobs(self.reference, pairs)
        with self.model.disable_adapter():
            return self.token_logprobs(self.model, pairs)

    @torch.no_grad()
    def dense_reward_signal(self, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) reward-model dense rewards aligned to the log-prob positions."""
        if self.reward_model is None:
            raise RuntimeError("dense_reward signal needs a reward model (set reward_model)")
        scores = position_scores(self.reward_model, pairs["input_ids"], pairs["attention_mask"])
        dense = dense_rewards(scores, pairs["labels"] != IGNORE_INDEX)  # entry t: reward of token t
        return dense[:, 1:]  # -> entry t: reward of token t+1, like the log-probs

    @torch.no_grad()
    def implicit_signal(self, pairs: dict[str, torch.Tensor], reference_logps: torch.Tensor) -> torch.Tensor:
        """(2B, L-1) the frozen model's implicit token rewards beta*(log pi* - log pi_ref)."""
        if self.implicit_model is None:
            raise RuntimeError("the implicit signal needs a frozen model (set implicit_model)")
        return implicit_rewards(self.token_logprobs(self.implicit_model, pairs), reference_logps, self.beta)

    def _model_signal(self) -> bool:
        """Whether the token signal is computed by a frozen model (and so cached with the reference)."""
        return self.ama.enabled and self.ama.token_signal in ("dense_reward", "implicit")

    def _frozen_values(self) -> tuple[str, ...]:
        """What :meth:`reference_values` returns: always ``reference``; ``signal`` for a model-made token signal."""
        return ("reference", "signal") if self._model_signal() else ("reference",)

    def reference_values(self, batch: dict[str, Any], pairs: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        """``{"reference": (2B, L-1), "signal": (2B, L-1) for dense-reward ADPO}``: from the cache when
        every pair of the batch is there, else computed now (and cached when caching is on)."""
        cache = self.reference_cache if "index" in batch else None
        if cache is not None:
            cached = cache.lookup(batch, pairs, split)
            if cached is not None:
                return {name: value.to(self.device) for name, value in cached.items()}
        values = self._compute_frozen_values(pairs)
        if cache is not None:
            cache.store(batch, pairs, split, values)
        return values

    def _compute_frozen_values(self, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = {"reference": self.reference_token_logprobs(pairs)}
        if "signal" in self._frozen_values():
            dense = self.ama.token_signal == "dense_reward"
            values["signal"] = self.dense_reward_signal(pairs) if dense else self.implicit_signal(pairs, values["reference"])
        return values

    def compute_token_signal(
        self, batch: dict[str, Any], pairs: dict[str, torch.Tensor], policy_logps: torch.Tensor,
        reference_logps: torch.Tensor, precomputed: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """(2B, L-1) per-token signal r_t for the AMA mask; override to plug in your own.

        ``precomputed`` is :meth:`reference_values`' result (``signal`` there is the frozen model's
        signal: dense or implicit rewards). ``policy_logps`` is passed for overrides that need it; a
        signal must not be derived from it (the mask would confirm itself, docs/METHOD.md).
        """
        if self.ama.token_signal in ("dense_reward", "implicit"):
            return precomputed["signal"]
        if "token_signal" not in pairs:
            raise ValueError(
                "ama.token_signal='field' but the batch has no chosen_token_signal / rejected_token_signal; "
                "add per-token signal columns to the preference data"
            )
        return pairs["token_signal"][:, 1:].float()

    def compute_masks(self, signal: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(keep (2B, L-1) or None, fallbacks (2B,))``: the ADPO masks, or None with AMA off."""
        if not self.ama.enabled:
            return None, torch.zeros(token_mask.shape[0], dtype=torch.bool, device=token_mask.device)
        signal_c, signal_r = signal.chunk(2)
        mask_c, mask_r = token_mask.chunk(2)
        (keep_c, keep_r), fb_c, fb_r = adpo_masks(
            signal_c, mask_c, signal_r, mask_r, baseline=self.ama.baseline, return_fallbacks=True
        )
        return torch.cat([keep_c, keep_r]), torch.cat([fb_c, fb_r])

    def compute_loss(self, batch: dict[str, Any], split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(mean loss, stats)``: DPO on the (ADPO-masked) sums of policy and reference log-probs."""
        pairs = self.stack(batch)
        token_mask = (pairs["labels"] != IGNORE_INDEX)[:, 1:]
        frozen = self.reference_values(batch, pairs, split)
        policy_logps = self.policy_token_logprobs(pairs)
        keep, fallbacks = None, torch.zeros(token_mask.shape[0], dtype=torch.bool, device=token_mask.device)
        if self.ama.enabled:
            signal = self.compute_token_signal(batch, pairs, policy_logps, frozen["reference"], frozen)
            keep, fallbacks = self.compute_masks(signal, token_mask)
        policy_chosen, policy_rejected = sequence_logprobs(policy_logps, keep).chunk(2)
        ref_chosen, ref_rejected = sequence_logprobs(frozen["reference"], keep).chunk(2)
        losses = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing)
        stats = {
            "rewards_chosen": implicit_rewards(policy_chosen, ref_chosen, self.beta).detach(),
            "rewards_rejected": implicit_rewards(policy_rejected, ref_rejected, self.beta).detach(),
            "logps_chosen": policy_chosen.detach(),
            "logps_rejected": policy_rejected.detach(),
        }
        if self.nll_weight:
            # RPO: per-token mean NLL over every chosen token, never masked.
            nll = -policy_logps.chunk(2)[0].sum(-1) / token_mask.chunk(2)[0].sum(-1).clamp(min=1)
            losses = losses + self.nll_weight * nll
            stats["nll_chosen"] = nll.detach()
        kept = keep if keep is not None else token_mask
        for side, kept_side, mask_side, fallback_side in zip(("chosen", "rejected"), kept.chunk(2), token_mask.chunk(2), fallbacks.chunk(2)):
            stats[f"kept_{side}"] = kept_fraction(kept_side, mask_side)
            stats[f"fallbacks_{side}"] = fallback_side.sum()
        return losses.mean(), stats

    # -- reference values computed once: the cache's life cycle -------------------------------

    def cache_fingerprint(self) -> str:
        """What the cached values depend on: the reference weights, the reward model, the signal kind."""
        s = self.model_settings
        dense = self._model_signal() and self.ama.token_signal == "dense_reward"
        implicit = self._model_signal() and self.ama.token_signal == "implicit"
        return fingerprint({
            "policy": s.name_or_path, "weights": weights_id(s.name_or_path), "dtype": s.dtype, "quant": s.quant,
            "reference": self.reference_mode, "reward_model": self.reward_model_path if dense else None,
            "reward_weights": weights_id(self.reward_model_path) if dense else None, "vocab": len(self.tokenizer),
            **({"implicit_model": self.implicit_model_path, "implicit_weights": weights_id(self.implicit_model_path),
                "beta": self.beta} if implicit else {}),
        })

    def cache_path(self) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else Path(self.trainer.default_root_dir) / "reference_cache"
        return root / f"reference-{self.cache_fingerprint()}.pt"

    @torch.no_grad()
    def precompute(self, dataloaders: dict[str, Any]) -> int:
        """Fill the cache for every row of ``{split: loader}``; returns the number of rows computed.

        Rows already cached (same tokens) are skipped, so a resumed run or a second run on the same
        data computes nothing.
        """
        if self.reference_cache is None:
            raise RuntimeError("precompute needs precompute_reference=True")

        def prepare(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            return batch, self.stack(batch)

        was_training, start = self.model.training, time.perf_counter()
        self.model.eval()
        try:
            computed = self.reference_cache.fill(dataloaders, prepare, self._compute_frozen_values)
        finally:
            self.model.train(was_training)
        log.info("reference cache: computed %d rows in %.1fs", computed, time.perf_counter() - start)
        return computed

    def on_fit_start(self) -> None:
        if self.reference_cache is not None:
            self.reference_cache.path = self.cache_path()
            self.reference_cache.load()

    def on_train_start(self) -> None:
        """Precompute before the first step, after Lightning built the loaders.

        Every rank runs the same pass (under FSDP the forward needs all ranks; under DDP it costs
        one extra pass per rank, once); rank 0 writes the file.
        """
        if self.reference_cache is None:
            return
        loaders: dict[str, DataLoader] = {}
        for split, dl in {"train": self.trainer.train_dataloader, "val": self.trainer.val_dataloaders}.items():
            if isinstance(dl, (list, tuple)):
                dl = dl[0] if dl else None
            if isinstance(dl, DataLoader):
                # A plain sequential pass over the same dataset and collate: the training sampler
                # (and its resumable position) is not touched.
                loaders[split] = DataLoader(dl.dataset, batch_size=dl.batch_size or 1, collate_fn=dl.collate_fn, shuffle=False)
        if self.precompute(loaders) and self.trainer.is_global_zero:
            self.reference_cache.save()
        self.trainer.strategy.barrier("reference_cache")

    # -- Lightning hooks -------------------------------------------------------------------

    def _log_stats(self, split: str, batch: dict[str, Any], loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        bs = stats["rewards_chosen"].shape[0]
        sync = split == "val"
        margin = stats["rewards_chosen"] - stats["rewards_rejected"]
        correct = (margin > 0).float()
        values = {
            "loss": loss,
            "accuracy": correct.mean(),
            "rewards_chosen": stats["rewards_chosen"].mean(),
            "rewards_rejected": stats["rewards_rejected"].mean(),
            "margin": margin.mean(),
            "logps_chosen": stats["logps_chosen"].mean(),
            "logps_rejected": stats["logps_rejected"].mean(),
            "kept_chosen": stats["kept_chosen"],
            "kept_rejected": stats["kept_rejected"],
        }
        if "nll_chosen" in stats:
            values["nll_chosen"] = stats["nll_chosen"].mean()
        for name, value in values.items():
            self.log(f"{split}/{name}", value, batch_size=bs, sync_dist=sync, prog_bar=name in ("loss", "margin"))
        for name in ("fallbacks_chosen", "fallbacks_rejected"):
            self.log(f"{split}/{name}", stats[name].float(), batch_size=bs, reduce_fx="sum", sync_dist=sync)
        log_per_group(self, f"{split}/margin_group", margin, batch.get("group"))
        log_per_group(self, f"{split}/accuracy_group", correct, batch.get("group"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss, stats = self.compute_loss(batch, "train")
        if not self.guard.check(loss, step=self.global_step, sync=rank_max(self)):
            self.log("train/skipped_steps", float(self.guard.total_skipped), batch_size=stats["rewards_chosen"].shape[0])
            return None
        self._log_stats("train", batch, loss, stats)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.compute_loss(batch, "val")
        self._log_stats("val", batch, loss, stats)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the trained policy: the frozen reference, reward and implicit models are reloaded from their paths."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return {k: v for k, v in state.items() if not k.startswith(tuple(f"{prefix}{name}." for name in _FROZEN))}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        own = {k: v for k, v in super().state_dict().items() if k.startswith(tuple(f"{name}." for name in _FROZEN))}
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)
