"""The shared-batch collector: rollouts of a fixed SB3 policy on a ``VecEnv``, time-major, raw rewards.

:func:`collect_rollout` runs the policy like SB3's ``OnPolicyAlgorithm.collect_rollouts`` (same actions, same
clipping of Box actions, same values) but keeps the environment's data apart instead of folding it into SB3's
storage convention: raw rewards, ``terminated`` and ``truncated`` flags, and the value of each step's true
successor (the final observation at a truncation). :func:`pgvar.estimators.gae_advantages` on a
:class:`RolloutBatch` reproduces SB3's advantages; the comparison engine feeds the same batch to every estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pgvar._sb3_policy import env_actions

__all__ = ["RolloutBatch", "collect_rollout"]


@dataclass(frozen=True)
class RolloutBatch:
    """``n_steps`` steps of ``N`` parallel environments under a fixed policy, time-major ``[T, N]``.

    ``next_values[t]`` is the value of the true successor of step ``t`` (the final observation at a
    truncation); rewards are the environment's raw rewards (no bootstrap folded in, unlike SB3's buffer).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor


def collect_rollout(policy: Any, env: Any, n_steps: int, last_obs: Any) -> tuple[RolloutBatch, Any]:
    """Run ``policy`` (an SB3 ``ActorCriticPolicy``) for ``n_steps`` steps of the ``VecEnv`` ``env``.

    :param policy: the policy, held fixed (actions sampled like SB3's ``collect_rollouts``)
    :param env: an SB3 ``VecEnv``
    :param n_steps: steps per environment (``T``)
    :param last_obs: the observation to start from (``env.reset()``, or the one a previous call returned)
    :return: the batch and the observation to continue from
    """
    rows: dict[str, list[Any]] = {k: [] for k in ("obs", "act", "rew", "val", "term", "trunc", "final")}
    obs = last_obs
    for _ in range(n_steps):
        with torch.no_grad():
            obs_tensor = policy.obs_to_tensor(obs)[0]
            actions, values, _ = policy(obs_tensor)
        # SB3 clips what the env sees and stores the raw action
        new_obs, rewards, dones, infos = env.step(env_actions(env.action_space, actions.cpu().numpy()))
        truncated = np.array([bool(d and info.get("TimeLimit.truncated", False)) for d, info in zip(dones, infos)])
        final = np.full(len(dones), np.nan, dtype=np.float64)
        for i in np.flatnonzero(truncated):
            with torch.no_grad():
                terminal = policy.obs_to_tensor(infos[i]["terminal_observation"])[0]
                final[i] = float(policy.predict_values(terminal).squeeze())
        rows["obs"].append(obs_tensor)
        rows["act"].append(actions)
        rows["rew"].append(torch.as_tensor(rewards, dtype=torch.float32))
        rows["val"].append(values.flatten())
        rows["term"].append(torch.as_tensor(dones & ~truncated))
        rows["trunc"].append(torch.as_tensor(truncated))
        rows["final"].append(torch.as_tensor(final, dtype=torch.float32))
        obs = new_obs
    with torch.no_grad():
        last_values = policy.predict_values(policy.obs_to_tensor(obs)[0]).flatten()
    values = torch.stack(rows["val"])
    truncated_t = torch.stack(rows["trunc"])
    next_values = torch.cat([values[1:], last_values[None]])
    next_values = torch.where(truncated_t, torch.stack(rows["final"]), next_values)
    batch = RolloutBatch(
        observations=torch.stack(rows["obs"]),
        actions=torch.stack(rows["act"]),
        rewards=torch.stack(rows["rew"]),
        values=values,
        next_values=next_values,
        terminated=torch.stack(rows["term"]),
        truncated=truncated_t,
    )
    return batch, obs
