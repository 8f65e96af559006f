"""A prompt's k sampled responses scored on one run of the prompt (its KV cache repeated k times).

``rollout.shared_prompt_forward`` against a plain full forward of every row (logits, hidden states,
scalar-model scores, gradients), with left-padded prompts of different lengths; and
``PolicyModule`` in GRPO mode with ``share_prompt`` on and off: the same rollout
statistics and the same first-step gradients, with each prompt run once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from equilibrate_pl.models.forward import can_share_prompt_cache, shared_prompt_forward
from equilibrate_pl.models.scalar_head import position_ids_from_mask
from equilibrate_pl.modules.policy import PolicyModule
from equilibrate_pl.modules.rollout import Rollout
from tests.modules.test_policy import PROMPTS, loader, make_trainer, prompt_batch, tiny_tokenizer_and_models

K, P, R = 3, 7, 5


@pytest.fixture(autouse=True)
def _cache(equilibrate_cache: Path) -> None:
    """The tiny tokenizer lives in the session's cache directory."""


def rollout_rows(vocab: int, pad_id: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """2 prompts (the second left-padded by 3) x K responses; one response ends 2 tokens early."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (2, P), generator=g)
    prompt_mask = torch.ones(2, P, dtype=torch.long)
    prompts[1, :3], prompt_mask[1, :3] = pad_id, 0
    sequences = torch.cat([prompts.repeat_interleave(K, 0), torch.randint(3, vocab, (2 * K, R), generator=g)], 1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(K, 0), torch.ones(2 * K, R, dtype=torch.long)], 1)
    sequences[1, -2:], attention_mask[1, -2:] = pad_id, 0
    return sequences, attention_mask


def test_shared_prompt_forward_equals_the_full_forward_with_gradients() -> None:
    tok, actor, reward, _ = tiny_tokenizer_and_models()
    seq, attn = rollout_rows(len(tok), tok.pad_token_id)
    real = attn[:, P - 1:].bool()[..., None]  # the positions a score or log-prob is read from
    full = actor(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False,
                 output_hidden_states=True)
    rows: list[int] = []
    hook = actor.get_input_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    logits, hidden = shared_prompt_forward(actor, seq, attn, P, K, prompt_positions=1, output_hidden_states=True)
    hook.remove()
    assert rows == [2, 2 * K]  # each prompt once, then every response
    assert logits.shape == (2 * K, R + 1, len(tok))
    torch.testing.assert_close(logits * real, full.logits[:, P - 1:] * real, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden * real, full.hidden_states[-1][:, P - 1:] * real, rtol=0, atol=1e-5)

    # Gradients reach the prompt's computation through the repeated cache.
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * real * weights).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in actor.named_parameters()}
    actor.zero_grad()
    (full.logits[:, P - 1:] * real * weights).sum().backward()
    for name, p in actor.named_parameters():
        # float32 sums in a different order: 1e-5 of the largest entry (gradients reach ~20 here)
        torch.testing.assert_close(shared_grads[name], p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()), msg=name)

    reward.eval()  # built from config in train mode: its classifier dropout would differ between calls
    with torch.no_grad():
        scores = reward(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False).logits
        got, _ = shared_prompt_forward(reward, seq, attn, P, K, prompt_positions=P)
    mask = attn.bool()[..., None]
    torch.testing.assert_close(got * mask, scores * mask, rtol=0, atol=1e-5)


def test_shared_prompt_forward_validates() -> None:
    tok, actor, _, _ = tiny_tokenizer_and_models()
    seq, attn = rollout_rows(len(tok), tok.pad_token_id)
    with pytest.raises(ValueError, match="blocks of 4"):
        shared_prompt_forward(actor, seq, attn, P, 4)
    with pytest.raises(ValueError, match="prompt_positions"):
        shared_prompt_forward(actor, seq, attn, P, K, prompt_positions=P + 1)
    assert can_share_prompt_cache(actor)
    from equilibrate_pl.models.loading import LoraSettings, prepare_for_training

    lora = prepare_for_training(tiny_tokenizer_and_models()[1], lora=LoraSettings(r=4, alpha=8), quant=None,
                                gradient_checkpointing=True, task_type="CAUSAL_LM")
    assert not can_share_prompt_cache(lora)  # checkpointed layers drop the cache; seen through PEFT too
    actor.gradient_checkpointing_enable()
    assert not can_share_prompt_cache(actor)


def test_prompt_group_needs_whole_blocks_of_one_prompt() -> None:
    tok, actor, reward, _ = tiny_tokenizer_and_models()
    module = PolicyModule.from_models(actor, tok, reward, advantage="grpo", samples_per_prompt=K)
    seq, attn = rollout_rows(len(tok), tok.pad_token_id)
    rollout = Rollout(prompt_length=P, sequences=seq, attention_mask=attn, response_mask=attn[:, P:].bool(),
                      truncated=torch.zeros(2 * K, dtype=torch.bool), groups=["general"] * (2 * K))
    assert module.prompt_group(rollout, torch.arange(2 * K)) == K
    assert module.prompt_group(rollout, torch.arange(1, K + 1)) == 1  # straddles two prompts
    assert module.prompt_group(rollout, torch.arange(K - 1)) == 1  # not a whole block
    other = seq.clone()
    other[1, P - 1] = other[0, P - 1] + 1
    assert module.prompt_group(Rollout(P, other, attn, attn[:, P:].bool(), rollout.truncated, rollout.groups),
                               torch.arange(2 * K)) == 1
    module.share_prompt = False
    assert module.prompt_group(rollout, torch.arange(2 * K)) == 1


def test_grpo_step_is_the_same_with_the_prompt_run_once() -> None:
    import lightning as L

    class FirstStep(L.Callback):
        grads: dict[str, torch.Tensor] | None = None

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def run(share: bool) -> tuple[dict[str, torch.Tensor], dict[str, float], list[int]]:
        tok, actor, rm, _ = tiny_tokenizer_and_models()
        module = PolicyModule.from_models(
            actor, tok, rm, advantage="grpo", samples_per_prompt=2, seed=0, kl={"coef": 0.1},
            generation={"max_new_tokens": 5, "do_sample": True}, actor_optim={"lr": 5e-2, "scheduler": "constant"},
            ppo={"minibatch_size": 8, "ppo_epochs": 1}, share_prompt=share,
            ama={"enabled": True, "token_signal": "dense_reward"},
        )
        rows: list[int] = []

        class CountRows(L.Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                for model in {id(m): m for m in (pl_module.actor, pl_module.reference, pl_module.reward_model)}.values():
                    model.get_input_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))

        recorder = FirstStep()
        make_trainer(max_steps=1, callbacks=[recorder, CountRows()]).fit(module, loader([prompt_batch(tok, PROMPTS)]))
        assert recorder.grads
        return recorder.grads, dict(module.last_metrics), rows

    shared, shared_metrics, shared_rows = run(True)
    plain, plain_metrics, plain_rows = run(False)
    # Generation's forwards first (8 rows each), then the scoring forwards: the shared run's
    # reference, actor and reward model each run the 4 prompts once, then the 8 responses.
    assert plain_rows[-3:] == [8, 8, 8]
    assert shared_rows[-6:] == [4, 8] * 3
    for key in ("reward/mean", "reward/std", "kl/k1", "kl/k3", "ppo/entropy", "ppo/first_ratio_max_deviation"):
        assert shared_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4, abs=1e-6), key
    assert shared.keys() == plain.keys()
    for name, grad in plain.items():
        assert torch.allclose(shared[name], grad, rtol=1e-4, atol=1e-7), name


def test_policy_metrics_reach_the_loggers_on_the_steps_lightning_writes(tmp_path: Path) -> None:
    """Every step's metrics are in ``last_metrics``; the loggers get them on Lightning's logging
    steps (``log_every_n_steps`` and the last step), with the values of that step."""
    import lightning as L

    from tests.modules.test_reward_step import CaptureLogger

    class PerStep(L.Callback):
        def __init__(self) -> None:
            self.metrics: list[tuple[int, dict[str, float]]] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self.metrics.append((trainer.global_step, dict(pl_module.last_metrics)))

    tok, actor, rm, _ = tiny_tokenizer_and_models()
    module = PolicyModule.from_models(actor, tok, rm, advantage="grpo", samples_per_prompt=2, seed=0,
                                      generation={"max_new_tokens": 4, "do_sample": True},
                                      ppo={"minibatch_size": 8, "ppo_epochs": 1})
    logger, per_step = CaptureLogger(), PerStep()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=logger, log_every_n_steps=2,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[per_step])
    trainer.fit(module, loader([prompt_batch(tok, PROMPTS)] * 5))
    assert [step for step, _ in per_step.metrics] == [1, 2, 3, 4, 5]
    # Lightning writes after optimizer steps 2 and 4 (every 2; the row's step is the count before
    # the step), exactly as when every step called self.log; the last step's values reach the
    # callbacks' metrics.
    assert [step for step, _ in logger.rows] == [1, 3]
    last = per_step.metrics[-1][1]
    assert float(trainer.callback_metrics["reward/mean"]) == pytest.approx(last["reward/mean"])
    assert float(trainer.callback_metrics["time/step_s"]) == pytest.approx(last["time/step_s"])  # differs every step
    by_step = dict(per_step.metrics)
    for step, row in logger.rows:
        expected = by_step[step + 1]
        assert {k for k in row if k != "epoch"} == set(expected)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)


def test_the_old_setting_name_still_loads_with_a_warning() -> None:
    with pytest.warns(FutureWarning, match="share_prompt_cache is now share_prompt"):
        module = PolicyModule(ppo={"share_prompt_cache": False, "ppo_epochs": 1})
    assert module.share_prompt is False and module.ppo.ppo_epochs == 1
