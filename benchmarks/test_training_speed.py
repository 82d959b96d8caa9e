"""Time of ``pgvar.PPO`` against ``stable_baselines3.PPO`` at equal settings, as a ratio.

Both train the same seeded model on the same environment (their results are bit-for-bit equal with the
defaults, ``tests/algos/test_parity.py``), so any difference is pgvar's overhead: the estimator calls in the
rollout buffer (``pgvar.estimators.gae_advantages`` and the reward check). Runs are interleaved (the order
alternates between repeats), each on a freshly built model in a fresh process (spawned, one torch thread, a
warm-up ``learn`` first): in one long-lived process whichever class ran later was about 10% slower in every C
function, mj_step included (NOTES.md), which biased ``min`` toward the class measured first. The ratio is
``min(pgvar) / min(SB3)`` over the repeats, for the wall time and for the CPU time of the measuring process; the
median of the per-repeat ratios is reported beside it.
Target: ratio <= 1.03 with the default arguments. The assertion uses the CPU-time ratio: on a machine shared
with other jobs the wall time of a run depends on the CPU share it happens to get (wall ratios from 0.8 to 1.3
were seen for identical code), while the CPU time counts only this process's work; both are reported.

A second benchmark times the only code that differs, ``compute_returns_and_advantage`` of a 2048 x 1 buffer.

Full run (SB3's default PPO hyperparameters, about 4 minutes)::

    python -m pytest benchmarks/test_training_speed.py --benchmark-enable -s

Smoke mode (tiny sizes, no assertion on the ratio, well under a minute) when ``PGVAR_BENCH_SMOKE=1`` or when
benchmarks are disabled (the default ``--benchmark-disable`` in ``pyproject.toml``).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
import stable_baselines3
import torch
from stable_baselines3.common.env_util import make_vec_env

import pgvar.algos
from pgvar.compare import library_versions

SEED = 0
TARGET_RATIO = 1.03
ENV_IDS = ["CartPole-v1", "HalfCheetah-v5"]
CLASSES = {"sb3": stable_baselines3.PPO, "pgvar": pgvar.algos.PPO}

# SB3's default PPO (n_steps 2048, batch 64, 10 epochs, net_arch 64x64) for the real measurement.
FULL = {"model": {}, "n_updates": 1, "repeats": 7}
SMOKE = {
    "model": {"n_steps": 64, "batch_size": 32, "n_epochs": 2, "policy_kwargs": {"net_arch": [16]}},
    "n_updates": 1,
    "repeats": 1,
}




def _timed_learn(library: str, env_id: str, model_kwargs: dict[str, Any], n_updates: int) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of ``model.learn`` (construction excluded) for ``n_updates`` rollouts and updates."""
    env = make_vec_env(env_id, n_envs=1, seed=SEED)
    model = CLASSES[library]("MlpPolicy", env, seed=SEED, device="cpu", **model_kwargs)
    wall, cpu = time.perf_counter(), time.process_time()
    model.learn(n_updates * model.n_steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    env.close()
    return wall, cpu


def _warm_then_timed_learn(library: str, env_id: str, model_kwargs: dict[str, Any], n_updates: int) -> tuple[float, float]:
    """In a fresh process: one thread, a small warm-up ``learn`` (imports, env registration, first calls), then
    :func:`_timed_learn`."""
    torch.set_num_threads(1)
    _timed_learn(library, env_id, SMOKE["model"], 1)
    return _timed_learn(library, env_id, model_kwargs, n_updates)


def _timed_learn_in_fresh_process(
    library: str, env_id: str, model_kwargs: dict[str, Any], n_updates: int
) -> tuple[float, float]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_warm_then_timed_learn, library, env_id, model_kwargs, n_updates).result()


