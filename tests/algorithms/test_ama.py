"""AMA masks (docs/METHOD.md section 3) against hand values and a per-row, per-token loop of the text.

Signals are drawn from a grid of quarters so a batch mean is either exactly a grid value or at least
1/(4n) away from every signal: float32 vs Python-float arithmetic can never flip a comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibrate_pl.algorithms.ama import (
    AMAMasks,
    adpo_masks,
    appo_mask,
    baseline_value,
    kept_fraction,
    sequence_advantage,
)
from equilibrate_pl.algorithms.dpo import dpo_loss
from equilibrate_pl.algorithms.logprobs import sequence_logprobs, token_logprobs

T, F = True, False
JUNK = 1e6  # put in padded positions: it must never reach a baseline or a mask


# -- references ----------------------------------------------------------------------------------

def loop_baseline(baseline, signals, masks) -> float:
    if baseline == "zero":
        return 0.0
    if baseline == "batch_mean":
        values = [float(s[i, t]) for s, m in zip(signals, masks)
                  for i in range(m.shape[0]) for t in range(m.shape[1]) if m[i, t]]
        return sum(values) / len(values) if values else 0.0
    return float(baseline)


def loop_keep(signal, mask, b: float, above: list[bool]):
    """Row by row: keep real tokens with r > b (above) or r < b; an empty selection keeps the mask."""
    keep = torch.zeros(mask.shape, dtype=torch.bool)
    fallback = torch.zeros(mask.shape[0], dtype=torch.bool)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                r = float(signal[i, t])
                keep[i, t] = r > b if above[i] else r < b
        if not keep[i].any() and mask[i].any():
            keep[i] = mask[i]
            fallback[i] = True
    return keep, fallback


def loop_adpo(cs, cm, rs, rm, baseline):
    b = loop_baseline(baseline, [cs, rs], [cm, rm])
    chosen = loop_keep(cs, cm, b, [True] * cm.shape[0])
    rejected = loop_keep(rs, rm, b, [False] * rm.shape[0])
    return chosen, rejected


def loop_appo(advantages, signal, mask, baseline):
    b = loop_baseline(baseline, [signal], [mask])
    above = []
    for i in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[i, t]]
        # Sequence-level advantage: the advantage at the row's first response token; >= 0 is "good".
        above.append(float(advantages[i, real[0]]) >= 0 if real else True)
    return loop_keep(signal, mask, b, above)


# -- random ragged batches -----------------------------------------------------------------------

def ragged(g: torch.Generator, batch: int, length: int, left_padded: bool, allow_empty: bool = True):
    """(signal, mask): one block of real tokens per row, junk in the padding."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        n = int(torch.randint(0 if allow_empty else 1, length + 1, (1,), generator=g))
        if left_padded:
            mask[i, length - n:] = True
        else:
            mask[i, :n] = True
    grid = torch.randint(-6, 7, (batch, length), generator=g).float() / 4
    junk = torch.where(torch.rand(batch, length, generator=g) < 0.5, JUNK, -JUNK)
    return torch.where(mask, grid, junk), mask


BASELINES = ["zero", "batch_mean", 0.25]


# -- adpo_masks ----------------------------------------------------------------------------------

def test_adpo_hand_zero_baseline() -> None:
    # chosen keeps r > 0: 0.5 yes, -1 no, 0 (tie) no, 2 is padding -> no.
    # rejected keeps r < 0: -0.5 yes, 1 no, 0 (tie) no, -3 is padding -> no.
    chosen, rejected = adpo_masks(
        torch.tensor([[0.5, -1.0, 0.0, 2.0]]), torch.tensor([[T, T, T, F]]),
        torch.tensor([[-0.5, 1.0, 0.0, -3.0]]), torch.tensor([[T, T, T, F]]),
    )
    assert chosen.tolist() == [[T, F, F, F]]
    assert rejected.tolist() == [[T, F, F, F]]
    assert chosen.dtype == torch.bool


