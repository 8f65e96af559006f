"""Preference pairs packed one pair per row, so the prompt they share is computed once.

A pair's chosen and rejected rows start with the same tokens: the prompt, often the first response
tokens too. Stacked as two padded rows, a causal model computes those tokens twice. Packed as

    [ shared prefix (s tokens) | chosen[s:c] | rejected[s:r] ]

with position ids ``0..s-1, s..c-1, s..r-1`` and a 4-D attention mask under which each branch
attends to the shared prefix and to itself (never to the other branch), every packed position has
exactly the hidden state it has in its own stacked row, so log-probs and scores are unchanged and
the shared tokens cost once ("prefix sharing", Wang et al., 2024, arXiv:2410.20305).

``s`` is one less than the common prefix: the last common token opens both branches. Then every
packed position predicts a single next token (the next one of its own branch), and a log-prob is
one gather per position, as in the stacked layout.

The stacked layout this maps back to is ``reward.stack_pairs``'s: chosen rows then rejected rows,
right-padded to one width ``L``; per-token log-probs in the ``(2B, L-1)`` layout of
``logprobs.token_logprobs`` (entry t: token t+1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from equilibrate_pl.data.schema import IGNORE_INDEX


def right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Each row's number of real tokens if every row is right-padded (its real tokens are a prefix
    of the row), else ``None``. One host transfer.

    Raises:
        ValueError: a row has no real token (nothing to score).
    """
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    no_real_after_pad = (mask[:, 1:] <= mask[:, :-1]).all() if mask.shape[1] > 1 else mask.new_ones(())
    values = torch.cat([lengths, no_real_after_pad.view(1).to(lengths.dtype)]).tolist()
    lengths_list, right_padded = values[:-1], bool(values[-1])
    if 0 in lengths_list:
        rows = [i for i, n in enumerate(lengths_list) if n == 0]
        raise ValueError(f"rows {rows} have no real token (attention_mask all zero); nothing to score")
    return lengths_list if right_padded else None


