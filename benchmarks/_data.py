"""HalfCheetah-v5 data for the per-sample gradient benchmarks, the policy, and a peak-memory probe.

Data: ``n`` environment steps from 8 synchronous HalfCheetah-v5 envs driven by SB3's initial (seeded)
``ActorCriticPolicy`` (``net_arch`` pi=[64, 64], vf=[64, 64], tanh), storing the unclipped sampled actions
(what ``log pi`` needs, as SB3's rollout buffer does) and advantages = discounted rewards-to-go
(``gamma = 0.99``, cut at episode ends, no bootstrap), normalized over the batch like PPO. Cached under
``<repo>/.benchmarks/pgvar-data/`` with the mujoco and gymnasium versions in the name (MuJoCo trajectories drift
between releases).

Peak memory (``python benchmarks/_data.py --peak-rss ROUTE --n N``): runs one route in a fresh process and
reports ``peak RSS during the call - RSS just before it``. The kernel's high-water mark ``VmHWM`` is reset
just before the call (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and read after it from
``/proc/self/status``; where the reset is not allowed, ``getrusage`` ``ru_maxrss`` (the process's lifetime peak,
an upper bound) is used and the output says so. torch's CPU allocator is plain ``malloc``, so RSS sees every
tensor (tracemalloc does not); a fresh process keeps other tests' allocations out; a warm-up call on a small
batch first keeps one-off allocations (libraries, vmap tracing) out of the number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".benchmarks" / "pgvar-data"
ENV_ID = "HalfCheetah-v5"
SEED = 0
GAMMA = 0.99
N_ENVS = 8
THREADS = int(os.environ.get("PGVAR_BENCH_THREADS", "1"))

#: Rows of the results table, filled by the benchmark tests and printed by conftest.pytest_terminal_summary.
RESULTS: list[dict] = []

if str(REPO) not in sys.path:  # so that `python benchmarks/_data.py` finds pgvar from a checkout
    sys.path.insert(0, str(REPO))


def versions() -> dict[str, str]:
    import gymnasium
    import mujoco
    import stable_baselines3

    return {
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "gymnasium": gymnasium.__version__,
        "mujoco": mujoco.__version__,
    }


def make_policy(observation_space, action_space, seed: int = SEED):
    """SB3's default MLP ``ActorCriticPolicy`` (pi=[64, 64]), initialized from ``seed``."""
    from stable_baselines3.common.policies import ActorCriticPolicy

    torch.manual_seed(seed)
    return ActorCriticPolicy(observation_space, action_space, lr_schedule=lambda _: 3e-4)


def spaces():
    import gymnasium as gym

    env = gym.make(ENV_ID)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def cache_path(n_steps: int, seed: int = SEED) -> Path:
    v = versions()
    return (
        CACHE_DIR
        / f"{ENV_ID.lower()}_seed{seed}_steps{n_steps}_mujoco{v['mujoco']}_gymnasium{v['gymnasium']}.pt"
    )


