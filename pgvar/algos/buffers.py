"""Rollout buffers whose returns and advantages come from :mod:`pgvar.estimators`.

Drop-in subclasses of SB3's ``RolloutBuffer`` and ``DictRolloutBuffer``: only
:meth:`~EstimatorBufferMixin.compute_returns_and_advantage` changes. It converts SB3's storage convention to the
estimators' one and calls them:

* SB3 folds the time-limit bootstrap into the stored reward (``r_t += gamma * V(final obs)`` in
  ``OnPolicyAlgorithm.collect_rollouts``) and marks the next row as an episode start. With that data,
  ``next_values[t] = values[t + 1]`` (``last_values`` at ``T - 1``), ``terminated[t] = episode_starts[t + 1]``
  (``dones`` at ``T - 1``) and no truncation flag reproduce SB3's GAE bit for bit, and the discounted
  return-to-go is bootstrapped from ``V`` at truncations and at the end of the rollout.
* The value targets are always the TD(lambda) returns ``R = A^GAE + V`` (SB3's ``returns``).
* The policy-gradient signal stored in ``advantages`` is ``A^GAE`` (``baseline="value"``) or ``G - b`` with a
  constant ``b`` (``"none"``: 0, ``"mean"``: the batch mean, ``"optimal"``: Greensmith et al.'s ``b*``).
* ``normalize_batch=True`` standardizes the advantages once over the whole rollout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.type_aliases import TensorDict

from pgvar._validation import check_choice
from pgvar.algos._checks import check_rewards_finite
from pgvar.estimators import (
    constant_baseline,
    discounted_returns,
    gae_advantages,
    normalize_advantages,
)

__all__ = [
    "BASELINES",
    "EstimatorBufferMixin",
    "EstimatorDictRolloutBuffer",
    "EstimatorRolloutBuffer",
    "QPropBufferMixin",
    "QPropDictRolloutBuffer",
    "QPropDictRolloutBufferSamples",
    "QPropRolloutBuffer",
    "QPropRolloutBufferSamples",
]

#: The policy-gradient baselines: a learned state value with GAE (SB3's), or a constant subtracted from the
#: discounted return-to-go (none, the batch mean, the variance-optimal constant).
BASELINES = ("value", "none", "mean", "optimal")

#: ``score_sq_norms_fn(observations, actions) -> [T, N]``: per-sample ``||grad_theta log pi(a_t|s_t)||^2`` for the
#: buffer's ``[T, N, ...]`` observations (an array, or a dict of arrays) and actions.
ScoreSqNormsFn = Callable[[Any, np.ndarray], th.Tensor]
#: ``reward_penalty_fn(observations, actions, log_probs) -> [T, N] or None``: a per-step penalty subtracted from the
#: rewards before the estimators run.
RewardPenaltyFn = Callable[[Any, np.ndarray, np.ndarray], "th.Tensor | None"]


class EstimatorBufferMixin:
    """Replaces SB3's ``compute_returns_and_advantage`` with calls to :mod:`pgvar.estimators`.

    Mixed in before an SB3 rollout buffer class; the extra constructor arguments are keyword-only.

    :param baseline: ``"value"`` (GAE advantages, SB3's), ``"none"``, ``"mean"`` or ``"optimal"``
    :param normalize_batch: standardize the advantages over the whole rollout, once
    :param score_sq_norms_fn: needed by ``baseline="optimal"``: per-sample squared score norms (see
        :data:`ScoreSqNormsFn`); the algorithm sets it once its policy exists
    :param reward_penalty_fn: ``(observations, actions, log_probs) -> [T, N] tensor or None``, subtracted from the
        rewards before GAE (the reference-policy penalty of :mod:`pgvar.algos.reference`; ``None``: no penalty)
    """

    # Set by SB3's buffers.
    buffer_size: int
    n_envs: int
    gamma: float
    gae_lambda: float
    observations: Any
    actions: np.ndarray
    rewards: np.ndarray
    values: np.ndarray
    episode_starts: np.ndarray
    advantages: np.ndarray
    returns: np.ndarray
    log_probs: np.ndarray

    def __init__(
        self,
        *args: Any,
        baseline: str = "value",
        normalize_batch: bool = False,
        score_sq_norms_fn: ScoreSqNormsFn | None = None,
        reward_penalty_fn: RewardPenaltyFn | None = None,
        **kwargs: Any,
    ) -> None:
        self.baseline = check_choice("baseline", baseline, BASELINES)
        self.normalize_batch = bool(normalize_batch)
        self.score_sq_norms_fn = score_sq_norms_fn
        self.reward_penalty_fn = reward_penalty_fn
        #: The constant baseline ``b`` of the last rollout (``None`` with ``baseline="value"``).
        self.constant_baseline: float | None = None
        super().__init__(*args, **kwargs)

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        """Fill ``returns`` (TD(lambda) value targets) and ``advantages`` (the policy-gradient signal).

        :param last_values: ``V(s_T)`` of the observation after the last step, one per env
        :param dones: whether the last step ended an episode, one per env
        """
        check_rewards_finite(self.rewards)
        rewards = th.from_numpy(self.rewards)
        penalty = None if self.reward_penalty_fn is None else self.reward_penalty_fn(
            self.observations, self.actions, self.log_probs
        )
        if penalty is not None:  # the stored rewards stay the environment's
            rewards = rewards - penalty.to(rewards.dtype)
        values = th.from_numpy(self.values)
        last_values = last_values.detach().to(device="cpu", dtype=values.dtype).reshape(1, self.n_envs)
        next_values = th.cat((values[1:], last_values))
        # The successor of step t starts a new episode (terminated, or truncated with the bootstrap in r_t).
        episode_ends = th.from_numpy(
            np.concatenate((self.episode_starts[1:], np.asarray(dones, dtype=np.float32).reshape(1, self.n_envs)))
        )
        advantages = gae_advantages(
            rewards, values, next_values, episode_ends, None, gamma=self.gamma, gae_lambda=self.gae_lambda
        )
        # td_lambda_returns(...) is defined as exactly this sum; adding here avoids running GAE twice.
        returns = advantages + values
        if self.baseline != "value":
            pg_returns = discounted_returns(rewards, episode_ends, None, next_values, gamma=self.gamma)
            baseline = self._constant_baseline(pg_returns)
            advantages = pg_returns - baseline
            self.constant_baseline = float(baseline)
        if self.normalize_batch:
            advantages = normalize_advantages(advantages, "batch")
        self.advantages = advantages.numpy()
        self.returns = returns.numpy()

    def _constant_baseline(self, pg_returns: th.Tensor) -> th.Tensor:
        score_sq_norms = None
        if self.baseline == "optimal":
            if self.score_sq_norms_fn is None:
                raise ValueError(
                    "baseline='optimal' needs score_sq_norms_fn (per-sample squared score norms); pgvar's algorithms "
                    "set it in _setup_model, a buffer used on its own must be given one"
                )
            score_sq_norms = self.score_sq_norms_fn(self.observations, self.actions).to(pg_returns.dtype)
        return constant_baseline(self.baseline, pg_returns, score_sq_norms=score_sq_norms)


class EstimatorRolloutBuffer(EstimatorBufferMixin, RolloutBuffer):
    """SB3's ``RolloutBuffer`` with returns and advantages from :mod:`pgvar.estimators` (see the module doc)."""


class EstimatorDictRolloutBuffer(EstimatorBufferMixin, DictRolloutBuffer):
    """SB3's ``DictRolloutBuffer`` (dict observations) with returns and advantages from :mod:`pgvar.estimators`."""


# ------------------------------------------------------------------------------------------------ Q-Prop
class QPropRolloutBufferSamples(NamedTuple):
    """SB3's ``RolloutBufferSamples`` plus the Q-Prop weight :math:`\\eta` of each sample."""

    observations: th.Tensor
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    #: the Q-Prop learning signal :math:`\hat A - \eta \bar A` (not yet normalized per minibatch)
    advantages: th.Tensor
    returns: th.Tensor
    #: :math:`\eta` of each sample (already divided by the batch std with ``normalize_advantage="batch"`` and
    #: ``qprop_normalization="consistent"``)
    qprop_etas: th.Tensor


class QPropDictRolloutBufferSamples(NamedTuple):
    """SB3's ``DictRolloutBufferSamples`` plus the Q-Prop weight :math:`\\eta` of each sample."""

    observations: TensorDict
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    qprop_etas: th.Tensor


class QPropBufferMixin(EstimatorBufferMixin):
    """A pgvar estimator buffer that also carries the Q-Prop :math:`\\eta` of each step to the minibatches.

    ``advantages`` hold :math:`\\hat A` after ``compute_returns_and_advantage`` and are replaced by the learning
    signal in ``QPropPPO.train`` / ``QPropTRPO.train``; ``qprop_etas`` (``[T, N]``, flattened like the other fields
    by ``get``) hold :math:`\\eta`. ``normalize_batch`` is accepted and ignored: Q-Prop normalizes the learning
    signal :math:`\\hat A - \\eta \\bar A` together with :math:`\\eta`, never :math:`\\hat A` alone.

    A custom rollout buffer for QPropPPO / QPropTRPO subclasses :class:`QPropRolloutBuffer` (or
    :class:`QPropDictRolloutBuffer` for dict observations).
    """

    qprop_etas: np.ndarray

    def __init__(self, *args: Any, normalize_batch: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, normalize_batch=False, **kwargs)

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.qprop_etas = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)

    def get(self, batch_size: int | None = None) -> Iterator[Any]:
        if not self.generator_ready:  # type: ignore[attr-defined]
            self.qprop_etas = self.swap_and_flatten(self.qprop_etas)  # type: ignore[attr-defined]
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> Any:
        samples: Any = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        etas = self.to_torch(self.qprop_etas[batch_inds].flatten())  # type: ignore[attr-defined]
        if isinstance(samples.observations, dict):
            return QPropDictRolloutBufferSamples._make((*samples, etas))
        return QPropRolloutBufferSamples._make((*samples, etas))


class QPropRolloutBuffer(QPropBufferMixin, EstimatorRolloutBuffer):  # type: ignore[misc]
    """:class:`EstimatorRolloutBuffer` with the per-step Q-Prop :math:`\\eta` (see :class:`QPropBufferMixin`)."""


class QPropDictRolloutBuffer(QPropBufferMixin, EstimatorDictRolloutBuffer):  # type: ignore[misc]
    """:class:`EstimatorDictRolloutBuffer` (dict observations) with the per-step Q-Prop :math:`\\eta`."""