def group_rows_by_length(lengths: Sequence[int], max_groups: int, forward_cost: float = 0.1) -> list[list[int]]:
    """Row indices split into at most ``max_groups`` groups of similar length, longest rows first.

    Each group is run as its own forward cut to its longest row, so it costs ``rows x longest``
    padded positions. Starting from one group of the rows sorted by length, the split that removes
    the most positions is made, again and again, while it removes more than ``forward_cost`` times
    the unsplit batch's positions (the fixed cost of one more forward and backward: kernel launches,
    Python): rows of equal length stay one group. O(max_groups x rows) on the host.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not order:
        return []
    longest = [lengths[i] for i in order]
    threshold = forward_cost * len(order) * longest[0]

    def best_split(lo: int, hi: int) -> tuple[float, int]:
        # Rows lo..hi-1 (sorted, longest first) as one group cost (hi - lo) * longest[lo];
        # split at s they cost (s - lo) * longest[lo] + (hi - s) * longest[s].
        return max(((hi - s) * (longest[lo] - longest[s]), s) for s in range(lo + 1, hi)) if hi - lo > 1 else (0, lo)

    bounds = [(0, len(order))]
    while len(bounds) < max_groups:
        candidates = [(*best_split(lo, hi), k) for k, (lo, hi) in enumerate(bounds)]
        saving, at, k = max(candidates)
        if saving <= threshold:
            break
        lo, hi = bounds[k]
        bounds[k : k + 1] = [(lo, at), (at, hi)]
    return [order[lo:hi] for lo, hi in bounds]


@dataclass(frozen=True)
class PackedPairs:
    """B pairs as B packed rows of width W (see the module docstring).

    Attributes:
        input_ids: (B, W) token ids, ``pad_token_id`` after each row's end.
        position_ids: (B, W) each token's position in its own stacked row (0 on padding).
        attention_mask: (B, 1, W, W) bool, True where query i may attend to key j. Padding attends
            to itself only, so no row of the mask is empty (an empty row gives NaN in sdpa).
        chosen_last, rejected_last: (B,) packed position of each side's last token (where a
            sequence score is read).
        source: (2B, L) packed position of every stacked token (chosen rows, then rejected);
            0 beyond a row's end.
        shared: (B,) s, the number of tokens computed once per pair.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen_last: torch.Tensor
    rejected_last: torch.Tensor
    source: torch.Tensor
    shared: torch.Tensor

    def row_groups(self, max_groups: int) -> list[tuple[torch.Tensor, int]]:
        """``(row index, width)`` of up to ``max_groups`` forwards over rows of similar packed length
        (:func:`group_rows_by_length`), each cut to its longest row. One host transfer."""
        ends = (self.rejected_last + 1).tolist()
        device = self.input_ids.device
        return [(torch.tensor(rows, device=device), max(ends[i] for i in rows)) for rows in group_rows_by_length(ends, max_groups)]

    def inputs(self, index: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``position_ids`` and the boolean 4-D ``attention_mask`` of rows ``index``,
        cut to ``width`` positions."""
        return {"input_ids": self.input_ids[index, :width], "position_ids": self.position_ids[index, :width],
                "attention_mask": self.attention_mask[index, :, :width, :width]}

    def labels(self, stacked_labels: torch.Tensor) -> torch.Tensor:
        """(B, W) labels in ``token_logprobs``' convention (entry j+1 is the token packed position j
        predicts), ``-100`` where no stacked row wants a log-prob.

        Args:
            stacked_labels: (2B, L), ``-100`` on tokens not scored (prompt, padding).
        """
        wanted = stacked_labels[:, 1:] != IGNORE_INDEX
        batch = self.input_ids.shape[0]
        rows = torch.arange(2 * batch, device=wanted.device).remainder(batch)[:, None].expand_as(wanted)
        out = torch.full_like(self.input_ids, IGNORE_INDEX)
        # Two stacked rows can want the same packed target (a response token inside the common
        # prefix); both write the same token id there.
        out[rows[wanted], self.source[:, :-1][wanted] + 1] = stacked_labels[:, 1:][wanted]
        return out

    def unpack_token_logprobs(self, packed: torch.Tensor, stacked_labels: torch.Tensor) -> torch.Tensor:
        """(2B, L-1) stacked log-probs from (B, W-1) packed ones; exactly 0 off the wanted tokens.

        Args:
            packed: ``token_logprobs(logits, self.labels(stacked_labels), ...)``: entry j is the
                log-prob of the token packed position j predicts.
            stacked_labels: the (2B, L) labels given to :meth:`labels`.
        """
        batch = self.input_ids.shape[0]
        index = self.source[:, :-1].clamp(max=packed.shape[1] - 1)
        values = packed.repeat(2, 1).gather(1, index) if batch else packed.new_zeros(index.shape)
        return torch.where(stacked_labels[:, 1:] != IGNORE_INDEX, values, torch.zeros_like(values))


def pack_pairs(
    chosen_ids: torch.Tensor, chosen_lengths: torch.Tensor, rejected_ids: torch.Tensor, rejected_lengths: torch.Tensor,
    pad_token_id: int, width: int | None = None,
) -> PackedPairs:
    """Pack right-padded pairs, one per row (see the module docstring).

    Args:
        chosen_ids: (B, Lc) right-padded token ids.
        chosen_lengths: (B,) real tokens per chosen row (>= 1).
        rejected_ids: (B, Lr), rejected_lengths: (B,) likewise.
        pad_token_id: written after each packed row's end.
        width: the stacked width L that :attr:`PackedPairs.source` maps (default ``max(Lc, Lr)``,
            ``stack_pairs``' width).

    Returns:
        :class:`PackedPairs` of width ``max(c + r - s)`` over the pairs.
    """
    if chosen_ids.shape[0] != rejected_ids.shape[0]:
        raise ValueError(f"{chosen_ids.shape[0]} chosen rows but {rejected_ids.shape[0]} rejected rows")
    device = chosen_ids.device
    c = chosen_lengths.to(device=device, dtype=torch.long)[:, None]
    r = rejected_lengths.to(device=device, dtype=torch.long)[:, None]
    if bool(((c < 1) | (r < 1)).any()):
        raise ValueError("every chosen and rejected row needs at least one real token")
    common_width = min(chosen_ids.shape[1], rejected_ids.shape[1])
    same = chosen_ids[:, :common_width] == rejected_ids[:, :common_width]
    common = same.long().cumprod(1).sum(1, keepdim=True)
    s = (torch.minimum(common, torch.minimum(c, r)) - 1).clamp(min=0)  # (B, 1)
    packed_width = int((c + r - s).max())
    j = torch.arange(packed_width, device=device)[None, :]
    in_chosen = j < c
    rejected_at = j - c + s  # the rejected token a position past the chosen branch holds
    in_rejected = ~in_chosen & (rejected_at < r)
    ids = torch.where(
        in_chosen, chosen_ids.gather(1, j.clamp(max=chosen_ids.shape[1] - 1).expand_as(rejected_at)),
        torch.where(in_rejected, rejected_ids.gather(1, rejected_at.clamp(0, rejected_ids.shape[1] - 1)),
                    torch.full_like(rejected_at, pad_token_id)),
    )
    positions = torch.where(in_chosen, j, torch.where(in_rejected, rejected_at, torch.zeros_like(j)))
    # 0 shared prefix, 1 chosen branch, 2 rejected branch, 3 padding
    branch = torch.where(j < s, 0, torch.where(in_chosen, 1, torch.where(in_rejected, 2, 3)))
    query, key = branch[:, :, None], branch[:, None, :]
    causal = (j[0, :, None] >= j[0, None, :])[None]
    mask = (causal & (key != 3) & ((key == 0) | (key == query))) | torch.eye(packed_width, dtype=torch.bool, device=device)
    stacked_width = max(chosen_ids.shape[1], rejected_ids.shape[1]) if width is None else width
    t = torch.arange(stacked_width, device=device)[None, :]
    source = torch.cat([
        torch.where(t < c, t, 0),
        torch.where(t < r, torch.where(t < s, t, c + t - s), 0),
    ])
    return PackedPairs(
        input_ids=ids, position_ids=positions, attention_mask=mask[:, None], chosen_last=(c - 1)[:, 0],
        rejected_last=(c + r - s - 1)[:, 0], source=source, shared=s[:, 0],
    )


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive float mask eager attention adds to its scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
