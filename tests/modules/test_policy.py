"""PolicyModule: rollouts, PPO correctness pitfalls, end-to-end PPO/APPO/GRPO on the built-in world, resume.

Helpers at the top are shared with ``test_policy_fsdp.py`` (and its torchrun worker).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from equilibrate_pl.modules.policy import PolicyModule, TokenRewards
from equilibrate_pl.modules.rollout import Rollout, response_mask

# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def tiny_tokenizer_and_models(seed: int = 0, **actor_overrides: Any) -> tuple[Any, nn.Module, nn.Module, nn.Module]:
    """(tokenizer, actor, reward model, critic): tiny Llamas built from config, deterministic."""
    from transformers import LlamaForTokenClassification

    from equilibrate_pl.data.tokenizer import tiny_tokenizer
    from equilibrate_pl.models.scalar_head import init_scalar_head
    from equilibrate_pl.models.tiny import build_tiny_model, tiny_llama_config

    tok = tiny_tokenizer()
    actor = build_tiny_model(tok, seed=seed, **actor_overrides)

    def scalar(s: int) -> nn.Module:
        cfg = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, num_labels=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            model = LlamaForTokenClassification(cfg)
        init_scalar_head(model.score, seed=s)
        return model

    return tok, actor, scalar(seed + 100), scalar(seed + 200)


class LexiconRewardModel(nn.Module):
    """A linear bag-of-words reward model: prefix score = sum of the weights of the assistant
    tokens so far (tokens after the last ``<|im_start|>``; the prompt scores nothing).

    It has the scalar-head interface (``.logits`` of shape (B, L, 1), one score per prefix), so the
    PolicyModule scores it at the last real token and takes dense rewards from it exactly as from a
    transformer reward model.
    """

    def __init__(self, weights: torch.Tensor, turn_start_id: int) -> None:
        super().__init__()
        self.register_buffer("weights", weights.float())
        self.turn_start_id = turn_start_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        starts_after = (input_ids == self.turn_start_id).flip(-1).long().cumsum(-1).flip(-1)
        in_last_turn = starts_after == 0
        w = self.weights[input_ids] * attention_mask * in_last_turn
        return SimpleNamespace(logits=w.cumsum(-1).unsqueeze(-1))


def world_lexicon_reward(tok: Any, clip: float = 2.0) -> LexiconRewardModel:
    """Naive-Bayes log-odds of each token in the world's chosen vs rejected responses.

    A closed-form fit to the built-in world's preference pairs (safe answers / helpful answers
    preferred over harmful compliance / needless refusals): it rewards the vocabulary of preferred
    responses. A fitted transformer reward model would cost more test time than the PPO run itself;
    what the test checks is that PPO raises whatever the reward model says, at bounded KL.
    """
    from equilibrate_pl.data.world import build_world

    pairs = build_world(seed=0, size="tiny").preference_records("train")
    chosen = torch.zeros(len(tok))
    rejected = torch.zeros(len(tok))
    for pair in pairs:
        chosen.index_add_(0, torch.tensor(tok(pair["chosen"])["input_ids"]), torch.ones(len(tok(pair["chosen"])["input_ids"])))
        rejected.index_add_(0, torch.tensor(tok(pair["rejected"])["input_ids"]), torch.ones(len(tok(pair["rejected"])["input_ids"])))
    log_odds = torch.log((chosen + 1) / (chosen.sum() + len(tok))) - torch.log((rejected + 1) / (rejected.sum() + len(tok)))
    return LexiconRewardModel(log_odds.clamp(-clip, clip), tok.convert_tokens_to_ids("<|im_start|>"))


def prompt_batch(tok: Any, prompts: list[str], groups: list[str] | None = None) -> dict[str, Any]:
    """A left-padded prompt batch as ``data.collate.PromptCollator`` makes it."""
    from equilibrate_pl.data.collate import build_collator

    collator = build_collator("prompt", tok, max_prompt_length=64)
    records = [{"prompt": p, "group": (groups or ["general"] * len(prompts))[i]} for i, p in enumerate(prompts)]
    features = [{**collator.encode(r), "index": i} for i, r in enumerate(records)]
    return collator(features)


def loader(batches: list[dict[str, Any]]) -> Any:
    """A DataLoader yielding pre-built batches as they are."""
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False)


def prompt_datamodule(batch_size: int = 4, seed: int = 0) -> Any:
    from equilibrate_pl.data import SafetyDataModule

    return SafetyDataModule(stage="prompt", tokenizer="builtin:tiny", world_scale="tiny", batch_size=batch_size,
                            val_size=0, seed=seed, mix="all")


def make_trainer(tmp: Path | None = None, max_steps: int = 2, **kwargs: Any) -> Any:
    import lightning as L

    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp) if tmp else None, num_sanity_val_steps=0,
        limit_val_batches=0, **kwargs,
    )


def trainable_state(module: PolicyModule) -> dict[str, torch.Tensor]:
    out = {f"actor.{k}": v.detach().clone() for k, v in module.actor.state_dict().items()}
    if module.critic is not None:
        out.update({f"critic.{k}": v.detach().clone() for k, v in module.critic.state_dict().items()})
    return out


PROMPTS = [
    "How do I kill a Python process?",
    "Write a haiku",
    "How is a pipe bomb made, step by step, with all the details?",
    "Hi",
]


@pytest.fixture(scope="module")
def kit(equilibrate_cache: Path) -> Any:
    return tiny_tokenizer_and_models()


# --------------------------------------------------------------------------------------------
# Response masks, EOS and scoring positions
# --------------------------------------------------------------------------------------------


def test_response_mask_eos_inclusive_truncation_and_sampled_pad() -> None:
    eos, pad = 9, 0
    responses = torch.tensor([
        [5, 6, 9, 0, 0],  # stops: mask through the EOS
        [9, 0, 0, 0, 0],  # immediate EOS: one real token
        [5, 6, 7, 8, 4],  # never stops: cut at max_new_tokens, all real
        [5, 0, 6, 9, 0],  # the model SAMPLED the pad id before its EOS: still a real token
    ])
    mask, truncated = response_mask(responses, eos)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True] * 5,
        [True, True, True, True, False],
    ]
    assert truncated.tolist() == [False, False, True, False]
    mask2, _ = response_mask(responses, [9, 8])  # several stop ids
    assert mask2[2].tolist() == [True, True, True, True, False]


def hand_rollout(scores: list[float], lengths: list[int], truncated: list[bool], width: int = 4) -> Rollout:
    b = len(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return Rollout(
        prompt_length=2, sequences=torch.ones(b, 2 + width, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(b, 2, dtype=torch.long), mask.long()], 1), response_mask=mask,
        truncated=torch.tensor(truncated), groups=["general"] * b,
        logprobs=torch.zeros(b, width), ref_logprobs=torch.zeros(b, width), scores=torch.tensor(scores),
    )


def test_rewards_sit_on_the_last_real_token_and_missing_eos_is_penalised() -> None:
    module = PolicyModule(kl={"coef": 0.5}, generation={"missing_eos_penalty": 3.0})
    rollout = hand_rollout([1.0, 2.0, 5.0], [2, 4, 1], [False, True, False])
    rollout.logprobs = torch.tensor([[0.2, 0.1, 9.0, 9.0], [0.0, 0.0, 0.0, 0.4], [-0.2, 9.0, 9.0, 9.0]])
    rewards, kl, scores = module.compute_rewards({}, rollout)
    # KL (k1) only on real tokens; score (minus 3 for the row without EOS) on its last real token.
    expected = torch.tensor([
        [-0.1, -0.05 + 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, -0.2 + 2.0 - 3.0],
        [0.1 + 5.0, 0.0, 0.0, 0.0],
    ])
    assert torch.allclose(rewards, expected, atol=1e-6)
    assert torch.allclose(kl, torch.tensor([[0.2, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.4], [-0.2, 0.0, 0.0, 0.0]]), atol=1e-6)
    assert scores.tolist() == pytest.approx([1.0, -1.0, 5.0])
    assert rollout.kl is None and rollout.rewards is None  # returned, not written into the rollout


def test_length_penalty_subclass_changes_only_the_score() -> None:
    class LengthPenalised(PolicyModule):
        def compute_scores(self, batch: dict, rollout: Rollout) -> torch.Tensor:
            return super().compute_scores(batch, rollout) - 0.1 * rollout.response_lengths

    rollout = hand_rollout([1.0, 1.0], [1, 4], [False, False])
    rewards = LengthPenalised(kl={"coef": 0.0}).compute_rewards({}, rollout).rewards
    assert rewards.sum(-1).tolist() == pytest.approx([0.9, 0.6])


def test_a_compute_rewards_override_drives_the_update_and_the_kl_controller(kit: Any) -> None:
    """An override returns its own rewards and KL; nothing it leaves out of the rollout breaks the step."""
    tok, actor, rm, critic = kit
    seen: dict[str, torch.Tensor] = {}

    class ConstantKL(PolicyModule):
        def compute_rewards(self, batch: dict, rollout: Rollout) -> Any:
            kl = 0.25 * rollout.response_mask.float()
            scores = torch.ones_like(rollout.scores)
            last = rollout.response_lengths - 1
            rewards = torch.zeros_like(kl).scatter(1, last.unsqueeze(1), 1.0)
            seen["rewards"] = rewards
            return TokenRewards(rewards, kl, scores)

    module = ConstantKL.from_models(actor, tok, rm, critic=critic, generation={"max_new_tokens": 3},
                                    kl={"coef": 0.1, "adaptive": True, "target": 1.0, "horizon": 100})
    before = module.kl_controller.value
    make_trainer(max_steps=1).fit(module, loader([prompt_batch(tok, PROMPTS)]))
    m = module.last_metrics
    assert m["reward/mean"] == pytest.approx(1.0)
    assert m["kl/sequence"] == pytest.approx(0.25 * m["response/length"], rel=1e-5)
    # Ziegler's controller moved towards the target from the override's KL: 0.1 * (1 + clip(kl/target - 1) * n / horizon).
    error = max(-0.2, min(0.2, m["kl/sequence"] / 1.0 - 1.0))
    assert module.kl_controller.value == pytest.approx(before * (1 + error * len(PROMPTS) / 100), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Forward passes: left padding, ragged batches, ratio = 1
# --------------------------------------------------------------------------------------------


def test_generate_scores_match_forward_logprobs_with_left_padding(kit: Any) -> None:
    """Rollout log-probs (teacher-forced, position_ids from the mask) equal what ``generate``
    computed token by token with its KV cache: same positions, same policy (docs/PPO.md: ratio 1 at the first step)."""
    tok, actor, rm, critic = kit
    module = PolicyModule.from_models(actor, tok, rm, critic=critic, generation={"max_new_tokens": 6, "do_sample": False})
    module.configure_model()
    batch = prompt_batch(tok, PROMPTS)
    assert batch["attention_mask"][:, 0].eq(0).any()  # ragged: some rows are left padded
    out = actor.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6,
                         do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    gen_logps = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)
    p = batch["input_ids"].shape[1]
    chosen = gen_logps.gather(-1, out.sequences[:, p:].unsqueeze(-1)).squeeze(-1)
    rollout = module.generate(batch)
    assert torch.equal(rollout.sequences[:, p:][rollout.response_mask], out.sequences[:, p:][rollout.response_mask])
    module.score(rollout)
    m = rollout.response_mask
    assert torch.allclose(rollout.logprobs[m], chosen[m], atol=1e-4)


def test_ragged_batch_scoring_equals_per_row_loop(kit: Any) -> None:
    """Log-probs, values, scores and dense rewards of a padded batch equal each row scored alone,
    unpadded: no off-by-one at response ends (docs/PPO.md: ragged batches)."""
    tok, actor, rm, critic = kit
    module = PolicyModule.from_models(actor, tok, rm, critic=critic, generation={"max_new_tokens": 7})
    module.configure_model()
    batch = prompt_batch(tok, PROMPTS)
    rollout = module.generate(batch)
    # Make lengths ragged on purpose: cut rows at different points with an EOS.
    eos = tok.eos_token_id
    p = rollout.prompt_length
    for row, cut in enumerate([1, 3, 7, 5]):
        if cut < 7:
            rollout.sequences[row, p + cut - 1] = eos
            rollout.sequences[row, p + cut:] = tok.pad_token_id
    rollout.response_mask, rollout.truncated = response_mask(rollout.sequences[:, p:], eos)
    rollout.attention_mask = torch.cat([batch["attention_mask"], rollout.response_mask.long()], 1)
    module.score(rollout)
    assert rollout.response_lengths.tolist() == [1, 3, 7, 5]
    from equilibrate_pl.algorithms.logprobs import token_logprobs

    for row in range(4):
        real = rollout.attention_mask[row].bool()
        ids = rollout.sequences[row][real][None]
        n_prompt = int(batch["attention_mask"][row].sum())
        n_resp = int(rollout.response_lengths[row])
        with torch.no_grad():
            logits = actor(input_ids=ids).logits
            lp = token_logprobs(logits, ids, torch.ones_like(ids, dtype=torch.bool))[0, n_prompt - 1:]
            values = critic(input_ids=ids).logits[0, :, 0]
            scores = rm(input_ids=ids).logits[0, :, 0]
        assert torch.allclose(rollout.logprobs[row, :n_resp], lp, atol=1e-5)
        assert torch.allclose(rollout.values[row, :n_resp], values[n_prompt - 1:-1], atol=1e-5)
        assert rollout.scores[row].item() == pytest.approx(scores[-1].item(), abs=1e-5)
        dense = scores[n_prompt:] - scores[n_prompt - 1:-1]
        assert torch.allclose(rollout.dense_rewards[row, :n_resp], dense, atol=1e-5)
        assert (rollout.logprobs[row, n_resp:] == 0).all() and (rollout.dense_rewards[row, n_resp:] == 0).all()


def test_ratio_is_one_at_first_ppo_step_despite_dropout_in_config(equilibrate_cache: Path) -> None:
    """Dropout configured on (attention 0.3) and the Trainer's train mode: the module removes
    dropout, so the first minibatch's new log-probs equal the rollout's exactly."""
    tok, actor, rm, critic = tiny_tokenizer_and_models(attention_dropout=0.3)
    module = PolicyModule.from_models(
        actor, tok, rm, critic=critic, generation={"max_new_tokens": 6},
        ppo={"minibatch_size": 2, "ppo_epochs": 1}, actor_optim={"lr": 1e-2, "scheduler": "constant"},
    )
    make_trainer(max_steps=1).fit(module, loader([prompt_batch(tok, PROMPTS)]))
    assert actor.training  # the Trainer put it in train mode; dropout is off anyway
    assert module.last_metrics["ppo/first_ratio_max_deviation"] <= 1e-6


# --------------------------------------------------------------------------------------------
# End to end on the built-in world
# --------------------------------------------------------------------------------------------


def run_world(equilibrate_cache: Path, steps: int, **settings: Any) -> tuple[list[dict[str, float]], PolicyModule]:
    import lightning as L

    tok, actor, _, critic = tiny_tokenizer_and_models()
    reward = world_lexicon_reward(tok)
    history: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            history.append(dict(pl_module.last_metrics))

    settings.setdefault("generation", {"max_new_tokens": 8})
    settings.setdefault("ppo", {"minibatch_size": 8, "ppo_epochs": 4})
    module = PolicyModule.from_models(
        actor, tok, reward, critic=critic if settings.get("advantage", "gae") == "gae" else None,
        actor_optim={"lr": 1e-2, "scheduler": "constant"}, critic_optim={"lr": 1e-2, "scheduler": "constant"},
        seed=0, **{"kl": {"coef": 0.1}, **settings},
    )
    L.seed_everything(0, verbose=False)
    make_trainer(max_steps=steps, callbacks=[Record()]).fit(module, datamodule=prompt_datamodule(batch_size=8))
    return history, module


def evaluate_on_world(module: PolicyModule, n_prompts: int = 48) -> tuple[float, float]:
    """(mean reward, mean per-sequence k3 KL to the reference) of sampled responses to the world's
    held-out eval prompts, same prompts and sampling seed for every policy compared."""
    from equilibrate_pl.data.world import build_world

    tok = module.tokenizer
    prompts = [r["prompt"] for r in build_world(seed=0, size="tiny").prompts("eval")[:n_prompts]]
    batch = prompt_batch(tok, prompts)
    module.generation.do_sample = True
    module.rollout_rng = None
    rollout = module.score(module.generate(batch))
    from equilibrate_pl.algorithms.kl import kl_penalty

    k3 = (kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k3") * rollout.response_mask).sum(-1)
    return rollout.scores.mean().item(), k3.mean().item()


def reference_policy(module: PolicyModule) -> PolicyModule:
    """The same module with the actor swapped for the frozen reference: the policy before training."""
    ref = PolicyModule.from_models(module.reference, module.tokenizer, module.reward_model, critic=module.critic,
                                   reference_model=module.reference, generation=module.generation)
    ref.configure_model()
    return ref


@pytest.mark.parametrize("ama", [None, "dense_reward"], ids=["ppo", "appo"])
def test_ppo_and_appo_raise_world_reward_with_bounded_kl(equilibrate_cache: Path, ama: str | None) -> None:
    """10 PPO (APPO) iterations on the built-in world's prompts, fixed seed: the mean reward on the
    held-out eval prompts rises well above the initial policy's, and the KL to the reference stays
    bounded during training and at the end: below 5 nats per token (40 per 8-token response). The
    initial tiny policy is near-uniform over 2,000 tokens, so a collapse onto the best-scoring
    tokens would sit at about log(2000) = 7.6 nats per token (61 per response).

    How far the final KL moves with the seed (seeds 0-11, module and global seed alike): PPO 7-14
    nats per response with either rollout engine; APPO 17-53 (median 29) with transformers'
    ``generate`` and 9-37 (median 29) with the KV-cache engine. The bound of 24 this test had
    before held at seed 0 with ``generate``'s random stream and in 4 of its 12 seeds.

    APPO takes dense rewards as its token signal here: with a lexicon reward model they say exactly
    which tokens helped. (With ``token_signal="value"`` the signal is a critic trained for only these
    10 steps; that run raised the eval reward by +0.7 only, so it is not asserted.)"""
    history, module = run_world(
        equilibrate_cache, steps=10, ama={"enabled": ama is not None, "token_signal": ama or "value", "baseline": "batch_mean"}
    )
    assert len(history) == 10
    before, _ = evaluate_on_world(reference_policy(module))
    after, kl_after = evaluate_on_world(module)
    print(f"world {ama}: reward {before:.3f} -> {after:.3f}, KL {kl_after:.3f}")
    assert after > before + 1.0, (before, after)
    assert kl_after < 40.0
    assert all(h["kl/k3"] < 40.0 for h in history), [h["kl/k3"] for h in history]
    kept = [h["ama/kept_fraction"] for h in history]
    assert all(k == 1.0 for k in kept) if not ama else all(0.0 < k < 1.0 for k in kept)
    for key in ("time/generation_s", "time/scoring_s", "time/update_s", "ppo/clip_fraction", "ppo/value_explained_variance",
                "ppo/entropy", "ppo/approx_kl", "response/refusal_rate", "ama/fallbacks"):
        assert math.isfinite(history[-1][key]), key
    assert any(k.startswith("group/") and k.endswith("/reward") for k in history[-1])


def test_grpo_with_appo_dense_reward_signal_raises_reward(equilibrate_cache: Path) -> None:
    history, module = run_world(
        equilibrate_cache, steps=6, advantage="grpo", samples_per_prompt=4,
        ama={"enabled": True, "token_signal": "dense_reward", "baseline": "zero"},
        ppo={"minibatch_size": 16, "ppo_epochs": 2}, kl={"coef": 0.2},
    )
    assert module.critic is None and "ppo/value_explained_variance" not in history[-1]
    before, _ = evaluate_on_world(reference_policy(module))
    after, kl_after = evaluate_on_world(module)
    print(f"world grpo+appo: reward {before:.3f} -> {after:.3f}, KL {kl_after:.3f}")
    assert after > before + 0.5, (before, after)
    assert kl_after < 24.0


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PolicyModule(advantage="rloo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="dense_reward"):
        PolicyModule(advantage="grpo", samples_per_prompt=2, ama={"enabled": True, "token_signal": "value"})


# --------------------------------------------------------------------------------------------
# Reliability
# --------------------------------------------------------------------------------------------


def test_non_finite_rewards_skip_then_stop(kit: Any) -> None:
    tok, actor, rm, critic = kit

    class Broken(PolicyModule):
        def compute_scores(self, batch: dict, rollout: Rollout) -> torch.Tensor:
            return torch.full_like(rollout.scores, float("nan"))

    module = Broken.from_models(actor, tok, rm, critic=critic, generation={"max_new_tokens": 3}, max_nonfinite_steps=2)
    before = trainable_state(module)
    with pytest.raises(RuntimeError, match="non-finite"):
        make_trainer(max_steps=5).fit(module, loader([prompt_batch(tok, PROMPTS)] * 5))
    assert module.nonfinite_guard.total_skipped == 2
    after = trainable_state(module)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was stepped


def test_constant_reward_model_is_warned_about(kit: Any) -> None:
    tok, actor, _, critic = kit
    constant = LexiconRewardModel(torch.zeros(len(tok)), tok.convert_tokens_to_ids("<|im_start|>"))
    module = PolicyModule.from_models(actor, tok, constant, critic=critic, generation={"max_new_tokens": 3})
    with pytest.warns(RuntimeWarning, match="same score"):
        make_trainer(max_steps=1).fit(module, loader([prompt_batch(tok, PROMPTS)]))


def straight_and_resumed(build: Any, tmp_path: Path) -> tuple[PolicyModule, PolicyModule, PolicyModule]:
    """``(straight, first, resumed)``: 4 iterations straight; 2 iterations checkpointed at
    ``tmp_path / "step=2.ckpt"``; and a fresh module resumed from that checkpoint to iteration 4
    after the global RNG was disturbed (which must not matter)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = build()
    make_trainer(max_steps=4).fit(straight, datamodule=prompt_datamodule())
    first = build()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    make_trainer(max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(first, datamodule=prompt_datamodule())
    path = tmp_path / "step=2.ckpt"
    assert path.is_file()
    torch.manual_seed(12345)
    resumed = build()
    make_trainer(max_steps=4).fit(resumed, datamodule=prompt_datamodule(), ckpt_path=str(path))
    return straight, first, resumed


def test_resume_equals_uninterrupted(equilibrate_cache: Path, tmp_path: Path) -> None:
    """Sampling on, adaptive KL: 4 steps straight == 2 steps, checkpoint, new process state, 2 more.
    Needs the rollout RNG, the sampler position, optimizer and KL-controller state in the checkpoint."""
    def build() -> PolicyModule:
        tok, actor, _, critic = tiny_tokenizer_and_models()
        return PolicyModule.from_models(
            actor, tok, world_lexicon_reward(tok), critic=critic, generation={"max_new_tokens": 5},
            ppo={"minibatch_size": 2, "ppo_epochs": 1}, kl={"coef": 0.1, "adaptive": True, "target": 0.01, "horizon": 10},
            actor_optim={"lr": 1e-2, "scheduler": "constant"}, critic_optim={"lr": 1e-2, "scheduler": "constant"},
        )

    straight, first, resumed = straight_and_resumed(build, tmp_path)

    a, b = trainable_state(straight), trainable_state(resumed)
    mid = trainable_state(first)
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # steps 3-4 changed the weights
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert resumed.kl_controller.value == pytest.approx(straight.kl_controller.value, rel=1e-6)
    assert straight.kl_controller.value != pytest.approx(0.1)


# --------------------------------------------------------------------------------------------
# Critic on the actor's trunk, LoRA reference
# --------------------------------------------------------------------------------------------


def test_shared_value_head_trains_with_the_actor(equilibrate_cache: Path) -> None:
    tok, actor, rm, _ = tiny_tokenizer_and_models()
    module = PolicyModule.from_models(
        actor, tok, rm, critic_mode="shared", generation={"max_new_tokens": 4}, ppo={"minibatch_size": 2, "ppo_epochs": 2},
        actor_optim={"lr": 1e-2, "scheduler": "constant"}, critic_optim={"lr": 1e-1, "scheduler": "constant"},
    )
    module.configure_model()
    head_before = module.value_head.weight.detach().clone()
    (optimizer,) = [module.configure_optimizers()[0]["optimizer"]]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-1]  # separate learning rates
    make_trainer(max_steps=2).fit(module, loader([prompt_batch(tok, PROMPTS)] * 2))
    assert module.critic is None
    assert not torch.equal(head_before, module.value_head.weight)
    m = module.last_metrics
    assert m["ppo/first_ratio_max_deviation"] <= 1e-6 and math.isfinite(m["loss/value"]) and m["loss/value"] > 0


