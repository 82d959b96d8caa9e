"""The Mirage variance decomposition
=================================

The Mirage decomposition on HalfCheetah: where the variance of a QPropTRPO policy's gradient comes from.

Trains pgvar.QPropTRPO briefly, then restores the MuJoCo simulator at states the policy visits and rolls out independent
continuations (pgvar.rollouts), and splits the per-sample policy-gradient variance into the trajectory term
Sigma_tau, the action term Sigma_a for each baseline (none, the learned V, a Monte Carlo V, and Q-Prop's control
variate: V plus the fitted critic's Taylor advantage), and the bound on the state term (Tucker et al. 2018,
arXiv:1802.10031).

::

    python examples/variance_decomposition.py                         # HalfCheetah-v5, about 2 minutes
    PGVAR_EXAMPLE_SMOKE=1 python examples/variance_decomposition.py   # Pendulum-v1, a few seconds (the tests)
"""

from __future__ import annotations

import os
import time

import torch

from pgvar import QPropTRPO
from pgvar.rollouts import sample_nested_rollouts

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")
ENV_ID = "Pendulum-v1" if SMOKE else "HalfCheetah-v5"
TRAIN_STEPS = 512 if SMOKE else 20_000
N_STATES = 8 if SMOKE else 128
HORIZON = 30 if SMOKE else None  # None: every continuation runs to the episode's time limit

torch.set_num_threads(1)
start = time.perf_counter()
small = {"n_steps": 256, "batch_size": 64, "qprop_warmup_steps": 256} if SMOKE else {}
model = QPropTRPO("MlpPolicy", ENV_ID, seed=0, device="cpu", **small)
model.learn(TRAIN_STEPS)


def critic(observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The Q-Prop critic Q_w(s, a) the model fitted off-policy during training."""
    return model.critic(observations, actions)[0].flatten()


samples = sample_nested_rollouts(model.policy, ENV_ID, N_STATES, horizon=HORIZON, seed=1, critic=critic)
result = samples.decomposition(state_baseline="mc_value")

print(f"{ENV_ID}: QPropTRPO after {TRAIN_STEPS} steps, {N_STATES} states, "
      f"{int(samples.continuation_steps.sum())} continuation steps, {time.perf_counter() - start:.0f} s")  # fmt: skip
print(f"{'term':<34} {'estimate':>12} {'std. error':>12}")
print(f"{'Sigma_tau (trajectory)':<34} {result.trajectory:>12.4g} {result.trajectory_se:>12.4g}")
for name in result.action:
    print(f"{'Sigma_a, baseline ' + name:<34} {result.action[name]:>12.4g} {result.action_se[name]:>12.4g}")
print(f"{'Sigma_s + |grad J|^2 (bound)':<34} {result.state_bound:>12.4g} {result.state_bound_se:>12.4g}")
assert result.trajectory >= 0.0
assert set(result.action) == {"none", "value", "mc_value", "qprop"}
