"""SpeedLimitReward: the proxy / true reward pair of ``pgvar frontier --env`` (Safety-Gymnasium's speed limit)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from pgvar.problems import SAFETY_VELOCITY_THRESHOLDS, SpeedLimitReward


@pytest.mark.parametrize("reward", ["proxy", "true"])
def test_reports_both_rewards_and_pays_the_chosen_one(reward):
    env = SpeedLimitReward(gym.make("Hopper-v5"), threshold=0.05, penalty=2.5, reward=reward)
    env.reset(seed=0)
    seen_cost = set()
    for step in range(40):
        sign = 1.0 if (step // 5) % 2 == 0 else -1.0  # pushes forward and back: both sides of the limit
        _, paid, terminated, truncated, info = env.step(np.full(3, sign, dtype=np.float32))
        assert info["cost"] == float(info["x_velocity"] > 0.05)
        assert info["true_reward"] == pytest.approx(info["proxy_reward"] - 2.5 * info["cost"])
        assert paid == info[f"{reward}_reward"]
        seen_cost.add(info["cost"])
        if terminated or truncated:
            env.reset(seed=1)
    assert seen_cost == {0.0, 1.0}  # both sides of the limit were visited: the test is not vacuous


def test_default_threshold_is_safety_gymnasiums():
    assert SpeedLimitReward(gym.make("Hopper-v5")).threshold == SAFETY_VELOCITY_THRESHOLDS["Hopper"] == 0.7402
    assert SpeedLimitReward(gym.make("HalfCheetah-v5")).threshold == 3.2096


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threshold": 0.0}, "threshold must be"),
    ({"penalty": -1.0}, "penalty must be"),
    ({"reward": "both"}, "reward must be one of"),
])  # fmt: skip
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeedLimitReward(gym.make("Hopper-v5"), **kwargs)


def test_unknown_task_needs_a_threshold_and_x_velocity():
    with pytest.raises(ValueError, match="threshold must be given for 'Pendulum'"):
        SpeedLimitReward(gym.make("Pendulum-v1"))
    env = SpeedLimitReward(gym.make("Pendulum-v1"), threshold=1.0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="x_velocity"):
        env.step(np.zeros(1, dtype=np.float32))
