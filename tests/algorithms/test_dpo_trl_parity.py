"""``algorithms.dpo.dpo_loss`` against TRL's own sigmoid DPO loss code.

TRL 1.16 computes the DPO loss inside ``DPOTrainer._compute_loss(model, inputs)``, after a
forward pass of its fused LM head. Building a real DPOTrainer needs a dataset, an accelerator and
a tokenizer; instead we call that method unbound on a minimal stand-in for the trainer holding
only the attributes the sigmoid/reverse-KL path reads, with a stand-in model that returns the
per-token log-probs we choose. The loss arithmetic that runs is TRL's, unmodified. If TRL's
internals move (the method or its attributes change), the test fails loudly rather than silently
comparing against a re-typed formula. (TRL 1.16's ``sigmoid`` loss ignores ``label_smoothing``;
its cDPO form moved to ``loss_type='robust'``/``exo_pair``, so only the plain loss is compared.)
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from equilibrate_pl.algorithms.dpo import dpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t: torch.Tensor) -> torch.Tensor:
        return t

    gather_for_metrics = gather


def _trl_sigmoid_loss(per_token_logps: torch.Tensor, completion_mask: torch.Tensor, ref_c: torch.Tensor,
                      ref_r: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """TRL's `_compute_loss` on (2B, L) inputs: chosen rows then rejected rows."""
    n, length = completion_mask.shape

    def model(**kwargs):  # stands in for the fused-LM-head forward: log-probs are zero off the completion
        zeros = torch.zeros(n, length - 1)
        return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(n, length - 1, dtype=torch.bool))

    model.training = True
    stub = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(n, length, dtype=torch.long), "attention_mask": torch.ones(n, length, dtype=torch.long),
        "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
    }
    return trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_loss_matches_trl_sigmoid(beta: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, length = 5, 9
    completion_mask = (torch.rand(2 * b, length, generator=g) > 0.3).long()
    per_token = -torch.rand(2 * b, length - 1, generator=g) * 3 * completion_mask[:, 1:]
    ref_c, ref_r = -torch.rand(b, generator=g) * 20, -torch.rand(b, generator=g) * 20
    expected = _trl_sigmoid_loss(per_token, completion_mask, ref_c, ref_r, beta, 0.0)
    pc, pr = per_token.sum(1).chunk(2)
    ours = dpo_loss(pc, pr, ref_c, ref_r, beta).mean()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)

