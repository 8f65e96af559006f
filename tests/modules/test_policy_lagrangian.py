"""PPO-Lagrangian in PolicyModule: per-token costs, the combined advantage, the APPO mask on it, the
multiplier's updates in training, per-group logging, behaviour against plain PPO, exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from equilibrate_pl.algorithms.ama import appo_mask
from equilibrate_pl.algorithms.ppo import gae, group_advantages
from equilibrate_pl.modules.policy import PolicyModule
from equilibrate_pl.modules.rollout import Rollout, response_mask
from tests.modules.test_policy import (
    LexiconRewardModel,
    hand_rollout,
    loader,
    make_trainer,
    prompt_batch,
    prompt_datamodule,
    straight_and_resumed,
    tiny_tokenizer_and_models,
    trainable_state,
    world_lexicon_reward,
)


def lexicon(tok: Any, weights: torch.Tensor) -> LexiconRewardModel:
    return LexiconRewardModel(weights, tok.convert_tokens_to_ids("<|im_start|>"))


def scored_rollout(lambda_init: float, **settings: Any) -> tuple[PolicyModule, Rollout]:
    """A hand rollout (2 rows, 3 response columns, lengths 2 and 3) with rewards and costs filled in."""
    module = PolicyModule(kl={"coef": 0.5}, ppo={"whiten_advantages": False, "gamma": 1.0, "lam": 1.0},
                          constraint={"lambda_init": lambda_init}, **settings)
    rollout = hand_rollout([1.0, 2.0], [2, 3], [False, False], width=3)
    rollout.logprobs = torch.tensor([[0.2, 0.1, 9.0], [0.0, 0.0, 0.4]])  # k1 KL against ref = 0
    rollout.cost_scores = torch.tensor([0.5, -1.0])
    rollout.rewards, rollout.kl, rollout.shaped_scores = module.compute_rewards({}, rollout)
    rollout.cost_rewards, _, rollout.shaped_costs = module.compute_cost_rewards({}, rollout)
    return module, rollout


def test_costs_carry_the_kl_term_and_the_advantages_combine_by_hand() -> None:
    module, rollout = scored_rollout(2.0)
    # rewards: -0.5 KL per token + score on the last; costs: +0.5 KL per token + cost on the last
    assert torch.allclose(rollout.rewards, torch.tensor([[-0.1, 0.95, 0.0], [0.0, 0.0, 1.8]]), atol=1e-6)
    assert torch.allclose(rollout.cost_rewards, torch.tensor([[0.1, 0.55, 0.0], [0.0, 0.0, -0.8]]), atol=1e-6)
    assert rollout.shaped_costs.tolist() == [0.5, -1.0]
    rollout.values = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.3, 0.7]])
    rollout.cost_values = torch.tensor([[0.3, -0.1, 0.0], [0.0, 0.0, 0.2]])
    advantages, returns = module.compute_advantages(rollout)
    # gamma = lambda_GAE = 1: A_t = (sum of the rewards from t on) - V_t, for rewards and costs alike;
    # reward advantages [[0.35, 0.75], [1.7, 1.5, 1.1]], cost advantages [[0.35, 0.65], [-0.8, -0.8, -1.0]],
    # combined (A_r - 2 A_c) / 3:
    expected = torch.tensor([[-0.35 / 3, -0.55 / 3, 0.0], [3.3 / 3, 3.1 / 3, 3.1 / 3]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.85, 0.95, 0.0], [1.8, 1.8, 1.8]]), atol=1e-6)
    assert torch.allclose(rollout.cost_returns, torch.tensor([[0.65, 0.55, 0.0], [-0.8, -0.8, -0.8]]), atol=1e-6)
    # The KL term counts once whatever lambda: the combination equals GAE on r - 2c with V_r - 2 V_c, over 3,
    # where the KL parts cancel to -0.5 KL.
    mask = rollout.response_mask
    direct, _ = gae(rollout.rewards - 2 * rollout.cost_rewards, rollout.values - 2 * rollout.cost_values, mask, 1.0, 1.0)
    assert torch.allclose(advantages, direct / 3, atol=1e-6)
    # (r - 2c) / 3 = -0.5 KL + (score - 2 cost) / 3 on the last token: the KL weight is the PPO one
    assert torch.allclose((rollout.rewards - 2 * rollout.cost_rewards) / 3,
                          -0.5 * rollout.kl + torch.tensor([[0, (1.0 - 1.0) / 3, 0], [0, 0, (2.0 + 2.0) / 3]]), atol=1e-6)


def test_critic_free_cost_advantages_are_group_normalised_costs() -> None:
    module = PolicyModule(advantage="grpo", samples_per_prompt=2, kl={"coef": 0.0}, ppo={"whiten_advantages": False},
                          constraint={"lambda_init": 1.0}, ama={"enabled": False, "token_signal": "dense_reward"})
    assert not module.uses_cost_critic
    rollout = hand_rollout([1.0, 1.0, 2.0, 0.0], [1, 2, 2, 1], [False] * 4, width=2)
    rollout.cost_scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    rollout.rewards, rollout.kl, rollout.shaped_scores = module.compute_rewards({}, rollout)
    rollout.cost_rewards, _, rollout.shaped_costs = module.compute_cost_rewards({}, rollout)
    advantages, returns = module.compute_advantages(rollout)
    # GRPO: rewards [1, 1 | 2, 0] -> [0, 0 | 1/sqrt2, -1/sqrt2]; costs [1, 3 | 0, 0] -> [-1/sqrt2, 1/sqrt2 | 0, 0]
    r2 = 1 / math.sqrt(2)
    per_row = torch.tensor([(0 + r2) / 2, (0 - r2) / 2, (r2 - 0) / 2, (-r2 - 0) / 2])
    assert torch.allclose(advantages, per_row[:, None] * rollout.response_mask, atol=1e-4)
    assert torch.equal(returns, torch.zeros_like(returns)) and torch.equal(rollout.cost_returns, torch.zeros_like(returns))
    assert torch.allclose(rollout.extras["cost_advantages"][:, 0], group_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2), atol=1e-6)


def test_appo_mask_takes_the_combined_advantages_sign_and_the_combined_signal() -> None:
    """Row 0 scores well but is costly: its combined advantage is negative although its reward
    advantage is positive, so APPO keeps its tokens whose combined signal is BELOW the baseline
    (those that raised the cost). Row 1 is cheap: positive, tokens above the baseline."""
    module = PolicyModule(kl={"coef": 0.0}, ppo={"whiten_advantages": False}, constraint={"lambda_init": 1.0},
                          ama={"enabled": True, "token_signal": "dense_reward", "baseline": "zero"})
    rollout = hand_rollout([1.0, 1.0], [3, 3], [False, False], width=3)
    rollout.cost_scores = torch.tensor([3.0, -3.0])
    rollout.values = torch.zeros(2, 3)
    rollout.cost_values = torch.zeros(2, 3)
    rollout.dense_rewards = torch.tensor([[1.0, -0.5, 0.2], [0.3, -0.2, 0.4]])
    rollout.cost_dense = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 0.5, 0.0]])
    rollout.rewards, rollout.kl, rollout.shaped_scores = module.compute_rewards({}, rollout)
    rollout.cost_rewards, _, rollout.shaped_costs = module.compute_cost_rewards({}, rollout)
    rollout.advantages, _ = module.compute_advantages(rollout)
    assert rollout.extras["reward_advantages"][0, 0] > 0 and rollout.advantages[0, 0] < 0  # (1 - 3) / 2
    assert rollout.advantages[1, 0] > 0  # (1 + 3) / 2
    keep = module.policy_mask(rollout)
    # combined signal (d_r - d_c) / 2: row 0 [-0.5, -0.25, 0.6] (negative row: keep < 0), row 1 [0.65, -0.35, 0.2] (keep > 0)
    assert keep.tolist() == [[True, True, False], [True, False, True]]
    combined = (rollout.dense_rewards - rollout.cost_dense) / 2
    assert torch.equal(keep, appo_mask(rollout.advantages, combined, rollout.response_mask))
    # The reward signal alone would have kept different tokens of the costly row.
    assert appo_mask(rollout.advantages, rollout.dense_rewards, rollout.response_mask)[0].tolist() == [False, True, False]


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="use_cost_critic: true needs advantage='gae'"):
        PolicyModule(advantage="grpo", samples_per_prompt=2, ama={"token_signal": "dense_reward"},
                     constraint={"use_cost_critic": True})
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        PolicyModule(constraint={"use_cost_critic": False})
    with pytest.raises(ValueError, match="needs a cost critic"):
        PolicyModule(samples_per_prompt=2, ama={"enabled": True, "token_signal": "value"}, constraint={"use_cost_critic": False})
    with pytest.raises(ValueError, match="lambda_init"):
        PolicyModule(constraint={"lambda_init": 0.0})
    tok, actor, rm, critic = tiny_tokenizer_and_models()
    with pytest.raises(ValueError, match="constraint needs a cost model"):
        PolicyModule.from_models(actor, tok, rm, critic=critic, constraint={}).configure_model()


class Record(L.Callback):
    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.history.append(dict(pl_module.last_metrics))


def test_lambda_follows_the_mean_cost_after_the_delay_and_is_logged_per_group(equilibrate_cache: Path) -> None:
    """A cost model that charges 0.05 per response token: every episode costs more than the threshold
    0.2, so lambda rises from the iteration after the delay, by exactly the multiplier's rule on the
    logged mean cost; per-group costs and violations are logged and add up to the batch's."""
    tok, actor, rm, critic = tiny_tokenizer_and_models()
    cost = lexicon(tok, torch.full((len(tok),), 0.05))
    cost_critic = tiny_tokenizer_and_models(seed=1)[3]
    module = PolicyModule.from_models(
        actor, tok, rm, critic=critic, cost_model=cost, cost_critic=cost_critic, generation={"max_new_tokens": 6},
        ppo={"minibatch_size": 8, "ppo_epochs": 1}, constraint={"threshold": 0.2, "lambda_lr": 0.5, "update_delay": 1},
        log_refusals=False,
    )
    record = Record()
    make_trainer(max_steps=3, callbacks=[record]).fit(module, datamodule=prompt_datamodule(batch_size=8))
    lambdas = [h["lagrangian/lambda"] for h in record.history]
    assert lambdas[0] == 1.0  # iteration 0 < update_delay
    for before, step in zip(lambdas[:-1], record.history[1:]):
        violation = step["cost/mean"] - 0.2
        assert violation > 0 and step["lagrangian/violation"] == pytest.approx(violation, rel=1e-5)
        assert step["lagrangian/lambda"] == pytest.approx(math.exp(math.log(before) + 0.5 * violation * before), rel=1e-5)
    last = record.history[-1]
    groups = [k.split("/")[1] for k in last if k.startswith("group/") and k.endswith("/cost")]
    assert groups and all(last[f"group/{g}/violation"] == pytest.approx(last[f"group/{g}/cost"] - 0.2) for g in groups)
    assert last["cost/unsafe_fraction"] == 1.0 and math.isfinite(last["ppo/cost_value_explained_variance"])
    assert module.cost_critic is cost_critic and not cost.training
    assert math.isfinite(last["loss/cost_value"]) and last["grad_norm/cost_critic"] > 0


