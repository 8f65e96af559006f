"""Rollout plumbing for :class:`~equilibrate_pl.modules.policy.PolicyModule`.

Kept apart from the module so each piece can be read and tested alone: the rollout container,
the response mask (EOS handling), dropout removal, FSDP2 sharding and gathering for ``generate``,
and the rollout's own RNG stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn


@dataclass
class Rollout:
    """One batch of generated responses and everything computed about them.

    Layout: ``sequences`` is ``[left-padded prompt | right-padded response]`` with the prompt ending
    at column ``prompt_length - 1`` for every row. Per-token tensors are (B, R) in *response
    coordinates*: column t is generated token t, ``response_mask`` is true through the EOS.
    """

    prompt_length: int
    sequences: torch.Tensor  # (B, P + R) token ids
    attention_mask: torch.Tensor  # (B, P + R) 1 on prompt and response tokens, 0 on padding
    response_mask: torch.Tensor  # (B, R) bool
    truncated: torch.Tensor  # (B,) bool: cut at max_new_tokens without an EOS
    groups: list[str]
    logprobs: torch.Tensor | None = None  # (B, R) actor log-probs at rollout time ("old")
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    values: torch.Tensor | None = None  # (B, R) critic values (None without a critic)
    scores: torch.Tensor | None = None  # (B,) sequence scores (reward model at the last real token)
    dense_rewards: torch.Tensor | None = None  # (B, R) differences of prefix scores
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate used in the reward
    rewards: torch.Tensor | None = None  # (B, R) per-token rewards (score + KL penalty)
    shaped_scores: torch.Tensor | None = None  # (B,) the sequence scores in the rewards (compute_scores)
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    policy_mask: torch.Tensor | None = None  # (B, R) tokens in the policy loss (APPO mask or response_mask)
    # With a cost model (PolicyModule.score_costs); the rest only with a constraint.
    cost_scores: torch.Tensor | None = None  # (B,) cost model at the last real token
    cost_dense: torch.Tensor | None = None  # (B, R) differences of the cost model's prefix scores
    shaped_costs: torch.Tensor | None = None  # (B,) the episode costs in the per-token costs (compute_costs)
    cost_rewards: torch.Tensor | None = None  # (B, R) per-token costs (episode cost + KL term)
    cost_values: torch.Tensor | None = None  # (B, R) cost critic values
    cost_returns: torch.Tensor | None = None  # (B, R)
    # Single-pass mode only: the actor's scoring forward, graph attached, which the update reuses.
    update_forward: dict[str, torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def last_token_index(self) -> torch.Tensor:
        """(B,) column in ``sequences`` of each row's last real token (the EOS, or the cut)."""
        return self.prompt_length + self.response_lengths - 1

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-row tensors of a minibatch (rows ``index``)."""
        names = ("sequences", "attention_mask", "response_mask", "logprobs", "values", "advantages", "returns", "policy_mask",
                 "cost_values", "cost_returns")
        return {n: getattr(self, n)[index] for n in names if getattr(self, n) is not None}


def response_mask(response_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the real response tokens and whether each row stopped on its own.

    A response runs through its first EOS (included: the model must learn to stop, docs/DATA.md: EOS is not padding);
    ``generate`` pads after it. A row without EOS was cut at ``max_new_tokens``: all its columns are
    real tokens, and it is flagged so the caller can penalise it (docs/PPO.md: responses without EOS). Pad ids *inside* a
    response (the model may sample the pad token) are real actions and stay in the mask: the mask
    comes from the EOS position, never from ``token != pad``.

    Returns ``(mask (B, R) bool, truncated (B,) bool)``.
    """
    eos_ids = torch.as_tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=response_ids.device)
    is_eos = torch.isin(response_ids, eos_ids)
    has_eos = is_eos.any(-1)
    width = response_ids.shape[1]
    first_eos = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, width - 1, dtype=torch.long))
    mask = torch.arange(width, device=response_ids.device)[None, :] <= first_eos[:, None]
    return mask, ~has_eos


_DROPOUT_ATTRS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout probability, keeping train mode (so gradient checkpointing stays on).

    With dropout on, the log-probs of the update differ from those of the rollout and the PPO
    ratio is not 1 at the first step (docs/PPO.md). Covers ``nn.Dropout`` layers (LoRA dropout too)
    and the float attributes that HF attention modules and configs read at call time.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
        config = getattr(module, "config", None)
        if config is not None and not isinstance(config, dict):
            for attr in _DROPOUT_ATTRS:
                if isinstance(getattr(config, attr, None), float):
                    setattr(config, attr, 0.0)
    return model


def _block_class_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_module(model: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the whole model (embeddings, head).

    Blocks come from HF's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``); a model without them
    is sharded as one unit. Frozen models (reward, reference) shard the same way: forward only.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = _block_class_names(model)
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Gather FSDP2-sharded weights once for the whole ``generate`` call, then re-shard.

    Without this every decoding step all-gathers every block twice (forward and the reshard after
    it): generation becomes communication-bound (the ZeRO-3/FSDP slowness of TRL #1726). Unsharded
    params stay plain tensors during decoding. Costs one full copy of the actor's weights per rank
    for the duration of generation. A no-op for an unsharded model.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


class RolloutRNG:
    """The random stream of sampling, separate from the global one and part of the checkpoint.

    Anything else that draws from the global RNG between two steps (a DataLoader creating its
    iterator, validation, a callback) cannot shift which tokens are sampled next, so a resumed run
    samples exactly what the uninterrupted one did.
    """

    def __init__(self, seed: int, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(seed)
            self.state = self._capture()

    def _cuda_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _capture(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Run a block on this stream; the global RNG is untouched afterwards."""
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.set_rng_state(self.state["cpu"])
            if "cuda" in self.state and self.device.type == "cuda":
                torch.cuda.set_rng_state(self.state["cuda"], self.device)
            yield
            self.state = self._capture()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.cpu() for k, v in state.items()}
