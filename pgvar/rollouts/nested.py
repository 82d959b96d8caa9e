"""Nested rollouts at sampled states of a real gymnasium environment: the data of the Mirage decomposition.

Tucker et al. 2018 (arXiv:1802.10031) estimate the trajectory, action and state terms of the policy-gradient
variance by restoring the simulator at states the policy visits and rolling out independent continuations
(``calc_variance.py`` in brain-research/mirage-rl-trpo). :func:`sample_nested_rollouts` does the same for an SB3
policy:

1. Run the policy for whole episodes (at least ``max(4 * n_states, 1000)`` steps) and keep the simulator state,
   observation and time step of every step; draw ``n_states`` of them uniformly without replacement.
2. At each drawn state ``s``, sample the policy's action ``a`` and five more independent actions: ``a'`` (with
   its score, for the state term) and three for a Monte Carlo value ``V(s)``.
3. Restore the state and roll out six continuations under the policy: two after ``a`` (``R_1``, ``R_2``), one
   after ``a'`` (``R'``), one after each value action; each is the discounted sum of raw rewards until
   termination, the environment's time limit (counted from the drawn state's time step) or ``horizon`` steps.

Continuations run in lockstep over ``n_parallel`` unwrapped copies of the environment with one batched policy
call per step. States are saved and restored through MuJoCo's ``set_state(qpos, qvel)`` or, for classic control,
the env's ``state`` attribute; other environments raise ``ValueError``.

:meth:`NestedRolloutSamples.decomposition` hands the data to :func:`pgvar.measure.variance_decomposition`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from pgvar._sb3_policy import actor_parameter_names, env_actions, log_prob_loss
from pgvar._validation import check_positive, check_unit_interval
from pgvar.estimators import qprop_control_variate
from pgvar.measure import (
    VarianceDecomposition,
    flatten_per_sample,
    per_sample_gradients,
    variance_decomposition,
)

__all__ = ["NestedRolloutSamples", "restore_state", "sample_nested_rollouts", "snapshot_state"]

#: continuations per sampled state, in this order: R_1, R_2 (after a), R' (after a'), three Monte Carlo values
_N_ROLES = 6


def snapshot_state(env: gym.Env) -> Any:
    """A copy of ``env``'s simulator state that :func:`restore_state` puts back.

    MuJoCo environments: ``(qpos, qvel)``; classic control: a copy of the ``state`` attribute.

    :raises ValueError: for an environment whose state this cannot save
    """
    base: Any = env.unwrapped
    if hasattr(base, "set_state") and hasattr(base, "data"):
        return ("mujoco", base.data.qpos.copy(), base.data.qvel.copy())
    if getattr(base, "state", None) is not None:
        return ("state", copy.deepcopy(base.state))
    raise ValueError(
        f"cannot save and restore the simulator state of {type(base).__name__}: supported are MuJoCo environments "
        "(set_state(qpos, qvel)) and classic-control environments with a `state` attribute"
    )


def restore_state(env: gym.Env, snapshot: Any) -> None:
    """Put back a state saved by :func:`snapshot_state` (the episode then continues from it)."""
    base: Any = env.unwrapped
    if snapshot[0] == "mujoco":
        base.set_state(snapshot[1], snapshot[2])
        return
    base.state = copy.deepcopy(snapshot[1])
    if hasattr(base, "steps_beyond_terminated"):  # CartPole: the episode is running again
        base.steps_beyond_terminated = None


@dataclass(frozen=True)
class NestedRolloutSamples:
    """What :func:`sample_nested_rollouts` measured at ``S`` sampled states (the inputs of
    :func:`pgvar.measure.variance_decomposition`, plus where the states came from)."""

    #: ``[S, P]`` score of the policy's action at each state, over the actor parameters
    scores: torch.Tensor
    #: ``[S, 2]`` two independent discounted returns after ``(s, a)``
    returns: torch.Tensor
    #: ``[S, P]`` score of the fresh action ``a'``
    fresh_scores: torch.Tensor
    #: ``[S]`` a discounted return after ``(s, a')``
    fresh_returns: torch.Tensor
    #: name to ``[S]`` or ``[S, 3]``: ``"value"`` (the policy's learned V), ``"mc_value"`` (three Monte Carlo
    #: returns after fresh actions) and, with a critic, ``"qprop"`` (Q-Prop with eta = 1: V(s) plus the critic's
    #: Taylor advantage ``grad_a Q(s, mu) . (a - mu)``, at a, a, a')
    baselines: dict[str, torch.Tensor]
    #: ``[S]`` time step of each state within its episode
    timesteps: torch.Tensor
    #: the sampled states' observations (as the policy takes them) and actions ``a`` (the scores' arguments)
    observations: torch.Tensor
    actions: torch.Tensor
    #: ``[S, 6]`` steps each continuation ran (R_1, R_2, R', three values)
    continuation_steps: torch.Tensor

    @classmethod
    def concatenate(cls, parts: list[NestedRolloutSamples]) -> NestedRolloutSamples:
        """The samples of several independent calls (e.g. batches of states measured by different processes) as
        one set: every per-state tensor concatenated along the state dimension.

        :raises ValueError: for no parts, or parts with different baselines
        """
        if not parts:
            raise ValueError("parts must hold at least one NestedRolloutSamples, got none")
        names = set(parts[0].baselines)
        if any(set(part.baselines) != names for part in parts):
            raise ValueError(f"parts must have the same baselines, got {[sorted(part.baselines) for part in parts]}")
        fields = {
            name: torch.cat([getattr(part, name) for part in parts])
            for name in ("scores", "returns", "fresh_scores", "fresh_returns", "timesteps", "observations", "actions",
                         "continuation_steps")
        }  # fmt: skip
        baselines = {name: torch.cat([part.baselines[name] for part in parts]) for name in parts[0].baselines}
        return cls(baselines=baselines, **fields)

    def decomposition(self, state_baseline: str = "mc_value") -> VarianceDecomposition:
        """The Mirage decomposition of these samples (:func:`pgvar.measure.variance_decomposition`)."""
        return variance_decomposition(
            self.scores, self.returns, self.fresh_scores, self.fresh_returns, self.baselines, state_baseline
        )


def _visited_states(policy: Any, env: gym.Env, n_steps: int, seed: int) -> list[tuple[Any, np.ndarray, int]]:
    """(snapshot, observation, time step) of every step of whole episodes, at least ``n_steps`` of them."""
    visited: list[tuple[Any, np.ndarray, int]] = []
    obs, _ = env.reset(seed=seed)
    t = 0
    while True:
        visited.append((snapshot_state(env), np.asarray(obs).copy(), t))
        with torch.no_grad():
            action = policy.get_distribution(policy.obs_to_tensor(obs)[0]).get_actions().cpu().numpy()[0]
        obs, _, terminated, truncated, _ = env.step(env_actions(env.action_space, action))
        t += 1
        if terminated or truncated:
            if len(visited) >= n_steps:
                return visited
            obs, _ = env.reset()
            t = 0


def _continuations(
    policy: Any,
    env_id: str,
    jobs: list[tuple[Any, np.ndarray, int]],
    gamma: float,
    n_parallel: int,
    seed: int,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Discounted return, length, whether it terminated, and last observation of each job ``(snapshot, first
    action, step limit)``, in lockstep (the continuation stops at termination or after ``step limit`` steps)."""
    envs = [gym.make(env_id).unwrapped for _ in range(min(n_parallel, len(jobs)))]
    for index, env in enumerate(envs):
        env.reset(seed=seed + 1 + index)
    returns = np.zeros(len(jobs))
    lengths = np.zeros(len(jobs), dtype=np.int64)
    ended = np.zeros(len(jobs), dtype=bool)
    last_obs: list[Any] = [None] * len(jobs)
    for start in range(0, len(jobs), len(envs)):
        chunk = list(range(start, min(start + len(envs), len(jobs))))
        observations: list[Any] = [None] * len(chunk)
        active = []
        for slot, job in enumerate(chunk):
            snapshot, action, _ = jobs[job]
            restore_state(envs[slot], snapshot)
            obs, reward, terminated, _, _ = envs[slot].step(env_actions(envs[slot].action_space, action))
            returns[job], lengths[job], observations[slot] = float(reward), 1, obs
            ended[job], last_obs[job] = bool(terminated), obs
            if not terminated and jobs[job][2] > 1:
                active.append(slot)
        discount = 1.0
        while active:
            discount *= gamma
            with torch.no_grad():
                batch = policy.obs_to_tensor(np.stack([observations[slot] for slot in active]))[0]
                actions = policy.get_distribution(batch).get_actions().cpu().numpy()
            still = []
            for slot, action in zip(active, actions):
                job = chunk[slot]
                obs, reward, terminated, _, _ = envs[slot].step(env_actions(envs[slot].action_space, action))
                returns[job] += discount * float(reward)
                lengths[job] += 1
                observations[slot] = obs
                ended[job], last_obs[job] = bool(terminated), obs
                if not terminated and lengths[job] < jobs[job][2]:
                    still.append(slot)
            active = still
        if progress is not None:
            progress("nested rollouts", chunk[-1] + 1, len(jobs))
    for env in envs:
        env.close()
    return returns, lengths, ended, last_obs