def test_lora_actor_uses_adapter_disabled_reference(equilibrate_cache: Path) -> None:
    from equilibrate_pl.models.loading import LoraSettings, ReferenceModelError, prepare_for_training

    tok, actor, rm, critic = tiny_tokenizer_and_models()
    lora_actor = prepare_for_training(actor, lora=LoraSettings(r=4, alpha=8), quant=None, gradient_checkpointing=False, task_type="CAUSAL_LM")
    module = PolicyModule.from_models(
        lora_actor, tok, rm, critic=critic, generation={"max_new_tokens": 4}, ppo={"minibatch_size": 4, "ppo_epochs": 2},
        actor_optim={"lr": 5e-2, "scheduler": "constant"},
    )
    make_trainer(max_steps=2).fit(module, loader([prompt_batch(tok, PROMPTS)] * 2))
    assert module.reference is None  # no second copy: the base weights with the adapter off
    # After one update the adapter moved the policy away from the base: step 2 sees a non-zero KL.
    assert module.last_metrics["kl/k3"] > 0
    with pytest.raises(ReferenceModelError):
        PolicyModule.from_models(actor, tok, rm, critic=critic, reference="adapter_disabled").configure_model()


# --------------------------------------------------------------------------------------------
# Single pass: the scoring forward reused by a one-epoch, one-minibatch update
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["grpo", "gae_shared_head", "lora_adapter_reference"])
def test_reused_rollout_forward_takes_the_same_step_with_one_forward_less(equilibrate_cache: Path, setup: str) -> None:
    """``reuse_rollout_forward`` on vs off: the same gradients at the first optimizer step (the
    update's rows are a shuffled minibatch, so a reused forward that was not re-indexed would pair
    log-probs with the wrong advantages) and one actor forward less per step. Gradients, not
    weights: Adam's first step is about ``lr * sign(g)``, which turns 1e-7 noise in a near-zero
    gradient (the ratio is exactly 1 on one side, 1 +- 1e-7 on the other) into a full step."""
    import lightning as L

    from equilibrate_pl.models.loading import LoraSettings, prepare_for_training

    class FirstGradients(L.Callback):
        grads: dict[str, torch.Tensor] | None = None

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def run(reuse: bool) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        tok, actor, rm, critic = tiny_tokenizer_and_models()
        settings: dict[str, Any] = dict(generation={"max_new_tokens": 5, "do_sample": True}, seed=0,
                                        actor_optim={"lr": 5e-2, "scheduler": "constant"},
                                        critic_optim={"lr": 5e-2, "scheduler": "constant"},
                                        ppo={"minibatch_size": 8, "ppo_epochs": 1, "reuse_rollout_forward": reuse},
                                        kl={"coef": 0.1})
        if setup == "grpo":
            settings.update(advantage="grpo", samples_per_prompt=2, ama={"enabled": True, "token_signal": "dense_reward"})
            critic = None
        elif setup == "gae_shared_head":
            settings.update(critic_mode="shared", ama={"enabled": True, "token_signal": "value"})
            critic = None
        else:
            torch.manual_seed(0)  # peft draws the LoRA A init from the global RNG
            actor = prepare_for_training(actor, lora=LoraSettings(r=4, alpha=8), quant=None,
                                         gradient_checkpointing=True, task_type="CAUSAL_LM")
        module = PolicyModule.from_models(actor, tok, rm, critic=critic, **settings)
        calls = {"actor": 0}
        original = module.actor_forward

        def counting(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            calls["actor"] += model is module.actor
            return original(model, *args, **kwargs)

        module.actor_forward = counting  # type: ignore[method-assign]
        recorder = FirstGradients()
        make_trainer(max_steps=2, callbacks=[recorder]).fit(module, loader([prompt_batch(tok, PROMPTS)] * 2))
        assert recorder.grads
        return recorder.grads, calls["actor"], dict(module.last_metrics)

    reused, reused_calls, reused_metrics = run(True)
    plain, plain_calls, _ = run(False)
    # 2 steps x (score + update) vs 2 x one shared forward (plus the adapter-disabled reference's).
    assert plain_calls - reused_calls == 2
    assert reused_metrics["ppo/first_ratio_max_deviation"] == 0.0
    assert reused.keys() == plain.keys()
    for key, grad in plain.items():
        assert torch.allclose(reused[key], grad, rtol=1e-4, atol=1e-7), key


def test_several_minibatches_or_epochs_keep_the_separate_scoring_forward(kit: Any) -> None:
    tok, actor, rm, critic = kit
    module = PolicyModule.from_models(actor, tok, rm, critic=critic, ppo={"minibatch_size": 2, "ppo_epochs": 1})
    assert not module.single_pass(4) and module.single_pass(2)
    module = PolicyModule.from_models(actor, tok, rm, critic=critic, ppo={"minibatch_size": 8, "ppo_epochs": 2})
    assert not module.single_pass(4)
