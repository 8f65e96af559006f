"""token_logprobs / sequence_logprobs against hand values, a per-row loop and a brute-force softmax."""

from __future__ import annotations

import math

import pytest
import torch

from equilibrate_pl.algorithms.logprobs import sequence_logprobs, token_logprobs

IGNORE = -100


def ragged_batch(seed: int, batch: int = 5, length: int = 9, vocab: int = 11, left_padded: bool = False):
    """Random logits, labels with -100 outside the response, and the response mask.

    Each row: some padding, a prompt of >= 1 token, then a response of >= 0 tokens. Right padding puts
    the pads after the response, left padding before the prompt (the generation layout).
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        real = int(torch.randint(1, length + 1, (1,), generator=g))
        prompt = int(torch.randint(1, real + 1, (1,), generator=g))
        start = length - real if left_padded else 0
        mask[row, start + prompt:start + real] = True
    labels = torch.where(mask, ids, torch.full_like(ids, IGNORE))
    return logits, labels, mask


def loop_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The definition, one row and one position at a time, in float64."""
    batch, length, _ = logits.shape
    out = torch.zeros(batch, length - 1, dtype=torch.float64)
    for row in range(batch):
        for t in range(length - 1):
            if mask[row, t + 1]:
                # Position t predicts token t + 1.
                out[row, t] = torch.log_softmax(logits[row, t].double(), dim=-1)[labels[row, t + 1]]
    return out


def test_hand_values() -> None:
    # V = 2. Position 0 logits [0, 0] -> p = (1/2, 1/2); position 1 logits [0, ln 3] -> p = (1/4, 3/4).
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    out = token_logprobs(logits, labels, mask)
    # entry 0 scores labels[1] = 1 under position 0: log(1/2); entry 1 scores labels[2] = 0 under
    # position 1: log(1 / (1 + 3)) = log(1/4). The last position's logits score nothing.
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), math.log(0.25)]]))

    # Masking the label at t = 1 zeroes entry 0 only.
    out = token_logprobs(logits, labels, torch.tensor([[False, False, True]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, math.log(0.25)]]))


def test_shift_entry_t_scores_label_t_plus_1() -> None:
    # Logits at position t put all mass on token (t + 1) % V: the shifted labels score ~0, the
    # unshifted ones ~-20.
    vocab, length = 4, 5
    logits = torch.full((1, length, vocab), -20.0)
    for t in range(length):
        logits[0, t, (t + 1) % vocab] = 20.0
    tokens = torch.arange(length).remainder(vocab).unsqueeze(0)
    mask = torch.ones(1, length, dtype=torch.bool)
    out = token_logprobs(logits, tokens, mask)
    assert out.shape == (1, length - 1)
    assert (out > -1e-6).all(), out


@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_on_ragged_batches(seed: int, left_padded: bool) -> None:
    logits, labels, mask = ragged_batch(seed, left_padded=left_padded)
    out = token_logprobs(logits, labels, mask)
    expected = loop_token_logprobs(logits, labels, mask)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-10)
    # Exactly zero wherever the label is not wanted (padding, prompt, -100).
    assert (out[~mask[:, 1:]] == 0).all()
    # The sum over a row is the response log-likelihood, again by loop.
    torch.testing.assert_close(sequence_logprobs(out), expected.sum(-1).to(out.dtype), rtol=0, atol=1e-10)


def test_brute_force_softmax_over_the_full_vocabulary() -> None:
    # log( exp(z_y) / sum_v exp(z_v) ) with Python floats, every vocabulary entry summed by hand.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = token_logprobs(logits, labels, mask)
    for row in range(2):
        for t in range(3):
            z = logits[row, t].tolist()
            denominator = sum(math.exp(v) for v in z)
            expected = math.log(math.exp(z[int(labels[row, t + 1])]) / denominator)
            assert abs(float(out[row, t]) - expected) < 1e-12


def test_ignore_labels_are_fine_and_give_zero() -> None:
    logits, labels, mask = ragged_batch(3)
    assert (labels == IGNORE).any()
    out = token_logprobs(logits, labels, labels != IGNORE)
    assert torch.isfinite(out).all()
    assert (out[labels[:, 1:] == IGNORE] == 0).all()


def test_bf16_logits_give_float32_close_to_float64() -> None:
    logits, labels, mask = ragged_batch(11, vocab=257)
    low = logits.to(torch.bfloat16)
    out = token_logprobs(low, labels, mask)
    assert out.dtype == torch.float32
    # Reference on the very same (rounded) logits in float64: only float32 arithmetic separates them.
    expected = loop_token_logprobs(low.double(), labels, mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_float64_logits_stay_float64() -> None:
    logits, labels, mask = ragged_batch(12)
    assert token_logprobs(logits, labels, mask).dtype == torch.float64


def test_non_finite_logits_at_masked_positions_do_not_leak() -> None:
    # Padding positions of some attention kernels can hold inf / nan; they must not reach row sums.
    logits, labels, mask = ragged_batch(5, left_padded=True)
    junk = logits.clone()
    junk[:, :-1][~mask[:, 1:]] = float("nan")
    junk[:, -1] = float("inf")  # the last position predicts nothing
    out = token_logprobs(junk, labels, mask)
    torch.testing.assert_close(out, token_logprobs(logits, labels, mask), rtol=0, atol=0)


def test_gradient_is_onehot_minus_softmax_on_wanted_positions_only() -> None:
    logits, labels, mask = ragged_batch(2)
    logits = logits.clone().requires_grad_(True)
    token_logprobs(logits, labels, mask).sum().backward()
    expected = torch.zeros_like(logits)
    for row in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if mask[row, t + 1]:
                # d log softmax(z)_y / dz = onehot(y) - softmax(z)
                grad = -torch.softmax(logits[row, t].detach(), -1)
                grad[labels[row, t + 1]] += 1
                expected[row, t] = grad
    torch.testing.assert_close(logits.grad, expected)


def test_sequence_logprobs_with_keep_mask() -> None:
    token_logps = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, 0.0, -8.0]])
    keep = torch.tensor([[True, False, True], [False, False, True]])
    # row 0: -1 + -4 = -5; row 1: -8
    torch.testing.assert_close(sequence_logprobs(token_logps, keep), torch.tensor([-5.0, -8.0]))
    torch.testing.assert_close(sequence_logprobs(token_logps), torch.tensor([-7.0, -8.5]))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2))


def test_mask_on_an_ignore_label_raises_naming_the_row() -> None:
    logits, labels, mask = ragged_batch(4)
    bad = mask.clone()
    bad[2, -1] = True
    labels[2, -1] = IGNORE
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        token_logprobs(logits, labels, bad)


def test_out_of_vocabulary_ids_at_masked_positions_are_never_read() -> None:
    # A pad id outside the vocabulary (e.g. an added token not in a smaller head) where mask is false.
    logits, labels, mask = ragged_batch(6, vocab=11)
    padded = torch.where(mask, labels, 10_000)
    torch.testing.assert_close(token_logprobs(logits, padded, mask), token_logprobs(logits, labels, mask),
                               rtol=0, atol=0)
