"""``SafetyDataModule``: load, categorize and FDC-mix general + safety data; serve each stage's batches.

``setup()`` does the work once: load every source (or the built-in world), categorize safety rows
when a categorizer is configured, hold out a validation set, mix (docs/DATA.md), convert to the
stage's record kind and tokenize once. The train loader uses :class:`ResumableSampler`; its
position travels in ``state_dict()`` (saved in Lightning checkpoints), so a resumed run continues
with exactly the batch that would have come next.

The position is counted by the train loader in the main process (batches handed out), so worker
processes and their prefetching never move it; under a Trainer this equals the Trainer's own batch
count (checked by tests/data/test_datamodule.py, which resumes from checkpoints written inside
``on_train_batch_end`` and at the end of an epoch).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import warnings
from collections import Counter
from dataclasses import asdict
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from equilibrate_pl.data import mixing
from equilibrate_pl.data.collate import EncodedDataset, build_collator
from equilibrate_pl.data.loaders import SIGNAL_FIELDS, DataError, DataSource, load_records
from equilibrate_pl.data.sampler import ResumableDataLoader, ResumableSampler
from equilibrate_pl.data.schema import SAFETY_FIELDS, SAFETY_GROUPS, SAFETY_LABEL_FIELDS, Group

log = logging.getLogger(__name__)

Stage = Literal["sft", "preference", "prompt"]
_STATE_VERSION = 1


def _record_kind(record: dict[str, Any]) -> str:
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "response" in record:
        return "sft"
    return "prompt"


def to_stage_record(record: dict[str, Any], stage: str, where: str, safety_labels: bool = False) -> dict[str, Any]:
    """Convert a record to the kind ``stage`` trains on.

    preference -> sft uses ``chosen`` as the response; anything -> prompt keeps the prompt. A
    conversion that would have to invent a field (prompt -> sft, sft -> preference) raises. A
    preference record keeps its safety labels (``schema.SAFETY_FIELDS``) only with ``safety_labels``:
    the stages that do not read them then never see a batch mixing rows with and without them.
    """
    kind = _record_kind(record)
    base = {k: record[k] for k in ("id", "prompt", "group", "source", "meta") if k in record}
    if stage == "prompt":
        return base
    if stage == "sft":
        if kind == "sft":
            return {**base, "response": record["response"]}
        if kind == "preference":
            return {**base, "response": record["chosen"]}
    if stage == "preference" and kind == "preference":
        out = {**base, "chosen": record["chosen"], "rejected": record["rejected"]}
        for key in SIGNAL_FIELDS + (SAFETY_FIELDS if safety_labels else ()):
            if key in record:
                out[key] = record[key]
        return out
    raise ValueError(
        f"{where}: a {kind} record (id={record.get('id', '?')!r}) cannot feed the {stage!r} stage; "
        f"set the source's kind (preference pairs serve every stage, SFT rows serve 'sft' and 'prompt')"
    )


def _hold_out(
    pools: dict[str, list[dict[str, Any]]], n: int, seed: int, max_share: float
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Take up to ``n`` rows, as equal as possible across groups, at most ``max_share`` of a group.

    Returns ``(held_out, rest)``; deterministic in ``seed``. Equal shares (not proportional) so
    that the small safety groups have enough validation rows for per-group metrics.
    """
    rng = random.Random(f"{seed}:holdout")
    shuffled = {g: rng.sample(rows, len(rows)) for g, rows in sorted(pools.items())}
    caps = {g: int(len(rows) * max_share) for g, rows in shuffled.items()}
    take = {g: 0 for g in shuffled}
    # Round-robin one row at a time: equal shares, and a short group's share goes to the others.
    while sum(take.values()) < n:
        progressed = False
        for g in shuffled:
            if sum(take.values()) < n and take[g] < caps[g]:
                take[g] += 1
                progressed = True
        if not progressed:
            break
    held = [r for g in shuffled for r in shuffled[g][: take[g]]]
    rest = {g: shuffled[g][take[g] :] for g in shuffled}
    return held, rest


def _fingerprint(records: list[dict[str, Any]]) -> str:
    digest = hashlib.sha1()
    for r in records:
        digest.update(f"{r.get('id', '')}\x1f{r.get('group', '')}\x1e".encode())
    return digest.hexdigest()[:16]


