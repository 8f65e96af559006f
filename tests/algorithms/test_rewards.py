"""dense_rewards against hand values, a per-token loop and the telescoping identity."""

from __future__ import annotations

import pytest
import torch

from equilibrate_pl.algorithms.rewards import dense_rewards

T, F = True, False


def loop_dense_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_t = S(x, y_<=t) - S(x, y_<t): the prefix score at t minus the one just before it."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for i in range(scores.shape[0]):
        for t in range(scores.shape[1]):
            if mask[i, t]:
                out[i, t] = float(scores[i, t]) - float(scores[i, t - 1])
    return out


def ragged(seed: int, left_padded: bool, batch: int = 6, length: int = 10):
    """Prefix scores with junk in the padding, and response masks after a prompt of >= 1 token."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    bounds = []
    for i in range(batch):
        real = int(torch.randint(1, length + 1, (1,), generator=g))
        prompt = int(torch.randint(1, real + 1, (1,), generator=g))
        start = length - real if left_padded else 0
        mask[i, start + prompt:start + real] = True
        bounds.append((start, start + prompt, start + real))  # first real, first response, end
        pad = torch.ones(length, dtype=torch.bool)
        pad[start:start + real] = False
        scores[i, pad] = 1e6
    return scores, mask, bounds


def test_hand_values_right_padded() -> None:
    scores = torch.tensor([[0.5, 1.0, 3.0, 2.0, 9.0]])
    mask = torch.tensor([[F, F, T, T, F]])
    # token 2: 3.0 - 1.0 (score at the end of the prompt) = 2; token 3: 2.0 - 3.0 = -1; padding 9.0: 0.
    torch.testing.assert_close(dense_rewards(scores, mask), torch.tensor([[0.0, 0.0, 2.0, -1.0, 0.0]]))


def test_hand_values_left_padded() -> None:
    scores = torch.tensor([[-7.0, -7.0, 0.25, 0.75, 1.75]])
    mask = torch.tensor([[F, F, F, T, T]])
    # pads -7, prompt ends at 0.25: 0.75 - 0.25 = 0.5; 1.75 - 0.75 = 1.0
    torch.testing.assert_close(dense_rewards(scores, mask), torch.tensor([[0.0, 0.0, 0.0, 0.5, 1.0]]))


@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_and_telescopes(seed: int, left_padded: bool) -> None:
    scores, mask, bounds = ragged(seed, left_padded)
    out = dense_rewards(scores, mask)
    torch.testing.assert_close(out.double(), loop_dense_rewards(scores, mask), rtol=0, atol=1e-12)
    assert (out[~mask] == 0).all()
    for i, (_, response, end) in enumerate(bounds):
        # sum_t (S_t - S_{t-1}) over the response = S(last token) - S(end of prompt)
        expected = float(scores[i, end - 1] - scores[i, response - 1]) if end > response else 0.0
        assert abs(float(out[i].sum()) - expected) < 1e-9


def test_non_finite_padding_scores_do_not_leak() -> None:
    scores, mask, bounds = ragged(9, left_padded=True)
    bad = scores.clone()
    for i, (first, _, end) in enumerate(bounds):
        bad[i, :first] = float("nan")
        bad[i, end:] = float("inf")
    torch.testing.assert_close(dense_rewards(bad, mask), dense_rewards(scores, mask), rtol=0, atol=0)


def test_dtypes() -> None:
    scores, mask, _ = ragged(1, left_padded=False)
    assert dense_rewards(scores, mask).dtype == torch.float64
    low = dense_rewards(scores.bfloat16(), mask)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), loop_dense_rewards(scores.bfloat16(), mask), rtol=0, atol=1e-6)


def test_mask_on_the_first_position_raises() -> None:
    with pytest.raises(ValueError, match=r"mask\[:, 0\] is set in rows \[1\]"):
        dense_rewards(torch.zeros(2, 3), torch.tensor([[F, T, T], [T, T, F]]))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        dense_rewards(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))


def test_value_positions_add_the_prompts_last_token() -> None:
    from equilibrate_pl.algorithms.rewards import value_positions

    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    want = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(value_positions(mask), want)


def test_prefix_value_loss_by_hand() -> None:
    from equilibrate_pl.algorithms.rewards import prefix_value_loss

    scores = torch.tensor([[9.0, 1.0, 2.0, 4.0, 7.0], [5.0, 0.0, 3.0, -1.0, 8.0]], requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    final = torch.tensor([4.0, 8.0])
    loss = prefix_value_loss(scores, mask, final)
    # row 0: positions 1, 2, 3 (prompt end + two response tokens) against 4: (9 + 4 + 0) / 3; row 1: no response
    torch.testing.assert_close(loss, torch.tensor([13.0 / 3.0, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(scores.grad, torch.tensor([[0.0, -2.0, -4.0 / 3.0, 0.0, 0.0], [0.0] * 5]))
    final_grad = torch.tensor([4.0, 8.0], requires_grad=True)
    assert not prefix_value_loss(scores.detach(), mask, final_grad).requires_grad  # the target is detached
