"""Preference pairs around a model's own answers (what ``equilibrate pairs`` writes).

A pair needs a good and a bad answer to the same prompt. The model under training supplies the
answers it actually gives (sampled), the response bank (:mod:`equilibrate_pl.data.responses`)
supplies the ones it should or should not give:

- harmful prompt (EHD / IHD / MHD): chosen = the response that fits the group (a refusal, a redirect
  to the need underneath, help with the safe part only), rejected = one of the model's own samples
  that does not refuse (it complied, or tried to);
- benign prompt (``general``, look-alikes included): chosen = one of the model's samples that does
  not refuse, rejected = an unwarranted refusal;
- ``as_harmful``: every prompt is treated as harmful and answered with a plain refusal, whatever
  its group: what unsorted safety data teach (the naive arm), noise included.

A prompt where every sample refuses has no compliant answer to reject (harmful) or no helpful
answer to prefer (benign) and is left out with its reason; so are empty and degenerate samples.
Nothing here imports model code: refusal detection is passed in as a function.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from equilibrate_pl.data.responses import GROUP_RESPONSE, compose
from equilibrate_pl.data.schema import Group

__all__ = ["PairBuild", "build_pairs", "usable_sample", "prompt_key"]


def prompt_key(prompt: Any) -> str:
    """A stable key of a prompt's text (string or message list): what cached samples are matched by."""
    return hashlib.sha256(repr(prompt).encode("utf-8")).hexdigest()[:20]


def usable_sample(text: str) -> bool:
    """An answer worth pairing: not empty, and not one token repeated (a degenerate generation)."""
    words = text.split()
    if len(words) < 3:
        return False
    return len(set(words)) > max(1, len(words) // 5)


@dataclass
class PairBuild:
    """The pairs, and every prompt left out with its reason (``skipped[reason] = [ids]``)."""

    pairs: list[dict[str, Any]]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p["group"] for p in self.pairs))

    def summary(self) -> str:
        parts = [f"{len(self.pairs)} pairs (" + ", ".join(f"{g} {n}" for g, n in sorted(self.counts().items())) + ")"]
        parts += [f"{len(ids)} prompts left out: {reason}" for reason, ids in sorted(self.skipped.items())]
        return "; ".join(parts)


def build_pairs(
    records: Sequence[Mapping[str, Any]],
    samples: Mapping[str, Sequence[str]],
    is_refusal: Callable[[Sequence[str]], Sequence[bool]],
    *,
    seed: int = 0,
    as_harmful: bool = False,
) -> PairBuild:
    """Pairs for ``records`` (prompt records with a ``group``) from the model's ``samples``.

    Args:
        records: prompt records; ``group`` decides the pair's direction (unless ``as_harmful``).
        samples: ``prompt_key(prompt) -> the model's sampled answers``, in sampling order.
        is_refusal: flags refusals in a list of texts (``eval.refusal.get_detector(m).predict``).
        seed: picks the bank responses; each prompt draws from its own generator, so a pair does not
            change when other prompts are added or removed.
        as_harmful: treat every prompt as harmful and prefer a plain refusal (unsorted safety data).
    """
    out = PairBuild([])
    for i, record in enumerate(records):
        rid = str(record.get("id", i))
        answers = [a for a in samples.get(prompt_key(record["prompt"]), ()) if usable_sample(a)]
        if not answers and not samples.get(prompt_key(record["prompt"])):
            out.skipped.setdefault("no samples", []).append(rid)
            continue
        flags = list(is_refusal(answers)) if answers else []
        compliant = [k for k, refused in enumerate(flags) if not refused]
        group = Group.parse(record["group"]).value
        harmful = as_harmful or group != Group.GENERAL.value
        rng = random.Random(f"{seed}:{rid}:{prompt_key(record['prompt'])}")
        if not compliant:
            reason = "every sample refuses (nothing to reject)" if harmful else "every sample refuses (no helpful answer)"
            out.skipped.setdefault(reason if answers else "only empty or degenerate samples", []).append(rid)
            continue
        answer, index = answers[compliant[0]], compliant[0]
        if harmful:
            kind = "refusal" if as_harmful else GROUP_RESPONSE[group]
            chosen, rejected, kinds = compose(kind, rng), answer, (kind, "model_sample")
        else:
            chosen, rejected, kinds = answer, compose("unwarranted_refusal", rng), ("model_sample", "unwarranted_refusal")
        meta = {**dict(record.get("meta") or {}), "chosen_kind": kinds[0], "rejected_kind": kinds[1],
                "sample_index": index, "as_harmful": as_harmful}
        pair = {"id": rid, "prompt": record["prompt"], "chosen": chosen, "rejected": rejected, "group": group, "meta": meta}
        if "source" in record:
            pair["source"] = record["source"]
        out.pairs.append(pair)
    return out
