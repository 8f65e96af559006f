"""DPO and ADPO (DPO with the AMA token mask, METHOD.md section 3).

The step, in order (each a small method a subclass can override):

1. :meth:`policy_token_logprobs` — one forward over the pairs, each pair packed into one row
   ``[prompt | chosen | rejected]`` so its prompt is computed once (``share_prompt``,
   ``algorithms.prefix_sharing``), or chosen and rejected stacked into one batch.
2. :meth:`reference_token_logprobs` — the frozen reference (a copy, or the policy with its LoRA
   adapter disabled), from the on-disk cache when ``precompute_reference`` is on.
3. :meth:`compute_token_signal` — r_t per response token: dense reward-model rewards, the implicit
   reward beta*(log pi - log pi_ref), or a per-token column of the data.
4. :meth:`compute_masks` — ``algorithms.ama.adpo_masks`` (chosen keeps r_t > b, rejected r_t < b).
5. :meth:`compute_loss` — the masked per-token sums of policy AND reference enter ``dpo_loss``.

Alignment of positions (the easy place for an off-by-one): ``token_logprobs`` entry t is the
log-prob of token t+1, while ``dense_rewards`` and the data's ``*_token_signal`` hold token t's value
at position t; both are therefore shifted by one (``[:, 1:]``) before they meet the log-probs.

Memory: DPO never scores the prompt, so the LM head runs only over the positions from the first one
any row scores (``logits_to_keep``, for models whose forward takes it): the (2B, L, V) logits are
the largest tensors of the step (V = 49152 for SmolLM2). The log-probs keep the full (2B, L-1)
layout, zero over the prompt, so every per-token tensor above stays aligned as described.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from equilibrate_pl.algorithms.ama import adpo_masks, kept_fraction
from equilibrate_pl.algorithms.dpo import dpo_loss
from equilibrate_pl.algorithms.logprobs import first_scored_position, sequence_logprobs, tail_token_logprobs, token_logprobs
from equilibrate_pl.algorithms.prefix_sharing import PackedPairs
from equilibrate_pl.algorithms.rewards import dense_rewards
from equilibrate_pl.data.schema import IGNORE_INDEX
from equilibrate_pl.models.forward import accepts_logits_to_keep, pack_for, packed_forward_inputs, stack_pairs
from equilibrate_pl.modules.common import (
    SingleModelHooks,
    ModelSettings,
    NonFiniteGuard,
    OptimSettings,
    atomic_torch_save,
    build_causal_lm,
    check_tokenizers_match,
    coerce_settings,
    log_per_group,
    rank_max,
    save_plain_hyperparameters,
)

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass
class AMASettings:
    """Adaptive Message-wise Alignment for DPO (ADPO).

    Args:
        enabled: mask the per-token log-probs; ``False`` is exactly DPO.
        token_signal: ``dense_reward`` (differences of a reward model's prefix scores; needs
            ``reward_model``), ``implicit`` (beta*(log pi - log pi_ref) per token, detached), or
            ``field`` (the batch's ``chosen_token_signal`` / ``rejected_token_signal``).
        baseline: ``zero`` or ``batch_mean`` (mean signal over every real response token of the
            batch, chosen and rejected together).
    """

    enabled: bool = False
    token_signal: Literal["dense_reward", "implicit", "field"] = "implicit"
    baseline: Literal["zero", "batch_mean"] = "zero"

    def __post_init__(self) -> None:
        if self.token_signal not in ("dense_reward", "implicit", "field"):
            raise ValueError(f"ama.token_signal must be dense_reward, implicit or field, got {self.token_signal!r}")
        if self.baseline not in ("zero", "batch_mean"):
            raise ValueError(f"ama.baseline must be zero or batch_mean, got {self.baseline!r}")


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
        ama: ADPO settings (``AMASettings``); disabled = DPO.
        reference: ``copy`` (a frozen second copy of the starting weights) or
            ``adapter_disabled`` (the policy's base with its LoRA adapter switched off; needs
            ``model.lora``; no second copy in memory).
        reward_model: a saved scalar-head model (``equilibrate export`` of the RM stage); needed for
            ``ama.token_signal: dense_reward``. Its tokenizer must match the policy's.
        precompute_reference: compute reference log-probs (and dense rewards) for every train and
            validation row once before training and keep them on disk; the reference model is then
            not run in the training steps.
        cache_dir: where the cache lives (default ``<trainer.default_root_dir>/reference_cache``).
        max_nonfinite_steps: stop after this many non-finite losses in a row.
        share_prompt: run each pair as one row, its common prefix (the prompt) computed once for
            chosen and rejected (``algorithms.prefix_sharing``; same log-probs). Used where the model
            takes a 4-D mask and position ids (sdpa or eager attention) and the rows are right
            padded; otherwise, or with ``False``, chosen and rejected run as stacked rows.
        length_groups: packed rows run in up to this many forwards of rows of similar length, each
            cut to its longest row (a split is made only when it saves more than 10% of the padded
            positions per extra forward); 1 = one forward. With more than one process it is always 1
            (under FSDP every rank must run the same forwards).
    """

    def __init__(
        self,
        model: ModelSettings | None = None,
        optim: OptimSettings | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        ama: AMASettings | None = None,
        reference: Literal["copy", "adapter_disabled"] = "copy",
        reward_model: str | None = None,
        precompute_reference: bool = False,
        cache_dir: str | None = None,
        max_nonfinite_steps: int = 3,
        share_prompt: bool = True,
        length_groups: int = 2,
    ) -> None:
        super().__init__()
        self.model_settings: ModelSettings = coerce_settings(ModelSettings, model) or ModelSettings()
        self.optim: OptimSettings = coerce_settings(OptimSettings, optim) or OptimSettings(lr=1e-5)
        self.ama: AMASettings = coerce_settings(AMASettings, ama) or AMASettings()
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
        if nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
        self.beta, self.label_smoothing, self.nll_weight = beta, label_smoothing, nll_weight
        self.reference_mode, self.reward_model_path = reference, reward_model
        self.precompute_reference, self.cache_dir = precompute_reference, cache_dir
        save_plain_hyperparameters(
            self, model=self.model_settings, optim=self.optim, beta=beta, label_smoothing=label_smoothing, nll_weight=nll_weight,
            ama=self.ama, reference=reference, reward_model=reward_model,
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
            from equilibrate_pl.models import check_adapter_reference

            check_adapter_reference(self.model)  # fails now, not after hours, if disabling is not the base
        self.reward_model: torch.nn.Module | None = None
        if uses_rm:
            self.reward_model = self._load_reward_model(reward_model)  # type: ignore[arg-type]
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._cache_file: Path | None = None

    # -- models ----------------------------------------------------------------------------

    def _load_frozen_reference(self) -> torch.nn.Module:
        from equilibrate_pl.models import freeze, load_causal_lm

        s = self.model_settings
        reference, _ = load_causal_lm(s.name_or_path, dtype=s.dtype, quant=s.quant, trust_remote_code=s.trust_remote_code)
        return freeze(reference)

    def _load_reward_model(self, path: str) -> torch.nn.Module:
        from equilibrate_pl.models import freeze, load_scalar_model

        reward_model, reward_tokenizer = load_scalar_model(
            path, dtype=self.model_settings.dtype, init_from_causal_lm=False,
            trust_remote_code=self.model_settings.trust_remote_code,
        )
        check_tokenizers_match(self.tokenizer, reward_tokenizer, names=("policy", "reward model"))
        return freeze(reward_model)

    def train(self, mode: bool = True) -> "PreferenceModule":
        """Lightning puts the whole module in train mode; the frozen models stay in eval (no dropout)."""
        super().train(mode)
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.eval()
        return self

    # -- the step, piece by piece ----------------------------------------------------------

    def stack(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows as one (2B, L) batch (see ``reward.stack_pairs``)."""
        keys = ("input_ids", "attention_mask", "labels")
        if "chosen_token_signal" in batch:
            keys += ("token_signal",)
        return stack_pairs(batch, self.tokenizer.pad_token_id, keys=keys)

    def forward_token_logprobs(self, model: torch.nn.Module, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) log-probs of the response tokens under ``model`` (entry t: token t+1).

        Each pair runs as one packed row when :meth:`pack` allows (``share_prompt``), else chosen
        and rejected as stacked rows. Either way the LM head runs only from the first position any
        row scores (``logits_to_keep``) when the model accepts it; the result is the same.
        """
        labels = pairs["labels"]
        packed = self.pack(model, pairs)
        if packed is None:
            return self._token_logprobs(model, labels, input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"])
        packed_labels = packed.labels(labels)
        width = packed_labels.shape[1]
        logps = torch.zeros(packed_labels.shape[0], width - 1, device=labels.device)
        for index, cut, inputs in packed_forward_inputs(model, packed, self.length_groups):
            part = self._token_logprobs(model, packed_labels[index, :cut], **inputs)
            logps = logps.index_put((index,), torch.nn.functional.pad(part.to(logps.dtype), (0, width - cut)))
        return packed.unpack_token_logprobs(logps, labels)

    def pack(self, model: torch.nn.Module, pairs: dict[str, torch.Tensor]) -> PackedPairs | None:
        """The stacked pairs packed one pair per row (``models.forward.pack_for``), or ``None`` when
        ``share_prompt`` is off, ``model`` cannot take the packed mask, or rows are not right padded."""
        if not self.share_prompt:
            return None
        ids, mask = pairs["input_ids"], pairs["attention_mask"]
        half = ids.shape[0] // 2
        return pack_for(model, ids[:half], mask[:half], ids[half:], mask[half:], self.tokenizer.pad_token_id, width=ids.shape[1])

    @staticmethod
    def _token_logprobs(model: torch.nn.Module, labels: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        mask = labels != IGNORE_INDEX
        if not accepts_logits_to_keep(model):
            return token_logprobs(model(**inputs, use_cache=False).logits, labels, mask)
        keep = labels.shape[1] - first_scored_position(mask)
        return tail_token_logprobs(model(**inputs, use_cache=False, logits_to_keep=keep).logits, labels, mask)

    def policy_token_logprobs(self, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) policy log-probs of the response tokens (entry t: token t+1)."""
        return self.forward_token_logprobs(self.model, pairs)

    @torch.no_grad()
    def reference_token_logprobs(self, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) reference log-probs, same layout as :meth:`policy_token_logprobs`."""
        if self.reference is not None:
            return self.forward_token_logprobs(self.reference, pairs)
        with self.model.disable_adapter():
            return self.forward_token_logprobs(self.model, pairs)

    @torch.no_grad()
    def dense_reward_signal(self, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B, L-1) reward-model dense rewards aligned to the log-prob positions."""
        from equilibrate_pl.models import position_scores

        if self.reward_model is None:
            raise RuntimeError("dense_reward signal needs a reward model (set reward_model)")
        scores = position_scores(self.reward_model, pairs["input_ids"], pairs["attention_mask"])
        dense = dense_rewards(scores, pairs["labels"] != IGNORE_INDEX)  # entry t: reward of token t
        return dense[:, 1:]  # -> entry t: reward of token t+1, like token_logprobs

    def compute_token_signal(
        self, batch: dict[str, Any], pairs: dict[str, torch.Tensor], policy_logps: torch.Tensor,
        reference_logps: torch.Tensor, precomputed: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """(2B, L-1) per-token signal r_t for the AMA mask; override to plug in your own."""
        kind = self.ama.token_signal
        if kind == "implicit":
            return self.beta * (policy_logps.detach() - reference_logps)
        if kind == "dense_reward":
            if "signal" in precomputed:
                return precomputed["signal"]
            return self.dense_reward_signal(pairs)
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
        """``(mean loss, stats)``: DPO on the (masked) sums of policy and reference log-probs."""
        pairs = self.stack(batch)
        token_mask = (pairs["labels"] != IGNORE_INDEX)[:, 1:]
        precomputed = self.reference_values(batch, pairs, split)
        reference_logps = precomputed["reference"]
        policy_logps = self.policy_token_logprobs(pairs)
        keep, fallbacks = None, torch.zeros(token_mask.shape[0], dtype=torch.bool, device=token_mask.device)
        if self.ama.enabled:
            signal = self.compute_token_signal(batch, pairs, policy_logps, reference_logps, precomputed)
            keep, fallbacks = self.compute_masks(signal, token_mask)
        policy_sums = sequence_logprobs(policy_logps, keep)
        reference_sums = sequence_logprobs(reference_logps, keep)
        pc, pr = policy_sums.chunk(2)
        rc, rr = reference_sums.chunk(2)
        losses = dpo_loss(pc, pr, rc, rr, self.beta, self.label_smoothing)
        nll = None
        if self.nll_weight:
            chosen_logps, chosen_mask = policy_logps.chunk(2)[0], token_mask.chunk(2)[0]
            nll = -chosen_logps.sum(-1) / chosen_mask.sum(-1).clamp(min=1)
            losses = losses + self.nll_weight * nll
        kept = keep if keep is not None else token_mask
        mask_c, mask_r = token_mask.chunk(2)
        keep_c, keep_r = kept.chunk(2)
        fb_c, fb_r = fallbacks.chunk(2)
        stats = {
            "rewards_chosen": (self.beta * (pc - rc)).detach(),
            "rewards_rejected": (self.beta * (pr - rr)).detach(),
            "logps_chosen": pc.detach(),
            "logps_rejected": pr.detach(),
            "kept_chosen": kept_fraction(keep_c, mask_c),
            "kept_rejected": kept_fraction(keep_r, mask_r),
            "fallbacks_chosen": fb_c.sum(),
            "fallbacks_rejected": fb_r.sum(),
        }
        if nll is not None:
            stats["nll_chosen"] = nll.detach()
        return losses.mean(), stats

    # -- reference values: computed per step, or once and cached ----------------------------

    def reference_values(self, batch: dict[str, Any], pairs: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        """``{"reference": (2B, L-1), "signal": (2B, L-1) if dense rewards}`` for this batch.

        From the cache when every row is there (matched by split, dataset index and a hash of its
        tokens), else computed now (and added to the cache when caching is on).
        """
        need_signal = self.ama.enabled and self.ama.token_signal == "dense_reward"
        if self.precompute_reference and "index" in batch:
            cached = self._from_cache(batch, pairs, split, need_signal)
            if cached is not None:
                return cached
        out = {"reference": self.reference_token_logprobs(pairs)}
        if need_signal:
            out["signal"] = self.dense_reward_signal(pairs)
        if self.precompute_reference and "index" in batch:
            self._to_cache(batch, pairs, split, out)
        return out

    def _row_keys(self, batch: dict[str, Any], pairs: dict[str, torch.Tensor], split: str) -> list[tuple[str, str, int, int]]:
        """Per row: (cache key, token hash, chosen length, rejected length)."""
        b = batch["index"].shape[0]
        ids, attn = pairs["input_ids"].cpu(), pairs["attention_mask"].cpu()
        lengths = attn.sum(-1).tolist()
        rows = []
        for i in range(b):
            h = hashlib.blake2b(digest_size=12)
            for r in (i, b + i):
                h.update(ids[r, : lengths[r]].numpy().astype(np.int64).tobytes())
                h.update(b"|")
            rows.append((f"{split}/{int(batch['index'][i])}", h.hexdigest(), lengths[i], lengths[b + i]))
        return rows

    def _from_cache(self, batch: dict[str, Any], pairs: dict[str, torch.Tensor], split: str, need_signal: bool) -> dict[str, torch.Tensor] | None:
        rows = self._row_keys(batch, pairs, split)
        entries = []
        for key, digest, _, _ in rows:
            entry = self._cache.get(key)
            if entry is None or entry["hash"] != digest or (need_signal and "signal_chosen" not in entry):
                return None
            entries.append(entry)
        b, width = len(rows), pairs["input_ids"].shape[1] - 1
        out = {"reference": torch.zeros(2 * b, width)}
        if need_signal:
            out["signal"] = torch.zeros(2 * b, width)
        for i, entry in enumerate(entries):
            for name, target in (("reference", "ref"), ("signal", "signal")):
                if name not in out:
                    continue
                c, r = entry[f"{target}_chosen"], entry[f"{target}_rejected"]
                out[name][i, : c.numel()] = c
                out[name][b + i, : r.numel()] = r
        return {k: v.to(self.device) for k, v in out.items()}

    def _to_cache(self, batch: dict[str, Any], pairs: dict[str, torch.Tensor], split: str, values: dict[str, torch.Tensor]) -> None:
        b = batch["index"].shape[0]
        for i, (key, digest, len_c, len_r) in enumerate(self._row_keys(batch, pairs, split)):
            # A row of n real tokens has n-1 log-prob positions; padding beyond is zero by construction.
            entry = {"hash": digest,
                     "ref_chosen": values["reference"][i, : len_c - 1].float().cpu().clone(),
                     "ref_rejected": values["reference"][b + i, : len_r - 1].float().cpu().clone()}
            if "signal" in values:
                entry["signal_chosen"] = values["signal"][i, : len_c - 1].float().cpu().clone()
                entry["signal_rejected"] = values["signal"][b + i, : len_r - 1].float().cpu().clone()
            self._cache[key] = entry

    def cache_fingerprint(self) -> str:
        """What the cached values depend on: the reference weights, the reward model, the signal kind."""
        from equilibrate_pl.models import resolve_model_path

        def weights_id(name: str | None) -> Any:
            if name is None:
                return None
            path = Path(resolve_model_path(name))
            if path.is_dir():  # a local directory: its weight files' sizes and times change when retrained
                return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in sorted(path.glob("*.safetensors"))]
            return str(name)

        s = self.model_settings
        info = {
            "version": _CACHE_VERSION, "policy": s.name_or_path, "weights": weights_id(s.name_or_path), "dtype": s.dtype,
            "quant": s.quant, "reference": self.reference_mode,
            "reward_model": self.reward_model_path if self.ama.token_signal == "dense_reward" else None,
            "reward_weights": weights_id(self.reward_model_path) if self.ama.token_signal == "dense_reward" else None,
            "vocab": len(self.tokenizer),
        }
        return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _cache_path(self) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else Path(self.trainer.default_root_dir) / "reference_cache"
        return root / f"reference-{self.cache_fingerprint()}.pt"

    def _load_cache_file(self, path: Path) -> None:
        if path.is_file():
            data = torch.load(path, weights_only=True, map_location="cpu")
            if data.get("version") == _CACHE_VERSION:
                self._cache.update(data["rows"])
                log.info("reference cache: %d rows from %s", len(data["rows"]), path)

    def _save_cache_file(self, path: Path) -> None:
        atomic_torch_save({"version": _CACHE_VERSION, "rows": self._cache}, path)

    @torch.no_grad()
    def precompute(self, dataloaders: dict[str, DataLoader]) -> int:
        """Fill the cache for every row of ``{split: loader}``; returns the number of rows computed.

        Rows already cached (same tokens) are skipped, so a resumed run or a second run on the same
        data computes nothing.
        """
        was_training = self.model.training
        self.model.eval()
        computed, start = 0, time.perf_counter()
        try:
            for split, loader in dataloaders.items():
                for batch in loader:
                    batch = self._move(batch)
                    pairs = self.stack(batch)
                    need_signal = self.ama.enabled and self.ama.token_signal == "dense_reward"
                    if self._from_cache(batch, pairs, split, need_signal) is not None:
                        continue
                    self.reference_values(batch, pairs, split)
                    computed += batch["index"].shape[0]
        finally:
            self.model.train(was_training)
        log.info("reference cache: computed %d rows in %.1fs", computed, time.perf_counter() - start)
        return computed

    def _move(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def on_fit_start(self) -> None:
        if self.precompute_reference:
            self._cache_file = self._cache_path()
            self._load_cache_file(self._cache_file)

    def on_train_start(self) -> None:
        """Precompute before the first step, after Lightning built the loaders.

        Every rank runs the same pass (under FSDP the forward needs all ranks; under DDP it costs
        one extra pass per rank, once); rank 0 writes the file.
        """
        if not self.precompute_reference:
            return
        trainer = self.trainer
        loaders: dict[str, DataLoader] = {}
        sources = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
        for split, dl in sources.items():
            if isinstance(dl, (list, tuple)):
                dl = dl[0] if dl else None
            if isinstance(dl, DataLoader):
                # A plain sequential pass over the same dataset and collate: the training sampler
                # (and its resumable position) is not touched.
                loaders[split] = DataLoader(dl.dataset, batch_size=dl.batch_size or 1, collate_fn=dl.collate_fn, shuffle=False)
        assert self._cache_file is not None
        computed = self.precompute(loaders)
        if computed and trainer.is_global_zero:
            self._save_cache_file(self._cache_file)
        trainer.strategy.barrier("reference_cache")

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
        """Only the trained policy: the frozen reference and reward model are reloaded from their paths."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return {k: v for k, v in state.items() if not k.startswith((f"{prefix}reference.", f"{prefix}reward_model."))}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        own = {k: v for k, v in super().state_dict().items() if k.startswith(("reference.", "reward_model."))}
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)
