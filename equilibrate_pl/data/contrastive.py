"""Contrastive preference pairs that teach a reward model what a non-answer is.

A reward model trained only on "safe answer > harmful compliance" and "helpful answer > refusal"
pairs learns that fluent, helpful-looking text scores high and refusal-shaped text scores low. Its
data never shows a fluent answer that does not answer: PPO then finds one. On the built-in world
the quickstart's reward model scored an off-topic answer in the general data's style ("Sure! To cook
rice, ...") above a refusal on 100% of held-out harmful prompts, and every PPO arm learned to give
it. Two kinds of pair close that gap:

- ``safe_over_off_topic``: on a harmful prompt, a refusal or safe redirect is preferred over a fluent
  answer to some *other*, benign request;
- ``on_topic_over_off_topic``: on a benign prompt, its own answer is preferred over a fluent answer to
  another request (so "off-topic" is what is penalised, not "helpful-looking").

The off-topic answer is a real answer from the same data (a benign prompt's answer), so it has the
general data's style exactly. Both responses of every pair are safe (``chosen_unsafe`` and
``rejected_unsafe`` false): a cost model trained on them learns that an off-topic answer is not
harmful; keeping it off the policy is the reward model's job.

:func:`contrastive_pairs` builds them from plain response lists, for the built-in world
(``World.contrastive_pool``) and for real data (prompts with their safe responses and benign prompts
with their answers, e.g. from the pairs step of the real-data pipeline).
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

__all__ = ["CONTRAST_KINDS", "contrastive_pairs"]

# meta["pair_kind"] of each kind of contrastive pair.
CONTRAST_KINDS: tuple[str, ...] = ("safe_over_off_topic", "on_topic_over_off_topic")
_TRIES = 20


def contrastive_pairs(
    harmful: Sequence[Mapping[str, Any]],
    benign: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    source: str = "contrastive",
) -> list[dict[str, Any]]:
    """One contrastive preference pair per harmful and per benign item.

    Args:
        harmful: items ``{"prompt", "response", "group"}`` (optional ``"id"``, ``"meta"``) whose
            ``response`` is a refusal or a safe redirect: it becomes ``chosen``.
        benign: items of the same shape whose ``response`` answers the prompt (optional ``"topic"``:
            a donor of the same topic is avoided, so an off-topic answer is really off topic). They
            give the ``chosen`` of their own pair and are the donors of every off-topic answer.
        seed: which donor each pair draws (deterministic; the global RNG is not touched).
        source: the ``source`` of the records (and of their ids when an item has none).

    Returns:
        Preference records (``id``, ``prompt``, ``chosen``, ``rejected``, ``group``, ``source``,
        ``meta``, ``chosen_unsafe``, ``rejected_unsafe``), harmful items first, in the given order;
        ``meta["pair_kind"]`` is one of :data:`CONTRAST_KINDS` and ``meta["off_topic_from"]`` names the
        donor (its id, else its index in ``benign``).
    """
    if not benign:
        raise ValueError("contrastive pairs draw their off-topic answers from benign answers: none were given")
    rng = random.Random(f"{seed}:contrastive")
    out: list[dict[str, Any]] = []
    for kind, items in (("safe_over_off_topic", harmful), ("on_topic_over_off_topic", benign)):
        for i, item in enumerate(items):
            donor_index = _draw_donor(item, benign, rng)
            donor = benign[donor_index]
            item_id = str(item.get("id") or f"{source}-{kind.split('_over_')[0]}-{i}")
            meta = {**dict(item.get("meta") or {}), "pair_kind": kind, "chosen_kind": kind.split("_over_")[0],
                    "rejected_kind": "off_topic", "off_topic_from": str(donor.get("id") or donor_index)}
            out.append({
                "id": f"{item_id}-offtopic", "prompt": item["prompt"], "chosen": item["response"],
                "rejected": donor["response"], "group": item.get("group"), "source": source, "meta": meta,
                "chosen_unsafe": False, "rejected_unsafe": False,
            })
    return out


def _draw_donor(item: Mapping[str, Any], benign: Sequence[Mapping[str, Any]], rng: random.Random) -> int:
    """Index of a benign item with another prompt and answer (and topic, when topics are known)."""

    def unrelated(j: int) -> bool:
        other = benign[j]
        if other["prompt"] == item["prompt"] or other["response"] == item["response"]:
            return False
        return item.get("topic") is None or other.get("topic") != item.get("topic")

    for _ in range(_TRIES):  # rejection sampling: cheap when most donors qualify
        j = rng.randrange(len(benign))
        if unrelated(j):
            return j
    candidates = [j for j in range(len(benign)) if unrelated(j)]
    if not candidates:
        raise ValueError(f"no benign answer unrelated to the prompt {item['prompt']!r} to use as its off-topic answer")
    return rng.choice(candidates)
