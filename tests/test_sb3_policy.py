"""pgvar._sb3_policy: the one actor-parameter rule, the log-prob loss, acting and rollout flattening."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer

from pgvar._sb3_policy import (
    actor_parameter_names,
    buffer_rows,
    env_actions,
    flatten_time_major,
    is_actor_parameter,
    log_prob_loss,
    policy_log_prob,
    preprocess_actor_observations,
)


def test_actor_parameters_are_those_the_action_distribution_uses():
    """Separate critic extractor and a frozen layer: the rule keeps exactly the parameters whose policy-gradient
    can be non-zero (the others' gradients are None or 0), and names no critic parameter."""
    model = PPO(
        "MlpPolicy", "Pendulum-v1", policy_kwargs={"share_features_extractor": False, "net_arch": [8]}, device="cpu"
    )
    policy = model.policy
    policy.action_net.bias.requires_grad_(False)
    names = actor_parameter_names(policy)
    assert "log_std" in names and "action_net.weight" in names and "action_net.bias" not in names
    assert not [n for n in names if "value" in n or n.startswith("vf_features_extractor")]
    obs = torch.randn(5, 3)
    actions = torch.randn(5, 1)
    named = dict(policy.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    grads = torch.autograd.grad(
        policy_log_prob(policy, obs, actions).sum(), [named[n] for n in trainable], allow_unused=True
    )
    used = {n for n, g in zip(trainable, grads) if g is not None and bool(g.abs().sum() > 0)}
    assert used == set(names)
    assert is_actor_parameter("mlp_extractor.policy_net.0.weight")
    assert not is_actor_parameter("mlp_extractor.value_net.0.weight")


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_log_prob_and_its_losses_equal_sb3s_evaluate_actions(env_id):
    model = PPO("MlpPolicy", env_id, n_steps=16, batch_size=16, seed=0, device="cpu")
    buffer = model.rollout_buffer
    model._setup_learn(16, callback=None)
    from stable_baselines3.common.callbacks import CallbackList

    callback = CallbackList([])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, buffer, n_rollout_steps=16)
    observations = torch.as_tensor(buffer_rows(buffer, "observations"))
    actions = torch.as_tensor(buffer_rows(buffer, "actions"))  # float, [B, 1] for Discrete: as SB3 stores them
    sb3_actions = actions.long().flatten() if isinstance(model.action_space, spaces.Discrete) else actions
    expected = model.policy.evaluate_actions(observations, sb3_actions)[1]
    torch.testing.assert_close(policy_log_prob(model.policy, observations, actions), expected)
    preprocessed, flag = preprocess_actor_observations(model.policy, observations)
    assert flag
    torch.testing.assert_close(policy_log_prob(model.policy, preprocessed, actions, preprocessed=True), expected)
    advantages = torch.randn(len(actions))
    torch.testing.assert_close(
        log_prob_loss()(model.policy, advantages, actions, observations), -(advantages * expected).sum()
    )
    torch.testing.assert_close(log_prob_loss(weighted=False)(model.policy, actions, observations), expected.sum())


def test_buffer_rows_follow_sb3s_get_order_and_flatten_time_major_is_a_reshape():
    buffer = RolloutBuffer(4, spaces.Box(-1, 1, (2,)), spaces.Discrete(3), n_envs=3)
    buffer.observations[:] = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    buffer.full = True
    before = buffer_rows(buffer, "observations")
    picked = buffer_rows(buffer, "observations", np.array([5, 0]))
    np.testing.assert_array_equal(picked, before[[5, 0]])
    buffer.observations = buffer.swap_and_flatten(buffer.observations)  # what get() does
    buffer.generator_ready = True
    np.testing.assert_array_equal(buffer_rows(buffer, "observations"), before)
    steps = torch.arange(24.0).reshape(4, 3, 2)
    flat = flatten_time_major(steps)
    assert flat.shape == (12, 2) and torch.equal(flat[3 * 1 + 2], steps[1, 2])
    assert flatten_time_major({"a": steps.numpy()})["a"].shape == (12, 2)


def test_env_actions_clip_box_actions_only():
    box = spaces.Box(-1.0, 1.0, shape=(2,))
    np.testing.assert_array_equal(env_actions(box, np.array([[2.0, -0.5]])), [[1.0, -0.5]])
    discrete = np.array([2, 0])
    assert env_actions(spaces.Discrete(3), discrete) is discrete


def test_detached_policy_copy_pickles_and_leaves_the_random_stream_alone():
    import io

    from stable_baselines3 import PPO as SB3PPO
    from torch.multiprocessing.reductions import init_reductions

    from pgvar._sb3_policy import detached_policy_copy

    init_reductions()
    policy = SB3PPO("MlpPolicy", "Pendulum-v1", seed=0, device="cpu").policy
    obs = torch.randn(5, 3)
    policy.get_distribution(obs)  # leaves a distribution with autograd history on the policy
    state = torch.random.get_rng_state()
    copy = detached_policy_copy(policy)
    assert torch.equal(torch.random.get_rng_state(), state)
    import multiprocessing.reduction

    buffer = io.BytesIO()
    multiprocessing.reduction.ForkingPickler(buffer).dump(copy)  # what a process pool does
    with pytest.raises(RuntimeError, match="non-leaf tensor"):
        multiprocessing.reduction.ForkingPickler(io.BytesIO()).dump(policy)
    torch.testing.assert_close(copy.predict_values(obs), policy.predict_values(obs))
    torch.testing.assert_close(copy.get_distribution(obs).distribution.mean, policy.get_distribution(obs).distribution.mean)
