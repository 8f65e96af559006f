"""PPO-Lagrangian (Safe RLHF, Dai et al., 2024): a cost constraint on the policy, as pure torch.

The constrained problem ``max_pi J_R(pi)  s.t.  J_C(pi) <= d`` (``J_C`` the mean episode cost of a
cost model, ``d`` the threshold) becomes the saddle point ``min_{lambda >= 0} max_pi J_R - lambda
(J_C - d)``. The policy side is PPO on the combined advantage of :func:`combine_advantages`; the
multiplier side is gradient descent on :func:`multiplier_loss`, whose step raises lambda while the
cost is above the threshold and lowers it (towards 0, never below) while it is under.

``lambda = exp(log_lambda)`` is parameterised by its logarithm, as safe-rlhf does
(``safe_rlhf/algorithms/ppo_lag/trainer.py``: ``log_lambda``, ``lambda_loss = -(episode_cost -
threshold) * log_lambda.exp()``, SGD, a delay before the first update, a cap, a moving window of
episode costs): lambda stays positive without a projection, and each step changes it by a factor,
so a multiplier near zero can still grow quickly once the constraint is violated.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable

import torch

__all__ = ["combine_advantages", "multiplier_loss", "LagrangeMultiplier"]


def combine_advantages(
    reward_advantages: torch.Tensor, cost_advantages: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """The actor's advantage ``(A_r - lambda * A_c) / (1 + lambda)`` (Safe RLHF, eq. 11).

    Dividing by ``1 + lambda`` keeps the advantage on the scale of ``A_r`` however large lambda
    grows, so PPO's clip range and the learning rate keep their meaning; at lambda = 0 it is exactly
    ``A_r``, and as lambda grows it tends to ``-A_c`` (only the cost matters).

    Args:
        reward_advantages, cost_advantages: tensors of one shape (per token, or per sequence).
        lam: the multiplier, >= 0 (a float or a 0-dim tensor; it is not differentiated through).
    """
    if reward_advantages.shape != cost_advantages.shape:
        raise ValueError(f"shape mismatch: reward advantages {tuple(reward_advantages.shape)}, "
                         f"cost advantages {tuple(cost_advantages.shape)}")
    lam = torch.as_tensor(lam, dtype=torch.float32, device=reward_advantages.device).detach()
    if not bool(lam >= 0):
        raise ValueError(f"the multiplier must be >= 0, got {float(lam)}")
    return (reward_advantages.float() - lam * cost_advantages.float()) / (1.0 + lam)


def multiplier_loss(log_lambda: torch.Tensor, mean_cost: float | torch.Tensor, threshold: float) -> torch.Tensor:
    """``-(J_C - d) * exp(log_lambda)``: its gradient step raises lambda while ``J_C > d``.

    d loss / d log_lambda = ``-(J_C - d) * lambda``, so plain gradient descent moves ``log_lambda`` by
    ``+lr * (J_C - d) * lambda``: up while the mean episode cost ``J_C`` is above the threshold,
    down while it is below. ``mean_cost`` is a measurement, never differentiated through.
    """
    violation = torch.as_tensor(mean_cost, dtype=log_lambda.dtype, device=log_lambda.device).detach() - threshold
    return -violation * log_lambda.exp()


class LagrangeMultiplier:
    """The multiplier lambda, its optimizer and the window of episode costs it is updated on.

    Each PPO iteration :meth:`update` adds the iteration's episode costs to the window and, from
    iteration ``delay`` on, takes one SGD step on :func:`multiplier_loss` with the window's mean
    cost; lambda is then capped at ``lambda_max``. Everything that defines the next value
    (``log_lambda``, the optimizer's state, the window) is in :meth:`state_dict`, so a resumed run
    continues exactly.

    Args:
        threshold: the episode-cost limit d.
        lambda_init: lambda at the start (> 0: the log parameterisation cannot start at 0).
        lambda_lr: SGD learning rate on ``log_lambda``.
        lambda_max: cap on lambda (``None``: none).
        delay: iterations before lambda starts moving (the cost estimate of a policy that has not
            moved yet says little about where training is going).
        window: episodes in the moving mean cost (``0``: the current iteration's episodes only).
    """

    def __init__(self, threshold: float = 0.0, lambda_init: float = 1.0, lambda_lr: float = 0.1,
                 lambda_max: float | None = None, delay: int = 0, window: int = 0) -> None:
        if lambda_init <= 0 or not math.isfinite(lambda_init):
            raise ValueError(f"lambda_init must be a positive number (lambda = exp(log_lambda)), got {lambda_init}")
        if lambda_lr < 0:
            raise ValueError(f"lambda_lr must be >= 0, got {lambda_lr}")
        if lambda_max is not None and lambda_max < lambda_init:
            raise ValueError(f"lambda_max ({lambda_max}) must be >= lambda_init ({lambda_init})")
        if delay < 0 or window < 0:
            raise ValueError(f"delay and window must be >= 0, got {delay}, {window}")
        self.threshold = float(threshold)
        self.lambda_max = lambda_max
        self.delay = int(delay)
        self.window = int(window)
        # float64: the value is read every iteration and compared across processes and resumes.
        self.log_lambda = torch.tensor(math.log(lambda_init), dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.log_lambda], lr=lambda_lr)
        self.costs: deque[float] = deque(maxlen=window or None)

    @property
    def value(self) -> float:
        """lambda = exp(log_lambda)."""
        return float(self.log_lambda.detach().exp())

    def mean_cost(self) -> float:
        """Mean episode cost over the window (NaN before any episode)."""
        return sum(self.costs) / len(self.costs) if self.costs else float("nan")

    def update(self, episode_costs: Iterable[float], iteration: int) -> bool:
        """Add this iteration's episode costs to the window; step lambda from iteration ``delay`` on.

        Returns whether lambda was stepped. Call it with every process's episodes (the same list on
        every rank), so every rank holds the same lambda.
        """
        costs = [float(c) for c in episode_costs]
        if not all(math.isfinite(c) for c in costs):
            raise ValueError("episode costs must be finite")
        if not self.window:
            self.costs.clear()
        self.costs.extend(costs)
        if iteration < self.delay or not self.costs:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        multiplier_loss(self.log_lambda, self.mean_cost(), self.threshold).backward()
        self.optimizer.step()
        if self.lambda_max is not None:
            with torch.no_grad():
                self.log_lambda.clamp_(max=math.log(self.lambda_max))
        if not math.isfinite(self.value):
            raise ValueError(f"lambda overflowed ({self.value}) after a mean cost of {self.mean_cost():.4g} against a "
                             f"threshold of {self.threshold:.4g}: set lambda_max (the step on log lambda grows with lambda)")
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_lambda": self.log_lambda.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "costs": torch.tensor(list(self.costs), dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_lambda.copy_(state["log_lambda"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.costs.clear()
        self.costs.extend(float(c) for c in state["costs"].tolist())
