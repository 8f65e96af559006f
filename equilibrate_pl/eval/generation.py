"""Batched generation with a Hugging Face causal LM: chat template, left padding, stop at eos.

Prompts are rendered and tokenized by the same `PromptCollator` that builds rollout batches
(`equilibrate_pl.data.collate`), so evaluation sees exactly the prompt format training saw. Rows are
sorted by length before batching (less padding), and results come back in the input order.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from equilibrate_pl.data.collate import PromptCollator, pad_and_eos_ids
from equilibrate_pl.data.schema import PromptLike

__all__ = ["generate"]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a reply: the tokenizer's eos plus any the model's generation config lists."""
    ids = {int(tokenizer.eos_token_id)}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(int(i) for i in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    return sorted(ids)


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
    max_prompt_length: int = 512,
    seed: int | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Generate one reply per prompt (a string or a chat message list); returns the decoded replies.

    Greedy unless `do_sample`. Generation stops at eos (the reply excludes it and anything after);
    a long prompt keeps its last `max_prompt_length` tokens. With `seed`, sampling is reproducible and
    the global RNG state is restored afterwards.
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
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    replies: list[str] = [""] * len(prompts)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collator.collate_records([{"prompt": prompts[i]} for i in idx])
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
                **sampling,
            )
            new_tokens = out[:, input_ids.shape[1] :].tolist()
            for i, tokens in zip(idx, new_tokens):
                cut = next((k for k, t in enumerate(tokens) if t in eos_ids), len(tokens))
                replies[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
            bar.update(len(idx))
        bar.close()
    model.train(was_training)
    return replies
