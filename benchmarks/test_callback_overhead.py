"""Overhead of GradientVarianceCallback (measuring at every update) on SB3's own PPO, as a time ratio.

``PPO.learn`` with the callback and without it, on the same machine in the same run, interleaved (the order
alternates between repeats), each run on a freshly built, identically seeded model; the ratio is
``min(with) / min(without)`` over the repeats. Target: ratio <= 1.5 at SB3's default PPO hyperparameters.

Two clocks: wall time, and the process's CPU time (``time.process_time``; one torch thread and SB3's
in-process ``DummyVecEnv``, so it counts all the work). On a machine shared with other jobs the wall time of
identical runs varies by tens of percent while the CPU time barely moves, so the assertion uses the CPU-time
ratio; both are printed and stored in ``extra_info``.

Full run (about 5 minutes)::

    python -m pytest benchmarks/test_callback_overhead.py --benchmark-enable -s

Smoke mode (tiny sizes, no assertion on the ratio, well under a minute) when ``PGVAR_BENCH_SMOKE=1`` or when
benchmarks are disabled (the default ``--benchmark-disable`` in ``pyproject.toml``).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from pgvar.callbacks import GradientVarianceCallback
from pgvar.compare import library_versions

SEED = 0
TARGET_RATIO = 1.5
ENV_IDS = ["CartPole-v1", "HalfCheetah-v5"]

# SB3's default PPO (n_steps 2048, batch 64, 10 epochs, net_arch 64x64) for the real measurement.
FULL = {"model": {}, "n_updates": 2, "repeats": 5}
SMOKE = {
    "model": {"n_steps": 64, "batch_size": 32, "n_epochs": 2, "policy_kwargs": {"net_arch": [16]}},
    "n_updates": 1,
    "repeats": 1,
}




class _TimedCallback(GradientVarianceCallback):
    """Also adds up the CPU seconds spent in ``on_rollout_end`` (the measurement; the hooks run inside train())."""

    cpu_seconds_in_rollout_end = 0.0

    def _on_rollout_end(self) -> None:
        start = time.process_time()
        super()._on_rollout_end()
        self.cpu_seconds_in_rollout_end += time.process_time() - start


def _timed_learn(
    env_id: str, model_kwargs: dict[str, Any], n_updates: int, with_callback: bool
) -> tuple[float, float, float]:
    """``(wall s, CPU s)`` of ``model.learn`` (model construction excluded) for ``n_updates`` rollouts + updates,
    and the CPU seconds of it spent in the callback's ``on_rollout_end``."""
    env = make_vec_env(env_id, n_envs=1, seed=SEED)
    model = PPO("MlpPolicy", env, seed=SEED, device="cpu", **model_kwargs)
    callback = _TimedCallback(every_n_updates=1) if with_callback else None
    wall, cpu = time.perf_counter(), time.process_time()
    model.learn(n_updates * model.n_steps, callback=callback)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    env.close()
    return wall, cpu, (callback.cpu_seconds_in_rollout_end if callback is not None else 0.0)


def measure_overhead(env_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """Interleaved timings with and without the callback; returns the minima, the ratios and the setup."""
    _timed_learn(env_id, config["model"], 1, True)  # warm-up: imports, env registration, first vmap trace
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    in_rollout_end: list[float] = []
    for repeat in range(config["repeats"]):
        for with_callback in (False, True) if repeat % 2 == 0 else (True, False):
            seconds, cpu_seconds, measuring = _timed_learn(
                env_id, config["model"], config["n_updates"], with_callback
            )
            wall[with_callback].append(seconds)
            cpu[with_callback].append(cpu_seconds)
            if with_callback:
                in_rollout_end.append(measuring)
    return {
        "env_id": env_id,
        "cpu_seconds_without": min(cpu[False]),
        "cpu_seconds_with": min(cpu[True]),
        "ratio": min(cpu[True]) / min(cpu[False]),
        "wall_seconds_without": min(wall[False]),
        "wall_seconds_with": min(wall[True]),
        "wall_ratio": min(wall[True]) / min(wall[False]),
        # The measurement's own CPU time per update (the grad-norm hooks run inside train(), not counted here).
        "rollout_end_cpu_s_per_update": min(in_rollout_end) / config["n_updates"],
        "all_cpu_without": cpu[False],
        "all_cpu_with": cpu[True],
        "all_wall_without": wall[False],
        "all_wall_with": wall[True],
        "n_updates": config["n_updates"],
        "repeats": config["repeats"],
        "model_kwargs": repr(config["model"]),
        "torch_threads": torch.get_num_threads(),
        "seed": SEED,
        **library_versions(),
    }




@pytest.mark.slow
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_callback_overhead_on_sb3_ppo(benchmark, env_id, smoke):
    config = SMOKE if smoke else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = benchmark.pedantic(measure_overhead, args=(env_id, config), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(result)
    benchmark.extra_info["smoke"] = smoke
    print(
        f"\n{env_id}: PPO.learn({result['n_updates']} updates) CPU time without {result['cpu_seconds_without']:.3f} s, "
        f"with GradientVarianceCallback {result['cpu_seconds_with']:.3f} s, ratio {result['ratio']:.3f}; "
        f"wall {result['wall_seconds_without']:.3f} s / {result['wall_seconds_with']:.3f} s, "
        f"ratio {result['wall_ratio']:.3f}; measurement {1e3 * result['rollout_end_cpu_s_per_update']:.1f} ms "
        f"CPU per update (min of {result['repeats']}, smoke={smoke}, seed {SEED}, {library_versions()})"
    )
    assert result["cpu_seconds_without"] > 0 and result["cpu_seconds_with"] > 0
    if not smoke:
        assert result["ratio"] <= TARGET_RATIO, result


if __name__ == "__main__":  # python benchmarks/test_callback_overhead.py [--smoke]
    import sys

    torch.set_num_threads(1)
    chosen = SMOKE if "--smoke" in sys.argv else FULL
    print(library_versions(), f"seed {SEED}")
    print(
        f"{'env':<16} {'CPU without (s)':>16} {'CPU with (s)':>13} {'ratio':>7} {'wall ratio':>11} {'ms/update':>10}"
    )
    for env_name in ENV_IDS:
        row = measure_overhead(env_name, chosen)
        print(
            f"{env_name:<16} {row['cpu_seconds_without']:>16.3f} {row['cpu_seconds_with']:>13.3f} "
            f"{row['ratio']:>7.3f} {row['wall_ratio']:>11.3f} {1e3 * row['rollout_end_cpu_s_per_update']:>10.1f}"
        )
