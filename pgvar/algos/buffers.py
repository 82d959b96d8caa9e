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
* The policy-gradient signal stored in ``advantages`` is ``A^GAE`` (``baseline="value"`` and ``"horizon"``) or
  ``G - b`` with a constant ``b`` (``"none"``: 0, ``"mean"``: the batch mean, ``"optimal"``: Greensmith et al.'s
  ``b*``).
* ``baseline="horizon"`` (:mod:`pgvar.algos.horizon_value`): the buffer also holds each row's in-episode step
  index ``t`` and the rewards before SB3's time-limit bootstrap; ``values`` are replaced by the horizon-aware
  :math:`V(s, t)` of the rows, the bootstrap values by :math:`V(s', t + 1)`, and GAE runs with explicit
  ``terminated`` / ``truncated`` flags in which the end at the horizon ``T`` terminates
  (:func:`~pgvar.estimators.horizon_episode_flags`). Each minibatch ``get()`` yields sets its rows' ``t`` on the
  policy's value net, so SB3's value loss regresses :math:`V(s, t)`.
* ``normalize_batch=True`` standardizes the advantages once over the whole rollout.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.type_aliases import TensorDict

from pgvar._validation import check_choice, check_positive
from pgvar.algos._checks import check_rewards_finite
from pgvar.estimators import (
    constant_baseline,
    discounted_returns,
    gae_advantages,
    horizon_episode_flags,
    normalize_advantages,
)

__all__ = [
    "BASELINES",
    "VALUE_BASELINES",
    "EstimatorBufferMixin",
    "EstimatorDictRolloutBuffer",
    "EstimatorRolloutBuffer",
    "QPropBufferMixin",
    "QPropDictRolloutBuffer",
    "QPropDictRolloutBufferSamples",
    "QPropRolloutBuffer",
    "QPropRolloutBufferSamples",
]

#: The policy-gradient baselines: a learned state value with GAE (SB3's), a constant subtracted from the
#: discounted return-to-go (none, the batch mean, the variance-optimal constant), or the horizon-aware learned value
#: V(s, t) = V0(s) + (1 - gamma^(T - t)) / (1 - gamma) r_bar(s) with GAE (Tucker et al. 2018, Sec. 6).
BASELINES = ("value", "none", "mean", "optimal", "horizon")
#: The baselines whose advantages are GAE with a learned value (the others subtract a constant from the return).
VALUE_BASELINES = ("value", "horizon")

#: ``score_sq_norms_fn(observations, actions) -> [T, N]``: per-sample ``||grad_theta log pi(a_t|s_t)||^2`` for the
#: buffer's ``[T, N, ...]`` observations (an array, or a dict of arrays) and actions.
ScoreSqNormsFn = Callable[[Any, np.ndarray], th.Tensor]
#: ``reward_penalty_fn(observations, actions, log_probs) -> [T, N] or None``: a per-step penalty subtracted from the
#: rewards before the estimators run.
RewardPenaltyFn = Callable[[Any, np.ndarray, np.ndarray], "th.Tensor | None"]
#: ``horizon_values_fn(observations, timesteps) -> [B]``: the horizon-aware values ``V(s, t)`` of a batch of ``B``
#: observations (``[B, ...]`` array, or a dict of them) at step indices ``timesteps`` (``[B]``).
HorizonValuesFn = Callable[[Any, np.ndarray], th.Tensor]


