"""Loading causal LMs for training and inference: dtype, LoRA (peft), 4/8-bit (bitsandbytes),
activation checkpointing, and the LoRA reference model.

Everything goes through the libraries' own entry points (`AutoModelForCausalLM.from_pretrained`,
`peft.get_peft_model`, `peft.prepare_model_for_kbit_training`, `BitsAndBytesConfig`) so that a hub
id, a local directory and the built-in tiny model all take the same path.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

BUILTIN_TINY = "builtin:tiny"
BUILTIN_SMOLLM2 = "builtin:smollm2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


class ReferenceModelError(RuntimeError):
    """Disabling the adapter of this model would not give the base (reference) model."""


@dataclass
class LoraSettings:
    """LoRA adapter settings (mapped onto `peft.LoraConfig`).

    `target_modules="all-linear"` adapts every linear layer except the output head, which is what
    QLoRA and most recipes use. `modules_to_save` lists extra layers trained in full (a copy is kept
    per adapter; see `check_adapter_reference` for what that means for the reference model).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoraSettings.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout}")

    def to_peft_config(
        self,
        task_type: str,
        *,
        exclude_modules: Sequence[str] | None = None,
        extra_modules_to_save: Sequence[str] = (),
    ) -> Any:
        """The `peft.LoraConfig`; scalar heads pass their head as excluded and trained in full."""
        from peft import LoraConfig

        modules_to_save = list(dict.fromkeys([*(self.modules_to_save or []), *extra_modules_to_save]))
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target,
            exclude_modules=list(exclude_modules) if exclude_modules else None,
            modules_to_save=modules_to_save or None,
            task_type=task_type,
        )


@dataclass
class QuantSettings:
    """bitsandbytes quantisation of the frozen base weights (QLoRA when combined with LoRA).

    The CPU backend of bitsandbytes >= 0.49 runs both 4-bit and 8-bit, so these settings are
    testable without a GPU. `compute_dtype` is the dtype of the de-quantised matmuls (4-bit only).
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: str = "float32"
    double_quant: bool = True
    skip_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"QuantSettings.bits must be 4 or 8, got {self.bits}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"QuantSettings.quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        torch_dtype(self.compute_dtype)  # validate early

    def to_bnb_config(self, extra_skip_modules: Sequence[str] = ()) -> BitsAndBytesConfig:
        skip = list(self.skip_modules) + [m for m in extra_skip_modules if m not in self.skip_modules]
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_compute_dtype=torch_dtype(self.compute_dtype),
            bnb_4bit_use_double_quant=self.double_quant,
            llm_int8_skip_modules=skip or None,
        )


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `torch.bfloat16`, ... -> `torch.dtype`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """`builtin:tiny` / `builtin:smollm2` -> their cached directories; anything else unchanged."""
    name = str(name_or_path)
    if name == BUILTIN_TINY:
        from equilibrate_pl.models.tiny import tiny_model_dir

        return str(tiny_model_dir())
    if name == BUILTIN_SMOLLM2:
        from equilibrate_pl.models.smollm2 import smollm2_dir

        return str(smollm2_dir())
    if name.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {name!r}; choose {BUILTIN_TINY!r} or {BUILTIN_SMOLLM2!r}")
    return name


def adapter_base_path(path: str) -> str | None:
    """If `path` is a local peft adapter directory (no full weights), the base model it adapts."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file() or (p / "config.json").is_file():
        return None
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not base:
        raise ValueError(f"{p / 'adapter_config.json'}: field 'base_model_name_or_path' is empty")
    return base


def _default_device_map() -> dict[str, Any]:
    # bitsandbytes quantises while loading, so the weights must land on their final device.
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def load_pretrained(
    auto_cls: Any,
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    quant: QuantSettings | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    config: Any = None,
    quant_skip_modules: Sequence[str] = (),
    output_loading_info: bool = False,
    tokenizer: Any = None,
) -> Any:
    """`auto_cls.from_pretrained` with the project's safe defaults (safetensors, no remote code).

    A local peft adapter directory is loaded onto its base and MERGED, so that the result is a plain
    model: a new adapter on top of it then disables back to this model (docs/MODELS.md: the LoRA reference: an SFT adapter
    left unmerged would be disabled together with the new one, giving the wrong reference).
    `tokenizer` (the one the adapter was trained with) sizes the base's embeddings first, in case
    a pad token was added then.
    """
    path = resolve_model_path(name_or_path)
    base = adapter_base_path(path)
    if base is not None:
        if quant is not None:
            raise ValueError(
                f"{path} is a LoRA adapter; merging it into a {quant.bits}-bit base is lossy. Merge it first "
                "(`equilibrate export --merge-lora`, or `merge_lora` in full precision) and load the merged directory"
            )
        from peft import PeftModel

        if config is None:
            config = AutoConfig.from_pretrained(resolve_model_path(base), trust_remote_code=trust_remote_code)
        model, info = load_pretrained(
            auto_cls, base, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, config=config, output_loading_info=True,
        )
        if tokenizer is not None:
            sync_special_tokens(model, tokenizer)
        peft_model = PeftModel.from_pretrained(model, path)
        saved = set(peft_model.active_peft_config.modules_to_save or ())
        model = peft_model.merge_and_unload()
        model.requires_grad_(True)  # PeftModel.from_pretrained froze the base; a merged model is a normal one
        # Layers trained in full (e.g. a scalar head) came from the adapter: no longer "missing".
        info["missing_keys"] = {
            k for k in info["missing_keys"] if not any(f".{m}." in f".{k}" for m in saved)
        }
        return (model, info) if output_loading_info else model

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype(dtype)}
    if config is not None:
        kwargs["config"] = config
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if Path(path).is_dir():
        # Local directories: safetensors whenever present; an old `.bin`-only directory still loads
        # (transformers reads it with `weights_only=True`) but with a warning. Hub ids let
        # transformers pick safetensors first.
        kwargs["use_safetensors"] = any(Path(path).glob("*.safetensors"))
        if not kwargs["use_safetensors"]:
            warnings.warn(f"{path} has no *.safetensors; loading pickled weights with weights_only=True")
    if quant is not None:
        kwargs["quantization_config"] = quant.to_bnb_config(quant_skip_modules)
        kwargs["device_map"] = _default_device_map()
    return auto_cls.from_pretrained(path, output_loading_info=output_loading_info, **kwargs)


