"""Forward passes the training stages share, and what a model's forward can take.

Preference pairs (DPO and the reward model) run stacked, ``[chosen; rejected]`` in one batch
(:func:`stack_pairs`), or packed one pair per row with the prompt computed once
(``algorithms.prefix_sharing``; :func:`pack_for`, :func:`packed_forward_inputs`) where the model
allows (:func:`can_run_packed`). Rollouts with several responses per prompt run the prompt once on a
repeated KV cache (:func:`shared_prompt_forward`). The capability checks read the model's forward
signature and attention settings (:func:`forward_takes`, :func:`is_causal_model`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from equilibrate_pl.algorithms.prefix_sharing import PackedPairs, additive_mask, pack_pairs, right_padded_lengths
from equilibrate_pl.data.schema import IGNORE_INDEX
from equilibrate_pl.distributed import is_multi_process
from equilibrate_pl.models.scalar_head import position_ids_from_mask


def stack_pairs(
    batch: dict[str, Any], pad_token_id: int, keys: tuple[str, ...] = ("input_ids", "attention_mask", "labels")
) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one (2B, L) batch, right-padded to the longer side.

    One forward pass over both halves instead of two: half the kernel launches and one weight read.
    """
    width = max(batch[f"chosen_{keys[0]}"].shape[1], batch[f"rejected_{keys[0]}"].shape[1])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key in keys:
        parts = []
        for side in ("chosen", "rejected"):
            t = batch[f"{side}_{key}"]
            parts.append(F.pad(t, (0, width - t.shape[1]), value=fill.get(key, 0)))
        out[key] = torch.cat(parts, dim=0)
    return out


def right_padded_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, lengths: Sequence[int], groups: Sequence[Sequence[int]]
) -> torch.Tensor:
    """(B,) float32 scores at each row's last real token, from one forward per group of rows.

    Rows must be right-padded (``lengths[i]`` real tokens first) and the model causal: a real token
    then only attends to real tokens before it, so cutting a group to its longest row and passing
    no attention mask (plain causal attention, positions 0, 1, ...) gives the same scores as the
    padded, masked forward, for less work (no padding columns beyond each group's longest row, no
    4-D mask; sdpa runs its causal kernel).
    """
    device = input_ids.device
    parts, rows_in_order = [], []
    for rows in groups:
        index = torch.tensor(rows, device=device)
        width = max(lengths[i] for i in rows)
        logits = model(input_ids=input_ids[index, :width], use_cache=False).logits  # (b, width, 1)
        last = torch.tensor([lengths[i] - 1 for i in rows], device=device)
        parts.append(logits[torch.arange(len(rows), device=device), last, 0])
        rows_in_order.extend(rows)
    scores = torch.cat(parts).float()
    inverse = torch.empty(len(rows_in_order), dtype=torch.long)
    inverse[torch.tensor(rows_in_order)] = torch.arange(len(rows_in_order))
    return scores[inverse.to(device)]


def is_causal_model(model: torch.nn.Module) -> bool:
    """True when every attention module that declares ``is_causal`` (transformers' decoder
    attention does) declares it True, and at least one does."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C-implemented forward
        return frozenset()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """A PEFT model's base model (which receives its keyword arguments), else ``model`` itself."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def forward_takes(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward declares the keyword ``name`` (``**kwargs`` alone does not count:
    a forward could swallow the argument). For a PEFT model the base model's forward is the one
    checked (:func:`base_model`). Read once per class."""
    return name in _forward_parameters(type(base_model(model)))


def can_run_packed(model: torch.nn.Module, width: int = 0) -> bool:
    """Whether ``model`` runs packed pairs (``algorithms.prefix_sharing``) of ``width`` positions exactly.

    transformers passes a 4-D mask through unchanged to its sdpa and eager attention; flash and flex
    attention take none, a model that is not causal would let the prefix see its branches, a forward
    without ``position_ids`` cannot restart the rejected branch's positions, and a sliding window
    shorter than the packed row would be lost under a custom mask.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if not is_causal_model(model) or not forward_takes(model, "position_ids"):
        return False
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return not (isinstance(window, int) and window < width)


