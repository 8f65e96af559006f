"""Resumable distributed sampler: torch's sharding, exact resume, nothing lost across ranks."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from equilibrate_pl.data.sampler import ResumableDataLoader, ResumableSampler


def as_list(batch: list[int]) -> list[int]:
    return list(batch)


def loader(n: int, *, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, drop_last: bool = False, num_workers: int = 0, loader_drop_last: bool = False) -> ResumableDataLoader:
    sampler = ResumableSampler(range(n), num_replicas=num_replicas, rank=rank, seed=seed, drop_last=drop_last)
    return ResumableDataLoader(
        list(range(n)), sampler=sampler, batch_size=batch_size, collate_fn=as_list, num_workers=num_workers,
        drop_last=loader_drop_last,
    )


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), replicas=st.integers(1, 4), seed=st.integers(0, 10**6), drop_last=st.booleans(), epoch=st.integers(0, 3))
def test_order_is_torchs_distributed_sampler(n, replicas, seed, drop_last, epoch):
    for rank in range(replicas):
        ours = ResumableSampler(range(n), num_replicas=replicas, rank=rank, seed=seed, drop_last=drop_last)
        ref = DistributedSampler(range(n), num_replicas=replicas, rank=rank, seed=seed, drop_last=drop_last)
        ours.set_epoch(epoch)
        ref.set_epoch(epoch)
        assert list(ours) == list(ref) == list(ours)  # same seed, same order, every time


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), replicas=st.integers(1, 4), seed=st.integers(0, 999), drop_last=st.booleans())
def test_union_of_rank_shards_is_the_dataset(n, replicas, seed, drop_last):
    shards = [list(ResumableSampler(range(n), num_replicas=replicas, rank=r, seed=seed, drop_last=drop_last)) for r in range(replicas)]
    assert len({len(s) for s in shards}) == 1  # every rank the same count
    seen = Counter(i for s in shards for i in s)
    if drop_last:  # nothing repeated; at most replicas-1 left out
        assert max(seen.values(), default=1) == 1
        assert n - len(seen) == n % replicas if n >= replicas else len(seen) == 0
    else:  # nothing lost; the documented padding repeats at most replicas-1 indices
        assert set(seen) == set(range(n))
        assert sum(seen.values()) - n == (-n) % replicas


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 7), k=st.integers(0, 12), seed=st.integers(0, 999),
       replicas=st.integers(1, 3), loader_drop_last=st.booleans())
def test_resume_after_k_batches_equals_uninterrupted(n, batch_size, k, seed, replicas, loader_drop_last):
    for rank in range(replicas):
        make = lambda: loader(n, batch_size=batch_size, seed=seed, num_replicas=replicas, rank=rank, loader_drop_last=loader_drop_last)  # noqa: E731
        # Uninterrupted: two epochs (set_epoch between them, as Lightning does).
        full = make()
        epoch0 = list(full)
        full.sampler.set_epoch(1)
        epoch1 = list(full)

        first = make()
        it = iter(first)
        taken = list(islice(it, k))
        state = first.sampler.state_dict()
        del it

        resumed = make()
        resumed.sampler.load_state_dict(state)
        if k < len(epoch0) or not epoch0:
            assert taken == epoch0[:k]
            assert taken + list(resumed) == epoch0
            resumed.sampler.set_epoch(1)
        else:  # the first run finished the epoch: the state points at the next one
            assert taken == epoch0
            assert resumed.sampler.epoch == 1
        assert list(resumed) == epoch1


def test_plain_loop_without_set_epoch_moves_to_the_next_epoch():
    dl = loader(10, batch_size=4)
    ref = DistributedSampler(range(10), num_replicas=1, rank=0, seed=0)
    assert [i for b in dl for i in b] == list(ref)
    ref.set_epoch(1)
    assert [i for b in dl for i in b] == list(ref)
    assert len(dl) == 3


def test_len_stays_the_full_epoch_after_resume():
    dl = loader(10, batch_size=4)
    dl.sampler.load_state_dict({**dl.sampler.state_dict(), "position": 4})
    assert len(dl) == 3  # Lightning keeps counting batches from the checkpoint
    assert sum(len(b) for b in dl) == 6


def test_resume_exact_with_worker_processes():
    n, bs, k = 37, 4, 3
    uninterrupted = list(loader(n, batch_size=bs, seed=5, num_workers=0))
    first = loader(n, batch_size=bs, seed=5, num_workers=2)
    it = iter(first)
    taken = [next(it) for _ in range(k)]  # workers have prefetched several more batches by now
    state = first.sampler.state_dict()
    assert state["position"] == k * bs
    del it
    resumed = loader(n, batch_size=bs, seed=5, num_workers=2)
    resumed.sampler.load_state_dict(state)
    assert taken + list(resumed) == uninterrupted


def test_load_refuses_a_different_world():
    s = ResumableSampler(range(10), num_replicas=2, rank=0, seed=1)
    state = s.state_dict()
    with pytest.raises(ValueError, match="num_replicas was 2"):
        ResumableSampler(range(10), num_replicas=1, rank=0, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size was 10"):
        ResumableSampler(range(11), num_replicas=2, rank=0, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="outside"):
        s.load_state_dict({**state, "position": 99})