def sample_nested_rollouts(
    policy: Any,
    env_id: str,
    n_states: int = 64,
    *,
    gamma: float = 0.99,
    horizon: int | None = None,
    n_parallel: int = 32,
    seed: int = 0,
    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> NestedRolloutSamples:
    """Sample states of ``policy`` on ``env_id`` and the continuations the Mirage decomposition needs (module doc).

    :param policy: an SB3 ``ActorCriticPolicy`` (``model.policy``); held fixed, scores over its actor parameters
    :param env_id: a gymnasium id whose state can be saved: MuJoCo (e.g. ``HalfCheetah-v5``) or classic control
    :param n_states: states to sample (``S``)
    :param gamma: discount of the returns, in [0, 1]
    :param horizon: most steps of one continuation (``None``: until the episode's time limit)
    :param n_parallel: environment copies stepped in lockstep
    :param seed: seeds the environments and the action sampling
    :param critic: optional Box-action critic ``critic(observations, actions) -> [B]`` Q values; adds the
        ``"qprop"`` baseline ``V(s) + grad_a Q(s, mu) . (a - mu)`` (the learned V plus Q-Prop's control variate
        with eta = 1, as Q-Prop subtracts it from the GAE advantage)
    :param progress: called as ``progress(stage, done, total)``
    :return: a :class:`NestedRolloutSamples`
    """
    check_positive("n_states", n_states, integer=True)
    check_positive("n_parallel", n_parallel, integer=True)
    check_unit_interval("gamma", gamma)
    if horizon is not None:
        check_positive("horizon", horizon, integer=True)
    env = gym.make(env_id)
    limit = env.spec.max_episode_steps if env.spec is not None else None
    if limit is None and horizon is None:
        raise ValueError(f"horizon must be given for {env_id!r}: the environment has no time limit")
    if critic is not None and not isinstance(env.action_space, spaces.Box):
        raise ValueError(f"critic (a Taylor-expanded Q(s, a)) needs Box actions, {env_id!r} has {env.action_space}")
    env.reset(seed=seed)
    snapshot_state(env)  # raises early for an environment whose state cannot be restored
    max_steps = min(limit if limit is not None else math.inf, horizon if horizon is not None else math.inf)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visited = _visited_states(policy, env, max(4 * n_states, 1000), seed)
        env.close()
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(visited), size=n_states, replace=len(visited) < n_states)
        snapshots = [visited[i][0] for i in chosen]
        obs = policy.obs_to_tensor(np.stack([visited[i][1] for i in chosen]))[0]
        timesteps = torch.tensor([visited[i][2] for i in chosen])
        with torch.no_grad():
            # (SB3 reuses one distribution object per policy: take what is needed before the next call)
            distribution = policy.get_distribution(obs)
            drawn = torch.stack([distribution.get_actions() for _ in range(5)])  # a, a', three value actions
            mean = distribution.distribution.mean.clone() if isinstance(env.action_space, spaces.Box) else None
        actions = torch.stack([drawn[0], drawn[0], drawn[1], drawn[2], drawn[3], drawn[4]])  # one per role
        remaining = [int(min(max_steps, (limit if limit is not None else math.inf) - visited[i][2])) for i in chosen]
        jobs = [
            (snapshots[s], actions[r, s].cpu().numpy(), remaining[s]) for r in range(_N_ROLES) for s in range(n_states)
        ]
        returns, lengths, _, _ = _continuations(policy, env_id, jobs, gamma, n_parallel, seed, progress)
    returns_t = torch.as_tensor(returns, dtype=torch.float64).reshape(_N_ROLES, n_states)
    lengths_t = torch.as_tensor(lengths).reshape(_N_ROLES, n_states).T

    # The scores of a and a' in one vmap pass: [2S, P], then split.
    both = per_sample_gradients(
        policy,
        log_prob_loss(weighted=False),
        (torch.cat([drawn[0], drawn[1]]), torch.cat([obs, obs])),
        params=actor_parameter_names(policy),
    )
    scores, fresh_scores = flatten_per_sample(both).to(torch.float64).split(n_states)

    value = policy.predict_values(obs).detach().flatten().to(torch.float64)
    baselines: dict[str, torch.Tensor] = {"value": value, "mc_value": returns_t[3:].T.contiguous()}
    if critic is not None:
        assert mean is not None
        at_mean = mean.detach().clone().requires_grad_(True)
        (grad_q,) = torch.autograd.grad(critic(obs, at_mean).flatten().sum(), at_mean)
        taylor = [qprop_control_variate(grad_q, actions[r], mean).to(torch.float64) for r in (0, 1, 2)]
        baselines["qprop"] = value[:, None] + torch.stack(taylor, dim=1)
    return NestedRolloutSamples(
        scores=scores,
        returns=returns_t[:2].T.contiguous(),
        fresh_scores=fresh_scores,
        fresh_returns=returns_t[2].clone(),
        baselines=baselines,
        timesteps=timesteps,
        observations=obs,
        actions=drawn[0],
        continuation_steps=lengths_t,
    )