def test_a_cost_model_without_a_constraint_is_only_logged(equilibrate_cache: Path) -> None:
    """Monitoring: the same run with and without a cost model takes the same steps."""
    def run(with_cost: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        tok, actor, rm, critic = tiny_tokenizer_and_models()
        extra = {"cost_model": lexicon(tok, torch.full((len(tok),), 0.05))} if with_cost else {}
        module = PolicyModule.from_models(actor, tok, rm, critic=critic, generation={"max_new_tokens": 4},
                                          ppo={"minibatch_size": 4, "ppo_epochs": 1}, log_refusals=False, **extra)
        make_trainer(max_steps=1).fit(module, loader([prompt_batch(tok, ["Hi", "How do I cook rice?"])]))
        return trainable_state(module), module.last_metrics

    (plain, _), (logged, metrics) = run(False), run(True)
    assert all(torch.equal(plain[k], logged[k]) for k in plain)
    assert "cost/mean" in metrics and "lagrangian/lambda" not in metrics


def world_cost(tok: Any) -> LexiconRewardModel:
    """A bag-of-words cost: the log-odds of each token in the world's harmful compliances against its
    other responses (refusals, safe redirects, answers), clipped to [-1, 2]."""
    from equilibrate_pl.data.world import build_world

    world = build_world(seed=0, size="tiny")
    harmful, other = torch.ones(len(tok)), torch.ones(len(tok))
    for ex in world.examples["train"]:
        harmful.index_add_(0, torch.tensor(tok(ex.harmful)["input_ids"]), torch.ones(len(tok(ex.harmful)["input_ids"])))
        for text in (ex.refusal, ex.helpful):
            ids = tok(text)["input_ids"]
            other.index_add_(0, torch.tensor(ids), torch.ones(len(ids)))
    log_odds = (harmful / harmful.sum()).log() - (other / other.sum()).log()
    return lexicon(tok, log_odds.clamp(-1.0, 2.0))


def test_the_constraint_holds_down_a_cost_that_plain_ppo_raises(equilibrate_cache: Path) -> None:
    """A reward that pays for exactly what the cost charges for (the words of the world's harmful
    compliances: a reward model bought by compliance). Over 12 iterations plain PPO raises the mean
    cost well above the start's; PPO-Lagrangian with the threshold at the start's cost (lambda
    starting at 3, so the combined advantage pushes the cost down from the first step) ends near or
    below the threshold, and lambda moved up while the windowed cost was above it and down while below.
    (Measured, seed 0: start 1.4, PPO 5.0, PPO-Lagrangian 0.8; with the rollout engine's sampling 1.5,
    5.4, 0.5. Other seeds of this toy move PPO's cost less; the assertion is for this one.)"""
    def run(constraint: dict[str, Any] | None) -> list[dict[str, float]]:
        tok, actor, _, critic = tiny_tokenizer_and_models()
        record = Record()
        module = PolicyModule.from_models(
            actor, tok, world_cost(tok), critic=critic, cost_model=world_cost(tok), cost_critic=tiny_tokenizer_and_models(seed=1)[3],
            generation={"max_new_tokens": 8}, ppo={"minibatch_size": 8, "ppo_epochs": 4}, kl={"coef": 0.05},
            actor_optim={"lr": 1e-2, "scheduler": "constant"}, critic_optim={"lr": 1e-2, "scheduler": "constant"}, seed=0,
            log_refusals=False, constraint=constraint,
        )
        L.seed_everything(0, verbose=False)
        make_trainer(max_steps=12, callbacks=[record]).fit(module, datamodule=prompt_datamodule(batch_size=8))
        return record.history

    def late(history: list[dict[str, float]]) -> float:
        return sum(h["cost/mean"] for h in history[-4:]) / 4

    plain = run(None)
    start = (plain[0]["cost/mean"] + plain[1]["cost/mean"]) / 2
    constrained = run({"threshold": start, "lambda_init": 3.0, "lambda_lr": 0.2, "window": 16})
    print(f"mean cost: start {start:.2f}, PPO {late(plain):.2f}, PPO-Lagrangian {late(constrained):.2f}, "
          f"lambda {[round(h['lagrangian/lambda'], 2) for h in constrained]}")
    assert late(plain) > start + 1.0, (start, late(plain))
    assert late(constrained) < late(plain) - 1.0 and late(constrained) < start + 0.5, (start, late(constrained))
    lambdas = [3.0] + [h["lagrangian/lambda"] for h in constrained]
    for before, after, h in zip(lambdas, lambdas[1:], constrained):  # up while over the threshold, down while under
        assert (after > before) == (h["lagrangian/violation"] > 0), (before, after, h["lagrangian/violation"])


def test_resume_equals_uninterrupted_with_the_multiplier_and_the_cost_critic(equilibrate_cache: Path, tmp_path: Path) -> None:
    """4 iterations straight == 2, checkpoint, new process state, 2 more: lambda, its window of
    episode costs, the cost critic and its optimizer resume exactly."""
    def build() -> PolicyModule:
        tok, actor, _, critic = tiny_tokenizer_and_models()
        return PolicyModule.from_models(
            actor, tok, world_lexicon_reward(tok), critic=critic, cost_model=world_cost(tok),
            cost_critic=tiny_tokenizer_and_models(seed=1)[3], generation={"max_new_tokens": 5},
            ppo={"minibatch_size": 2, "ppo_epochs": 1}, kl={"coef": 0.1},
            constraint={"threshold": -0.5, "lambda_lr": 0.3, "window": 6, "update_delay": 1},
            actor_optim={"lr": 1e-2, "scheduler": "constant"}, critic_optim={"lr": 1e-2, "scheduler": "constant"},
            log_refusals=False,
        )

    def state(module: PolicyModule) -> dict[str, torch.Tensor]:
        out = trainable_state(module)
        out.update({f"cost_critic.{k}": v.detach().clone() for k, v in module.cost_critic.state_dict().items()})
        return out

    straight, first, resumed = straight_and_resumed(build, tmp_path)
    path = tmp_path / "step=2.ckpt"
    saved = torch.load(path, weights_only=True)["policy_state"]["lagrange_multiplier"]
    assert saved["costs"].numel() == 6  # the window crossed iterations

    a, b, mid = state(straight), state(resumed), state(first)
    assert any(not torch.equal(a[k], mid[k]) for k in a if k.startswith("cost_critic."))  # steps 3-4 moved the cost critic
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert resumed.multiplier.value == pytest.approx(straight.multiplier.value, rel=1e-9)
    assert straight.multiplier.value != pytest.approx(first.multiplier.value)
    assert list(resumed.multiplier.costs) == pytest.approx(list(straight.multiplier.costs))
    # a checkpoint of an unconstrained run cannot seed a constrained one
    plain = {"policy_state": {k: v for k, v in torch.load(path, weights_only=True)["policy_state"].items() if k != "lagrange_multiplier"}}
    with pytest.raises(ValueError, match="without a constraint"):
        build().on_load_checkpoint(plain)


def test_constraint_groups_choose_the_episodes_lambda_is_updated_on() -> None:
    module = PolicyModule(constraint={"threshold": 0.0, "lambda_lr": 1.0, "groups": ["EHD", "MHD"]})
    rollout = hand_rollout([0.0] * 4, [1] * 4, [False] * 4, width=1)
    rollout.groups = ["general", "EHD", "general", "MHD"]
    rollout.shaped_costs = torch.tensor([-9.0, 1.0, -9.0, 2.0])
    module.update_multiplier(rollout)
    assert module.multiplier.mean_cost() == 1.5  # the general episodes do not dilute it
    assert module.multiplier.value == pytest.approx(math.exp(1.5))
    rollout.groups = ["general"] * 4  # no constrained episode: lambda stays
    module.update_multiplier(rollout)
    assert module.multiplier.value == pytest.approx(math.exp(1.5))
    with pytest.raises(ValueError, match="constraint.groups"):
        PolicyModule(constraint={"groups": ["harmful"]})


@pytest.mark.parametrize("samples_per_prompt", [1, 2], ids=["rows", "shared-prompt"])
def test_costs_are_read_like_rewards_at_the_last_real_token(equilibrate_cache: Path, samples_per_prompt: int) -> None:
    """With the reward model as the cost model, the episode costs and dense costs of a ragged batch
    (left-padded prompts, responses cut by EOS at different lengths or at max_new_tokens) are the
    scores and dense rewards exactly: the same position (the EOS or the cut, never a pad), the same
    shared-prompt path."""
    tok, actor, rm, critic = tiny_tokenizer_and_models()
    module = PolicyModule.from_models(actor, tok, rm, critic=critic, cost_model=rm, generation={"max_new_tokens": 7},
                                      samples_per_prompt=samples_per_prompt, log_refusals=False)
    module.configure_model()
    batch = prompt_batch(tok, ["Hi", "How do I cook rice?", "How is a pipe bomb made?"])
    rollout = module.generate(batch)
    p = rollout.prompt_length
    for row, cut in enumerate([1, 4, 7, 2, 7, 5][: rollout.sequences.shape[0]]):  # ragged: EOS at different places
        if cut < 7:
            rollout.sequences[row, p + cut - 1] = tok.eos_token_id
            rollout.sequences[row, p + cut:] = tok.pad_token_id
    rollout.response_mask, rollout.truncated = response_mask(rollout.sequences[:, p:], tok.eos_token_id)
    rollout.attention_mask = torch.cat([rollout.attention_mask[:, :p], rollout.response_mask.long()], 1)
    assert len(set(rollout.response_lengths.tolist())) > 1 and rollout.truncated.any()
    module.score(rollout)
    module.score_costs(rollout)
    assert torch.equal(rollout.cost_scores, rollout.scores)
    assert torch.equal(rollout.cost_dense, rollout.dense_rewards)
    assert rollout.cost_values is None  # no constraint: no cost critic
