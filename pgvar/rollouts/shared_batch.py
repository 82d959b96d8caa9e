"""The shared-batch collector: rollouts of a fixed SB3 policy on a ``VecEnv``, time-major, raw rewards.

:func:`collect_rollout` runs the policy like SB3's ``OnPolicyAlgorithm.collect_rollouts`` (same actions, same
clipping of Box actions, same values) but keeps the environment's data apart instead of folding it into SB3's
storage convention: raw rewards, ``terminated`` and ``truncated`` flags, and the value of each step's true
successor (the final observation at a truncation). :func:`pgvar.estimators.gae_advantages` on a
:class:`RolloutBatch` reproduces SB3's advantages; the comparison engine feeds the same batch to every estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pgvar._sb3_policy import env_actions
from pgvar.rollouts.nested import snapshot_state

__all__ = ["RolloutBatch", "collect_rollout"]


@dataclass(frozen=True)
class RolloutBatch:
    """``n_steps`` steps of ``N`` parallel environments under a fixed policy, time-major ``[T, N]``.

    ``next_values[t]`` is the value of the true successor of step ``t`` (the final observation at a
    truncation); rewards are the environment's raw rewards (no bootstrap folded in, unlike SB3's buffer).
    ``timesteps[t]`` is the step's index within its episode (0 at a reset; read from the environment's
    ``TimeLimit`` where there is one, so it is right for a batch that starts mid-episode), ``next_observations[t]``
    the observation after step ``t`` (the final observation where the episode ended), and ``states[t][n]``, when
    recorded, the simulator state before step ``t`` (:func:`pgvar.rollouts.snapshot_state`).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    timesteps: torch.Tensor | None = None
    next_observations: torch.Tensor | None = None
    states: list[list[Any]] | None = field(default=None, repr=False)


def _elapsed_steps(env: Any) -> np.ndarray:
    """Each environment's step count within its episode (its ``TimeLimit``'s; zeros without one)."""
    try:
        return np.asarray(env.get_attr("_elapsed_steps"), dtype=np.int64)
    except AttributeError:
        return np.zeros(env.num_envs, dtype=np.int64)


def collect_rollout(
    policy: Any, env: Any, n_steps: int, last_obs: Any, *, record_states: bool = False
) -> tuple[RolloutBatch, Any]:
    """Run ``policy`` (an SB3 ``ActorCriticPolicy``) for ``n_steps`` steps of the ``VecEnv`` ``env``.

    :param policy: the policy, held fixed (actions sampled like SB3's ``collect_rollouts``)
    :param env: an SB3 ``VecEnv``
    :param n_steps: steps per environment (``T``)
    :param last_obs: the observation to start from (``env.reset()``, or the one a previous call returned)
    :param record_states: keep the simulator state before every step (``RolloutBatch.states``; a
        ``DummyVecEnv`` of environments :func:`pgvar.rollouts.snapshot_state` supports), for Monte Carlo values
        by state restore (:func:`pgvar.rollouts.monte_carlo_values`)
    :return: the batch and the observation to continue from
    """
    rows: dict[str, list[Any]] = {k: [] for k in ("obs", "act", "rew", "val", "term", "trunc", "final", "next", "t")}
    states: list[list[Any]] | None = [] if record_states else None
    if record_states and not hasattr(env, "envs"):
        raise ValueError(
            f"record_states needs a DummyVecEnv (its environments' states are saved), got {type(env).__name__}"
        )
    elapsed = _elapsed_steps(env)
    obs = last_obs
    for _ in range(n_steps):
        if states is not None:
            states.append([snapshot_state(sub_env) for sub_env in env.envs])
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
        if not isinstance(new_obs, dict):  # (Dict observations: no next_observations)
            next_obs = np.array(new_obs, copy=True)
            for i in np.flatnonzero(dones):
                next_obs[i] = infos[i]["terminal_observation"]
            rows["next"].append(torch.as_tensor(next_obs))
        rows["t"].append(torch.as_tensor(elapsed.copy()))
        elapsed = np.where(dones, 0, elapsed + 1)
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
        timesteps=torch.stack(rows["t"]),
        next_observations=torch.stack(rows["next"]) if rows["next"] else None,
        states=states,
    )
    return batch, obs