def test_adpo_hand_batch_mean_over_real_tokens_of_both_sides() -> None:
    cs = torch.tensor([[1.0, 3.0, 100.0]])
    rs = torch.tensor([[2.0, 6.0, 50.0]])
    cm = rm = torch.tensor([[T, T, F]])
    # b = (1 + 3 + 2 + 6) / 4 = 3.  (With padding leaking, b = 162/6 = 27, or 12/6 = 2 if only the
    # count leaked.)  Chosen keeps r > 3: none (3 is a tie) -> fallback to its full mask [T, T, F].
    # Rejected keeps r < 3: [T, F, F].
    (chosen, rejected), fb_c, fb_r = adpo_masks(cs, cm, rs, rm, baseline="batch_mean", return_fallbacks=True)
    assert chosen.tolist() == [[T, T, F]]
    assert rejected.tolist() == [[T, F, F]]
    assert fb_c.tolist() == [True] and fb_r.tolist() == [False]
    torch.testing.assert_close(baseline_value("batch_mean", [cs, rs], [cm, rm]), torch.tensor(3.0))


def test_adpo_number_baseline() -> None:
    # b = 1.5: chosen keeps 2 and 4, rejected keeps 1.
    chosen, rejected = adpo_masks(torch.tensor([[2.0, 1.0, 4.0]]), torch.ones(1, 3, dtype=torch.bool),
                                  torch.tensor([[2.0, 1.0, 4.0]]), torch.ones(1, 3, dtype=torch.bool), baseline=1.5)
    assert chosen.tolist() == [[T, F, T]] and rejected.tolist() == [[F, T, F]]


def test_adpo_ties_fall_back_to_the_full_mask() -> None:
    # Every real token equals b = 0: nothing is strictly above or below, so both rows keep their mask.
    signal = torch.tensor([[0.0, 0.0, 7.0]])
    mask = torch.tensor([[T, T, F]])
    (chosen, rejected), fb_c, fb_r = adpo_masks(signal, mask, signal, mask, return_fallbacks=True)
    assert chosen.tolist() == rejected.tolist() == [[T, T, F]]
    assert fb_c.tolist() == fb_r.tolist() == [True]


def test_adpo_all_padding_row_stays_empty_and_is_no_fallback() -> None:
    signal = torch.tensor([[1.0, -1.0], [5.0, -5.0]])
    mask = torch.tensor([[T, T], [F, F]])
    (chosen, rejected), fb_c, fb_r = adpo_masks(signal, mask, signal, mask, baseline="batch_mean",
                                                return_fallbacks=True)
    assert chosen[1].tolist() == rejected[1].tolist() == [F, F]
    assert fb_c.tolist() == fb_r.tolist() == [False, False]
    # b = 0 from the real row only: chosen keeps 1, rejected keeps -1.
    assert chosen[0].tolist() == [T, F] and rejected[0].tolist() == [F, T]


def test_adpo_all_padding_batch() -> None:
    signal = torch.full((2, 3), JUNK)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for baseline in BASELINES:
        (chosen, rejected), fb_c, fb_r = adpo_masks(signal, mask, signal, mask, baseline, return_fallbacks=True)
        assert not chosen.any() and not rejected.any() and not fb_c.any() and not fb_r.any()


