"""Small environments whose exact policy gradient is known: the ground truth of pgvar's unbiasedness tests.

Each problem is a real ``gymnasium.Env`` and implements :class:`~pgvar.problems.base.ExactGradientProblem`:
exact return, exact gradient, exact state values, vectorized episode sampling (time-major
:class:`~pgvar.problems.base.EpisodeBatch`) and a differentiable ``log_prob``.

- :class:`TabularMDP`: random finite MDP, tabular softmax policy, solved by linear algebra.
- :class:`GaussianBandit`: one-step contextual bandit, linear-Gaussian policy, closed-form expected reward.
- :class:`LinearQuadraticRegulator`: finite-horizon LQR, linear-Gaussian policy, adjoint (Riccati-like) gradient.
- :class:`ReferenceRegularizedMDP`: a tabular MDP with proxy and true rewards and a reference policy; exact
  occupancy measures, divergences to the reference and regularized optima. :class:`GoodhartBandit` (heavy- or
  light-tailed proxy error) and :class:`RewardHackingMDP` (ORPO's tomato-watering hack) are two of them.
- :class:`SpeedLimitReward`: a gymnasium wrapper giving MuJoCo locomotion a proxy reward (the task's) and a true
  reward that also pays for exceeding Safety-Gymnasium's speed limit (no exact quantities: measured).
"""

from pgvar.problems.bandit import GaussianBandit
from pgvar.problems.base import (
    EpisodeBatch,
    ExactGradientProblem,
    GaussianPolicyProblem,
    Params,
    check_parameters,
)
from pgvar.problems.goodhart import ERROR_DISTRIBUTIONS, GoodhartBandit, GoodhartPoint
from pgvar.problems.lqr import LinearQuadraticRegulator
from pgvar.problems.regularized import MEASURES, ReferenceRegularizedMDP
from pgvar.problems.reward_hacking import RewardHackingMDP
from pgvar.problems.speed_limit import SAFETY_VELOCITY_THRESHOLDS, SpeedLimitReward
from pgvar.problems.tabular import TabularMDP

__all__ = [
    "EpisodeBatch",
    "ExactGradientProblem",
    "GaussianBandit",
    "GaussianPolicyProblem",
    "LinearQuadraticRegulator",
    "Params",
    "TabularMDP",
    "check_parameters",
    "MEASURES",
    "ReferenceRegularizedMDP",
    "ERROR_DISTRIBUTIONS",
    "GoodhartBandit",
    "GoodhartPoint",
    "RewardHackingMDP",
    "SAFETY_VELOCITY_THRESHOLDS",
    "SpeedLimitReward",
]
