"""The replay feed: every transition an SB3 on-policy algorithm collects also goes into an off-policy replay buffer.

SB3's ``collect_rollouts`` is not copied: the callback it is given is wrapped by :class:`ReplayFeed` (a
``StepHook``, :mod:`pgvar.algos._step_hook`), which stores each vectorized step with the logic of SB3's
``OffPolicyAlgorithm._store_transition`` before it forwards the call. Used by Q-Prop
(:class:`~pgvar.algos.qprop_critic.QPropCritic` trains on the buffer).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from pgvar.algos._step_hook import StepHook

__all__ = ["ReplayFeed", "penalize_replay_rewards", "store_transition"]


class ReplayFeed(StepHook):
    """Wraps the callback given to ``collect_rollouts``: stores each transition in the replay buffer, then forwards.

    ``collect_rollouts`` calls ``update_locals`` and ``on_step`` right after ``env.step`` and **before** it adds
    ``gamma * V(final observation)`` to the rewards of truncated episodes (in place), so the rewards seen here
    are the environment's.

    :param algorithm: the algorithm whose ``collect_rollouts`` runs (its last observations and ``VecNormalize``)
    :param replay_buffer: where the transitions go
    :param callback: the callback to forward every call to
    """

    def __init__(self, algorithm: OnPolicyAlgorithm, replay_buffer: ReplayBuffer, callback: BaseCallback) -> None:
        super().__init__(callback)
        self.algorithm = algorithm
        self.replay_buffer = replay_buffer

    def before_step(self, step_locals: dict[str, Any]) -> None:
        store_transition(self.algorithm, self.replay_buffer, step_locals)


def store_transition(algorithm: OnPolicyAlgorithm, replay_buffer: ReplayBuffer, step_locals: dict[str, Any]) -> None:
    """Add one vectorized step to ``replay_buffer``, as SB3's ``OffPolicyAlgorithm._store_transition`` does.

    Unnormalized observations and rewards (``VecNormalize`` normalizes them again when the critic samples),
    the action the policy sampled (before clipping to the action bounds: the :math:`a` of
    :math:`a - \\mu(s)`), and for finished episodes the final observation from
    ``infos[i]["terminal_observation"]`` instead of the reset observation.

    :param algorithm: the collecting algorithm (its ``_last_obs``; with ``VecNormalize``, its
        ``_last_original_obs``, which this updates)
    :param replay_buffer: an SB3 ``ReplayBuffer`` or ``DictReplayBuffer``
    :param step_locals: the locals of ``collect_rollouts`` right after ``env.step``
    """
    new_obs, rewards, dones, infos = (step_locals[key] for key in ("new_obs", "rewards", "dones", "infos"))
    vec_normalize = algorithm._vec_normalize_env
    if vec_normalize is not None:
        new_obs_ = vec_normalize.get_original_obs()
        rewards_ = vec_normalize.get_original_reward()
        last_obs = algorithm._last_original_obs
    else:
        new_obs_, rewards_, last_obs = new_obs, rewards, algorithm._last_obs
    next_obs = copy.deepcopy(new_obs_)
    for index, done in enumerate(dones):
        terminal = infos[index].get("terminal_observation") if done else None
        if terminal is None:
            continue
        if vec_normalize is not None:
            terminal = vec_normalize.unnormalize_obs(terminal)
        if isinstance(next_obs, dict):
            for key in next_obs:
                next_obs[key][index] = terminal[key]
        else:
            next_obs[index] = terminal
    actions = np.asarray(step_locals["actions"])
    replay_buffer.add(last_obs, next_obs, actions, rewards_, dones, infos)  # type: ignore[arg-type]
    if vec_normalize is not None:
        algorithm._last_original_obs = new_obs_


def penalize_replay_rewards(replay_buffer: ReplayBuffer, start: int, penalty: th.Tensor, vec_normalize: Any) -> None:
    r"""Subtract a rollout's reward penalty (``[T, N]``, the reference regularizer's) from its transitions in the
    replay buffer, which were stored from row ``start`` on (wrapping around; rows since overwritten are skipped).

    The replay buffer holds the environment's rewards; with a reward-normalizing ``VecNormalize`` (which the critic's
    sampling applies) the penalty is scaled by the current return std, so that the critic's normalized reward is
    the rollout buffer's penalized one, :math:`r / \sigma - p`.
    """
    values = penalty.detach().cpu().double().numpy()
    size = replay_buffer.buffer_size
    rows = (start + np.arange(len(values))) % size
    if len(values) > size:  # the earliest transitions were overwritten by the latest
        rows, values = rows[-size:], values[-size:]
    if vec_normalize is not None and vec_normalize.norm_reward:
        values = values * float(np.sqrt(vec_normalize.ret_rms.var + vec_normalize.epsilon))
    replay_buffer.rewards[rows] -= values.astype(replay_buffer.rewards.dtype)
