"""Rollout engines: left-padded prompts in, greedy or sampled responses out, behind one interface.

:func:`generate_tokens` is what PPO / GRPO rollouts (``modules.policy``) and evaluation
(``eval.generation``) call; the engine behind it is chosen by name:

- ``"kv"`` (:class:`KVCacheEngine`) — a decode loop written for RL on the model's own forward:
  keys and values go into buffers allocated once for prompt + ``max_new_tokens`` (transformers'
  ``DynamicCache`` concatenates, copying the whole cache at every token), the attention mask is
  built once and sliced, a prompt shared by ``group`` consecutive rows (GRPO's samples) runs once,
  the next token is drawn with one uniform per row (``algorithms.sampling``) instead of
  ``torch.multinomial``, finished rows leave the batch, and the loop stops when every row has
  finished. Greedy decoding gives ``generate``'s tokens; sampling draws from the same distribution
  through a different random stream (both tested).
- ``"hf"`` (:class:`HFGenerateEngine`) — transformers' ``generate``, for any model the ``kv``
  engine does not take (flash / flex attention, sliding windows, hybrid caches).
- ``"auto"`` — ``kv`` where :meth:`KVCacheEngine.supports` the model, else ``hf``.

A third engine (vLLM for GPU users) would subclass :class:`RolloutEngine` and register itself in
:data:`ENGINES`. Every engine applies exactly the filters of :class:`SamplingParams`: a model's
``generation_config`` adds nothing (a repetition penalty there would make rollouts off-policy).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from equilibrate_pl.algorithms.prefix_sharing import additive_mask
from equilibrate_pl.algorithms.sampling import next_tokens
from equilibrate_pl.distributed import all_ranks_agree, is_multi_process
from equilibrate_pl.models.forward import accepts_logits_to_keep, base_model, cache_keyword, forward_takes, is_causal_model
from equilibrate_pl.models.scalar_head import position_ids_from_mask

__all__ = [
    "ENGINES",
    "Generation",
    "HFGenerateEngine",
    "KVCacheEngine",
    "RolloutEngine",
    "SamplingParams",
    "generate_tokens",
    "resolve_engine",
]


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. ``do_sample=False`` is greedy; ``top_k=0`` / ``top_p=1`` disable those filters.

    A response ends at its first token in ``eos_token_ids`` or once its text contains one of
    ``stop_strings`` (which needs the tokenizer), both included in the response; after the end,
    ``pad_token_id``.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids must name at least one token")


@dataclass
class Generation:
    """What an engine returns.

    ``sequences`` (B, P + T): the prompt columns as given, then T <= ``max_new_tokens`` response
    columns (T is the longest response). A response runs through its eos / stop-string token
    (``lengths``); its later columns hold the pad id. ``finished`` is false for a response cut at
    ``max_new_tokens``.
    """

    sequences: torch.Tensor
    prompt_length: int
    lengths: torch.Tensor  # (B,) long
    finished: torch.Tensor  # (B,) bool

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, T) bool: true on each response's tokens (through its last one)."""
        width = self.sequences.shape[1] - self.prompt_length
        return torch.arange(width, device=self.lengths.device)[None, :] < self.lengths[:, None]


class RolloutEngine:
    """Generates responses for a batch of left-padded prompts (:meth:`generate`)."""

    name = "base"

    def supports(self, model: nn.Module, total_length: int) -> bool:
        """Whether this engine can run ``model`` on sequences of up to ``total_length`` positions."""
        return True

    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
        tokenizer: Any = None, group: int = 1,
    ) -> Generation:
        """Responses to ``input_ids`` / ``attention_mask`` (B, P), every prompt ending in the last
        column. ``group``: rows come in blocks of ``group`` identical prompts (several samples per
        prompt), which an engine may run once; a hint, never a change in the result. Sampling
        draws from the global torch RNG (callers fork it)."""
        raise NotImplementedError

    def session(self, model: nn.Module, rows: int) -> contextlib.AbstractContextManager[None]:
        """A block in which several :meth:`generate` calls on ``model`` (unchanged weights, batches
        of up to ``rows``) share their set-up work; nothing by default."""
        return contextlib.nullcontext()


