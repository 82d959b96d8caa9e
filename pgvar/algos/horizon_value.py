r"""``baseline="horizon"``: the horizon-aware value function of Tucker et al. (2018, Sec. 6) on an SB3 policy.

.. math::  V(s, t) = V_0(s) + \frac{1 - \gamma^{T - t}}{1 - \gamma}\, \bar r(s)

with ``t`` the step index within the episode (0 at reset) and ``T`` the environment's time limit; the formula and
the regression targets are :mod:`pgvar.estimators.horizon`'s. Three pieces put it into SB3's on-policy loop
without copying SB3's ``collect_rollouts`` or ``train()``:

* :class:`HorizonValueNet` replaces the policy's ``value_net`` (SB3's ``nn.Linear`` on the value torso) by two
  linear heads on the same latent, ``v0`` (:math:`V_0`, the original layer) and ``r_bar`` (:math:`\bar r`, new,
  zero-initialized so that training starts from the plain value). Every value SB3 computes goes through
  ``value_net`` (``forward``, ``evaluate_actions``, ``predict_values``), so with the step indices of the batch set
  (:meth:`HorizonValueNet.at_timesteps`, or the rollout buffer setting them for each minibatch it yields) SB3's
  own value loss in ``train()`` regresses :math:`V(s, t)` on the targets. The heads are parameters of the policy:
  saved and loaded with it, trained by the policy's optimizer (rebuilt to include ``r_bar``).
* :class:`EpisodeStepCounter` counts the in-episode step index of every environment during ``collect_rollouts``
  (reset at each episode end; the count is an attribute of the model, so it is saved and restored by exact-resume
  checkpoints) and records what the buffer needs: each row's ``t``, the rewards before SB3's time-limit bootstrap,
  which episodes were truncated and their final observations, and the observation after the last step.
* The rollout buffer (:mod:`pgvar.algos.buffers`) then evaluates :math:`V(s, t)` for every stored row, for the
  observation after the last step (the bootstrap at the rollout cut) and for the final observation of a
  truncation before ``T``, and runs GAE with the end at the horizon as a termination
  (:func:`~pgvar.estimators.horizon_episode_flags`): the values SB3 stored while collecting (:math:`V_0` only)
  and its bootstrap ``gamma * V_0(final obs)`` are replaced.

Without step indices (a call outside training, e.g. ``model.policy.predict_values(obs)``) ``value_net`` returns
:math:`V_0(s)`, the value's state part: the time left is unknown there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from pgvar._validation import check_positive
from pgvar.algos._step_hook import StepHook
from pgvar.estimators import horizon_aware_values

if TYPE_CHECKING:
    from pgvar.algos.buffers import EstimatorBufferMixin

__all__ = ["EpisodeStepCounter", "HorizonValueNet", "attach_horizon_value", "env_time_limit", "horizon_values_fn"]


class HorizonValueNet(nn.Module):
    r"""The two value heads :math:`V_0(s)` and :math:`\bar r(s)` on the value torso's latent; SB3's ``value_net``.

    ``forward(latent)`` returns :math:`V(s, t) = V_0(s) + f(T - t)\, \bar r(s)`
    (:func:`~pgvar.estimators.horizon_aware_values`) for the step indices in :attr:`timesteps` (one per row of
    ``latent``), or :math:`V_0(s)` when :attr:`timesteps` is ``None``.

    :param v0: the :math:`V_0` head (SB3's ``value_net``, ``nn.Linear(latent_dim_vf, 1)``)
    :param r_bar: the :math:`\bar r` head, same shape
    :param horizon: the time limit ``T``
    :param gamma: the discount factor of the time-to-go factor
    """

    def __init__(self, v0: nn.Linear, r_bar: nn.Linear, *, horizon: int, gamma: float) -> None:
        super().__init__()
        self.v0 = v0
        self.r_bar = r_bar
        self.horizon = int(check_positive("horizon", horizon, integer=True))
        self.gamma = float(gamma)
        #: step index ``t`` of each row of the next batch (``None``: return ``V0``)
        self.timesteps: th.Tensor | None = None

    def heads(self, latent: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        r"""``(V0, r_bar)``, each ``[B, 1]``, for a ``[B, latent_dim_vf]`` latent of the value torso."""
        return self.v0(latent), self.r_bar(latent)

    def forward(self, latent: th.Tensor) -> th.Tensor:
        v0, r_bar = self.heads(latent)
        timesteps = self.timesteps
        if timesteps is None:
            return v0
        if timesteps.numel() != v0.shape[0]:
            raise RuntimeError(
                f"the horizon-aware value net holds step indices for {timesteps.numel()} rows but was called on a "
                f"batch of {v0.shape[0]}: set value_net.timesteps (or use value_net.at_timesteps) for this batch"
            )
        timesteps = timesteps.reshape(v0.shape).to(v0.device)
        return horizon_aware_values(v0, r_bar, timesteps, horizon=self.horizon, gamma=self.gamma)

    @contextmanager
    def at_timesteps(self, timesteps: th.Tensor | np.ndarray) -> Iterator[None]:
        """Within the block, ``forward`` uses these step indices (one per row of the batch)."""
        previous = self.timesteps
        self.timesteps = th.as_tensor(np.asarray(timesteps)).reshape(-1)
        try:
            yield
        finally:
            self.timesteps = previous

    def extra_repr(self) -> str:
        return f"horizon={self.horizon}, gamma={self.gamma}"


def attach_horizon_value(policy: nn.Module, *, horizon: int, gamma: float, learning_rate: float) -> HorizonValueNet:
    """Replace ``policy.value_net`` by a :class:`HorizonValueNet` and rebuild the policy's optimizer to include it.

    :param policy: an SB3 ``ActorCriticPolicy`` (its ``value_net`` an ``nn.Linear``)
    :param horizon: the time limit ``T``
    :param gamma: the discount factor
    :param learning_rate: the optimizer's initial learning rate (``lr_schedule(1)``, as SB3 builds it)
    :return: the new value net
    :raises ValueError: for a policy without SB3's linear ``value_net``
    """
    value_net = getattr(policy, "value_net", None)
    if not isinstance(policy, ActorCriticPolicy) or not isinstance(value_net, nn.Linear) or value_net.out_features != 1:
        raise ValueError(
            "baseline='horizon' adds a second value head next to the policy's value_net and needs an SB3 "
            "ActorCriticPolicy (MlpPolicy, CnnPolicy, MultiInputPolicy) whose value_net is nn.Linear(latent, 1), got "
            f"{type(policy).__name__} with value_net={type(value_net).__name__}; use baseline='value' with this policy"
        )
    r_bar = nn.Linear(value_net.in_features, 1, device=value_net.weight.device, dtype=value_net.weight.dtype)
    nn.init.zeros_(r_bar.weight)
    nn.init.zeros_(r_bar.bias)
    net = HorizonValueNet(value_net, r_bar, horizon=horizon, gamma=gamma)
    policy.value_net = net  # type: ignore[assignment]
    policy.optimizer = policy.optimizer_class(policy.parameters(), lr=learning_rate, **policy.optimizer_kwargs)  # type: ignore[call-arg]
    return net


def env_time_limit(env: VecEnv) -> int | None:
    """The time limit of a VecEnv's environments: ``spec.max_episode_steps`` (``None`` when unknown).

    :raises ValueError: if the environments have different time limits
    """
    limits = {None if spec is None else spec.max_episode_steps for spec in env.get_attr("spec")}
    if len(limits) > 1:
        raise ValueError(
            f"baseline='horizon' needs one time limit for all environments, got max_episode_steps {sorted(limits, key=str)}"
        )
    limit = limits.pop()
    return None if limit is None else int(limit)


class EpisodeStepCounter(StepHook):
    """Counts the in-episode step index of each environment and records it in the rollout buffer (module doc).

    :param callback: the callback given to ``collect_rollouts`` (every call is forwarded)
    :param counts: ``[n_envs]`` int64 step index of each environment's current observation, updated in place
    :param buffer: the rollout buffer being filled (``baseline="horizon"``)
    """

    def __init__(self, callback: BaseCallback, counts: np.ndarray, buffer: EstimatorBufferMixin) -> None:
        super().__init__(callback)
        self.counts = counts
        self.buffer = buffer

    def before_step(self, step_locals: dict[str, Any]) -> None:
        dones, infos = np.asarray(step_locals["dones"], dtype=bool), step_locals["infos"]
        truncated = [
            bool(done) and info.get("terminal_observation") is not None and bool(info.get("TimeLimit.truncated", False))
            for done, info in zip(dones, infos)
        ]
        final_observations = {
            index: infos[index]["terminal_observation"] for index, flag in enumerate(truncated) if flag
        }
        self.buffer.record_horizon_step(self.counts, step_locals["rewards"], np.asarray(truncated), final_observations)
        self.counts[:] = np.where(dones, 0, self.counts + 1)
        self.buffer.record_horizon_last(step_locals["new_obs"], self.counts)


def horizon_values_fn(policy: ActorCriticPolicy, value_net: HorizonValueNet) -> Any:
    """``(observations, timesteps) -> [B]`` float32 CPU tensor: :math:`V(s, t)` through the policy, no gradient.

    :param policy: the policy (its ``predict_values``: features extractor, value torso, ``value_net``)
    :param value_net: the policy's :class:`HorizonValueNet`
    """

    def values(observations: Any, timesteps: np.ndarray) -> th.Tensor:
        with th.no_grad(), value_net.at_timesteps(timesteps):
            return policy.predict_values(obs_as_tensor(observations, policy.device)).reshape(-1).cpu()

    return values