def load_batch(n_steps: int, seed: int = SEED) -> dict[str, torch.Tensor]:
    """``{"obs": [n, 17], "actions": [n, 6], "advantages": [n]}`` float32, collected once and cached."""
    path = cache_path(n_steps, seed)
    if path.exists():
        return torch.load(path)
    batch = collect_batch(n_steps, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(batch, path)
    return batch


def collect_batch(n_steps: int, seed: int = SEED) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-8 policy calls: threads only add overhead
    try:
        return _collect_batch(n_steps, seed)
    finally:
        torch.set_num_threads(threads)


def _collect_batch(n_steps: int, seed: int) -> dict[str, torch.Tensor]:
    import gymnasium as gym

    envs = gym.make_vec(
        ENV_ID,
        num_envs=N_ENVS,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
    )
    policy = make_policy(envs.single_observation_space, envs.single_action_space, seed)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    horizon = math.ceil(n_steps / N_ENVS)
    obs_buf = torch.zeros(horizon, N_ENVS, *envs.single_observation_space.shape)
    act_buf = torch.zeros(horizon, N_ENVS, *envs.single_action_space.shape)
    rewards = np.zeros((horizon, N_ENVS))
    dones = np.zeros((horizon, N_ENVS), dtype=bool)
    obs, _ = envs.reset(seed=seed)
    torch.manual_seed(seed)
    for t in range(horizon):
        obs_t = torch.as_tensor(obs, dtype=torch.float32)
        with torch.no_grad():
            actions = policy.get_distribution(obs_t).sample()
        obs_buf[t], act_buf[t] = obs_t, actions
        obs, rewards[t], terminated, truncated, _ = envs.step(np.clip(actions.numpy(), low, high))
        dones[t] = terminated | truncated
    envs.close()
    returns = np.zeros_like(rewards)
    running = np.zeros(N_ENVS)
    for t in reversed(range(horizon)):  # once per dataset, not a hot path
        running = rewards[t] + GAMMA * (~dones[t]) * running
        returns[t] = running
    adv = torch.as_tensor(returns, dtype=torch.float32)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    # sample-major: env 0's steps, then env 1's, ... so a prefix holds whole stretches of trajectories
    return {
        "obs": obs_buf.transpose(0, 1).reshape(-1, obs_buf.shape[-1])[:n_steps].contiguous(),
        "actions": act_buf.transpose(0, 1).reshape(-1, act_buf.shape[-1])[:n_steps].contiguous(),
        "advantages": adv.T.reshape(-1)[:n_steps].contiguous(),
    }


def pg_loss(policy, obs, actions, advantages):
    """``-sum_i log pi(a_i|s_i) A_i`` through SB3's ``evaluate_actions`` (a sum of per-sample terms)."""
    return -(policy.evaluate_actions(obs, actions)[1] * advantages).sum()


def is_actor_param(name: str) -> bool:
    """The actor's parameters: ``log_std``, ``mlp_extractor.policy_net.*``, ``action_net.*`` (P = 5,708)."""
    return not name.startswith(("value_net", "mlp_extractor.value_net"))


def route(name: str, policy, inputs):
    """Run one measured route and return its result."""
    from pgvar.measure import (
        gradient_statistics_from_norms,
        gradient_statistics_streaming,
        per_sample_gradients,
    )

    if name == "norms":
        return gradient_statistics_from_norms(policy, pg_loss, inputs, params=is_actor_param)
    if name == "streaming":
        return gradient_statistics_streaming(policy, pg_loss, inputs, params=is_actor_param)
    if name == "vmap":
        return per_sample_gradients(policy, pg_loss, inputs, params=is_actor_param)
    if name == "backward":
        params = [p for n, p in policy.named_parameters() if is_actor_param(n)]
        return torch.autograd.grad(pg_loss(policy, *inputs) / inputs[0].shape[0], params)
    raise ValueError(f"route must be one of 'norms', 'streaming', 'vmap', 'backward'; got {name!r}")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> str:
    """Reset the kernel's RSS high-water mark (VmHWM) if possible; return the method used."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM reset via /proc/self/clear_refs"
    except OSError:
        return "getrusage ru_maxrss (not reset: an upper bound)"


def _peak_rss_bytes(method: str) -> int:
    if method.startswith("VmHWM"):
        return _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_peak_rss(route_name: str, n_steps: int, threads: int) -> dict[str, float | str]:
    """In THIS process: extra peak RSS of one call of ``route_name`` on ``n_steps`` samples (see module doc)."""
    torch.set_num_threads(threads)
    batch = load_batch(n_steps)
    policy = make_policy(*spaces())
    inputs = (batch["obs"], batch["actions"], batch["advantages"])
    route(route_name, policy, tuple(x[:64] for x in inputs))  # warm-up: lazy initialization
    method = _reset_peak_rss()
    before = _status_bytes("VmRSS")
    result = route(route_name, policy, inputs)
    peak = _peak_rss_bytes(method)
    del result
    return {
        "route": route_name,
        "n": n_steps,
        "rss_before_mb": before / 2**20,
        "peak_rss_mb": peak / 2**20,
        "extra_peak_mb": (peak - before) / 2**20,
        "method": method,
    }


def peak_rss_in_subprocess(route_name: str, n_steps: int, threads: int = 1) -> dict[str, float]:
    """Run :func:`measure_peak_rss` in a fresh Python process (the data must be cached already)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-rss", route_name, "--n", str(n_steps)]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-rss", choices=["norms", "streaming", "vmap", "backward"], required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(measure_peak_rss(args.peak_rss, args.n, args.threads)))