def measure_speed_ratio(env_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """Interleaved timings of SB3's and pgvar's PPO, each in a fresh process; returns the minima, the ratios and
    the setup."""
    wall: dict[str, list[float]] = {library: [] for library in CLASSES}
    cpu: dict[str, list[float]] = {library: [] for library in CLASSES}
    for repeat in range(config["repeats"]):
        for library in ("sb3", "pgvar") if repeat % 2 == 0 else ("pgvar", "sb3"):
            wall_s, cpu_s = _timed_learn_in_fresh_process(library, env_id, config["model"], config["n_updates"])
            wall[library].append(wall_s)
            cpu[library].append(cpu_s)
    return {
        "median_cpu_ratio": statistics.median(p / s for p, s in zip(cpu["pgvar"], cpu["sb3"])),
        "env_id": env_id,
        "seconds_sb3": min(wall["sb3"]),
        "seconds_pgvar": min(wall["pgvar"]),
        "ratio": min(wall["pgvar"]) / min(wall["sb3"]),
        "cpu_seconds_sb3": min(cpu["sb3"]),
        "cpu_seconds_pgvar": min(cpu["pgvar"]),
        "cpu_ratio": min(cpu["pgvar"]) / min(cpu["sb3"]),
        "all_wall": wall,
        "all_cpu": cpu,
        "n_updates": config["n_updates"],
        "repeats": config["repeats"],
        "model_kwargs": repr(config["model"]),
        "torch_threads": torch.get_num_threads(),
        "seed": SEED,
        **library_versions(),
    }


def measure_buffer_ratio(repeats: int) -> dict[str, Any]:
    """CPU time of ``compute_returns_and_advantage`` on a 2048 x 1 rollout: SB3's numpy loop vs pgvar's."""
    import numpy as np
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    from pgvar.algos import EstimatorRolloutBuffer

    rng = np.random.default_rng(SEED)
    rewards, values = rng.standard_normal((2048, 1)), rng.standard_normal((2048, 1))
    starts = rng.random((2048, 1)) < 0.02
    seconds = {}
    for name, cls in (("sb3", RolloutBuffer), ("pgvar", EstimatorRolloutBuffer)):
        buffer = cls(2048, spaces.Box(-1, 1, (4,)), spaces.Discrete(2), device="cpu", gamma=0.99, gae_lambda=0.95)
        buffer.rewards[:], buffer.values[:], buffer.episode_starts[:] = rewards, values, starts
        times = []
        for _ in range(repeats):
            start = time.process_time()
            buffer.compute_returns_and_advantage(torch.zeros(1, 1), np.zeros(1, dtype=bool))
            times.append(time.process_time() - start)
        seconds[name] = min(times)
    return {"cpu_seconds_sb3": seconds["sb3"], "cpu_seconds_pgvar": seconds["pgvar"],
            "ratio": seconds["pgvar"] / seconds["sb3"], "repeats": repeats, **library_versions()}




@pytest.mark.slow
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_pgvar_ppo_trains_as_fast_as_sb3_ppo(benchmark, env_id, smoke):
    config = SMOKE if smoke else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = benchmark.pedantic(measure_speed_ratio, args=(env_id, config), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(result)
    benchmark.extra_info["smoke"] = smoke
    print(
        f"\n{env_id}: PPO.learn({result['n_updates']} x {result['model_kwargs']}) wall: stable_baselines3 "
        f"{result['seconds_sb3']:.3f} s, pgvar {result['seconds_pgvar']:.3f} s, ratio {result['ratio']:.3f}; "
        f"CPU: {result['cpu_seconds_sb3']:.3f} s, {result['cpu_seconds_pgvar']:.3f} s, ratio "
        f"{result['cpu_ratio']:.3f}, median of the per-repeat ratios {result['median_cpu_ratio']:.3f} (min of "
        f"{result['repeats']}, each in a fresh process; smoke={smoke}, seed {SEED}, {library_versions()})"
    )
    assert result["seconds_sb3"] > 0 and result["seconds_pgvar"] > 0
    if not smoke:
        assert result["cpu_ratio"] <= TARGET_RATIO, result


def test_estimator_buffer_vs_sb3_buffer(benchmark, smoke):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = benchmark.pedantic(measure_buffer_ratio, args=(3 if smoke else 50,), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(result)
    print(
        f"\ncompute_returns_and_advantage, 2048 x 1: stable_baselines3 {result['cpu_seconds_sb3'] * 1e3:.2f} ms, "
        f"pgvar {result['cpu_seconds_pgvar'] * 1e3:.2f} ms, ratio {result['ratio']:.3f} (CPU, min of "
        f"{result['repeats']})"
    )
    if not smoke:
        assert result["ratio"] <= TARGET_RATIO, result


if __name__ == "__main__":  # python benchmarks/test_training_speed.py [--smoke]
    import sys

    torch.set_num_threads(1)
    chosen = SMOKE if "--smoke" in sys.argv else FULL
    print(library_versions(), f"seed {SEED}")
    print(f"{'env':<16} {'SB3 wall (s)':>12} {'pgvar wall (s)':>14} {'ratio':>6} {'CPU ratio':>9}")
    for env_name in ENV_IDS:
        row = measure_speed_ratio(env_name, chosen)
        print(f"{env_name:<16} {row['seconds_sb3']:>12.3f} {row['seconds_pgvar']:>14.3f} {row['ratio']:>6.3f} "
              f"{row['cpu_ratio']:>9.3f}")