class _TrainLoader(ResumableDataLoader):
    """The train loader; ``state_dict``/``load_state_dict`` delegate to the data module.

    Having them tells Lightning the loader is resumable (no "not resumable" warning on a mid-epoch
    resume); Lightning's copy of the state (under ``loops``) is then the module's own.
    """

    def __init__(self, *args: Any, owner: "SafetyDataModule", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def state_dict(self) -> dict[str, Any]:
        return self._owner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._owner.load_state_dict(state)


class SafetyDataModule(LightningDataModule):
    """General + safety data, FDC-mixed, as SFT, preference or prompt batches (docs/DATA.md).

    Args:
        stage: batch kind: ``sft`` (input_ids/labels), ``preference`` (chosen/rejected) or
            ``prompt`` (left-padded prompts for rollouts).
        tokenizer: ``"builtin:tiny"``, a hub id or a local path (``data.tokenizer.load_tokenizer``).
        general: general (helpfulness) data files; every row is used, labelled ``general``.
        safety: safety data files, labelled per row or categorized on the fly (``categorizer``).
        builtin_world: use the built-in synthetic world for a pool that has no files.
        world_scale: size of the built-in world, ``default`` or ``tiny`` (~10x smaller).
        world_seed: seed of the built-in world (the data themselves; ``seed`` varies the mix).
        categorizer: ``None`` keeps the groups in the data; ``labels`` | ``rules`` |
            ``classifier`` | ``judge`` re-categorizes every safety row (``data.fdc``).
        categorizer_args: keyword arguments of ``data.fdc.build_categorizer``.
        mix: ``ratio`` | ``quota`` | ``all`` | ``sorted`` (``data.mixing.mix``) or ``naive``
            (``data.mixing.naive``: unsorted safety rows at ``naive_scale`` x the FDC budget).
        ratios: general rows per ONE safety row of each group (default EHD 25, IHD 75, MHD 150).
        quotas: rows per safety group for ``mix="quota"`` (default 10000 / 3000 / 1000).
        naive_scale: multiple of the FDC ratio budget drawn by ``mix="naive"``.
        replacement: upsample groups that have fewer rows than asked for (off: take all, report).
        seed: mixing, hold-out and shuffling seed.
        batch_size / eval_batch_size: per-process batch sizes of the train / val loaders.
        num_workers: DataLoader worker processes (resume stays exact; see the module docstring).
        max_length / max_prompt_length: token limits (``data.collate``).
        val_size: validation rows: the world's eval split for the built-in world, else held out of
            the loaded pools before mixing (equal shares per group, at most a quarter of a group).
        on_bad_row: ``raise`` or ``skip`` (skipped rows are counted in ``describe()``).
        safety_labels: carry each pair's safety labels (``chosen_unsafe`` / ``rejected_unsafe``,
            optional ``safer_response``; docs/DATA.md) into the batches, and require them on every
            train and validation row (the cost model's stage sets it). Preference stage only.
        contrastive_pairs: add pairs that teach a reward model what a non-answer is
            (``data.contrastive``: a safe response over an off-topic answer on harmful prompts, an
            on-topic over an off-topic answer on benign ones): the built-in world's
            ``contrastive_pool``, or pairs built from the loaded data. Added after mixing (the FDC
            mix is unchanged), one per train row, and up to ``val_size`` of them held out for
            validation (per-kind metrics: the batch's ``pair_kind``). Preference stage only.
        world_size: the former name of ``world_scale`` (it read like the number of processes); still
            accepted, with a FutureWarning.
    """

    def __init__(
        self,
        stage: Stage = "preference",
        tokenizer: str = "builtin:tiny",
        general: list[DataSource] | None = None,
        safety: list[DataSource] | None = None,
        builtin_world: bool = True,
        world_scale: Literal["default", "tiny"] = "default",
        world_seed: int = 0,
        categorizer: str | None = None,
        categorizer_args: dict[str, Any] | None = None,
        mix: Literal["ratio", "quota", "all", "sorted", "naive"] = "ratio",
        ratios: dict[str, float] | None = None,
        quotas: dict[str, int] | None = None,
        naive_scale: float = 1.0,
        replacement: bool = False,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        max_length: int = 256,
        max_prompt_length: int = 128,
        val_size: int = 64,
        on_bad_row: Literal["raise", "skip"] = "raise",
        world_size: Literal["default", "tiny"] | None = None,
        safety_labels: bool = False,
        contrastive_pairs: bool = False,
    ) -> None:
        super().__init__()
        if world_size is not None:
            warnings.warn("data.world_size is now data.world_scale (the size of the built-in world; the number of "
                          "processes is the Trainer's); the old name will be refused in a later release",
                          FutureWarning, stacklevel=2)
            world_scale = world_size
        if stage not in ("sft", "preference", "prompt"):
            raise ValueError(f"stage must be 'sft', 'preference' or 'prompt', got {stage!r}")
        if mix not in ("ratio", "quota", "all", "sorted", "naive"):
            raise ValueError(f"mix must be 'ratio', 'quota', 'all', 'sorted' or 'naive', got {mix!r}")
        if (safety_labels or contrastive_pairs) and stage != "preference":
            raise ValueError(f"safety_labels and contrastive_pairs are for preference pairs: stage is {stage!r}")
        if batch_size < 1 or eval_batch_size < 1 or val_size < 0 or num_workers < 0:
            raise ValueError("batch sizes must be >= 1, val_size and num_workers >= 0")
        self.general = [s if isinstance(s, DataSource) else DataSource(**s) for s in general or []]
        self.safety = [s if isinstance(s, DataSource) else DataSource(**s) for s in safety or []]
        if not builtin_world and not (self.general and self.safety):
            raise ValueError("builtin_world=False needs both `general` and `safety` data sources")
        self.stage_kind = stage
        self.tokenizer_name = tokenizer
        self.builtin_world, self.world_scale, self.world_seed = builtin_world, world_scale, world_seed
        self.categorizer, self.categorizer_args = categorizer, dict(categorizer_args or {})
        self.mix_mode, self.ratios, self.quotas = mix, ratios, quotas
        self.naive_scale, self.replacement, self.seed = naive_scale, replacement, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.val_size, self.on_bad_row = val_size, on_bad_row
        self.safety_labels, self.contrastive_pairs = safety_labels, contrastive_pairs
        # Plain types only in hparams: checkpoints stay loadable with weights_only=True.
        self.save_hyperparameters(ignore=["general", "safety", "world_size"])
        self.hparams["general"] = [asdict(s) for s in self.general]
        self.hparams["safety"] = [asdict(s) for s in self.safety]

        self.tokenizer: Any = None
        self.mix_result: mixing.MixResult | None = None
        self.train_records: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []
        self.train_dataset: EncodedDataset | None = None
        self.val_dataset: EncodedDataset | None = None
        self._sources: list[str] = []
        self._notes: list[str] = []
        self._fingerprint = ""
        self._sampler: ResumableSampler | None = None
        self._pending_state: dict[str, Any] | None = None
        self._world: Any = None

    # -- set-up ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Rank 0 only: build the tiny tokenizer's cache once instead of racing on every rank.
        from equilibrate_pl.data.tokenizer import load_tokenizer

        load_tokenizer(self.tokenizer_name)

    def setup(self, stage: str | None = None) -> None:
        """Load, categorize, hold out, mix, convert and tokenize (once; later calls return)."""
        if self.train_dataset is not None:
            return
        from equilibrate_pl.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_name)
        general, safety, val_pool = self._load_pools()
        if self.categorizer is not None:
            safety = self._categorize(safety)
        if val_pool is None:  # files: hold validation rows out before mixing
            # Keyed by pool too: a safety row labelled `general` (a look-alike) must stay a safety
            # row, not join the general data.
            pools = {"general": general, **{f"safety/{g}": rows for g, rows in _group_pools(safety).items()}}
            val, rest = _hold_out(pools, self.val_size, self.seed, max_share=0.25)
            general = rest.pop("general")
            safety = [r for rows in rest.values() for r in rows]
        else:
            val, _ = _hold_out(_group_pools(val_pool), self.val_size, self.seed, max_share=1.0)
        if self.mix_mode == "naive":
            result = mixing.naive(
                general, safety, scale=self.naive_scale, seed=self.seed, replacement=self.replacement
            )
        else:
            result = mixing.mix(
                general, safety, mode=self.mix_mode, ratios=self.ratios, quotas=self.quotas,
                replacement=self.replacement, seed=self.seed,
            )
        self.mix_result = result
        train = list(result.records)
        if self.contrastive_pairs:
            extra_train, extra_val = self._contrastive(train, val)
            train, val = train + extra_train, val + extra_val
        self.train_records = [to_stage_record(r, self.stage_kind, "train data", self.safety_labels) for r in train]
        self.val_records = [to_stage_record(r, self.stage_kind, "validation data", self.safety_labels) for r in val]
        _check_signals(self.train_records + self.val_records)
        if self.safety_labels:
            _check_safety_labels(self.train_records + self.val_records)
        collator = self._collator()
        self.train_dataset = EncodedDataset(self.train_records, collator)
        self.val_dataset = EncodedDataset(self.val_records, collator)
        self._fingerprint = _fingerprint(self.train_records)
        for warning in self._degenerate_rows():
            log.warning("%s", warning)
            self._notes.append(warning)
        log.info("%s", self.describe())

    def _load_pools(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]] | None]:
        world = None
        if self.builtin_world and not (self.general and self.safety):
            world = _cached_world(self.world_seed, self.world_scale)
        # Contrastive pairs come from the world when it supplies all the data (its true labels and topics).
        self._world = world if world is not None and not (self.general or self.safety) else None
        if self.general:
            general = []
            for src in self.general:
                rows = self._load(src, "general")
                relabelled = sum(1 for r in rows if r.get("group") != Group.GENERAL.value)
                if relabelled:
                    self._notes.append(
                        f"{src.path}: {relabelled} rows with a safety label read as general (general sources are general)"
                    )
                general.extend({**r, "group": Group.GENERAL.value} for r in rows)
        else:
            general = world.general_pool("train")
            self._sources.append(f"general: built-in world ({self.world_scale}, seed {self.world_seed}), train split, {len(general)} rows")
        if self.safety:
            safety = [r for src in self.safety for r in self._load(src, "safety")]
        else:
            safety = world.safety_pool("train")
            self._sources.append(f"safety: built-in world unsorted pool, train split, {len(safety)} rows")
        # The world's eval split is disjoint from train by construction: validate on it, with true labels.
        val_pool = world.preference_records("eval") if world is not None and not (self.general or self.safety) else None
        return general, safety, val_pool

    def _contrastive(self, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Contrastive pairs for training (one per train row) and validation (up to ``val_size``,
        equal shares per group): the world's own, or built from the rows' chosen responses."""
        if self._world is not None:
            extra_train, held = self._world.contrastive_pool("train"), self._world.contrastive_pool("eval")
        else:
            extra_train, held = _contrastive_from(train, self.seed), _contrastive_from(val, self.seed + 1)
        extra_val, _ = _hold_out(_group_pools(held), self.val_size, self.seed, max_share=1.0)
        self._notes.append(f"contrastive pairs (data.contrastive): {len(extra_train)} train, {len(extra_val)} validation "
                           "(added after mixing)")
        return extra_train, extra_val

    def _load(self, src: DataSource, pool: str) -> list[dict[str, Any]]:
        # No kind and no preset: read the file as the records this stage trains on.
        kind = src.kind if src.kind is not None else (None if src.preset else self.stage_kind)
        # Safety rows are mixed per FDC group: without a categorizer each row must bring its own.
        require_group = pool == "safety" and self.categorizer is None
        result = load_records(src, kind, on_bad_row=self.on_bad_row, require_group=require_group,
                              require_safety_labels=self.safety_labels)
        counts = ", ".join(f"{g} {n}" for g, n in sorted(result.group_counts().items()))
        skipped = f", {len(result.skipped)} rows skipped" if result.skipped else ""
        self._sources.append(f"{pool}: {src.path} ({len(result.records)} rows: {counts}{skipped})")
        if result.skipped:
            self._notes.append(result.summary())
        return result.records

    def _categorize(self, safety: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from equilibrate_pl.data.fdc import build_categorizer

        categorizer = build_categorizer(self.categorizer, **self.categorizer_args)
        before = Counter(r.get("group") for r in safety)
        out = categorizer.categorize_records(safety)
        after = Counter(r["group"] for r in out)
        changed = sum(1 for a, b in zip(safety, out) if a.get("group") != b["group"])
        self._notes.append(
            f"categorizer {self.categorizer!r}: {dict(sorted(after.items()))} "
            f"({changed} of {len(out)} labels changed from {dict(sorted((str(k), v) for k, v in before.items()))}; "
            f"{getattr(categorizer, 'fallbacks', 0)} fallbacks)"
        )
        return out

    def _degenerate_rows(self) -> list[str]:
        """Warnings, with counts, about train rows that cannot teach what they were meant to.

        Truncation keeps a prompt's last ``max_prompt_length`` tokens and cuts responses at
        ``max_length`` (no eos then); a preference pair whose chosen and rejected tokens are the same
        (in the data, or once truncated) has a DPO / reward loss gradient of zero. Every pair alike
        is an error: such a run would finish "successfully" having learned nothing.
        """
        assert self.train_dataset is not None
        features, n = self.train_dataset.features, len(self.train_dataset)
        if n == 0:
            return []
        out = []
        cut_prompts = sum(bool(f["prompt_truncated"]) for f in features)
        if cut_prompts:
            out.append(f"train data: {cut_prompts} of {n} prompts were cut to their last max_prompt_length="
                       f"{self.max_prompt_length} tokens (their beginning is not seen)")
        if self.stage_kind == "prompt":
            return out
        keys = ("response_truncated",) if self.stage_kind == "sft" else ("chosen_truncated", "rejected_truncated")
        cut_responses = sum(any(f[k] for k in keys) for f in features)
        if cut_responses:
            out.append(f"train data: {cut_responses} of {n} rows lost the end of a response to max_length={self.max_length} "
                       "(no eos: the model is not taught to stop there)")
        if self.stage_kind == "preference":
            same = sum(f["chosen_input_ids"] == f["rejected_input_ids"] for f in features)
            in_data = sum(str(r["chosen"]).strip() == str(r["rejected"]).strip() for r in self.train_records)
            if same:
                message = (f"train data: {same} of {n} pairs have identical chosen and rejected tokens ({in_data} identical in "
                           f"the data, {same - in_data} made identical by max_length={self.max_length}): they carry no "
                           "preference signal")
                if same == n:
                    raise DataError(message + "; nothing to learn (check the chosen/rejected columns or raise max_length)",
                                    file="train data")
                out.append(message)
        return out

    def _collator(self) -> Any:
        return build_collator(self.stage_kind, self.tokenizer, max_length=self.max_length, max_prompt_length=self.max_prompt_length)

    # -- loaders -----------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """The resumable train loader; a re-built one continues where the previous one stopped."""
        self.setup()
        assert self.train_dataset is not None
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.overfit_batches > 0:
            # Lightning's debug mode swaps in a sequential sampler (re-building the loader); there is
            # no run to resume, so hand it a plain loader.
            return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self._collator(),
                              num_workers=self.num_workers)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        previous = self._sampler
        self._sampler = ResumableSampler(self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        if self._pending_state is not None:  # a checkpoint's state, loaded before the loader existed
            self._apply_state(self._pending_state)
            self._pending_state = None
        elif previous is not None:
            # Re-built loader (e.g. reload_dataloaders_every_n_epochs): continue, never replay.
            self._sampler.load_state_dict(previous.state_dict())
        return _TrainLoader(
            self.train_dataset, sampler=self._sampler, batch_size=self.batch_size, collate_fn=self._collator(),
            num_workers=self.num_workers, owner=self,
        )

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        assert self.val_dataset is not None
        if len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self._collator(),
            num_workers=self.num_workers,
        )

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Sampler epoch and position (samples of this rank's shard consumed) + a data fingerprint."""
        if self._sampler is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"version": _STATE_VERSION, "sampler": self._sampler.state_dict(), "fingerprint": self._fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` (applied now, or when the train loader is built)."""
        if not state_dict:
            return
        if state_dict.get("version") != _STATE_VERSION or "sampler" not in state_dict:
            raise ValueError(f"not a SafetyDataModule state (version {state_dict.get('version')!r})")
        if self._sampler is not None:
            self._apply_state(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self._sampler is not None
        if state.get("fingerprint") and state["fingerprint"] != self._fingerprint:
            raise ValueError(
                "cannot resume: the training data differ from the checkpoint's (fingerprint "
                f"{state['fingerprint']} vs {self._fingerprint}); use the same sources, mix and seed"
            )
        self._sampler.load_state_dict(state["sampler"])

    # -- report ------------------------------------------------------------------------------

    def describe(self) -> str:
        """The mix: rows per group, share of the total, requested/available, sources and notes."""
        self.setup()
        assert self.mix_result is not None
        res = self.mix_result
        how = {
            "ratio": "ratio (general rows per safety row: "
            + ", ".join(f"{g} {r:g}" for g, r in (self.ratios or mixing.DEFAULT_RATIOS).items()) + ")",
            "quota": "quota (" + ", ".join(f"{g} {q}" for g, q in (self.quotas or mixing.DEFAULT_QUOTAS).items()) + ")",
            "all": "all rows",
            "sorted": "every row of the harmful groups (rows categorized general left out)",
            "naive": f"naive (unsorted safety rows, {self.naive_scale:g} x the FDC ratio budget)",
        }[self.mix_mode]
        val_counts = Counter(r["group"] for r in self.val_records)
        lines = [
            f"SafetyDataModule: stage={self.stage_kind}, mix={how}, seed={self.seed}",
            *("  source " + s for s in self._sources),
            res.table(),
            *(
                [f"naive: drew {res.requested['safety']} of {res.available['safety']} unsorted safety rows"]
                if self.mix_mode == "naive" else []
            ),
            f"val: {len(self.val_records)} rows ("
            + ", ".join(f"{g} {val_counts[g]}" for g in sorted(val_counts, key=mixing._group_order)) + ")",
        ]
        lines += ["note: " + n for n in self._notes + res.notes]
        return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def _cached_world(seed: int, size: str) -> Any:
    """The built-in world, built once per process (deterministic; its pools are fresh lists)."""
    from equilibrate_pl.data.world import build_world

    return build_world(seed=seed, size=size)


def _check_signals(records: list[dict[str, Any]]) -> None:
    """Per-token signal columns: every row has each one, or none does (a batch cannot mix them)."""
    for key in SIGNAL_FIELDS:
        missing = [r for r in records if key not in r]
        if missing and len(missing) < len(records):
            first = missing[0]
            raise DataError(
                f"{len(records) - len(missing)} of {len(records)} rows have it and {len(missing)} do not (e.g. id="
                f"{first.get('id')!r}); give it to every row of the run, or to none", file=str(first.get("source", "<data>")),
                field=key,
            )


def _check_safety_labels(records: list[dict[str, Any]]) -> None:
    """``safety_labels``: every row must carry both labels (a cost model cannot learn from a pair without them)."""
    missing = [r for r in records if any(r.get(k) is None for k in SAFETY_LABEL_FIELDS)]
    if missing:
        first = missing[0]
        raise DataError(
            f"{len(missing)} of {len(records)} rows have no safety labels (e.g. id={first.get('id')!r}); the cost model "
            "needs chosen_unsafe and rejected_unsafe on every pair (docs/DATA.md)",
            file=str(first.get("source", "<data>")), field="chosen_unsafe",
        )


def _contrastive_from(records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Contrastive pairs from preference rows: a safety row's chosen (its safe response) and a
    general row's chosen (its answer) are the items; general answers are the donors."""
    from equilibrate_pl.data.contrastive import contrastive_pairs

    safety = {g.value for g in SAFETY_GROUPS}
    harmful = [{"id": r.get("id"), "prompt": r["prompt"], "response": r["chosen"], "group": r["group"], "meta": r.get("meta")}
               for r in records if r.get("group") in safety and "chosen" in r]
    benign = [{"id": r.get("id"), "prompt": r["prompt"], "response": r["chosen"], "group": r["group"], "meta": r.get("meta")}
              for r in records if r.get("group") == Group.GENERAL.value and "chosen" in r]
    if not benign:
        raise DataError("contrastive_pairs needs general rows with answers (their chosen responses are the off-topic "
                        "answers), and none were loaded", file="<data>")
    return contrastive_pairs(harmful, benign, seed=seed, source="contrastive")


def _group_pools(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    pools: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        pools.setdefault(Group.parse(r["group"]).value, []).append(r)
    return pools


__all__ = ["SafetyDataModule", "to_stage_record"]
