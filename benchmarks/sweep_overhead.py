"""What a sweep costs beyond training: the overhead of one unit, and units per hour with 1 and 2 workers.

1. Overhead: one sweep unit (PPO on CartPole-v1, seed 0, checkpoints every ``--checkpoint-every`` steps, curve,
   final model and result written atomically) against the same ``PPO.learn`` in the same process, CPU time of the
   process, min over ``--repeats``. Target (issue 13): under 5% for a 50k-step run.
2. Scaling: a sweep of ``--units`` such units of ``--scaling-steps`` steps, on the local backend and on Ray, with 1
   and 2 workers: units per hour (wall clock).

Run: ``python benchmarks/sweep_overhead.py`` (about 10 minutes here; ``--steps 5000 --units 2`` for a quick look).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def unit_config(steps: int, checkpoint_every: int, seeds: list[int]) -> dict:
    return {
        "name": "overhead", "envs": ["CartPole-v1"], "seeds": seeds, "total_timesteps": steps,
        "checkpoint_every": checkpoint_every, "learners": {"PPO": {"algo": "PPO", "kwargs": {}}},
    }  # fmt: skip


def overhead(steps: int, checkpoint_every: int, repeats: int) -> tuple[float, float]:
    from stable_baselines3.common.env_util import make_vec_env

    from pgvar import PPO
    from pgvar.experiments import SweepConfig, run_unit

    unit = SweepConfig.from_dict(unit_config(steps, checkpoint_every, [0])).units()[0]
    plain, swept = [], []
    for _ in range(repeats):
        start = time.process_time()
        env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
        PPO("MlpPolicy", env, seed=0, device="cpu").learn(steps)
        plain.append(time.process_time() - start)
        with tempfile.TemporaryDirectory() as results:
            start = time.process_time()
            run_unit(unit, results)
            swept.append(time.process_time() - start)
    return min(plain), min(swept)


def units_per_hour(backend: str, workers: int, n_units: int, steps: int) -> float:
    from pgvar.experiments import SweepConfig, run_sweep

    config = SweepConfig.from_dict(unit_config(steps, steps, list(range(n_units))))
    with tempfile.TemporaryDirectory() as results:
        start = time.perf_counter()
        state = run_sweep(config, results, backend=backend, workers=workers)
        elapsed = time.perf_counter() - start
    assert state.failed == 0, state.failures
    return n_units / elapsed * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--checkpoint-every", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--scaling-steps", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plain, swept = overhead(args.steps, args.checkpoint_every, args.repeats)
    print(f"overhead: PPO.learn({args.steps}) {plain:.2f} s CPU, sweep unit {swept:.2f} s CPU, "
          f"ratio {swept / plain:.3f} (min of {args.repeats}; checkpoint every {args.checkpoint_every})")  # fmt: skip
    for backend in ("local", "ray"):
        for workers in (1, 2):
            rate = units_per_hour(backend, workers, args.units, args.scaling_steps)
            print(f"scaling: {backend}, {workers} worker(s): {rate:.0f} units/hour "
                  f"({args.units} units of {args.scaling_steps} steps)")  # fmt: skip


if __name__ == "__main__":
    main()
