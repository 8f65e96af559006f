"""Slow: one APPO step on SmolLM2-135M-Instruct with LoRA on CPU, through the real loading path.

Run with ``python -m pytest tests/modules/test_policy_smollm2.py -m slow -s``; it prints the step time,
the share of each phase and the peak resident memory (the numbers in docs/PPO.md).
"""

from __future__ import annotations

import resource
from typing import Any

import pytest
import torch


@pytest.mark.slow
def test_one_appo_step_on_smollm2_with_lora(tmp_path: Any) -> None:
    pytest.importorskip("gguf")
    import lightning as L

    from equilibrate_pl.data import SafetyDataModule
    from equilibrate_pl.models import LoraSettings, load_causal_lm, load_scalar_model
    from equilibrate_pl.modules.policy import PolicyModule

    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    actor, tok = load_causal_lm("builtin:smollm2", lora=lora)
    # A scalar head on the SmolLM2 trunk: an untrained head stands in for an `equilibrate rm` export,
    # which is what the timing needs (the same forward passes); the critic has its own LoRA.
    reward, _ = load_scalar_model("builtin:smollm2", head_seed=1)
    critic, _ = load_scalar_model("builtin:smollm2", lora=lora, head_seed=2)
    module = PolicyModule.from_models(
        actor, tok, reward, critic=critic, reference="adapter_disabled",
        generation={"max_new_tokens": 16}, ppo={"minibatch_size": 4, "ppo_epochs": 1},
        ama={"enabled": True, "token_signal": "value", "baseline": "batch_mean"},
        actor_optim={"lr": 1e-5, "scheduler": "constant"}, critic_optim={"lr": 1e-5, "scheduler": "constant"},
    )
    from equilibrate_pl.models import smollm2_dir

    # data.tokenizer.load_tokenizer does not resolve "builtin:smollm2"; the directory works.
    data = SafetyDataModule(stage="prompt", tokenizer=str(smollm2_dir()), world_scale="tiny", batch_size=4, val_size=0, mix="all")
    before = {n: p.detach().clone() for n, p in actor.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    m = module.last_metrics
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nSmolLM2-135M LoRA APPO step (4 prompts x 16 new tokens, 2nd step): {m['time/step_s']:.2f} s; "
          f"generation {m['time/generation_share']:.0%}, scoring {m['time/scoring_share']:.0%}, "
          f"update {m['time/update_share']:.0%}; peak RSS {peak_gib:.2f} GiB")
    assert module.reference is None  # adapter-disabled reference: no second copy
    assert m["ppo/first_ratio_max_deviation"] <= 1e-5
    assert 0 < m["ama/kept_fraction"] <= 1 and torch.isfinite(torch.tensor(m["loss/policy"]))
    changed = [n for n, p in actor.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora" in n for n in changed)
