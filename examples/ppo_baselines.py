"""PPO with each baseline on CartPole
==================================

pgvar.PPO with each policy-gradient baseline on CartPole-v1: the same agent, only ``baseline=`` changes.

``baseline="value"`` is SB3's PPO (GAE with the learned V(s)); ``"none"``, ``"mean"`` and ``"optimal"`` use the
discounted return-to-go minus a constant (0, the batch mean, the variance-optimal b*). The value function is
trained the same way in all four. Advantage normalization is off (``normalize_advantage="none"``): centring
``G - b`` per minibatch would cancel any constant ``b``. The script prints the mean evaluation return of each and the constant
baseline used in the last update.

::

    python examples/ppo_baselines.py                          # 4 baselines x 3 seeds x 50k steps, ~5 min of CPU
    PGVAR_EXAMPLE_SMOKE=1 python examples/ppo_baselines.py    # tiny budgets, a few seconds
"""

from __future__ import annotations

import os

import numpy as np
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from pgvar.algos import PPO  # the only change from `from stable_baselines3 import PPO`

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")
TOTAL_TIMESTEPS = 512 if SMOKE else 50_000
SEEDS = [0] if SMOKE else [0, 1, 2]
BASELINES = ["value", "none", "mean", "optimal"]


def train_and_evaluate(baseline: str, seed: int) -> tuple[float, float | None]:
    env = make_vec_env("CartPole-v1", n_envs=4, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=128 if SMOKE else 256,
        batch_size=64,
        n_epochs=4,
        baseline=baseline,
        # A constant baseline only matters without normalization: centring G - b per minibatch cancels b.
        normalize_advantage="none",
        seed=seed,
        policy_kwargs={"net_arch": [16] if SMOKE else [64, 64]},
    )
    model.learn(TOTAL_TIMESTEPS)
    mean_return, _ = evaluate_policy(model, make_vec_env("CartPole-v1", n_envs=1, seed=100 + seed), n_eval_episodes=5)
    return float(mean_return), model.logger.name_to_value.get("pgvar/constant_baseline")


def main() -> None:
    torch.set_num_threads(1)
    print(f"PPO on CartPole-v1, {TOTAL_TIMESTEPS} steps, seeds {SEEDS}")
    print(f"{'baseline':<9} {'eval return (mean +- std over seeds)':>36} {'last constant b':>16}")
    for baseline in BASELINES:
        results = [train_and_evaluate(baseline, seed) for seed in SEEDS]
        returns = np.array([r for r, _ in results])
        constant = results[-1][1]
        shown = "-" if constant is None else f"{constant:.2f}"
        print(f"{baseline:<9} {returns.mean():>28.1f} +- {returns.std():<5.1f} {shown:>16}")


if __name__ == "__main__":
    main()
