"""Samplers of real gymnasium environments under a fixed SB3 policy: the data of the comparison engine and of the
variance decomposition.

- :func:`collect_rollout` (:mod:`pgvar.rollouts.shared_batch`): one time-major batch of a ``VecEnv`` with raw
  rewards and separate ``terminated``/``truncated`` flags, which every estimator of a comparison then shares.
- :func:`sample_nested_rollouts` (:mod:`pgvar.rollouts.nested`): states sampled from the policy's episodes and
  independent continuations from each, by restoring the simulator state (the Mirage decomposition's data), and
  :func:`monte_carlo_values`: Monte Carlo state values at saved states, by the same continuations.

This package sits below :mod:`pgvar.compare` and :mod:`pgvar.callbacks` and imports neither.
"""

from pgvar.rollouts.nested import (
    NestedRolloutSamples,
    monte_carlo_values,
    restore_state,
    sample_nested_rollouts,
    snapshot_state,
)
from pgvar.rollouts.shared_batch import RolloutBatch, collect_rollout

__all__ = [
    "NestedRolloutSamples",
    "RolloutBatch",
    "collect_rollout",
    "monte_carlo_values",
    "restore_state",
    "sample_nested_rollouts",
    "snapshot_state",
]