def test_adpo_unpacks_as_a_tuple_and_by_name() -> None:
    cs, cm = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    result = adpo_masks(cs, cm, cs, cm)
    assert isinstance(result, AMAMasks) and isinstance(result, tuple)
    chosen, rejected = result
    assert chosen is result.chosen_keep and rejected is result.rejected_keep
    masks, fb_c, fb_r = adpo_masks(cs, cm, cs, cm, return_fallbacks=True)
    assert isinstance(masks, AMAMasks) and fb_c.shape == fb_r.shape == (1,)


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_adpo_matches_loop_on_ragged_batches(seed: int, left_padded: bool, baseline) -> None:
    g = torch.Generator().manual_seed(seed)
    cs, cm = ragged(g, 6, 8, left_padded)
    rs, rm = ragged(g, 6, 8, left_padded)
    (chosen, rejected), fb_c, fb_r = adpo_masks(cs, cm, rs, rm, baseline, return_fallbacks=True)
    (exp_c, exp_fc), (exp_r, exp_fr) = loop_adpo(cs, cm, rs, rm, baseline)
    assert torch.equal(chosen, exp_c) and torch.equal(rejected, exp_r)
    assert torch.equal(fb_c, exp_fc) and torch.equal(fb_r, exp_fr)
    assert not (chosen & ~cm).any() and not (rejected & ~rm).any()  # padding never kept


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.lists(st.integers(-4, 4), min_size=0, max_size=5), st.lists(st.integers(-4, 4), max_size=5)),
        min_size=1, max_size=4,
    ),
    baseline=st.sampled_from(BASELINES),
)
def test_adpo_matches_loop_hypothesis(rows, baseline) -> None:
    width = max(1, max(max(len(c), len(r)) for c, r in rows))

    def pack(seqs):
        signal = torch.full((len(seqs), width), -JUNK)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, seq in enumerate(seqs):
            signal[i, :len(seq)] = torch.tensor(seq, dtype=torch.float32) / 2
            mask[i, :len(seq)] = True
        return signal, mask

    cs, cm = pack([c for c, _ in rows])
    rs, rm = pack([r for _, r in rows])
    (chosen, rejected), fb_c, fb_r = adpo_masks(cs, cm, rs, rm, baseline, return_fallbacks=True)
    (exp_c, exp_fc), (exp_r, exp_fr) = loop_adpo(cs, cm, rs, rm, baseline)
    assert torch.equal(chosen, exp_c) and torch.equal(rejected, exp_r)
    assert torch.equal(fb_c, exp_fc) and torch.equal(fb_r, exp_fr)


def test_adpo_non_finite_padding_does_not_leak_into_the_batch_mean() -> None:
    g = torch.Generator().manual_seed(3)
    cs, cm = ragged(g, 4, 6, False, allow_empty=False)
    rs, rm = ragged(g, 4, 6, True, allow_empty=False)
    cs_bad = torch.where(cm, cs, float("nan"))
    rs_bad = torch.where(rm, rs, float("inf"))
    assert torch.isfinite(baseline_value("batch_mean", [cs_bad, rs_bad], [cm, rm]))
    expected = adpo_masks(cs, cm, rs, rm, "batch_mean")
    got = adpo_masks(cs_bad, cm, rs_bad, rm, "batch_mean")
    assert torch.equal(got.chosen_keep, expected.chosen_keep) and torch.equal(got.rejected_keep, expected.rejected_keep)


def test_adpo_low_precision_signal_is_compared_at_full_precision() -> None:
    # bf16 neighbours 1 and 1 + 2^-7; b = 1 + 2^-8 rounds (half to even) to 1.0 in bf16. Comparing
    # in bf16 would make the rejected 1.0 a tie instead of "below b".
    values = torch.tensor([[1.0, 1.0078125]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = adpo_masks(values, mask, values, mask, "batch_mean")
    assert expected.rejected_keep.tolist() == [[T, F]] and expected.chosen_keep.tolist() == [[F, T]]
    got = adpo_masks(values.bfloat16(), mask, values.bfloat16(), mask, "batch_mean")
    assert torch.equal(got.chosen_keep, expected.chosen_keep) and torch.equal(got.rejected_keep, expected.rejected_keep)


def test_adpo_chosen_and_rejected_may_have_different_lengths() -> None:
    cs = torch.tensor([[1.0, -1.0, 2.0]])
    rs = torch.tensor([[-2.0, 3.0]])
    # b = (1 - 1 + 2 - 2 + 3) / 5 = 0.6: chosen keeps 1, 2; rejected keeps -2.
    chosen, rejected = adpo_masks(cs, torch.ones(1, 3), rs, torch.ones(1, 2), "batch_mean")
    assert chosen.tolist() == [[T, F, T]] and rejected.tolist() == [[T, F]]


def test_adpo_bad_inputs_raise() -> None:
    s, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="baseline"):
        adpo_masks(s, m, s, m, baseline="median")
    with pytest.raises(ValueError, match="baseline"):
        adpo_masks(s, m, s, m, baseline=True)
    with pytest.raises(ValueError, match="shape"):
        adpo_masks(s, torch.ones(2, 4, dtype=torch.bool), s, m)
    with pytest.raises(ValueError, match="batch sizes differ"):
        adpo_masks(s, m, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))


