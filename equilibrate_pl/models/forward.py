"""Forward passes the training stages share, and what a model's forward can take.

Two entry points for preference pairs, stacked ``[chosen; rejected]`` as (2B, L) rows
(:func:`stack_pairs`): :func:`forward_token_logprobs` (a causal LM's log-probs of the labelled
tokens; DPO/ADPO) and :func:`forward_scores` (a scalar-head model's sequence scores; the reward
model). Both run each pair as one packed row with the prompt computed once
(``algorithms.prefix_sharing``) where the model allows it (:func:`can_run_packed`), else the
stacked rows, in up to ``length_groups`` forwards of rows of similar length, and return the
stacked layout either way: callers never see which path ran. The LM head's log-probs are taken
here only: :func:`lm_token_logprobs` for pairs, :func:`rollout_token_logprobs` for rollouts.

Rollouts (``[left-padded prompt | response]`` rows) have their own two, :func:`rollout_token_logprobs`
and :func:`rollout_scores`; with several responses per prompt they run the prompt once on a
repeated KV cache (:func:`shared_prompt_forward`). The capability checks read a model's forward signature and
attention settings (:func:`forward_takes`, :func:`is_causal_model`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from equilibrate_pl.algorithms.logprobs import first_scored_position, tail_token_logprobs, token_logprobs
from equilibrate_pl.algorithms.ppo import entropy_from_logits
from equilibrate_pl.algorithms.prefix_sharing import (
    PackedPairs,
    additive_mask,
    group_rows_by_length,
    pack_pairs,
    right_padded_lengths,
)
from equilibrate_pl.data.schema import IGNORE_INDEX
from equilibrate_pl.distributed import is_multi_process
from equilibrate_pl.models.scalar_head import last_token_scores, position_ids_from_mask, position_scores

# --------------------------------------------------------------------------------------------
# What a model's forward can take
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C-implemented forward
        return frozenset()


def base_model(model: nn.Module) -> nn.Module:
    """A PEFT model's base model (which receives its keyword arguments), else ``model`` itself."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def forward_takes(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward declares the keyword ``name`` (``**kwargs`` alone does not count:
    a forward could swallow the argument). For a PEFT model the base model's forward is the one
    checked (:func:`base_model`). Read once per class."""
    return name in _forward_parameters(type(base_model(model)))


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=K)`` returns only the last K positions' logits (transformers
    causal LMs: Llama, Qwen2, Mistral, ...)."""
    return forward_takes(model, "logits_to_keep")


