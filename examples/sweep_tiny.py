"""A tiny sweep, end to end
========================

A tiny sweep end to end: two learners x two seeds on CartPole, run on a local process pool, then aggregated.

The same config runs on a Ray cluster with ``run_sweep(..., backend="ray")`` (or ``pgvar sweep CONFIG --backend
ray``); rerunning it skips the finished units and resumes interrupted ones from their checkpoints.

Run: ``python examples/sweep_tiny.py`` (about a minute; ``PGVAR_EXAMPLE_SMOKE=1``: a few seconds).
"""

from __future__ import annotations

import os
import tempfile

from pgvar.experiments import SweepConfig, aggregate_results, run_sweep

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE") == "1"

CONFIG = {
    "name": "tiny",
    "envs": ["CartPole-v1"],
    "seeds": [0, 1],
    "total_timesteps": 256 if SMOKE else 20_000,
    "checkpoint_every": 128 if SMOKE else 5_000,
    "learners": {
        # pgvar's PPO with SB3's defaults, and the same PPO with no baseline and no normalization (REINFORCE-like)
        "PPO": {"algo": "PPO", "kwargs": {"n_steps": 128, "batch_size": 64}},
        "PPO-no-baseline": {
            "algo": "PPO",
            "kwargs": {"n_steps": 128, "batch_size": 64, "baseline": "none", "normalize_advantage": "none"},
        },
    },
}


def main() -> None:
    config = SweepConfig.from_dict(CONFIG)
    with tempfile.TemporaryDirectory() as results:
        state = run_sweep(config, results, workers=2)
        print(f"units: {state.done} done, {state.failed} failed")
        aggregate = aggregate_results(results, reps=1000)
        for row in aggregate.rows:
            print(
                f"{row['env']:>12} {row['learner']:>16}: mean {row['mean']:7.1f} "
                f"[{row['mean_low']:.1f}, {row['mean_high']:.1f}], IQM {row['iqm']:7.1f}, n = {row['n']}"
            )
        for (a, b), (point, low, high) in aggregate.improvement["CartPole-v1"].items():
            print(f"P({a} > {b}) = {point:.2f} [{low:.2f}, {high:.2f}]")


if __name__ == "__main__":
    main()