def sync_special_tokens(model: PreTrainedModel, tokenizer: Any) -> None:
    """Grow the embeddings if the tokenizer has more tokens (a pad token was added) and copy the
    tokenizer's pad/eos/bos ids into the model and generation configs."""
    embeddings = model.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
        # mean_resizing initialises new rows at the mean embedding, so an added <pad> row does not
        # perturb the output distribution before training.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            cfg.eos_token_id = tokenizer.eos_token_id


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing through the transformers API (no input-grad hack needed)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # the KV cache is useless (and warned about) under checkpointing


def prepare_for_training(
    model: PreTrainedModel,
    *,
    lora: LoraSettings | None,
    quant: QuantSettings | None,
    gradient_checkpointing: bool,
    task_type: str,
    lora_exclude_modules: Sequence[str] = (),
    lora_extra_modules_to_save: Sequence[str] = (),
) -> nn.Module:
    """Apply k-bit preparation, activation checkpointing and LoRA, in the order peft expects."""
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if gradient_checkpointing:
            model.config.use_cache = False
    elif gradient_checkpointing:
        enable_activation_checkpointing(model)
    if lora is not None:
        from peft import get_peft_model

        peft_config = lora.to_peft_config(
            task_type, exclude_modules=lora_exclude_modules, extra_modules_to_save=lora_extra_modules_to_save
        )
        model = get_peft_model(model, peft_config)
    return model


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    lora: LoraSettings | None = None,
    quant: QuantSettings | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    padding_side: Literal["left", "right"] = "right",
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer: `"builtin:tiny"`, `"builtin:smollm2"`, a hub id or a path.

    Returns `(model, tokenizer)`. With `lora`, the model is a `peft.PeftModel` whose only trainable
    parameters are the adapter's (plus `modules_to_save`); with `quant` the base is 4/8-bit and frozen
    (QLoRA when `lora` is also given). A LoRA adapter directory is merged into its base first.
    """
    from equilibrate_pl.data.tokenizer import load_tokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(
        tokenizer_source(path), trust_remote_code=trust_remote_code, padding_side=padding_side
    )
    model = load_pretrained(
        AutoModelForCausalLM, path, dtype=dtype, quant=quant,
        trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, tokenizer=tokenizer,
    )
    sync_special_tokens(model, tokenizer)
    model = prepare_for_training(
        model, lora=lora, quant=quant, gradient_checkpointing=gradient_checkpointing, task_type="CAUSAL_LM"
    )
    return model, tokenizer


def config_source(path: str) -> str:
    """Where the model config lives: the directory itself, or the base of an adapter directory."""
    base = adapter_base_path(path)
    return path if base is None else resolve_model_path(base)


def tokenizer_source(path: str) -> str:
    """An adapter directory may lack tokenizer files; fall back to its base model's."""
    base = adapter_base_path(path)
    if base is None:
        return path
    p = Path(path)
    if (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file():
        return path
    return resolve_model_path(base)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base and drop the peft wrapper (no-op for a plain model).

    Do this to an SFT LoRA model before adding the RL/DPO adapter, so `disable_adapter` gives the SFT
    model and not the pre-SFT base (docs/MODELS.md: the LoRA reference).
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def check_adapter_reference(model: nn.Module) -> None:
    """Raise `ReferenceModelError` unless disabling the adapter of `model` gives its base model.

    Checks, inside `model.disable_adapter()`, that every peft layer reports itself disabled, including
    `modules_to_save` copies: peft <= 0.4 kept running the trained copy of a `modules_to_save` layer
    with the adapter disabled (huggingface/peft#493, fixed by #736), so the "reference" silently
    carried the trained head or embedding (docs/MODELS.md: the LoRA reference). Also refuses a model with several adapters,
    whose base would include none of them.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not isinstance(model, PeftModel):
        raise ReferenceModelError(
            f"{type(model).__name__} has no LoRA adapter; use a frozen copy as the reference model"
        )
    if len(model.peft_config) > 1:
        raise ReferenceModelError(
            f"model has {len(model.peft_config)} adapters {sorted(model.peft_config)}; disabling them gives the "
            "model without ANY of them. Merge the SFT adapter first (`merge_lora`)"
        )
    still_active: list[str] = []
    with model.disable_adapter():
        for name, module in model.named_modules():
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not module.disable_adapters:
                still_active.append(name)
    if still_active:
        raise ReferenceModelError(
            "disable_adapter() leaves these adapted layers active, so the reference would not be the base "
            f"model: {still_active[:5]}{' ...' if len(still_active) > 5 else ''}. Typical cause: "
            "`modules_to_save` with a peft version that does not restore them; keep a frozen copy as "
            "the reference instead, or drop modules_to_save"
        )


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the reference model: the LoRA model with its adapter off (no second copy in memory).

    Verifies first (`check_adapter_reference`) that this really is the base model; gradients are
    off inside the block since the reference is never trained.
    """
    check_adapter_reference(model)
    with model.disable_adapter(), torch.no_grad():
        yield model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: for frozen reward and reference models."""
    model.eval()
    model.requires_grad_(False)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (4-bit weights counted as stored elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
