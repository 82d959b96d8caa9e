"""Shared pieces of the tests of pgvar's SB3 algorithms (tests/algos/test_*.py)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env


@pytest.fixture
def torch_single_thread():
    """Tiny networks on a shared 2-core machine: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DictObservation(gym.ObservationWrapper):
    """Splits a Box observation into a Dict of two Boxes, to exercise the dict rollout buffer."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high
        half = low.shape[0] // 2
        self.half = half
        self.observation_space = gym.spaces.Dict(
            {
                "head": gym.spaces.Box(low[:half], high[:half], dtype=np.float32),
                "tail": gym.spaces.Box(low[half:], high[half:], dtype=np.float32),
            }
        )

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        return {"head": observation[: self.half], "tail": observation[self.half :]}


def short_episodes_env(env_id: str, n_envs: int, max_episode_steps: int, *, dict_obs: bool = False, **kwargs):
    """A DummyVecEnv whose time limit cuts episodes inside a small rollout (truncations in the data)."""
    return make_vec_env(
        env_id,
        n_envs=n_envs,
        env_kwargs={"max_episode_steps": max_episode_steps},
        wrapper_class=DictObservation if dict_obs else None,
        **kwargs,
    )


@pytest.fixture
def make_short_env():
    """:func:`short_episodes_env` as a fixture."""
    return short_episodes_env
