"""ADPO's token signal comes from outside the loss it steers.

A mask computed from the trained policy's own log-ratio keeps exactly the tokens that moved the
right way, so ANY movement of the policy lowers the loss, whatever the labels. This test would have
caught that: with every shipped signal (a reward model's dense rewards, a frozen model's implicit
rewards, a data column) random moves of the policy do not lower the loss, for the true labels and
for the swapped ones, while a module that reads its own policy (the control, a subclass) fails.

(Training on random labels is no such test: with any fixed token signal the policy can learn to
raise the tokens the signal favours and lower the others, which lowers the loss for either
labelling; that is learning from the signal, which is what ADPO is for.)
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from equilibrate_pl.algorithms.ama import ADPOSettings
from equilibrate_pl.algorithms.dpo import implicit_rewards
from equilibrate_pl.modules.preference import PreferenceModule

LOG2 = math.log(2.0)
BETA = 0.5


class SelfConfirming(PreferenceModule):
    """The control: the token signal is the policy's own (detached) log-ratio, as the first release did."""

    def compute_token_signal(self, batch, pairs, policy_logps, reference_logps, precomputed):
        return implicit_rewards(policy_logps.detach(), reference_logps, self.beta)


@pytest.fixture(scope="module")
def reward_model_dir(equilibrate_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A scalar model on the tiny backbone with a seeded random head: a fixed, label-blind signal."""
    from equilibrate_pl.models import load_scalar_model

    model, tokenizer = load_scalar_model("builtin:tiny", init_from_causal_lm=True, head_seed=7)
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _records(n: int, seed: int) -> list[dict[str, Any]]:
    from equilibrate_pl.data.world import build_world

    rows = build_world(seed=0, size="tiny").preference_records("train")
    return random.Random(seed).sample(rows, n)


def _with_field(records: list[dict[str, Any]], tokenizer: Any, seed: int) -> list[dict[str, Any]]:
    g = random.Random(seed)
    out = []
    for r in records:
        row = dict(r)
        for side in ("chosen", "rejected"):
            n = len(tokenizer(r[side], add_special_tokens=False)["input_ids"]) + 1
            row[f"{side}_token_signal"] = [g.gauss(0.0, 1.0) for _ in range(n)]
        out.append(row)
    return out


def _module(kind: str, reward_model_dir: str, implicit_model_dir: str, **kwargs: Any) -> PreferenceModule:
    cls = SelfConfirming if kind == "self" else PreferenceModule
    signal = {"self": "implicit", "dense_reward": "dense_reward", "implicit": "implicit", "field": "field"}[kind]
    return cls(beta=BETA, ama=ADPOSettings(enabled=True, token_signal=signal, baseline="zero"),
               reward_model=reward_model_dir if kind == "dense_reward" else None,
               implicit_model=implicit_model_dir if kind in ("implicit", "self") else None, **kwargs)


def _batch(module: PreferenceModule, records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    from equilibrate_pl.data.collate import build_collator

    if kind == "field":
        records = _with_field(records, module.tokenizer, seed=5)
    return build_collator("preference", module.tokenizer, max_length=96, max_prompt_length=48).collate_records(records)


def _swap(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in records]


def _shift(model: torch.nn.Module, direction: dict[str, torch.Tensor], sign: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(sign * direction[name])


KINDS = ["dense_reward", "implicit", "field"]


@pytest.mark.parametrize("kind", KINDS + ["self"])
@pytest.mark.parametrize("noise_seed", [11, 12])
def test_random_moves_of_the_policy_do_not_lower_the_loss(kind: str, noise_seed: int, reward_model_dir: str,
                                                          implicit_model_dir: str, equilibrate_cache: Path) -> None:
    """No data, no training: the policy is the reference moved by a small random +delta, then -delta.

    With a frozen mask the masked margin is, to first order, linear in delta: the two moves change
    the loss by equal and opposite amounts, so their mean stays at log 2 up to second order, for the
    true labels and for the swapped ones. The self-confirming mask keeps the tokens that moved the
    right way under either move, so both moves lower the loss, to first order, whatever the labels:
    the audit's measurement (0.693 -> 0.685 on random weight noise, true and swapped labels alike).
    """
    # float64 and a tiny move: second-order terms (which do not flip with the move) stay far below
    # the first-order ones the test is about.
    module = _module(kind, reward_model_dir, implicit_model_dir).double()
    g = torch.Generator().manual_seed(noise_seed)
    direction = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) * 1e-5 for n, p in module.model.named_parameters()}
    records = _records(8, seed=1)
    for labels, rows in (("true", records), ("swapped", _swap(records))):
        batch = _batch(module, rows, kind)
        drop = {}
        for sign in (1.0, -1.0):
            _shift(module.model, direction, sign)
            with torch.no_grad():
                drop[sign] = LOG2 - float(module.compute_loss(batch)[0])
            _shift(module.model, direction, -sign)
        first_order = max(abs(drop[1.0]), abs(drop[-1.0]))
        mean_drop = (drop[1.0] + drop[-1.0]) / 2
        assert first_order > 1e-6, drop  # the moves are big enough to measure
        if kind == "self":
            assert drop[1.0] > 0 and drop[-1.0] > 0 and mean_drop > 0.5 * first_order, (labels, drop)
        else:
            assert abs(mean_drop) < 0.1 * first_order, (labels, drop)
