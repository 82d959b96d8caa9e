"""A2C, a drop-in for SB3's A2C
============================

pgvar.A2C is stable_baselines3.A2C with two more arguments: same seed, same parameters, bit for bit.

The script trains SB3's A2C and pgvar's A2C side by side and checks that every parameter is identical
(time-limit truncations included: SB3's bootstrap is kept exactly), then trains a pgvar A2C with a batch-mean
baseline, saves it, and loads it back with its options.

::

    python examples/a2c_drop_in.py                          # ~30 s of CPU
    PGVAR_EXAMPLE_SMOKE=1 python examples/a2c_drop_in.py    # a few seconds
"""

from __future__ import annotations

import os
import tempfile

import stable_baselines3
import torch
from stable_baselines3.common.env_util import make_vec_env

from pgvar.algos import A2C

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")
TOTAL_TIMESTEPS = 400 if SMOKE else 20_000


def short_episodes(seed: int):
    # A time limit of 50 steps: truncated episodes appear in every rollout.
    return make_vec_env("CartPole-v1", n_envs=4, seed=seed, env_kwargs={"max_episode_steps": 50})


def main() -> None:
    torch.set_num_threads(1)
    reference = stable_baselines3.A2C("MlpPolicy", short_episodes(0), seed=0).learn(TOTAL_TIMESTEPS)
    drop_in = A2C("MlpPolicy", short_episodes(0), seed=0).learn(TOTAL_TIMESTEPS)
    reference_params, params = reference.policy.state_dict(), drop_in.policy.state_dict()
    identical = all(torch.equal(reference_params[name], params[name]) for name in reference_params)
    print(f"{TOTAL_TIMESTEPS} steps of A2C: parameters identical to stable_baselines3.A2C: {identical}")
    assert identical

    # A2C does not normalize advantages by default, so the batch-mean baseline is what the gradient sees.
    model = A2C("MlpPolicy", short_episodes(1), seed=1, baseline="mean")
    model.learn(TOTAL_TIMESTEPS)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "a2c_mean_baseline.zip")
        model.save(path)  # atomic: a failed save never damages an existing file
        loaded = A2C.load(path)
    print(f"loaded: baseline={loaded.baseline!r}, normalize_advantage={loaded.advantage_normalization!r}, "
          f"last batch-mean baseline {model.logger.name_to_value['pgvar/constant_baseline']:.2f}")


if __name__ == "__main__":
    main()