def _stop_criteria(params: SamplingParams, tokenizer: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """transformers' ``StopStringCriteria`` as a function of the token ids so far (B, L) -> (B,) bool."""
    if not params.stop_strings:
        return None
    if tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    from transformers.generation.stopping_criteria import StopStringCriteria

    criteria = StopStringCriteria(tokenizer, list(params.stop_strings))
    return lambda ids: criteria(ids, None)


class HFGenerateEngine(RolloutEngine):
    """transformers' ``generate`` (sampling through ``torch.multinomial``, a ``DynamicCache``)."""

    name = "hf"

    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
        tokenizer: Any = None, group: int = 1,
    ) -> Generation:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens, do_sample=params.do_sample, pad_token_id=params.pad_token_id,
            eos_token_id=list(params.eos_token_ids), use_cache=True, synced_gpus=is_multi_process(),
        )
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        if params.stop_strings:
            kwargs.update(stop_strings=list(params.stop_strings), tokenizer=tokenizer)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        prompt_length = input_ids.shape[1]
        lengths, finished = _response_ends(out, prompt_length, params, _stop_criteria(params, tokenizer))
        return Generation(out, prompt_length, lengths, finished)


def _response_ends(
    sequences: torch.Tensor, prompt_length: int, params: SamplingParams,
    stop: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths, finished) of responses that ``generate`` padded after their end: through the
    first eos, else through the first token that completes a stop string, else the whole width."""
    responses = sequences[:, prompt_length:]
    rows, width = responses.shape
    ends = torch.full((rows,), width, dtype=torch.long, device=responses.device)
    is_eos = torch.isin(responses, torch.tensor(params.eos_token_ids, device=responses.device))
    has_eos = is_eos.any(-1)
    ends = torch.where(has_eos, is_eos.int().argmax(-1) + 1, ends)
    finished = has_eos.clone()
    if stop is not None:
        for t in range(width):
            hit = stop(sequences[:, : prompt_length + t + 1]) & ~finished
            ends = torch.where(hit, t + 1, ends)
            finished |= hit
    return ends, finished


class _BufferLayer:
    """One layer's keys and values in buffers of ``capacity`` positions allocated at the first
    write; :meth:`write` copies new states in place and returns views of the filled part."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def write(self, keys: torch.Tensor, values: torch.Tensor, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, heads, new, _ = keys.shape
        if self.keys is None:
            self.keys = keys.new_empty(rows * repeat, heads, self.capacity, keys.shape[-1])
            self.values = values.new_empty(rows * repeat, heads, self.capacity, values.shape[-1])
        end = self.length + new
        if repeat > 1:
            # A shared prompt: the attention of this (first) forward runs on the unrepeated states.
            shape = (rows, repeat, heads, new)
            self.keys[:, :, self.length:end].view(*shape, -1).copy_(keys.unsqueeze(1))
            self.values[:, :, self.length:end].view(*shape, -1).copy_(values.unsqueeze(1))
            self.length = end
            return keys, values
        self.keys[:, :, self.length:end].copy_(keys)
        self.values[:, :, self.length:end].copy_(values)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep_rows(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


def _buffer_cache(capacity: int) -> Any:
    """A transformers ``Cache`` whose layers are :class:`_BufferLayer`; ``cache.repeat`` > 1 makes
    the next write store each row ``repeat`` times (the prompt of several samples)."""
    from transformers.cache_utils import Cache

    class BufferCache(Cache):
        def __init__(self) -> None:
            super().__init__(layers=[])
            self.repeat = 1

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            while len(self.layers) <= layer_idx:
                self.layers.append(_BufferLayer(capacity))
            return self.layers[layer_idx].write(key_states, value_states, self.repeat)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

        def keep_rows(self, index: torch.Tensor) -> None:
            for layer in self.layers:
                layer.keep_rows(index)

    return BufferCache()


# --------------------------------------------------------------------------------------------
# Prepacked linear layers (CPU)
# --------------------------------------------------------------------------------------------

def can_prepack(model: nn.Module) -> bool:
    """Whether :func:`prepacked_linears` would change anything: float32 weights on a CPU with oneDNN."""
    param = next(model.parameters(), None)
    return (param is not None and param.device.type == "cpu" and param.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@contextlib.contextmanager
def prepacked_linears(model: nn.Module, rows: int) -> Iterator[None]:
    """Inside the block every plain ``nn.Linear`` of ``model`` multiplies with a copy of its weight
    reordered once for oneDNN (CPU, float32), instead of MKL's ``sgemm`` on the weight as stored.

    With a few rows per matmul (decoding) the matmuls stream every weight from memory at each
    token, and the reordered layout streams it faster (SmolLM2-135M at batch 8: 72 -> 43 ms of
    matmuls per token on this project's CPU). It is a different kernel: logits agree with MKL's to
    ~1e-6, not bit for bit. The copies (one more set of the linear weights) are freed on exit;
    a block nested in another reuses the outer one's. Inference only: no gradient reaches the
    copies. A no-op where :func:`can_prepack` is false.
    """
    if not can_prepack(model):
        yield
        return
    patched = []
    by_weight: dict[int, torch.Tensor] = {}  # tied weights are packed once
    try:
        for module in model.modules():
            if type(module) is not nn.Linear or "forward" in module.__dict__:  # not plain, or packed by an outer block
                continue
            weight = module.weight
            if weight.dtype != torch.float32 or weight.device.type != "cpu":
                continue
            if id(weight) not in by_weight:
                by_weight[id(weight)] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            module.forward = functools.partial(_packed_forward, by_weight[id(weight)], module.bias)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


class KVCacheEngine(RolloutEngine):
    """The decode loop of the module docstring.

    Args:
        compact_fraction: drop finished rows from the batch (one copy of the cache) once at least
            this fraction of the rows still decoded have finished; 1 keeps them to the end (their
            tokens are padding either way). Never with several processes.
        prepack: run the linear layers on weights reordered for oneDNN (:func:`prepacked_linears`;
            CPU float32 only): ~1.7x faster decoding, logits equal to ~1e-6 instead of bit for bit.
    """

    name = "kv"

    def __init__(self, compact_fraction: float = 0.25, prepack: bool = True) -> None:
        self.compact_fraction = compact_fraction
        self.prepack = prepack

    def supports(self, model: nn.Module, total_length: int) -> bool:
        """A causal LM whose forward takes a KV cache, ``position_ids`` and a 4-D mask (sdpa or eager
        attention), with full attention in every layer over ``total_length`` positions."""
        config = getattr(base_model(model), "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False):
            return False
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return False
        if cache_keyword(model) is None or not forward_takes(model, "position_ids") or not is_causal_model(model):
            return False
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            return False
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        return not (isinstance(window, int) and window < total_length)

    @torch.no_grad()
    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
        tokenizer: Any = None, group: int = 1,
    ) -> Generation:
        with self.session(model, input_ids.shape[0]):
            return self._decode(model, input_ids, attention_mask, params, tokenizer, group)

    def session(self, model: nn.Module, rows: int) -> contextlib.AbstractContextManager[None]:
        """The prepacked weights (:func:`prepacked_linears`) for every call inside the block."""
        return prepacked_linears(model, rows) if self.prepack else contextlib.nullcontext()

    def _decode(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
        tokenizer: Any, group: int,
    ) -> Generation:
        rows, prompt_length = input_ids.shape
        device = input_ids.device
        steps = params.max_new_tokens
        if group < 1 or rows % group:
            raise ValueError(f"{rows} rows do not split into blocks of {group}")
        if group > 1 and not bool((input_ids.view(-1, group, prompt_length) == input_ids[::group, None]).all()
                                  and (attention_mask.view(-1, group, prompt_length) == attention_mask[::group, None]).all()):
            group = 1  # the hint was wrong: run every row's prompt
        stop = _stop_criteria(params, tokenizer)
        keyword = cache_keyword(model)
        config = base_model(model).config
        dtype = next(model.parameters()).dtype
        additive = config.get_text_config()._attn_implementation != "sdpa"  # eager adds its mask
        keep_logits = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        eos = torch.tensor(params.eos_token_ids, device=device)

        # Keys every query may see: the prompt's real tokens, then every generated position.
        seen = torch.ones(rows, prompt_length + steps, dtype=torch.bool, device=device)
        seen[:, :prompt_length] = attention_mask.bool()
        positions = position_ids_from_mask(attention_mask)
        cache = _buffer_cache(prompt_length + steps)

        # Prefill. A pad position attends to itself only, so its (unused) states stay finite.
        first = slice(None, None, group)
        causal = torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=device).tril()
        mask = (causal & seen[first, None, None, :prompt_length]) | torch.eye(prompt_length, dtype=torch.bool, device=device)
        cache.repeat = group
        out = model(input_ids=input_ids[first], attention_mask=additive_mask(mask, dtype) if additive else mask,
                    position_ids=positions[first], use_cache=True, **{keyword: cache}, **keep_logits)
        cache.repeat = 1
        logits = out.logits[:, -1].float()
        if group > 1:
            logits = logits.repeat_interleave(group, 0)
        del out

        sequences = torch.full((rows, prompt_length + steps), params.pad_token_id, dtype=input_ids.dtype, device=device)
        sequences[:, :prompt_length] = input_ids
        lengths = torch.full((rows,), steps, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        live = torch.arange(rows, device=device)  # rows still in the batch (finished ones until compaction)
        next_position = positions[:, -1:] + 1
        seen_mask = seen[:, None, None, :]
        if additive:
            seen_mask = additive_mask(seen_mask, dtype)
        compact = self.compact_fraction < 1 and not is_multi_process()
        width = 0
        for t in range(steps):
            column = prompt_length + t
            token = next_tokens(logits, params.do_sample, params.temperature, params.top_k, params.top_p)
            ended = torch.isin(token, eos)
            token = token.masked_fill(finished[live], params.pad_token_id)
            sequences[live, column] = token
            if stop is not None:
                ended |= stop(sequences[live, : column + 1])
            newly = ended & ~finished[live]
            lengths[live[newly]] = t + 1
            finished[live[newly]] = True
            width = t + 1
            if t == steps - 1 or all_ranks_agree(bool(finished.all()), device):
                break
            done = finished[live]
            if compact and done.any() and float(done.float().mean()) >= self.compact_fraction:
                keep = (~done).nonzero().squeeze(1)
                cache.keep_rows(keep)
                live, token = live[keep], token[keep]
                seen_mask, next_position = seen_mask[keep], next_position[keep]
            out = model(input_ids=token[:, None], attention_mask=seen_mask[..., : column + 1],
                        position_ids=next_position + t, use_cache=True, **{keyword: cache}, **keep_logits)
            logits = out.logits[:, -1].float()
        return Generation(sequences[:, : prompt_length + width], prompt_length, lengths.clamp(max=width), finished)


ENGINES: dict[str, Callable[[], RolloutEngine]] = {"kv": KVCacheEngine, "hf": HFGenerateEngine}


def resolve_engine(engine: str | RolloutEngine, model: nn.Module, total_length: int) -> RolloutEngine:
    """The engine named ``engine`` (``auto``: ``kv`` where it supports ``model``, else ``hf``), or
    ``engine`` itself when it is one."""
    if isinstance(engine, RolloutEngine):
        return engine
    if engine == "auto":
        kv = KVCacheEngine()
        return kv if kv.supports(model, total_length) else HFGenerateEngine()
    if engine not in ENGINES:
        raise ValueError(f"unknown rollout engine {engine!r}; choose 'auto' or one of {sorted(ENGINES)}")
    chosen = ENGINES[engine]()
    if not chosen.supports(model, total_length):
        raise ValueError(f"the {engine!r} rollout engine cannot run {type(base_model(model)).__name__} "
                         f"(attention {getattr(base_model(model).config, '_attn_implementation', '?')}); use 'auto' or 'hf'")
    return chosen


def generate_tokens(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
    engine: str | RolloutEngine = "auto", tokenizer: Any = None, group: int = 1,
) -> Generation:
    """Responses to left-padded prompts (every prompt ends in the last column) by ``engine``
    (:func:`resolve_engine`); see :meth:`RolloutEngine.generate`."""
    if attention_mask[:, -1].eq(0).any():
        raise ValueError("prompt batches must be LEFT padded (every prompt ends at the last column)")
    chosen = resolve_engine(engine, model, input_ids.shape[1] + params.max_new_tokens)
    return chosen.generate(model, input_ids, attention_mask, params, tokenizer=tokenizer, group=group)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """Every token that ends a response: the tokenizer's eos plus any the model's generation config lists."""
    ids = {int(tokenizer.eos_token_id)}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(int(i) for i in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    return tuple(sorted(ids))

