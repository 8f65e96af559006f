"""SFTModule: response-only loss against a per-row loop, LoRA/QLoRA modes, a tiny run lowers val loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from equilibrate_pl.modules.common import ModelSettings, OptimSettings
from equilibrate_pl.modules.sft import SFTModule


@pytest.fixture(scope="module")
def batch_records(equilibrate_cache: Path) -> list[dict[str, Any]]:
    from equilibrate_pl.data.world import build_world

    return build_world(seed=0, size="tiny").sft_records("train")[:4]


def _batch(module: SFTModule, records: list[dict[str, Any]]) -> dict[str, Any]:
    from equilibrate_pl.data.collate import build_collator

    return build_collator("sft", module.tokenizer, max_length=96, max_prompt_length=48).collate_records(records)


def test_loss_is_token_mean_nll_of_response_tokens(batch_records: list[dict[str, Any]]) -> None:
    module = SFTModule()
    batch = _batch(module, batch_records)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            ids, labels = batch["input_ids"][i, :n], batch["labels"][i, :n]
            lp = F.log_softmax(module.model(input_ids=ids[None]).logits[0].float(), -1)
            for j in range(1, n):
                if labels[j] != -100:  # prompt tokens never count; the eos does
                    total -= float(lp[j - 1, ids[j]])
                    count += 1
        loss, _ = module.compute_loss(batch)
    assert batch["labels"][0][batch["attention_mask"][0].bool()][-1] == module.tokenizer.eos_token_id
    torch.testing.assert_close(loss, torch.tensor(total / count), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", [None, {"bits": 4}], ids=["lora", "qlora"])
def test_lora_and_qlora_train_only_the_adapter(quant: Any, batch_records: list[dict[str, Any]]) -> None:
    module = SFTModule(model=ModelSettings(lora={"r": 4, "alpha": 8}, quant=quant), optim=OptimSettings(lr=1e-2))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = _batch(module, batch_records)
    optimizer = module.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    loss, _ = module.compute_loss(batch)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable


def test_tiny_run_lowers_validation_loss(tmp_path: Path, equilibrate_cache: Path) -> None:
    from equilibrate_pl.data import SafetyDataModule

    L.seed_everything(0)
    module = SFTModule(optim=OptimSettings(lr=1e-2, warmup_steps=2))
    data = SafetyDataModule(stage="sft", world_scale="tiny", batch_size=16, eval_batch_size=32, val_size=16,
                            max_length=96, max_prompt_length=48)
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        val_check_interval=12, check_val_every_n_epoch=None)
    before = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"])
    trainer.fit(module, datamodule=data)
    after = float(trainer.callback_metrics["val/loss"])
    # 7.6 nats (uniform over ~2k tokens) at the start; one nat less is a 2.7x lower perplexity.
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_export_lora_reloads_to_the_same_model(merge: bool, batch_records: list[dict[str, Any]], tmp_path: Path) -> None:
    from equilibrate_pl.models import load_causal_lm

    module = SFTModule(model=ModelSettings(lora={"r": 4, "alpha": 8}))
    with torch.no_grad():  # a trained-looking adapter (B starts at zero, which would hide a lost adapter)
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch(module, batch_records)
    module.export(str(tmp_path / "out"), merge_lora=merge)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert ("model.safetensors" in files) == merge and ("adapter_model.safetensors" in files) == (not merge)
    reloaded, _ = load_causal_lm(str(tmp_path / "out"))  # an adapter directory is merged onto its base
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert hasattr(module.model, "peft_config")  # exporting merged a copy, not the live model