def is_causal_model(model: nn.Module) -> bool:
    """True when every attention module that declares ``is_causal`` (transformers' decoder
    attention does) declares it True, and at least one does."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def can_run_packed(model: nn.Module, width: int = 0) -> bool:
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


# --------------------------------------------------------------------------------------------
# Preference pairs: stacked or packed
# --------------------------------------------------------------------------------------------


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


def pack_for(model: nn.Module, pairs: dict[str, torch.Tensor], pad_token_id: int) -> PackedPairs | None:
    """Stacked ``pairs`` (:func:`stack_pairs`) packed one pair per row (``prefix_sharing.pack_pairs``),
    or ``None`` when ``model`` cannot run them (:func:`can_run_packed`) or a row is not right padded."""
    if not can_run_packed(model):
        return None
    ids = pairs["input_ids"]
    lengths = right_padded_lengths(pairs["attention_mask"])
    if lengths is None:
        return None
    half = ids.shape[0] // 2
    lengths_t = torch.tensor(lengths, device=ids.device)
    packed = pack_pairs(ids[:half], lengths_t[:half], ids[half:], lengths_t[half:], pad_token_id, width=ids.shape[1])
    return packed if can_run_packed(model, packed.input_ids.shape[1]) else None


def _forward_count(length_groups: int) -> int:
    # Sharded strategies (FSDP) all-gather in every forward: each rank must run the same number of
    # forwards, and a data-dependent split would leave ranks waiting on each other.
    if length_groups < 1:
        raise ValueError(f"length_groups must be >= 1, got {length_groups}")
    return 1 if is_multi_process() else length_groups


def _packed_forward_inputs(
    model: nn.Module, packed: PackedPairs, length_groups: int,
) -> Iterator[tuple[torch.Tensor, int, dict[str, torch.Tensor]]]:
    """``(rows, width, model inputs)`` of up to ``length_groups`` forwards over packed rows of
    similar length, each cut to its longest row, the mask as ``model``'s attention takes it (as is
    for sdpa, additive for eager)."""
    for index, width in packed.row_groups(_forward_count(length_groups)):
        inputs = packed.inputs(index, width)
        if model.config._attn_implementation != "sdpa":
            inputs["attention_mask"] = additive_mask(inputs["attention_mask"], next(model.parameters()).dtype)
        yield index, width, inputs


# --------------------------------------------------------------------------------------------
# The entry points
# --------------------------------------------------------------------------------------------


def lm_token_logprobs(model: nn.Module, labels: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """(B, L-1) log-probs of ``labels`` (``IGNORE_INDEX`` where none is wanted) under causal LM
    ``model`` run on ``inputs``; entry t is token t+1's.

    The LM head runs only from the first position any row scores (``logits_to_keep``) when the
    model takes it: the (B, L, V) logits are a step's largest tensors, and a prompt is never scored.
    """
    mask = labels != IGNORE_INDEX
    if not accepts_logits_to_keep(model):
        return token_logprobs(model(**inputs, use_cache=False).logits, labels, mask)
    keep = labels.shape[1] - first_scored_position(mask)
    return tail_token_logprobs(model(**inputs, use_cache=False, logits_to_keep=keep).logits, labels, mask)


def forward_token_logprobs(
    model: nn.Module, pairs: dict[str, torch.Tensor], pad_token_id: int, share_prompt: bool = True,
    length_groups: int = 2,
) -> torch.Tensor:
    """(2B, L-1) log-probs of the labelled tokens of stacked ``pairs`` under causal LM ``model``
    (entry t: token t+1; zero where the label is ``IGNORE_INDEX``).

    Args:
        pairs: ``input_ids``, ``attention_mask``, ``labels`` (2B, L), chosen rows then rejected
            (:func:`stack_pairs`).
        pad_token_id: written after each packed row's end.
        share_prompt: run each pair as one packed row, the prompt computed once, where
            :func:`pack_for` allows; otherwise (or ``False``) the stacked rows in one forward.
        length_groups: packed rows run in up to this many forwards of rows of similar length
            (``prefix_sharing.group_rows_by_length``); always one with several processes.
    """
    labels = pairs["labels"]
    packed = pack_for(model, pairs, pad_token_id) if share_prompt else None
    if packed is None:
        return lm_token_logprobs(model, labels, input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"])
    packed_labels = packed.labels(labels)
    width = packed_labels.shape[1]
    logps = torch.zeros(packed_labels.shape[0], width - 1, device=labels.device)
    for index, cut, inputs in _packed_forward_inputs(model, packed, length_groups):
        part = lm_token_logprobs(model, packed_labels[index, :cut], **inputs)
        logps = logps.index_put((index,), F.pad(part.to(logps.dtype), (0, width - cut)))
    return packed.unpack_token_logprobs(logps, labels)


def forward_scores(
    model: nn.Module, pairs: dict[str, torch.Tensor], pad_token_id: int, share_prompt: bool = True,
    length_groups: int = 2,
) -> torch.Tensor:
    """(2B,) float32 scores of scalar-head ``model`` at the last real token of each stacked row of
    ``pairs`` (chosen rows, then rejected); arguments as in :func:`forward_token_logprobs`.

    Packed pairs read both scores from one row; otherwise :func:`sequence_scores` scores the rows.
    """
    packed = pack_for(model, pairs, pad_token_id) if share_prompt else None
    if packed is None:
        return sequence_scores(model, pairs["input_ids"], pairs["attention_mask"], length_groups)
    rows = packed.input_ids.shape[0]
    chosen = torch.empty(rows, device=packed.input_ids.device)
    rejected = torch.empty_like(chosen)
    for index, _, inputs in _packed_forward_inputs(model, packed, length_groups):
        logits = model(**inputs, use_cache=False).logits[..., 0]
        at = torch.arange(index.shape[0], device=index.device)
        chosen = chosen.index_put((index,), logits[at, packed.chosen_last[index]].float())
        rejected = rejected.index_put((index,), logits[at, packed.rejected_last[index]].float())
    return torch.cat([chosen, rejected])


def sequence_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, length_groups: int = 2,
) -> torch.Tensor:
    """(B,) float32 scores of scalar-head ``model`` at each row's last real token.

    Right-padded rows of a causal model run through :func:`right_padded_scores` in up to
    ``length_groups`` forwards (always one with several processes); anything else (left padding)
    through one masked forward.
    """
    lengths = right_padded_lengths(attention_mask) if is_causal_model(model) else None
    if lengths is None:
        return last_token_scores(position_scores(model, input_ids, attention_mask), attention_mask)
    groups = group_rows_by_length(lengths, _forward_count(length_groups))
    return right_padded_scores(model, input_ids, lengths, groups)


def right_padded_scores(
    model: nn.Module, input_ids: torch.Tensor, lengths: Sequence[int], groups: Sequence[Sequence[int]]
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


# --------------------------------------------------------------------------------------------
# Rollouts: several responses on one prompt
# --------------------------------------------------------------------------------------------


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


def rollout_token_logprobs(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, group: int = 1,
    temperature: float = 1.0, with_entropy: bool = False, with_hidden: bool = False,
) -> dict[str, torch.Tensor]:
    """``{"logprobs": (B, R)}`` of the response tokens of rollout rows under causal LM ``model``
    (column t: generated token t; 0 off the response), with ``entropy`` (B, R) and the last layer's
    ``hidden`` states (B, R, H) at the positions that predict them when asked.

    Args:
        sequences, attention_mask: (B, P + R) ``[left-padded prompt | response]``.
        prompt_length: P.
        group: rows come in blocks of ``group`` with the same prompt, which then runs once
            (:func:`shared_prompt_forward`) when the model allows (:func:`can_share_prompt_cache`).
        temperature: the sampling temperature: log-probs of ``softmax(logits / temperature)``.
    """
    width = sequences.shape[1] - prompt_length
    if group > 1 and can_share_prompt_cache(model):
        logits, hidden = shared_prompt_forward(model, sequences, attention_mask, prompt_length, group,
                                               prompt_positions=1, output_hidden_states=with_hidden)
    else:
        out = model(
            input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
            use_cache=False, logits_to_keep=width + 1, output_hidden_states=with_hidden,
        )
        # logits[:, j] predicts sequences[:, P - 1 + j + 1]: the last width+1 positions cover the response.
        logits = out.logits[:, -(width + 1):]
        hidden = out.hidden_states[-1][:, prompt_length - 1:] if with_hidden else None
    resp_mask = attention_mask[:, prompt_length - 1:].bool().clone()
    resp_mask[:, 0] = False
    if temperature != 1.0:
        logits = logits / temperature
    result = {"logprobs": token_logprobs(logits, sequences[:, prompt_length - 1:], resp_mask)}
    if with_entropy:
        result["entropy"] = entropy_from_logits(logits[:, :-1])
    if hidden is not None:
        result["hidden"] = hidden[:, :-1]
    return result


def rollout_scores(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0, group: int = 1,
) -> torch.Tensor:
    """(B, L) float32 per-position scores of scalar-head ``model`` (a critic or a reward model) on
    rollout rows, 0 at padding; ``group`` and ``prompt_length`` as in :func:`rollout_token_logprobs`."""
    if group > 1 and prompt_length > 0 and can_share_prompt_cache(model):
        logits, _ = shared_prompt_forward(model, sequences, attention_mask, prompt_length, group,
                                          prompt_positions=prompt_length)
        return logits.squeeze(-1).float().masked_fill(attention_mask == 0, 0.0)
    return position_scores(model, sequences, attention_mask, position_ids_from_mask(attention_mask))