# -- appo_mask -----------------------------------------------------------------------------------

def test_sequence_advantage_is_taken_at_the_first_response_token() -> None:
    advantages = torch.tensor([[0.5, -2.0, -2.0, 9.0], [9.0, 9.0, -1.0, 3.0], [4.0, 4.0, 4.0, 4.0]])
    mask = torch.tensor([[T, T, T, F], [F, F, T, T], [F, F, F, F]])
    # row 0 starts at 0 -> 0.5; row 1 (left padded) starts at 2 -> -1; row 2 has no response -> 0.
    torch.testing.assert_close(sequence_advantage(advantages, mask), torch.tensor([0.5, -1.0, 0.0]))


def test_policy_mask_hand_values() -> None:
    advantages = torch.tensor([[0.5, -2.0, -2.0, 9.0], [9.0, 9.0, -1.0, 3.0], [0.0, -5.0, -5.0, -5.0]])
    signal = torch.tensor([[1.0, -1.0, 0.0, 8.0], [8.0, -8.0, -1.0, 2.0], [-1.0, 0.5, 0.0, 8.0]])
    mask = torch.tensor([[T, T, T, F], [F, F, T, T], [T, T, T, F]])
    keep, fallback = appo_mask(advantages, signal, mask, return_fallbacks=True)
    # row 0: A = 0.5 >= 0 keeps r > 0 -> [1]; 0 is a tie, 8 is padding.
    # row 1: A = -1 (first response token, mid-row) keeps r < 0 -> [-1]; -8 is padding.
    # row 2: A = 0 counts as non-negative -> keeps r > 0 -> [0.5], although later advantages are < 0.
    assert keep.tolist() == [[T, F, F, F], [F, F, T, F], [F, T, F, F]]
    assert fallback.tolist() == [F, F, F]


def test_policy_mask_batch_mean_and_fallback() -> None:
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    signal = torch.tensor([[2.0, 2.0, -50.0], [2.0, 6.0, 70.0]])
    mask = torch.tensor([[T, T, F], [T, T, F]])
    # b = (2 + 2 + 2 + 6) / 4 = 3. Row 0 (A >= 0) keeps r > 3: none -> fallback [T, T, F].
    # Row 1 (A < 0) keeps r < 3: [T, F, F].
    keep, fallback = appo_mask(advantages, signal, mask, baseline="batch_mean", return_fallbacks=True)
    assert keep.tolist() == [[T, T, F], [T, F, F]]
    assert fallback.tolist() == [T, F]
    # Without return_fallbacks only the mask comes back.
    assert torch.equal(appo_mask(advantages, signal, mask, baseline="batch_mean"), keep)


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_policy_mask_matches_loop_on_ragged_batches(seed: int, left_padded: bool, baseline) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    signal, mask = ragged(g, 7, 9, left_padded)
    # Advantages on the grid too, so some are exactly 0; junk in the padding.
    advantages = torch.where(mask, torch.randint(-2, 3, mask.shape, generator=g).float(), -JUNK)
    keep, fallback = appo_mask(advantages, signal, mask, baseline, return_fallbacks=True)
    exp_keep, exp_fallback = loop_appo(advantages, signal, mask, baseline)
    assert torch.equal(keep, exp_keep) and torch.equal(fallback, exp_fallback)
    assert not (keep & ~mask).any()


# -- kept_fraction and AMA off -------------------------------------------------------------------

def test_kept_fraction() -> None:
    keep = torch.tensor([[T, F, F], [T, T, F]])
    mask = torch.tensor([[T, T, T], [T, T, F]])
    # 3 kept of 5 real tokens.
    torch.testing.assert_close(kept_fraction(keep, mask), torch.tensor(0.6))
    torch.testing.assert_close(kept_fraction(keep & False, mask & False), torch.tensor(0.0))