def monte_carlo_values(
    policy: Any,
    env_id: str,
    states: list[Any],
    observations: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    gamma: float = 0.99,
    n_rollouts: int = 4,
    horizon: int | None = None,
    n_parallel: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    r"""Monte Carlo state values by restoring the simulator: the mean over ``n_rollouts`` continuations under
    ``policy`` from each saved state (Ilyas et al. 2020's "true value" row, up to the rollouts' noise).

    .. math::  \hat V(s) = \frac1M \sum_{m=1}^M \Big(\sum_{k=0}^{L_m - 1} \gamma^k r^{(m)}_k
               + \gamma^{L_m} V_\phi(s^{(m)}_{L_m})\,[\text{not terminated}]\Big)

    Each continuation runs until termination, the environment's time limit (counted from the state's time step)
    or ``horizon`` steps; where it did not terminate it is bootstrapped from the policy's learned value
    :math:`V_\phi` of its last observation (as the comparison engine bootstraps a truncated return). With
    ``horizon=None`` and no time limit the continuations would not end: ``horizon`` is then required. The first
    action of each continuation is drawn from the policy at the state, so the estimate is independent of the
    action the batch took there (a valid baseline).

    :param policy: an SB3 ``ActorCriticPolicy``, held fixed
    :param env_id: the gymnasium id the states come from (MuJoCo or classic control; :func:`snapshot_state`)
    :param states: ``S`` simulator states (:func:`snapshot_state`, e.g. ``RolloutBatch.states`` flattened)
    :param observations: ``[S, ...]`` the observation at each state, as the policy takes it
    :param timesteps: ``[S]`` each state's step index within its episode
    :param gamma: discount factor in ``[0, 1]``
    :param n_rollouts: continuations per state (``M``)
    :param horizon: most steps of one continuation (``None``: until the time limit)
    :param n_parallel: environment copies stepped in lockstep
    :param seed: seeds the environments and the action sampling
    :return: ``[S]`` float64 values

    Reference: Ilyas, Engstrom, Santurkar, Tsipras, Janoos, Rudolph, Madry (2020), "A Closer Look at Deep Policy
    Gradients", ICLR, arXiv:1811.02553, Sec. 3.2 (the "true" value function by extra rollouts).
    """
    check_positive("n_rollouts", n_rollouts, integer=True)
    check_positive("n_parallel", n_parallel, integer=True)
    check_unit_interval("gamma", gamma)
    if horizon is not None:
        check_positive("horizon", horizon, integer=True)
    if len(states) != observations.shape[0] or len(states) != timesteps.shape[0]:
        raise ValueError(
            f"states, observations and timesteps must have one entry per state, got {len(states)}, "
            f"{observations.shape[0]} and {timesteps.shape[0]}"
        )
    spec = gym.spec(env_id)
    limit = spec.max_episode_steps if spec is not None else None
    if limit is None and horizon is None:
        raise ValueError(f"horizon must be given for {env_id!r}: the environment has no time limit")
    max_steps = min(limit if limit is not None else math.inf, horizon if horizon is not None else math.inf)
    n_states = len(states)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            distribution = policy.get_distribution(observations)
            first = torch.stack([distribution.get_actions() for _ in range(n_rollouts)])  # [M, S, ...]
        remaining = [
            int(min(max_steps, (limit if limit is not None else math.inf) - int(timesteps[s]))) for s in range(n_states)
        ]
        jobs = [
            (states[s], first[m, s].cpu().numpy(), max(remaining[s], 1)) for m in range(n_rollouts) for s in range(n_states)
        ]
        returns, lengths, ended, last_obs = _continuations(policy, env_id, jobs, gamma, n_parallel, seed, None)
    open_jobs = np.flatnonzero(~ended)
    if len(open_jobs):
        with torch.no_grad():
            tails = policy.predict_values(policy.obs_to_tensor(np.stack([last_obs[j] for j in open_jobs]))[0])
        returns[open_jobs] += gamma ** lengths[open_jobs] * tails.double().flatten().cpu().numpy()
    return torch.as_tensor(returns, dtype=torch.float64).reshape(n_rollouts, n_states).mean(0)
