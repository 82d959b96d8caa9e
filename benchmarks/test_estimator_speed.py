"""GAE on a [2048, 8] rollout: pgvar.estimators.gae_advantages vs SB3's RolloutBuffer, same data, same run.

Full run: ``python -m pytest benchmarks/test_estimator_speed.py --benchmark-enable -s`` (min of 200 calls each,
interleaved, one torch thread; prints the ratio). Smoke mode (benchmarks disabled, the default of the test
command): a few calls, no assertion on the ratio. Target (issue 3): pgvar is not slower (ratio <= 1).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer

from pgvar.estimators import gae_advantages

T, N, GAMMA, LAMBDA = 2048, 8, 0.99, 0.95


def _rollout() -> tuple[RolloutBuffer, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(0)
    buffer = RolloutBuffer(T, spaces.Box(-1, 1, (17,)), spaces.Box(-1, 1, (6,)), gamma=GAMMA, gae_lambda=LAMBDA, n_envs=N)
    buffer.rewards[:] = rng.normal(size=(T, N)).astype(np.float32)
    buffer.values[:] = rng.normal(size=(T, N)).astype(np.float32)
    buffer.episode_starts[:] = (rng.random((T, N)) < 1 / 1000).astype(np.float32)
    buffer.full = True
    return buffer, torch.tensor(rng.normal(size=N).astype(np.float32)), np.zeros(N, dtype=np.float32)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def test_gae_advantages_vs_sb3_rollout_buffer(benchmark):
    smoke = bool(benchmark.disabled)
    repeats = 3 if smoke else 200
    buffer, last_values, dones = _rollout()
    values = torch.from_numpy(buffer.values)
    next_values = torch.cat([values[1:], last_values[None]])
    terminated = torch.cat([torch.from_numpy(buffer.episode_starts[1:]), torch.from_numpy(dones)[None]])
    rewards = torch.from_numpy(buffer.rewards)

    def pgvar_gae():
        return gae_advantages(rewards, values, next_values, terminated, gamma=GAMMA, gae_lambda=LAMBDA)

    def sb3_gae():
        buffer.compute_returns_and_advantage(last_values, dones)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pgvar_s, sb3_s = float("inf"), float("inf")
        for _ in range(5):  # interleaved blocks, so that load from other processes hits both alike
            pgvar_s = min(pgvar_s, _best_of(pgvar_gae, max(1, repeats // 5)))
            sb3_s = min(sb3_s, _best_of(sb3_gae, max(1, repeats // 5)))
        benchmark.pedantic(pgvar_gae, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pgvar_gae(), torch.from_numpy(buffer.advantages))  # same numbers, bit for bit
    ratio = pgvar_s / sb3_s
    benchmark.extra_info.update(pgvar_ms=pgvar_s * 1e3, sb3_ms=sb3_s * 1e3, ratio=ratio, smoke=smoke)
    print(
        f"\nGAE on [{T}, {N}] float32 (min CPU time of {repeats} calls, 1 thread, torch {torch.__version__}): "
        f"pgvar {pgvar_s * 1e3:.2f} ms, SB3 RolloutBuffer {sb3_s * 1e3:.2f} ms, ratio {ratio:.3f}"
    )
    if not smoke:
        assert ratio <= 1.0, f"gae_advantages is slower than SB3's buffer: ratio {ratio:.3f}"
