"""LLM-judge categorizer: a causal LM prompted as a safety reviewer (the paper's labelling method).

The reviewer writes a short analysis, then a JSON verdict
``{"explicit_risk": bool, "harmful_intent": bool, "group": "EHD|IHD|MHD|general"}``. The two
booleans decide the group (FDC's definition: both -> MHD, explicit only -> EHD, intent only ->
IHD, neither -> general); ``group`` alone is used only when they are missing. Malformed output is
retried with a reminder, then the prompt goes to a fallback (a fixed group or the rule
categorizer) and is counted in ``fallbacks``. A judge never crashes a labelling run.

Models are loaded with transformers directly (this is data code; it does not import
``equilibrate_pl.models``), ``trust_remote_code=False``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Sequence

from equilibrate_pl.data.fdc import Categorizer, RuleCategorizer, prompt_text
from equilibrate_pl.data.schema import GROUP_NAMES, Group, PromptLike

__all__ = ["JudgeCategorizer", "REVIEWER_PROMPT", "parse_verdict", "hf_generate_fn"]

log = logging.getLogger(__name__)

REVIEWER_PROMPT = """You are a safety reviewer sorting user requests sent to an AI assistant. Judge the REQUEST, not whether an answer would be allowed.

Answer two questions:
1. explicit_risk: does the request itself contain objectively risky content or terms (weapons, explosives, drugs, sexual content, sexual content involving minors, slurs or hate speech, graphic violence, self-harm, hacking tools), whatever the intent?
2. harmful_intent: does the user mean harm, even without risky words (insinuation, sarcasm, insults, stereotypes, inducement, deception, revenge, evading detection, a harmful goal disguised as an innocent one)?

Benign requests that only look risky (for example "How do I kill a Python process?") have neither.

Write one or two sentences of analysis, then the verdict as JSON on the last line, exactly in this form:
{{"explicit_risk": true or false, "harmful_intent": true or false, "group": "EHD" or "IHD" or "MHD" or "general"}}
(group: MHD if both, EHD if only explicit_risk, IHD if only harmful_intent, general if neither)

REQUEST:
<<<
{request}
>>>"""

RETRY_SUFFIX = "\n\nYour previous reply had no valid JSON verdict. Reply again, ending with the JSON verdict on its own line."

_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def parse_verdict(text: str) -> str | None:
    """The group in a reviewer's output, or ``None`` if it holds no usable JSON verdict.

    Scans for JSON objects from the END (the verdict comes after the analysis, and an analysis
    may quote braces); the last object with usable fields wins.
    """
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"\{", text)]
    for start in reversed(starts):
        try:
            obj, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        explicit, intent = _as_bool(obj.get("explicit_risk")), _as_bool(obj.get("harmful_intent"))
        if explicit is not None and intent is not None:
            if explicit and intent:
                return Group.MHD.value
            return Group.EHD.value if explicit else Group.IHD.value if intent else Group.GENERAL.value
        group = obj.get("group")
        if isinstance(group, str):
            try:
                return Group.parse(group).value
            except ValueError:
                continue
    return None


def hf_generate_fn(model: Any, tokenizer: Any, max_new_tokens: int = 256) -> Callable[[list[str]], list[str]]:
    """Wrap a transformers causal LM as ``generate_fn``: chat template when the tokenizer has one,
    left padding, greedy decoding (deterministic), only the new tokens decoded."""
    import torch

    if tokenizer.pad_token is None:
        # Generation only: the attention mask marks the padding, no loss is computed, so pad=eos is harmless here.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    def generate(texts: list[str]) -> list[str]:
        if getattr(tokenizer, "chat_template", None):
            rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in texts]
        else:
            rendered = list(texts)
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=not getattr(tokenizer, "chat_template", None))
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


class JudgeCategorizer(Categorizer):
    """Categorize with a causal LM acting as a safety reviewer.

    Args:
        model_name_or_path: hub id or local directory of a causal LM (loaded with transformers,
            ``trust_remote_code`` as given, default off). Ignored when ``generate_fn`` is given.
        generate_fn: ``list[str] -> list[str]``, instead of a model (for tests and other backends).
        max_retries: extra attempts for outputs without a usable verdict.
        batch_size: prompts per ``generate_fn`` call.
        fallback: ``"rules"`` (the :class:`RuleCategorizer`) or a group name for prompts the judge
            could not label; every such prompt is counted in ``fallbacks``.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        generate_fn: Callable[[list[str]], list[str]] | None = None,
        *,
        max_retries: int = 2,
        batch_size: int = 8,
        fallback: str = "rules",
        max_new_tokens: int = 256,
        prompt_template: str = REVIEWER_PROMPT,
        dtype: str | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ):
        if generate_fn is None:
            if model_name_or_path is None:
                raise ValueError("JudgeCategorizer needs model_name_or_path or generate_fn")
            generate_fn = self._load(model_name_or_path, max_new_tokens, dtype, device, trust_remote_code)
        if fallback != "rules":
            fallback = Group.parse(fallback).value
        self.generate_fn = generate_fn
        self.max_retries = max_retries
        self.batch_size = batch_size
        self.fallback = fallback
        self.prompt_template = prompt_template
        self.fallbacks = 0
        self.retries = 0
        self._rules = RuleCategorizer() if fallback == "rules" else None

    @staticmethod
    def _load(name: str, max_new_tokens: int, dtype: str | None, device: str | None, trust_remote_code: bool) -> Callable[[list[str]], list[str]]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
        if device is not None:
            model.to(device)
        return hf_generate_fn(model, tokenizer, max_new_tokens)

    def _generate(self, texts: list[str]) -> list[str]:
        try:
            outputs = list(self.generate_fn(texts))
        except Exception as err:  # a failing backend is a fallback, not a crashed labelling run
            log.warning("judge generate_fn failed on a batch of %d (%s: %s)", len(texts), type(err).__name__, err)
            return [""] * len(texts)
        if len(outputs) != len(texts):
            log.warning("judge generate_fn returned %d outputs for %d prompts; treating the batch as malformed", len(outputs), len(texts))
            return [""] * len(texts)
        return outputs

    def categorize(self, prompts: Sequence[PromptLike]) -> list[str]:
        requests = [self.prompt_template.format(request=prompt_text(p)) for p in prompts]
        groups: list[str | None] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            if attempt:
                self.retries += len(pending)
            suffix = RETRY_SUFFIX if attempt else ""
            for start in range(0, len(pending), self.batch_size):
                chunk = pending[start:start + self.batch_size]
                for i, out in zip(chunk, self._generate([requests[i] + suffix for i in chunk])):
                    groups[i] = parse_verdict(out)
            pending = [i for i in pending if groups[i] is None]
        if pending:
            self.fallbacks += len(pending)
            log.warning("judge: %d of %d prompts had no valid verdict after %d retries; using fallback %r",
                        len(pending), len(prompts), self.max_retries, self.fallback)
            if self._rules is not None:
                for i, g in zip(pending, self._rules.categorize([prompts[i] for i in pending])):
                    groups[i] = g
            else:
                for i in pending:
                    groups[i] = self.fallback
        assert all(g in GROUP_NAMES for g in groups)
        return groups  # type: ignore[return-value]
