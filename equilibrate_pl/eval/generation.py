"""Batched generation with a Hugging Face causal LM: chat template, left padding, stop at eos.

Prompts are rendered and tokenized by the same `PromptCollator` that builds rollout batches
(`equilibrate_pl.data.collate`), so evaluation sees exactly the prompt format training saw. Rows are
sorted by length before batching (less padding), and results come back in the input order. Tokens
come from the rollout engine PPO uses (`equilibrate_pl.models.rollout_engine`; transformers'
`generate` with ``engine="hf"`` or for models the KV-cache engine does not take).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from equilibrate_pl.data.collate import PromptCollator, pad_and_eos_ids
from equilibrate_pl.data.schema import PromptLike
from equilibrate_pl.models.rollout_engine import RolloutEngine, SamplingParams, eos_token_ids, generate_tokens, resolve_engine

__all__ = ["generate"]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    max_prompt_length: int = 512,
    seed: int | None = None,
    progress: bool = True,
    desc: str = "generating",
    stop_strings: Sequence[str] = (),
    engine: str | RolloutEngine = "auto",
) -> list[str]:
    """Generate one reply per prompt (a string or a chat message list); returns the decoded replies.

    Greedy unless `do_sample` (then `temperature`, `top_k`, `top_p`; `top_k=50` is the default
    transformers' `generate` applied when this function called it, kept so sampled evaluations
    mean what they meant; 0 disables it). Generation stops at eos or once the reply contains one of
    `stop_strings`; the reply excludes the eos or stop string and anything after. A long prompt
    keeps its last `max_prompt_length` tokens. With `seed`, sampling is reproducible and the global
    RNG state is restored afterwards. `engine`: see `equilibrate_pl.models.rollout_engine`.
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    pad_id, _ = pad_and_eos_ids(tokenizer)  # raises if pad is missing or equals eos (docs/DATA.md: EOS is not padding)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template; evaluation renders prompts as chat turns. "
            "Set tokenizer.chat_template (e.g. copy it from the instruct model's tokenizer)"
        )
    collator = PromptCollator(tokenizer, max_length=max_prompt_length + 1, max_prompt_length=max_prompt_length)
    params = SamplingParams(
        max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids(model, tokenizer), pad_token_id=pad_id,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, stop_strings=tuple(stop_strings),
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    replies: list[str] = [""] * len(prompts)
    # Resolved once for the longest possible rows, so every batch shares the engine's set-up
    # (prepacked weights: the model does not change between batches).
    engine = resolve_engine(engine, model, max_prompt_length + max_new_tokens)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), engine.session(model, batch_size):
        if seed is not None:
            torch.manual_seed(seed)
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collator.collate_records([{"prompt": prompts[i]} for i in idx])
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            out = generate_tokens(model, input_ids, attention_mask, params, engine=engine, tokenizer=tokenizer)
            for i, tokens, length in zip(idx, out.responses.tolist(), out.lengths.tolist()):
                tokens = tokens[:length]
                if tokens and tokens[-1] in params.eos_token_ids:
                    tokens = tokens[:-1]
                replies[i] = _cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop_strings).strip()
            bar.update(len(idx))
        bar.close()
    model.train(was_training)
    return replies


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stop_strings``."""
    cuts = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[: min(cuts)] if cuts else text
