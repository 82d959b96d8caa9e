"""Soft Q-learning is an entropy-regularized policy gradient
=========================================================

Soft Q-learning IS an entropy-regularized policy gradient: a numerical proof.

Schulman, Chen, Abbeel (2017, arXiv:1704.06440, Sec. 4): with pi and V derived from Q (Boltzmann policy, soft
value), on-policy actions and constant targets,

::

    E_a[ grad soft_q_loss ] = tau * E_a[ grad (-Delta log pi + tau KL + (1/tau) * 1/2 (V - (V + Delta))^2) ].

The script checks it three ways, in float64 on a random tabular MDP (pgvar.problems.TabularMDP):

1. EXACT: every action enumerated at the step whose gradient is taken, the n-step continuation entering
   through its exact conditional expectation (dynamic programming): the gradients agree to round-off;
2. SAMPLED: whole sampled episodes, n-step advantages from the sampled rewards: the mean gradients agree within
   sampling error, the per-episode gradients do not;
3. CONTROL: the same comparison without a stop-gradient, or with SB3's value coefficient 0.5 instead of 1/tau,
   is far off (so the checks above can fail);

and 4. the two pgvar algorithms, EntropyPG and SoftQ, on CartPole states with the same network.

::

    python examples/soft_q_equivalence.py                          # ~1 min
    PGVAR_EXAMPLE_SMOKE=1 python examples/soft_q_equivalence.py    # a few seconds
"""

from __future__ import annotations

import math
import os

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.env_util import make_vec_env

from pgvar.algos.soft_q import EntropyPG, SoftQ
from pgvar.estimators.soft_q import (
    boltzmann_log_probs,
    entropy_regularized_pg_loss,
    kl_regularized_n_step_advantages,
    kl_to_reference,
    soft_q_loss,
    soft_q_targets,
    soft_value,
)
from pgvar.problems import TabularMDP

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")
N_EPISODES = 1_000 if SMOKE else 20_000
F64 = torch.float64


def both_losses(q, actions, deltas, tau, ref, value_coef=None, mask=None):
    """(soft-Q loss, tau * entropy-regularized PG loss) of the Q-values ``q``; ``actions=None`` enumerates."""
    log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
    kls = kl_to_reference(log_pi, ref)
    targets = soft_q_targets(values, kls, deltas, tau=tau)  # V + tau KL + Delta, detached
    weights = log_pi.exp() if actions is None else None  # the expectation over a ~ pi, weights held constant
    q_loss = soft_q_loss(q, actions, targets, action_weights=weights, mask=mask)
    pg = entropy_regularized_pg_loss(
        log_pi, values, actions, deltas, tau=tau, ref_log_probs=ref, value_coef=value_coef, mask=mask
    )
    return q_loss, tau * pg.loss


def exact_deltas(mdp, q, tau, ref, n):
    """E[Delta_t | s_t = s, a_t = a] for the n-step KL-regularized advantage, by dynamic programming."""
    with torch.no_grad():
        log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
        kls = kl_to_reference(log_pi, ref)
        cont = mdp.gamma * (1 - mdp.termination_probs)  # discount times P(not terminated) [S, A]
        one_step = (
            mdp.reward_table - tau * kls[:, None] - values[:, None] + cont * (mdp.transition_probs @ values)
        )
        table = torch.zeros_like(q)
        for _ in range(n):
            table = one_step + cont * (mdp.transition_probs @ (log_pi.exp() * table).sum(-1))
        return table


def gradient(loss, param):
    (g,) = torch.autograd.grad(loss, param, retain_graph=True)
    return g


def relative_gap(a, b):
    return float((a - b).norm() / b.norm())


def exact_check(mdp, ref) -> None:
    print("1. EXACT (actions enumerated, exact continuation), float64:")
    for tau, n in [(0.05, 1), (0.5, 3), (2.0, 5)]:
        q = (torch.randn(mdp.n_states, mdp.n_actions, dtype=F64) * 2 * tau).requires_grad_()
        q_loss, pg_loss = both_losses(q, None, exact_deltas(mdp, q, tau, ref, n), tau, ref)
        gap = relative_gap(gradient(q_loss, q), gradient(pg_loss, q))
        print(f"   tau={tau:<4} n={n}: |grad soft-Q - tau grad PG| / |tau grad PG| = {gap:.1e}")
        assert gap < 1e-12


