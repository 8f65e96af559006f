"""Packing of preference pairs one per row (``algorithms.prefix_sharing``), checked by hand."""

from __future__ import annotations

import pytest
import torch

from equilibrate_pl.algorithms.prefix_sharing import additive_mask, pack_pairs, right_padded_lengths

PAD = 0
# Pair 0: common prefix [5, 6], so s = 1: token 5 is shared and 6 opens both branches.
# Pair 1: the rejected row is a prefix of the chosen one (common prefix = the whole rejected row).
# Pair 2: nothing in common: s = 0, two branches side by side.
CHOSEN = torch.tensor([[5, 6, 7, 8], [5, 6, 7, PAD], [3, PAD, PAD, PAD]])
REJECTED = torch.tensor([[5, 6, 9], [5, 6, PAD], [4, PAD, PAD]])


def packed() -> object:
    return pack_pairs(CHOSEN, torch.tensor([4, 3, 1]), REJECTED, torch.tensor([3, 2, 1]), PAD)


def test_ids_positions_and_ends_by_hand() -> None:
    p = packed()
    assert p.shared.tolist() == [1, 1, 0]
    assert p.input_ids.tolist() == [
        [5, 6, 7, 8, 6, 9],  # [5 | 6 7 8 | 6 9]
        [5, 6, 7, 6, PAD, PAD],  # [5 | 6 7 | 6]
        [3, 4, PAD, PAD, PAD, PAD],  # [ | 3 | 4]
    ]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 1, 2], [0, 1, 2, 1, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert p.chosen_last.tolist() == [3, 2, 0]
    assert p.rejected_last.tolist() == [5, 3, 1]
    # Stacked width 4 (max of 4 and 3): chosen rows, then rejected rows; 0 past a row's end.
    assert p.source.tolist() == [
        [0, 1, 2, 3], [0, 1, 2, 0], [0, 0, 0, 0],
        [0, 4, 5, 0], [0, 3, 0, 0], [1, 0, 0, 0],
    ]


def test_attention_mask_by_hand() -> None:
    mask = packed().attention_mask
    assert mask.shape == (3, 1, 6, 6) and mask.dtype == torch.bool
    want0 = [
        [1, 0, 0, 0, 0, 0],  # shared 5
        [1, 1, 0, 0, 0, 0],  # chosen 6
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],  # rejected 6: the prefix and itself, never the chosen branch
        [1, 0, 0, 0, 1, 1],
    ]
    assert mask[0, 0].int().tolist() == want0
    want2 = [
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],  # s = 0: the rejected branch sees only itself
        [0, 0, 1, 0, 0, 0],  # padding: itself only, so no softmax row is empty
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask[2, 0].int().tolist() == want2


def test_labels_and_unpacking_by_hand() -> None:
    p = packed()
    ignore = -100
    # Responses: pair 0 chosen [7, 8], rejected [9]; pair 1 chosen [6, 7] and rejected [6] (the
    # first response token is inside the common prefix); pair 2's one-token rows score nothing.
    stacked = torch.tensor([
        [ignore, ignore, 7, 8], [ignore, 6, 7, ignore], [ignore] * 4,
        [ignore, ignore, 9, ignore], [ignore, 6, ignore, ignore], [ignore] * 4,
    ])
    labels = p.labels(stacked)
    # Entry j+1 is the token packed position j predicts: 7 (from 6 at j=1), 8 (j=2), 9 (from the
    # rejected 6 at j=4); pair 1: 6 (from 5 at j=0, wanted by both sides), 7 (j=1).
    assert labels.tolist() == [
        [ignore, ignore, 7, 8, ignore, 9],
        [ignore, 6, 7, ignore, ignore, ignore],
        [ignore] * 6,
    ]
    packed_logps = torch.arange(1.0, 16.0).view(3, 5)  # a distinct value per packed position
    got = p.unpack_token_logprobs(packed_logps, stacked)
    assert got.tolist() == [
        [0, 2, 3], [6, 7, 0], [0, 0, 0],  # chosen: entry t from packed position t of its pair's row
        [0, 5, 0], [6, 0, 0], [0, 0, 0],  # rejected: entry 1 of pair 0 from position 4 (its own 6)
    ]


def test_unshared_rows_and_validation() -> None:
    p = pack_pairs(torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([[3, 4, 5]]), torch.tensor([3]), PAD, width=5)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5]] and p.shared.tolist() == [0]
    assert p.source.shape == (2, 5) and p.source[1, :3].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="at least one real token"):
        pack_pairs(torch.tensor([[1, 2]]), torch.tensor([0]), torch.tensor([[3]]), torch.tensor([1]), PAD)
    with pytest.raises(ValueError, match="rejected rows"):
        pack_pairs(torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([[3], [4]]), torch.tensor([1, 1]), PAD)


def test_additive_mask() -> None:
    mask = torch.tensor([[True, False]])
    out = additive_mask(mask, torch.float16)
    assert out.dtype == torch.float16 and out.tolist() == [[0.0, torch.finfo(torch.float16).min]]


def test_right_padded_lengths() -> None:
    assert right_padded_lengths(torch.tensor([[1, 1, 0], [1, 1, 1]])) == [2, 3]
    assert right_padded_lengths(torch.tensor([[0, 1, 1]])) is None