def _pair_batch(seed: int, left_padded: bool):
    g = torch.Generator().manual_seed(seed)
    batch, length, vocab = 3, 7, 13
    logits = {name: torch.randn(2 * batch, length, vocab, generator=g, dtype=torch.float64)
              for name in ("policy", "reference")}
    ids = torch.randint(0, vocab, (2 * batch, length), generator=g)
    mask = torch.zeros(2 * batch, length, dtype=torch.bool)
    for i in range(2 * batch):
        n = int(torch.randint(1, length - 1, (1,), generator=g))
        if left_padded:
            mask[i, length - n:] = True
        else:
            mask[i, 2:2 + n] = True
    labels = torch.where(mask, ids, -100)
    return logits, labels, mask


@pytest.mark.parametrize("left_padded", [False, True])
def test_all_true_mask_reduces_adpo_to_dpo_exactly(left_padded: bool) -> None:
    logits, labels, mask = _pair_batch(21, left_padded)
    logps = {k: token_logprobs(v, labels, mask) for k, v in logits.items()}
    everything = torch.ones_like(logps["policy"], dtype=torch.bool)
    for keep in (everything, mask[:, 1:]):  # AMA off: all true, or the plain response mask
        plain = {k: sequence_logprobs(v) for k, v in logps.items()}
        masked = {k: sequence_logprobs(v, keep) for k, v in logps.items()}
        for k in logps:
            assert torch.equal(plain[k], masked[k])
        pc, pr = plain["policy"].chunk(2)
        rc, rr = plain["reference"].chunk(2)
        mpc, mpr = masked["policy"].chunk(2)
        mrc, mrr = masked["reference"].chunk(2)
        assert torch.equal(dpo_loss(pc, pr, rc, rr, 0.1), dpo_loss(mpc, mpr, mrc, mrr, 0.1))


def test_adpo_loss_matches_a_loop_over_kept_tokens() -> None:
    logits, labels, mask = _pair_batch(22, left_padded=True)
    beta = 0.2
    logps = {k: token_logprobs(v, labels, mask) for k, v in logits.items()}
    token_mask = mask[:, 1:]
    signal = beta * (logps["policy"] - logps["reference"])  # the `implicit` signal
    sig_c, sig_r = signal.chunk(2)
    m_c, m_r = token_mask.chunk(2)
    keep_c, keep_r = adpo_masks(sig_c, m_c, sig_r, m_r, "batch_mean")
    keep = torch.cat([keep_c, keep_r])
    pc, pr = sequence_logprobs(logps["policy"], keep).chunk(2)
    rc, rr = sequence_logprobs(logps["reference"], keep).chunk(2)
    loss = dpo_loss(pc, pr, rc, rr, beta)

    # Loop: the masked sums of policy AND reference enter the usual DPO loss.
    b = loop_baseline("batch_mean", [sig_c, sig_r], [m_c, m_r])
    batch = logits["policy"].shape[0] // 2
    expected = []
    for i in range(batch):
        sums = {}
        for side, row, above in (("chosen", i, True), ("rejected", batch + i, False)):
            kept = [t for t in range(token_mask.shape[1]) if token_mask[row, t]
                    and (signal[row, t] > b if above else signal[row, t] < b)]
            if not kept:
                kept = [t for t in range(token_mask.shape[1]) if token_mask[row, t]]
            for name in ("policy", "reference"):
                sums[side, name] = sum(
                    float(torch.log_softmax(logits[name][row, t], -1)[labels[row, t + 1]]) for t in kept
                )
        z = (sums["chosen", "policy"] - sums["chosen", "reference"]) - (
            sums["rejected", "policy"] - sums["rejected", "reference"])
        expected.append(math.log1p(math.exp(-beta * z)))
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=loss.dtype), rtol=1e-10, atol=1e-10)


def test_policy_mask_bad_inputs_raise() -> None:
    a, s, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        appo_mask(torch.zeros(2, 1), s, m)  # a (B, 1) advantage would broadcast silently
    with pytest.raises(ValueError, match="shape"):
        appo_mask(a, s, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="baseline"):
        appo_mask(a, s, m, baseline="mean")