def sampled_check(mdp, ref, tau=0.5, n=3) -> None:
    print(
        f"2. SAMPLED ({N_EPISODES} episodes, n={n}, tau={tau}): per-episode gradients, mean +- standard error"
    )
    q_table = torch.randn(mdp.n_states, mdp.n_actions, dtype=F64) * tau
    batch = mdp.sample_episodes(
        {"logits": boltzmann_log_probs(q_table, tau, ref)}, N_EPISODES, torch.Generator().manual_seed(1)
    )
    q = q_table[batch.observations].clone().requires_grad_()  # one leaf Q row per (t, episode) entry
    log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
    next_values = soft_value(q_table[batch.next_observations], tau, ref)
    deltas = kl_regularized_n_step_advantages(
        batch.rewards,
        kl_to_reference(log_pi, ref),
        values,
        next_values,
        batch.terminated,
        batch.truncated,
        gamma=mdp.gamma,
        tau=tau,
        n_step=n,
    )
    count = float(batch.mask.sum())
    per_episode = []
    for loss in both_losses(q, batch.actions, deltas, tau, ref, mask=batch.mask):
        rows = gradient(loss * count, q)  # [T, N, A]: summed per episode and state below
        slots = (torch.arange(batch.n_episodes) * mdp.n_states + batch.observations).reshape(-1)
        summed = torch.zeros(batch.n_episodes * mdp.n_states, mdp.n_actions, dtype=F64)
        per_episode.append(
            summed.index_add_(0, slots, rows.reshape(-1, mdp.n_actions)).reshape(batch.n_episodes, -1)
        )
    difference = per_episode[0] - per_episode[1]
    z = difference.mean(0) / (difference.std(0) / math.sqrt(batch.n_episodes))
    print(
        f"   mean difference / its standard error: max |z| = {float(z.abs().max()):.2f} over {z.numel()} coordinates"
    )
    print(
        f"   per-episode |difference| / |soft-Q gradient| = "
        f"{float(difference.norm(dim=1).mean() / per_episode[0].norm(dim=1).mean()):.2f} (zero-mean, not zero)"
    )
    assert float(z.abs().max()) < 4.5


def control_check(mdp, ref, tau=0.5, n=3) -> None:
    print("3. CONTROL: the exact check, broken on purpose:")
    q = (torch.randn(mdp.n_states, mdp.n_actions, dtype=F64) * tau).requires_grad_()
    deltas = exact_deltas(mdp, q, tau, ref, n)
    q_loss, pg_loss = both_losses(q, None, deltas, tau, ref)
    reference = gradient(pg_loss, q)
    log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
    live_target = values[:, None] + tau * kl_to_reference(log_pi, ref)[:, None] + deltas  # no stop-gradient
    no_stop_grad = (log_pi.exp().detach() * 0.5 * (q - live_target) ** 2).sum(-1).mean()
    print(f"   soft-Q target not detached:   gap {relative_gap(gradient(no_stop_grad, q), reference):.2f}")
    _, sb3_coef = both_losses(q, None, deltas, tau, ref, value_coef=0.5)
    print(
        f"   value coefficient 0.5, not 1/tau: gap {relative_gap(gradient(sb3_coef, q), gradient(q_loss, q)):.2f}"
    )


def algorithm_check(tau=0.3) -> None:
    print(
        "4. pgvar.algos: EntropyPG('SoftQMlpPolicy') and SoftQ('MlpPolicy'), same seed and network, CartPole:"
    )
    kwargs = dict(n_steps=8, tau=tau, ref_policy=(0.3, 0.7), seed=0, policy_kwargs=dict(net_arch=[32]))
    pg = EntropyPG("SoftQMlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), **kwargs)
    sq = SoftQ("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), **kwargs)
    # Move the policy away from the reference (a Q-network starts near Q = 0, where pi = pi_ref).
    with torch.no_grad():
        for model in (pg, sq):
            model.policy.q_net[-1].weight.mul_(50)
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    states = np.stack([env.observation_space.sample() * 0.5 for _ in range(32)]).astype(np.float32)
    rewards, not_terminated, next_obs = np.zeros((32, 2)), np.zeros((32, 2)), np.zeros((32, 2, 4), np.float32)
    for i in range(32):  # branch every state on both actions: Delta(s, a) for each action (n = 1)
        for a in range(2):
            env.state, env.steps_beyond_terminated = states[i].astype(np.float64), None
            next_obs[i, a], rewards[i, a], terminated, _, _ = env.step(a)
            not_terminated[i, a] = 1.0 - terminated
    obs = torch.as_tensor(states)
    with torch.no_grad():
        here, after = pg.soft_outputs(obs), pg.soft_outputs(torch.as_tensor(next_obs.reshape(-1, 4)))
        kls = kl_to_reference(here.log_probs, torch.tensor((0.3, 0.7)).log())
        deltas = (
            torch.as_tensor(rewards, dtype=torch.float32)
            - tau * kls[:, None]
            - here.values[:, None]
            + pg.gamma * torch.as_tensor(not_terminated, dtype=torch.float32) * after.values.reshape(32, 2)
        )
    grads = []
    for model in (pg, sq):
        model.policy.optimizer.zero_grad()
        model.compute_loss(obs, None, deltas)[0].backward()  # actions=None: enumerated
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.policy.parameters()]))
    gap = relative_gap(grads[1], tau * grads[0])
    print(f"   enumerated: |grad SoftQ - tau grad EntropyPG| / |tau grad EntropyPG| = {gap:.1e} (float32)")
    assert gap < 1e-4


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mdp = TabularMDP(n_states=6, n_actions=3, gamma=0.9, termination_prob=0.25, seed=0)
    ref = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=F64))  # a non-uniform reference policy
    exact_check(mdp, ref)
    sampled_check(mdp, ref)
    control_check(mdp, ref)
    algorithm_check()


if __name__ == "__main__":
    main()