class EstimatorBufferMixin:
    """Replaces SB3's ``compute_returns_and_advantage`` with calls to :mod:`pgvar.estimators`.

    Mixed in before an SB3 rollout buffer class; the extra constructor arguments are keyword-only.

    :param baseline: ``"value"`` (GAE advantages, SB3's), ``"none"``, ``"mean"`` or ``"optimal"``
    :param normalize_batch: standardize the advantages over the whole rollout, once
    :param score_sq_norms_fn: needed by ``baseline="optimal"``: per-sample squared score norms (see
        :data:`ScoreSqNormsFn`); the algorithm sets it once its policy exists
    :param reward_penalty_fn: ``(observations, actions, log_probs) -> [T, N] tensor or None``, subtracted from the
        rewards before GAE (the reference-policy penalty of :mod:`pgvar.algos.reference`; ``None``: no penalty)
    :param horizon: the time limit ``T`` (``baseline="horizon"`` only, required there)
    :param horizon_values_fn: needed by ``baseline="horizon"``: :math:`V(s, t)` of a batch (see
        :data:`HorizonValuesFn`); the algorithm sets it once its policy exists
    :param sample_timesteps_fn: ``baseline="horizon"``: called with the ``[B]`` step indices of each batch of
        samples ``get()`` yields, before the batch is returned (the algorithm sets them on its value net)
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
        horizon: int | None = None,
        horizon_values_fn: HorizonValuesFn | None = None,
        sample_timesteps_fn: Callable[[th.Tensor], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.baseline = check_choice("baseline", baseline, BASELINES)
        if (horizon is None) == (self.baseline == "horizon"):
            raise ValueError(
                f"horizon (the time limit T) must be given with baseline='horizon' and only then, got "
                f"horizon={horizon!r} with baseline={self.baseline!r}"
            )
        self.horizon = None if horizon is None else int(check_positive("horizon", horizon, integer=True))
        self.horizon_values_fn = horizon_values_fn
        self.sample_timesteps_fn = sample_timesteps_fn
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
        penalty = None if self.reward_penalty_fn is None else self.reward_penalty_fn(
            self.observations, self.actions, self.log_probs
        )
        # The successor of step t starts a new episode (terminated, or truncated with the bootstrap in r_t).
        episode_ends = th.from_numpy(
            np.concatenate((self.episode_starts[1:], np.asarray(dones, dtype=np.float32).reshape(1, self.n_envs)))
        )
        if self.baseline == "horizon":
            rewards, values, next_values, terminated, truncated = self._horizon_inputs(episode_ends)
        else:
            rewards, values = th.from_numpy(self.rewards), th.from_numpy(self.values)
            last_values = last_values.detach().to(device="cpu", dtype=values.dtype).reshape(1, self.n_envs)
            next_values = th.cat((values[1:], last_values))
            terminated, truncated = episode_ends, None
        if penalty is not None:  # the stored rewards stay the environment's
            rewards = rewards - penalty.to(rewards.dtype)
        advantages = gae_advantages(
            rewards, values, next_values, terminated, truncated, gamma=self.gamma, gae_lambda=self.gae_lambda
        )
        # td_lambda_returns(...) is defined as exactly this sum; adding here avoids running GAE twice.
        returns = advantages + values
        if self.baseline not in VALUE_BASELINES:
            pg_returns = discounted_returns(rewards, episode_ends, None, next_values, gamma=self.gamma)
            baseline = self._constant_baseline(pg_returns)
            advantages = pg_returns - baseline
            self.constant_baseline = float(baseline)
        if self.normalize_batch:
            advantages = normalize_advantages(advantages, "batch")
        self.advantages = advantages.numpy()
        self.returns = returns.numpy()

    # ---------------------------------------------------------------------------- baseline="horizon"
    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        if self.baseline == "horizon":
            shape = (self.buffer_size, self.n_envs)
            #: in-episode step index ``t`` of each row
            self.timesteps = np.zeros(shape, dtype=np.int64)
            #: the environment's reward of each row (SB3 adds its time-limit bootstrap to ``rewards``)
            self.env_rewards = np.zeros(shape, dtype=np.float32)
            #: whether the row's episode was cut by a time limit (``TimeLimit.truncated``), not terminated
            self.truncated = np.zeros(shape, dtype=bool)
            self.final_observations: dict[tuple[int, int], Any] = {}
            self.last_observations: Any = None
            self.last_timesteps = np.zeros(self.n_envs, dtype=np.int64)

    def record_horizon_step(
        self, timesteps: np.ndarray, rewards: np.ndarray, truncated: np.ndarray, final_observations: dict[int, Any]
    ) -> None:
        """Record the row about to be added (``baseline="horizon"``; called right after ``env.step``).

        :param timesteps: ``[N]`` step index of each environment's observation of this row
        :param rewards: ``[N]`` the environments' rewards (before SB3 adds its time-limit bootstrap)
        :param truncated: ``[N]`` bool: the episode was cut by a time limit at this step
        :param final_observations: env index -> final observation, for the truncated environments
        """
        row = self.pos  # type: ignore[attr-defined]
        self.timesteps[row] = timesteps
        self.env_rewards[row] = np.asarray(rewards, dtype=np.float32).reshape(self.n_envs)
        self.truncated[row] = truncated
        for index, observation in final_observations.items():
            self.final_observations[(row, index)] = observation

    def record_horizon_last(self, observations: Any, timesteps: np.ndarray) -> None:
        """Record the observation after the latest step and its step indices (the bootstrap at the rollout cut)."""
        self.last_observations = observations
        self.last_timesteps = np.array(timesteps, dtype=np.int64)

    def _horizon_inputs(
        self, episode_ends: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """``(rewards, values, next_values, terminated, truncated)`` for GAE with the horizon-aware value.

        Replaces ``values`` with :math:`V(s_t, t)` and ``rewards`` with the environment's reward plus
        ``gamma * V(s', t + 1)`` at a truncation before the horizon (SB3's convention, for later readers).
        """
        if self.horizon_values_fn is None or self.last_observations is None:
            raise ValueError(
                "baseline='horizon' needs horizon_values_fn and the step records of the rollout; pgvar's algorithms "
                "set them (_setup_model, collect_rollouts), a buffer used on its own must be given them"
            )
        assert self.horizon is not None
        steps, n_envs = self.buffer_size, self.n_envs
        timesteps = th.from_numpy(self.timesteps)
        truncated = th.from_numpy(self.truncated)
        terminated, truncated = horizon_episode_flags(
            episode_ends.bool() & ~truncated, truncated, timesteps, horizon=self.horizon
        )
        values = self.horizon_values_fn(_rows(self.observations), self.timesteps.reshape(-1)).reshape(steps, n_envs)
        last_values = self.horizon_values_fn(self.last_observations, self.last_timesteps).reshape(1, n_envs)
        next_values = th.cat((values[1:], last_values.to(values.dtype)))
        if self.final_observations:
            cuts = list(self.final_observations)
            final_values = self.horizon_values_fn(
                _stack([self.final_observations[cut] for cut in cuts]),
                np.array([self.timesteps[cut] + 1 for cut in cuts]),
            )
            rows, envs = (th.tensor(index) for index in zip(*cuts))
            next_values[rows, envs] = final_values.to(values.dtype)
        rewards = th.from_numpy(self.env_rewards)
        self.values = values.numpy()
        self.rewards = (rewards + self.gamma * th.where(truncated, next_values, 0.0)).numpy()
        return rewards, values, next_values, terminated, truncated

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        if self.baseline == "horizon" and not self.generator_ready:  # type: ignore[attr-defined]
            self.timesteps = self.swap_and_flatten(self.timesteps)  # type: ignore[attr-defined]
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> Any:
        samples = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        if self.baseline == "horizon" and self.sample_timesteps_fn is not None:
            self.sample_timesteps_fn(th.as_tensor(self.timesteps[batch_inds].reshape(-1)))
        return samples

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


def _rows(observations: Any) -> Any:
    """``[T, N, ...]`` buffer observations (an array, or a dict of arrays) as ``[T * N, ...]`` rows, time-major."""
    if isinstance(observations, dict):
        return {key: _rows(value) for key, value in observations.items()}
    return observations.reshape(-1, *observations.shape[2:])


def _stack(observations: list[Any]) -> Any:
    """Single observations (arrays, or dicts of arrays) as one batch."""
    if isinstance(observations[0], dict):
        return {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
    return np.stack([np.asarray(obs) for obs in observations])


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
        super().reset()
        self.qprop_etas = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        if not self.generator_ready:  # type: ignore[attr-defined]
            self.qprop_etas = self.swap_and_flatten(self.qprop_etas)  # type: ignore[attr-defined]
        yield from super().get(batch_size)

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> Any:
        samples: Any = super()._get_samples(batch_inds, env)
        etas = self.to_torch(self.qprop_etas[batch_inds].flatten())  # type: ignore[attr-defined]
        if isinstance(samples.observations, dict):
            return QPropDictRolloutBufferSamples._make((*samples, etas))
        return QPropRolloutBufferSamples._make((*samples, etas))


class QPropRolloutBuffer(QPropBufferMixin, EstimatorRolloutBuffer):
    """:class:`EstimatorRolloutBuffer` with the per-step Q-Prop :math:`\\eta` (see :class:`QPropBufferMixin`)."""


class QPropDictRolloutBuffer(QPropBufferMixin, EstimatorDictRolloutBuffer):
    """:class:`EstimatorDictRolloutBuffer` (dict observations) with the per-step Q-Prop :math:`\\eta`."""

