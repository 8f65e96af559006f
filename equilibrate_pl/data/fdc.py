"""FDC categorization: sort safety prompts into EHD / IHD / MHD / general (docs/METHOD.md section 2).

Pure python. One interface, :class:`Categorizer`, and the cheap implementations:
:class:`LabelCategorizer` (labels already in the data) and :class:`RuleCategorizer` (an
explicit-risk lexicon plus harmful-intent cues, ``fdc_lexicon``). The trainable classifier and the
LLM judge live in ``fdc_classifier`` / ``fdc_judge`` and are reached through
:func:`build_categorizer`, so importing this module never imports torch.

Beside it: ``fdc_mhd`` (MHD synthesis) and ``fdc_report`` (measuring a categorizer against labels).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, Iterable, Mapping, Sequence

from equilibrate_pl.data.fdc_lexicon import BENIGN_PATTERNS, EXPLICIT_TERMS, INTENT_CUES
from equilibrate_pl.data.schema import BEAVERTAILS_GROUP_LABELS, GROUP_NAMES, Group, PromptLike

__all__ = [
    "Categorizer",
    "LabelCategorizer",
    "RuleCategorizer",
    "build_categorizer",
    "prompt_text",
    "CATEGORIZER_METHODS",
]

CATEGORIZER_METHODS = ("labels", "rules", "classifier", "judge")


def prompt_text(prompt: PromptLike) -> str:
    """The text a categorizer reads: a string as is; for a dialogue, the user turns joined.

    Only user turns: the harmful intent or explicit request is the user's, and an assistant turn
    quoting risky words (e.g. a refusal) must not make a prompt look riskier than it is.
    """
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return "\n".join(users or [m["content"] for m in prompt])


class Categorizer(ABC):
    """Maps prompts to FDC group names (``schema.GROUP_NAMES``).

    ``fallbacks`` counts prompts for which the categorizer could not decide by its own method and
    used its fallback instead (the judge's malformed outputs); it is never reset silently.
    """

    fallbacks: int = 0

    @abstractmethod
    def categorize(self, prompts: Sequence[PromptLike]) -> list[str]:
        """One group name per prompt, in order."""

    def categorize_records(self, records: Sequence[Mapping[str, Any]], text_field: str = "prompt") -> list[dict[str, Any]]:
        """Copies of ``records`` with ``group`` set from ``record[text_field]``."""
        groups = self.categorize([r[text_field] for r in records])
        return [{**r, "group": g} for r, g in zip(records, groups)]


class LabelCategorizer(Categorizer):
    """Use labels already in the data, mapped to group names.

    ``mapping`` (case-insensitive) adds labels on top of the canonical names and of the FDC
    BeaverTails release's ``No risk`` and ``OTHER`` (``schema.BEAVERTAILS_GROUP_LABELS``, both
    ``general``). An unknown label raises.
    """

    def __init__(self, mapping: Mapping[str, str] | None = None, field: str = "group"):
        merged = {**BEAVERTAILS_GROUP_LABELS, **(mapping or {})}
        self.mapping = {k.strip().lower(): Group.parse(v).value for k, v in merged.items()}
        self.field = field

    def _map(self, label: Any, where: str) -> str:
        if isinstance(label, str):
            key = label.strip().lower()
            if key in self.mapping:
                return self.mapping[key]
            try:
                return Group.parse(label).value
            except ValueError:
                pass
        raise ValueError(f"{where}: unknown label {label!r}; expected one of {list(GROUP_NAMES) + sorted(self.mapping)}")

    def categorize(self, prompts: Sequence[Any]) -> list[str]:
        """Here the "prompts" are the labels themselves (this categorizer cannot read text)."""
        return [self._map(label, f"item {i}") for i, label in enumerate(prompts)]

    def categorize_records(self, records: Sequence[Mapping[str, Any]], text_field: str = "prompt") -> list[dict[str, Any]]:
        out = []
        for i, r in enumerate(records):
            label = r.get(self.field, (r.get("meta") or {}).get(self.field))
            out.append({**r, "group": self._map(label, f"record {i}, field {self.field!r}")})
        return out


# --------------------------------------------------------------------------------------------
# rules

def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])(?:" + "|".join(patterns) + r")(?![\w-])", re.IGNORECASE)


class RuleCategorizer(Categorizer):
    """Lexicon + cue rules: explicit term and intent cue -> MHD, explicit only -> EHD,
    intent only -> IHD, neither -> general.

    ``explicit_terms`` / ``intent_cues`` replace the built-in lists (regex fragments; word
    boundaries are added). :meth:`explain` returns the matches, for debugging a label.
    """

    def __init__(
        self,
        explicit_terms: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
        intent_cues: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
        benign_patterns: Sequence[str] | None = None,
    ):
        self.explicit = _compile(_flatten(EXPLICIT_TERMS if explicit_terms is None else explicit_terms))
        self.intent = _compile(_flatten(INTENT_CUES if intent_cues is None else intent_cues))
        benign = BENIGN_PATTERNS if benign_patterns is None else list(benign_patterns)
        self.benign = _compile(benign) if benign else None  # an empty list switches look-alike removal off
        self.fallbacks = 0

    def explain(self, prompt: PromptLike) -> dict[str, list[str]]:
        text = prompt_text(prompt).replace("’", "'")
        if self.benign is not None:
            text = self.benign.sub(" ", text)
        # finditer + group(0): user patterns may contain capturing groups, which would change findall's result
        return {"explicit": [m.group(0) for m in self.explicit.finditer(text)],
                "intent": [m.group(0) for m in self.intent.finditer(text)]}

    def categorize_one(self, prompt: PromptLike) -> str:
        hits = self.explain(prompt)
        explicit, intent = bool(hits["explicit"]), bool(hits["intent"])
        if explicit and intent:
            return Group.MHD.value
        if explicit:
            return Group.EHD.value
        if intent:
            return Group.IHD.value
        return Group.GENERAL.value

    def categorize(self, prompts: Sequence[PromptLike]) -> list[str]:
        return [self.categorize_one(p) for p in prompts]


def _flatten(patterns: Mapping[str, Sequence[str]] | Sequence[str]) -> list[str]:
    if isinstance(patterns, Mapping):
        return [p for group in patterns.values() for p in group]
    return list(patterns)


def build_categorizer(method: str, **kwargs: Any) -> Categorizer:
    """Build a categorizer by name: ``labels`` | ``rules`` | ``classifier`` | ``judge``.

    ``classifier`` with ``path=DIR`` loads a saved :class:`~equilibrate_pl.data.fdc_classifier.ClassifierCategorizer`
    (``path="builtin:world"``: the built-in world's, trained on first use on another draw of the
    world and cached); other keyword arguments go to the class's constructor.
    """
    if method == "labels":
        return LabelCategorizer(**kwargs)
    if method == "rules":
        return RuleCategorizer(**kwargs)
    if method == "classifier":
        from equilibrate_pl.data.fdc_classifier import ClassifierCategorizer

        path = kwargs.pop("path", None)
        if path == "builtin:world":  # the built-in world's classifier, trained on another draw and cached
            from equilibrate_pl.data.fdc_classifier import world_classifier_dir

            path = world_classifier_dir()
        return ClassifierCategorizer.load(path, **kwargs) if path is not None else ClassifierCategorizer(**kwargs)
    if method == "judge":
        from equilibrate_pl.data.fdc_judge import JudgeCategorizer

        return JudgeCategorizer(**kwargs)
    raise ValueError(f"unknown categorizer method {method!r}; expected one of {list(CATEGORIZER_METHODS)}")