def packed_mask_for(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The boolean 4-D mask of packed pairs as ``model``'s attention takes it: as is for sdpa, as an
    additive float mask for eager attention."""
    if model.config._attn_implementation == "sdpa":
        return mask
    return additive_mask(mask, next(model.parameters()).dtype)


def pack_for(
    model: torch.nn.Module, chosen_ids: torch.Tensor, chosen_mask: torch.Tensor, rejected_ids: torch.Tensor,
    rejected_mask: torch.Tensor, pad_token_id: int, width: int | None = None,
) -> PackedPairs | None:
    """The pairs packed one per row (``algorithms.prefix_sharing.pack_pairs``; ``width`` as there), or
    ``None`` when ``model`` cannot run them (:func:`can_run_packed`) or a row is not right padded."""
    if not can_run_packed(model):
        return None
    lengths = [right_padded_lengths(mask) for mask in (chosen_mask, rejected_mask)]
    if lengths[0] is None or lengths[1] is None:
        return None
    device = chosen_ids.device
    packed = pack_pairs(chosen_ids, torch.tensor(lengths[0], device=device), rejected_ids,
                        torch.tensor(lengths[1], device=device), pad_token_id, width=width)
    return packed if can_run_packed(model, packed.input_ids.shape[1]) else None


def packed_forward_inputs(
    model: torch.nn.Module, packed: PackedPairs, max_groups: int,
) -> Iterator[tuple[torch.Tensor, int, dict[str, torch.Tensor]]]:
    """``(rows, width, model inputs)`` of up to ``max_groups`` forwards over packed rows of similar
    length, each cut to its longest row, the mask in ``model``'s form. One forward with several
    processes: under FSDP every rank must run the same number of forwards."""
    for index, width in packed.row_groups(1 if is_multi_process() else max_groups):
        inputs = packed.inputs(index, width)
        inputs["attention_mask"] = packed_mask_for(model, inputs["attention_mask"])
        yield index, width, inputs


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=K)`` returns only the last K positions' logits.

    True for transformers causal LMs that take the argument (Llama, Qwen2, Mistral, ... in
    transformers 5); see :func:`forward_takes`.
    """
    return forward_takes(model, "logits_to_keep")


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword under which ``model``'s forward takes a KV cache (``cache`` from transformers
    5.x on, ``past_key_values`` before), or ``None``."""
    for name in ("cache", "past_key_values"):
        if forward_takes(model, name):
            return name
    return None


def can_share_prompt_cache(model: nn.Module) -> bool:
    """Whether :func:`shared_prompt_forward` can run ``model``: its forward takes a KV cache, and
    gradient checkpointing is off (transformers drops the cache in checkpointed layers)."""
    base = base_model(model)
    # transformers 5 renamed the flag; the old name still works but warns.
    flag = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return cache_keyword(model) is not None and not getattr(base, flag, False)


def shared_prompt_forward(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, group: int,
    prompt_positions: int = 1, output_hidden_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of rollout rows whose prompts come in blocks of ``group`` identical rows (the
    ``samples_per_prompt`` responses of one prompt), each prompt computed once.

    The prompt runs for the first row of each block; its KV cache is repeated ``group`` times and
    every row's response runs on top of it. Causal attention makes each response position's hidden
    state the one the full forward gives (gradients flow through the cache to the prompt's
    computation), at ``1/group`` of the prompt's cost.

    Args:
        sequences, attention_mask: (B, P + R) ``[left-padded prompt | response]``, B a multiple of
            ``group``, rows ``i*group .. i*group + group - 1`` with the same prompt columns.
        prompt_length: P.
        prompt_positions: how many of the prompt's last positions to return (1 for a causal LM's
            next-token logits, P for a scalar model's prefix scores).

    Returns:
        ``(logits, hidden)`` over positions ``P - prompt_positions .. P + R - 1``; ``hidden`` is the
        last layer's hidden states there when ``output_hidden_states``, else ``None``.
    """
    from transformers import DynamicCache

    rows = sequences.shape[0]
    if group < 1 or rows % group:
        raise ValueError(f"{rows} rows do not split into blocks of {group}")
    if not 1 <= prompt_positions <= prompt_length:
        raise ValueError(f"prompt_positions must be in 1..{prompt_length}, got {prompt_positions}")
    keyword = cache_keyword(model)
    if keyword is None:
        raise ValueError(f"{type(model).__name__}'s forward takes no KV cache")
    positions = position_ids_from_mask(attention_mask)
    first = slice(None, None, group)
    cache = DynamicCache(config=model.config)
    extra: dict[str, Any] = {keyword: cache}
    if forward_takes(model, "logits_to_keep"):
        extra["logits_to_keep"] = prompt_positions  # no LM head over the rest of the prompt
    prompt = model(
        input_ids=sequences[first, :prompt_length], attention_mask=attention_mask[first, :prompt_length],
        position_ids=positions[first, :prompt_length], use_cache=True, output_hidden_states=output_hidden_states,
        **extra,
    )
    cache.batch_repeat_interleave(group)
    response = model(
        input_ids=sequences[:, prompt_length:], attention_mask=attention_mask, position_ids=positions[:, prompt_length:],
        use_cache=True, output_hidden_states=output_hidden_states, **{keyword: cache},
    )
    logits = torch.cat([prompt.logits[:, -prompt_positions:].repeat_interleave(group, 0), response.logits], dim=1)
    hidden = None
    if output_hidden_states:
        hidden = torch.cat([prompt.hidden_states[-1][:, -prompt_positions:].repeat_interleave(group, 0),
                            response.hidden_states[-1]], dim=1)
    return logits, hidden
