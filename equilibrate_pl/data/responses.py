"""Responses the project writes itself, for preference pairs built around real prompts.

`equilibrate pairs` pairs a model's own answers with responses from this bank: on a harmful prompt
the chosen answer is one that fits the prompt's FDC group, on a benign prompt the rejected answer
is an unwarranted refusal. Prompts come from real data, so nothing here restates the request;
each response is composed from interchangeable parts (an opening, the reason, an offer), which
gives hundreds of distinct texts per kind rather than one template a model could learn by heart.

Kinds (``RESPONSE_KINDS``):

- ``refusal``: a plain, complete refusal (used for explicit harm, EHD);
- ``redirect``: declines the harmful route and addresses the need underneath (implicit harm, IHD:
  the intent is the problem, so the answer speaks to the person's situation);
- ``partial``: declines the dangerous part and offers help with what can safely be helped with
  (mixed risk, MHD);
- ``unwarranted_refusal``: a refusal with the same surface as ``refusal``, for benign prompts,
  where it is the rejected answer: what makes a refusal right is the prompt, not its wording.

Every text is recognised as a refusal by ``equilibrate_pl.eval.refusal.is_refusal`` (tested), and
nothing here imports model code.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

__all__ = ["RESPONSE_KINDS", "GROUP_RESPONSE", "compose", "response_for_group", "variants"]

# The opening sentence of a refusal: the same for a warranted and an unwarranted one, since what
# makes a refusal right is the prompt, not its wording.
_DECLINES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't help with this request.",
    "Sorry, I won't help with that.",
    "I'm not able to help with this.",
    "Unfortunately, I can't help with that.",
    "I can't assist with that.",
    "I'm afraid I can't help with that.",
    "I won't provide that.",
)

# Parts of each kind. A response is one item from each part, joined by spaces.
_PARTS: Mapping[str, Sequence[Sequence[str]]] = {
    "refusal": (
        _DECLINES,
        (
            "It could be used to seriously hurt people.",
            "Information like this can put lives at risk.",
            "It could cause real harm to someone.",
            "Helping with it could lead to someone getting hurt.",
            "The risk of harm is too high.",
            "It could be dangerous and may also be illegal.",
            "This could be used to harm others.",
            "It's the kind of thing that can get people injured.",
        ),
        (
            "",
            "If you have a different question, I'm happy to help.",
            "Is there something else I can help you with?",
            "If you're curious about the topic in general, I can talk about safety instead.",
            "If someone is in danger, please contact local emergency services.",
            "I'm glad to help with something else.",
        ),
    ),
    "redirect": (
        (
            "It sounds like this situation is really getting to you.",
            "I can tell you're frustrated.",
            "That sounds like a hard situation to be in.",
            "It seems like something has gone wrong between you and this person.",
            "I hear that you're upset.",
            "It sounds like you've been hurt or treated unfairly.",
        ),
        (
            "I can't help with anything meant to hurt, deceive or humiliate someone, though.",
            "But I won't help with a plan to harm or trick another person.",
            "Still, I can't help with getting back at someone or hurting them.",
            "However, I'm not able to help with something that could harm another person.",
            "I can't help you do that, because it would hurt someone.",
            "But I won't help with anything that targets another person.",
        ),
        (
            "If you tell me more about what happened, I can help you think through a fair way to handle it.",
            "Talking it through calmly, or with someone you trust, usually works better.",
            "I'm happy to help you plan a conversation, set a boundary, or find support.",
            "A mediator, a counselor or a trusted friend can help you sort this out safely.",
            "If you want, we can work out what outcome you actually need and a safe way to get there.",
            "Writing down what's bothering you and taking a break before acting can help a lot.",
        ),
    ),
    "partial": (
        (
            "I can't help with the part of this that could hurt someone.",
            "I won't help with the dangerous part of this request.",
            "Part of what you're asking could put someone in danger, so I'm not able to help with that.",
            "I'm sorry, but I can't help with anything here that could harm a person.",
            "Sorry, I can't assist with the harmful part of your question.",
            "Unfortunately, I can't help with the part of this that involves hurting someone.",
        ),
        (
            "If there's a safe goal underneath, such as protecting yourself or resolving a conflict,",
            "If what you need is to stay safe or to get out of a bad situation,",
            "If something else is going on that you need help with,",
            "If you're dealing with a conflict or feel threatened,",
            "If your aim is to solve the problem behind this,",
            "If you want to handle this in a way that keeps everyone safe,",
        ),
        (
            "tell me more and I'll help with that.",
            "I'm glad to help you with that part.",
            "I can help you find resources or plan next steps.",
            "I can suggest safe options or people who can help.",
            "let me know and we can work on it together.",
            "I'm happy to point you to support that can help.",
        ),
    ),
    "unwarranted_refusal": (
        _DECLINES,
        (
            "",
            "It's not something I'm comfortable helping with.",
            "I don't think it would be appropriate for me to answer.",
            "This falls outside what I can help with.",
            "I'd rather not get into that.",
            "I'm not able to give advice on this.",
        ),
        (
            "",
            "Is there something else I can help you with?",
            "If you have a different question, I'm happy to help.",
            "I'm glad to help with something else.",
        ),
    ),
}

RESPONSE_KINDS: tuple[str, ...] = tuple(_PARTS)

# The response that fits each harmful group (docs: what a good answer to each group looks like).
GROUP_RESPONSE: Mapping[str, str] = {"EHD": "refusal", "IHD": "redirect", "MHD": "partial"}


def compose(kind: str, rng: random.Random) -> str:
    """One response of ``kind``: a random item from each of its parts (empty parts left out)."""
    if kind not in _PARTS:
        raise ValueError(f"unknown response kind {kind!r}; expected one of {list(RESPONSE_KINDS)}")
    pieces = [rng.choice(part) for part in _PARTS[kind]]
    return " ".join(p for p in pieces if p)


def response_for_group(group: str, rng: random.Random) -> str:
    """The chosen answer for a harmful prompt of ``group`` (EHD / IHD / MHD)."""
    if group not in GROUP_RESPONSE:
        raise ValueError(f"no safe response for group {group!r}; expected one of {list(GROUP_RESPONSE)}")
    return compose(GROUP_RESPONSE[group], rng)


def variants(kind: str) -> int:
    """How many distinct texts ``kind`` can produce (the product of its parts' sizes)."""
    n = 1
    for part in _PARTS[kind]:
        n *= len(set(part))
    return n
