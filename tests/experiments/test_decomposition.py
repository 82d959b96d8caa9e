"""decompose_training: checkpoints of a training run, states pooled from independent batches, any number of workers."""

from __future__ import annotations

import pytest
import torch

from pgvar import PPO
from pgvar.experiments import decompose_training
from pgvar.rollouts import NestedRolloutSamples, sample_nested_rollouts


def test_concatenated_samples_decompose_like_one_set():
    model = PPO("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", n_steps=64, batch_size=32)
    a = sample_nested_rollouts(model.policy, "Pendulum-v1", 3, horizon=4, seed=1)
    b = sample_nested_rollouts(model.policy, "Pendulum-v1", 2, horizon=4, seed=2)
    both = NestedRolloutSamples.concatenate([a, b])
    assert both.scores.shape[0] == 5 and both.baselines["mc_value"].shape == (5, 3)
    torch.testing.assert_close(both.returns, torch.cat([a.returns, b.returns]))
    from pgvar.measure import variance_decomposition

    expected = variance_decomposition(
        torch.cat([a.scores, b.scores]), torch.cat([a.returns, b.returns]),
        torch.cat([a.fresh_scores, b.fresh_scores]), torch.cat([a.fresh_returns, b.fresh_returns]),
        {name: torch.cat([a.baselines[name], b.baselines[name]]) for name in a.baselines}, "mc_value",
    )  # fmt: skip
    assert both.decomposition() == expected
    with pytest.raises(ValueError, match="parts must hold at least one"):
        NestedRolloutSamples.concatenate([])


@pytest.mark.slow
def test_decompose_training_measures_checkpoints_and_does_not_depend_on_workers():
    kwargs = dict(algo="ppo", algo_kwargs={"n_steps": 32, "batch_size": 32}, checkpoints=[0, 32], n_states=4,
                  states_per_batch=2, horizon=3, seed=0)  # fmt: skip
    one = decompose_training("Pendulum-v1", workers=1, **kwargs)
    two = decompose_training("Pendulum-v1", workers=2, **kwargs)
    assert [c["timesteps"] for c in one.checkpoints] == [0, 32]
    assert [c["decomposition"] for c in one.checkpoints] == [c["decomposition"] for c in two.checkpoints]
    assert one.algo == "PPO" and set(one.checkpoints[0]["decomposition"]["action"]) == {"none", "value", "mc_value"}


def test_decompose_training_bad_input():
    with pytest.raises(ValueError, match=r"checkpoints must be increasing whole numbers >= 0, got \[5, 3\]"):
        decompose_training("Pendulum-v1", checkpoints=[5, 3])
    with pytest.raises(ValueError, match="algo must be one of"):
        decompose_training("Pendulum-v1", algo="dqn")
    with pytest.raises(ValueError, match="checkpoints must be \\[0\\] with a given model"):
        decompose_training("Pendulum-v1", model=object(), checkpoints=[0, 10])
