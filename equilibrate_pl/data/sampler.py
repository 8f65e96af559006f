"""A deterministic, distributed sampler that resumes exactly where a run stopped.

Why not a library: ``torch.utils.data.DistributedSampler`` shards well but has no position.
``torchdata``'s ``StatefulDataLoader`` snapshots samplers and per-worker state; it is an extra
dependency, and for a map-style dataset with an order that is a pure function of
``(seed, epoch)`` the whole state is one integer. Lightning saves ``state_dict()`` of a
``LightningDataModule`` (and of any train loader that has one) in its checkpoints, which is the
hook we use. So we keep the sharding of ``DistributedSampler`` (this class subclasses it: the
permutation, padding and rank split are exactly torch's, and Lightning does not wrap it again)
and add only a position:

- ``epoch``: selects the permutation (``seed + epoch``, as in torch);
- ``position``: how many of this rank's samples of ``epoch`` were consumed. ``__iter__`` yields
  the rank's shard from ``position`` on. Nothing inside the sampler advances it, because
  DataLoader workers prefetch indices long before the caller gets a batch; the consumer
  advances it: :class:`ResumableDataLoader` counts the batches it hands out, in the main process.
  (Lightning pulls exactly one batch per training step from a loader that has a length; it
  pre-fetches only from unsized iterables, so this count equals the Trainer's.)

``__len__`` stays the full shard length even after a resume, so ``len(loader)`` and Lightning's
epoch bookkeeping (which continues its batch counter from the checkpoint) agree.
"""

from __future__ import annotations

from typing import Any, Iterator, Sized

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` with a resumable position.

    Sharding (same as torch): each epoch a permutation of ``range(len(dataset))`` from a generator
    seeded with ``seed + epoch``; with ``drop_last=False`` the first indices are repeated to make
    the length divisible by ``num_replicas`` (at most ``num_replicas - 1`` repeats per epoch),
    with ``drop_last=True`` the tail is dropped; rank ``r`` takes every ``num_replicas``-th index
    starting at ``r``. Every rank gets ``num_samples`` indices.

    Args:
        dataset: anything with ``len``.
        num_replicas / rank: world size and this process's rank (explicit: no process group needed).
        shuffle, seed, drop_last: as in ``DistributedSampler``.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.position = 0

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.num_samples:
            # The previous pass ran to the end and nobody called set_epoch: start the next epoch
            # rather than yield nothing (a plain `for epoch ...: for batch in loader` loop).
            self.epoch += 1
            self.position = 0
        shard = list(super().__iter__())
        return iter(shard[self.position :])

    def __len__(self) -> int:
        return self.num_samples

    @property
    def remaining(self) -> int:
        """Samples of this rank's shard of ``epoch`` not consumed yet."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch starts at position 0, the same one keeps it.

        Keeping the position for the same epoch is what makes a resumed run continue: Lightning
        calls ``set_epoch(current_epoch)`` after the checkpoint's state was loaded.
        """
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def advance(self, n: int) -> None:
        """Mark ``n`` more samples of the current epoch as consumed (capped at the shard end)."""
        if n < 0:
            raise ValueError(f"advance(n) needs n >= 0, got {n}")
        self.position = min(self.position + n, self.num_samples)

    def finish_epoch(self) -> None:
        """Mark the whole shard of the current epoch as consumed (an iteration ran to its end)."""
        self.position = self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position and what the permutation depends on (checked on load)."""
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "num_replicas": int(self.num_replicas),
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "shuffle": bool(self.shuffle),
            "drop_last": bool(self.drop_last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises if the data, seed or world size changed.

        A finished epoch (``position == num_samples``) is stored as the start of the next one, so
        resuming from an end-of-epoch checkpoint never replays or skips an epoch.
        """
        for key in ("seed", "num_replicas", "dataset_size", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume the sampler: {key} was {state[key]!r} when saved, is {mine!r} now "
                    "(the order of samples would differ; resume with the same data, seed and world size)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"sampler position {position} outside [0, {self.num_samples}]")
        if position == self.num_samples:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that counts what it hands out.

    The counting runs in the main process, in ``__iter__``, so it is exact with any
    ``num_workers`` (workers and prefetching do not move the position; only batches actually
    returned to the caller do). When an iteration is exhausted the epoch is marked finished, also
    when ``drop_last=True`` left a partial batch out.

    ``sampler.state_dict()`` after consuming ``k`` batches, loaded into a fresh sampler, makes the
    fresh loader yield exactly batch ``k + 1`` onwards.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Any, *, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        if kwargs.get("batch_sampler") is not None or kwargs.get("shuffle"):
            raise ValueError("ResumableDataLoader takes batch_size and a ResumableSampler, not batch_sampler/shuffle")
        super().__init__(dataset, sampler=sampler, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        return self._counting(super().__iter__())

    def _counting(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            # Every batch but the last is full; `advance` caps at the shard end for the last.
            self.sampler.advance(self.batch_size or 1)
            if self.drop_last and self.sampler.remaining < (self.batch_size or 1):
                # No full batch is left: the epoch is over even if the caller never asks again.
                self.sampler.finish_epoch()
            yield batch
        self.sampler.finish_epoch()
