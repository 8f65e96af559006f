"""Scalar-head model for reward models and critics: one score at EVERY position, one forward pass.

Choice: transformers' `AutoModelForTokenClassification` with `num_labels=1`, not a custom wrapper.
It is exactly "decoder backbone + `nn.Linear(hidden, 1)` on every hidden state", exists for Llama,
Qwen2, Mistral, Gemma, ... and saves/loads as a standard HF directory (`architectures:
["LlamaForTokenClassification"]`), so peft (`task_type="TOKEN_CLS"`), bitsandbytes, FSDP auto-wrap and
`save_pretrained` all work unchanged. `AutoModelForSequenceClassification` (TRL's reward model) only
returns the score at the last non-pad token, found through `pad_token_id`; that gives no per-prefix
scores for dense rewards and breaks with left padding. A custom `nn.Module` wrapper would need its own
save format, peft plumbing and FSDP wrap policy.

Two settings differ from the library defaults, on purpose:
- `classifier_dropout = 0.0`: the default 0.1 would make training scores noisy and the critic's
  rollout values differ from its first update's values.
- the head is re-initialised with std `1/sqrt(hidden+1)` and zero bias (as in OpenAI's
  lm-human-preferences and TRL), deterministically from `head_seed`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterator, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForTokenClassification

from equilibrate_pl.models.loading import (
    LoraSettings,
    QuantSettings,
    load_pretrained,
    prepare_for_training,
    resolve_model_path,
    sync_special_tokens,
    config_source,
    tokenizer_source,
)

# Attribute name of the head in transformers' GenericForTokenClassification models (Llama, Qwen2/3,
# Mistral, Gemma, Phi-3, ...); older encoder-style classes (GPT-2, BERT) call it `classifier`.
HEAD_NAME = "score"

log = logging.getLogger(__name__)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _own_load_report() -> Iterator[None]:
    """transformers warns "LOAD REPORT ... score.weight MISSING ... newly initialized" whenever a
    causal LM is loaded as a scalar model, although a missing head is expected there (it is
    initialised below, or a trained one is loaded from a checkpoint right after). The report is
    replaced by :func:`_report_load`, which warns only about what is really unexpected."""
    logger, drop = logging.getLogger("transformers.modeling_utils"), _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _report_load(path: str, info: dict[str, Any]) -> None:
    def keys(kind: str, skip: tuple[str, ...]) -> list[str]:
        return sorted(k for k in info.get(kind, ()) if k.split(".")[0] not in skip)

    missing = keys("missing_keys", (HEAD_NAME,))
    unexpected = keys("unexpected_keys", ("lm_head",))  # a causal LM's own head, dropped by design
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        log.warning("%s: weights newly initialised (not in the checkpoint): %s; unused: %s; shape mismatch: %s",
                    path, missing or "none", unexpected or "none", mismatched or "none")


def scalar_head(model: nn.Module) -> nn.Linear:
    """The `Linear(hidden, 1)` head of a (possibly peft-wrapped) scalar model."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    head = getattr(inner, HEAD_NAME)
    # peft's ModulesToSaveWrapper keeps the trained copy under modules_to_save[adapter]
    if hasattr(head, "modules_to_save"):
        head = head.modules_to_save[head.active_adapters[0]]
    return head


def init_scalar_head(head: nn.Linear, seed: int = 0) -> None:
    """Normal(0, 1/sqrt(hidden+1)) weights, zero bias; does not touch the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    std = 1.0 / math.sqrt(head.in_features + 1)
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=generator, dtype=torch.float32) * std
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def load_scalar_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    lora: LoraSettings | None = None,
    quant: QuantSettings | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    init_from_causal_lm: bool | None = None,
    attn_implementation: str | None = None,
    head_seed: int = 0,
    padding_side: Literal["left", "right"] = "right",
) -> tuple[nn.Module, Any]:
    """Load a scalar-head model and its tokenizer.

    `name_or_path` is either a causal LM (the backbone is taken from it, its LM head dropped, a new
    scalar head created) or a saved scalar model (its trained head is kept).
    `init_from_causal_lm`: `None` (default) decides from the checkpoint, a new head iff it has none;
    `True` always starts a new head; `False` requires a trained head and raises if there is none.
    With `lora`, the head is excluded from LoRA and trained in full (`modules_to_save`); with `quant`,
    the head stays in full precision.
    """
    from equilibrate_pl.data.tokenizer import load_tokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(
        tokenizer_source(path), trust_remote_code=trust_remote_code, padding_side=padding_side
    )
    config = AutoConfig.from_pretrained(config_source(path), trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    with _own_load_report():
        model, info = load_pretrained(
            AutoModelForTokenClassification, path, dtype=dtype, quant=quant,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
            config=config, quant_skip_modules=[HEAD_NAME], output_loading_info=True, tokenizer=tokenizer,
        )
    _report_load(str(path), info)
    if not isinstance(getattr(model, HEAD_NAME, None), nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no '{HEAD_NAME}' linear head; scalar models need an architecture built "
            "on transformers' GenericForTokenClassification (Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...)"
        )
    head_missing = any(k.split(".")[0] == HEAD_NAME for k in info.get("missing_keys", ()))
    if init_from_causal_lm is False and head_missing:
        raise ValueError(
            f"{path} has no trained scalar head ('{HEAD_NAME}.*' missing); pass init_from_causal_lm=True "
            "to start a new head from this causal LM"
        )
    if init_from_causal_lm or head_missing:
        init_scalar_head(getattr(model, HEAD_NAME), seed=head_seed)
    sync_special_tokens(model, tokenizer)
    model = prepare_for_training(
        model, lora=lora, quant=quant, gradient_checkpointing=gradient_checkpointing, task_type="TOKEN_CLS",
        lora_exclude_modules=[HEAD_NAME], lora_extra_modules_to_save=[HEAD_NAME],
    )
    return model, tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, whatever the padding side.

    With left padding the default positions (0..L-1) shift every real token by the pad count. RoPE
    models only see relative positions, so for them this is a float-rounding difference, but models
    with absolute position embeddings (GPT-2, OPT) would score a padded row differently (docs/PPO.md: ratio 1 at the first step).
    Counting only real tokens makes a padded row score like the same row unpadded for both kinds.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def position_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(B, L)` float32 scores: entry t is the score of the prefix ending at token t.

    Positions where `attention_mask` is 0 are set to 0 (they carry no meaning). Gradients flow when
    the model is trainable; wrap in `torch.no_grad()` for a frozen reward model.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    scores = out.logits.squeeze(-1).float()
    return scores.masked_fill(attention_mask == 0, 0.0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` index of the last real token of each row (right or left padding; never a pad)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    empty = ~mask.any(-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no real token (attention_mask all zero); nothing to score")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return positions.masked_fill(~mask, -1).amax(-1)


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` sequence score = the position score at the last real token, never a pad (docs/PPO.md)."""
    index = last_token_index(attention_mask)
    return scores.gather(-1, index.unsqueeze(-1)).squeeze(-1)
