"""Learning curves of EntropyPG and SoftQ (pgvar.algos.soft_q) on CartPole-v1 and Acrobot-v1.

Every learner shares every hyperparameter (below); they differ only in the loss and the network.
``EntropyPG`` is ``EntropyPG("MlpPolicy")``: an A2C on the KL-regularized return, with SB3's actor-critic
network. ``SoftQ`` is ``SoftQ("MlpPolicy")``: on-policy n-step soft Q-learning with a Q-network and its Boltzmann
policy (Schulman, Chen, Abbeel 2017, arXiv:1704.06440, Sec. 4). ``SoftQ-dueling`` is ``SoftQ("DuelingMlpPolicy")``:
SoftQ on SB3's actor-critic network read as Q = V + tau log(pi / pi_ref), the paper's Sec. 6.3. It has the same
network as EntropyPG, so it takes the same expected update. ``--learners EntropyPG-qnet`` adds EntropyPG on
SoftQ's Q-network.

The curve is the return of the training episodes (the stochastic policy the learner acts with, raw rewards from
SB3's Monitor), averaged in bins of timesteps, mean over seeds with the min-max band. The table gives, per env
and learner: the mean return of the episodes finished in the last 10% of the timesteps, and of 10 evaluation
episodes of the final stochastic policy, as mean +- standard deviation over seeds, and the wall time per run.

    python benchmarks/soft_q_learning.py                 # 3 seeds x 2 envs x 3 learners, 50k steps each
    python benchmarks/soft_q_learning.py --smoke         # 1 seed, 4k steps: a check that it runs (< 60 s)

Writes the figure (``docs/_static/soft_q_curves.png`` by default) and a markdown table (``--table``, default:
printed only), and prints the seeds and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import gymnasium
import matplotlib
import numpy as np
import stable_baselines3
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pgvar.algos.soft_q import EntropyPG, SoftQ  # noqa: E402

LEARNERS = {
    "EntropyPG": (EntropyPG, "MlpPolicy"),
    "SoftQ": (SoftQ, "MlpPolicy"),
    "SoftQ-dueling": (SoftQ, "DuelingMlpPolicy"),
    "EntropyPG-qnet": (EntropyPG, "SoftQMlpPolicy"),
}
DEFAULT_LEARNERS = ["EntropyPG", "SoftQ-dueling", "SoftQ"]
ENVS = ["CartPole-v1", "Acrobot-v1"]
DOCS_FIGURE = REPO / "docs" / "_static" / "soft_q_curves.png"
#: Shared by every learner. Rewards are normalized by a running estimate of the return's std (SB3's
#: VecNormalize, observations untouched), so that the Q-network's outputs stay of order 1: tau is in those units.
HYPERPARAMETERS = dict(n_steps=8, learning_rate=1e-3, gamma=0.99, tau=0.02, n_step=None)
N_ENVS = 8
FULL = dict(timesteps=50_000, seeds=[0, 1, 2], n_bins=25, eval_episodes=10)
# Smoke: 4096 steps = one full 500-step Acrobot episode per env.
SMOKE = dict(timesteps=4_096, seeds=[0], n_bins=4, eval_episodes=1)


class EpisodeReturns(BaseCallback):
    """Collects ``(timestep, raw return)`` of every finished training episode (from SB3's Monitor info)."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: list[tuple[int, float]] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.episodes.append((self.num_timesteps, float(info["episode"]["r"])))
        return True


def run_one(env_id: str, learner: str, seed: int, timesteps: int, eval_episodes: int) -> dict:
    cls, policy = LEARNERS[learner]
    env = VecNormalize(
        make_vec_env(env_id, n_envs=N_ENVS, seed=seed),
        norm_obs=False,
        norm_reward=True,
        gamma=HYPERPARAMETERS["gamma"],
    )
    model = cls(policy, env, seed=seed, **HYPERPARAMETERS)
    recorder = EpisodeReturns()
    start = time.perf_counter()
    model.learn(timesteps, callback=recorder)
    seconds = time.perf_counter() - start
    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + 1000)
    eval_returns, _ = evaluate_policy(
        model, eval_env, n_eval_episodes=eval_episodes, deterministic=False, return_episode_rewards=True
    )
    episodes = np.array(recorder.episodes, dtype=np.float64).reshape(-1, 2)
    tail = episodes[episodes[:, 0] > 0.9 * timesteps, 1]
    return dict(
        env=env_id,
        learner=learner,
        seed=seed,
        seconds=seconds,
        episodes=episodes,
        final=float(tail.mean()) if len(tail) else float("nan"),
        eval=float(np.mean(eval_returns)),
    )


def binned_curve(episodes: np.ndarray, timesteps: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean return of the episodes finished in each of ``n_bins`` equal timestep bins (NaN for an empty bin)."""
    edges = np.linspace(0, timesteps, n_bins + 1)
    centers = 0.5 * (edges[1:] + edges[:-1])
    which = np.clip(np.searchsorted(edges, episodes[:, 0], side="left") - 1, 0, n_bins - 1)
    means = np.array(
        [episodes[which == b, 1].mean() if np.any(which == b) else np.nan for b in range(n_bins)]
    )
    return centers, means


def mean_std(values: Sequence[float]) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.1f} +- {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def table(results: list[dict], envs: Sequence[str], learners: Sequence[str]) -> str:
    lines = [
        "| env | learner | return, last 10% of training | return, final policy (eval) | wall time per run |",
        "|---|---|---|---|---|",
    ]
    for env_id in envs:
        for learner in learners:
            rows = [r for r in results if r["env"] == env_id and r["learner"] == learner]
            lines.append(
                f"| {env_id} | {learner} | {mean_std([r['final'] for r in rows])} | "
                f"{mean_std([r['eval'] for r in rows])} | {np.mean([r['seconds'] for r in rows]):.0f} s |"
            )
    return "\n".join(lines)


def plot(
    results: list[dict], envs: Sequence[str], learners: Sequence[str], timesteps: int, n_bins: int, path: Path
) -> None:
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        for learner in learners:
            curves = [
                binned_curve(r["episodes"], timesteps, n_bins)
                for r in results
                if r["env"] == env_id and r["learner"] == learner
            ]
            centers, values = curves[0][0], np.stack([c[1] for c in curves])
            with warnings.catch_warnings():  # a bin without a finished episode is NaN: leave a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                line = ax.plot(centers, np.nanmean(values, 0), label=f"{learner} ({len(curves)} seeds)")[0]
                ax.fill_between(
                    centers, np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.2
                )
        ax.set_title(env_id)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training episode return")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(
        f"KL-regularized PG vs soft Q-learning (tau={HYPERPARAMETERS['tau']}, {N_ENVS} envs x "
        f"{HYPERPARAMETERS['n_steps']} steps, lr {HYPERPARAMETERS['learning_rate']})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> str:
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, stable-baselines3 "
        f"{stable_baselines3.__version__}, gymnasium {gymnasium.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, 4k steps: check that everything runs")
    parser.add_argument("--envs", nargs="+", default=ENVS)
    parser.add_argument("--learners", nargs="+", default=DEFAULT_LEARNERS, choices=list(LEARNERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--timesteps", type=int, default=None, help="per run (default 50k; smoke 4k)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="figure path (default docs/_static/soft_q_curves.png; smoke: a temporary file)",
    )
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    config = dict(SMOKE if args.smoke else FULL)
    seeds = args.seeds if args.seeds is not None else config["seeds"]
    timesteps = args.timesteps if args.timesteps is not None else config["timesteps"]
    if args.out is None:  # a smoke run never overwrites the documented figure
        args.out = Path(tempfile.gettempdir()) / "soft_q_curves_smoke.png" if args.smoke else DOCS_FIGURE
    torch.set_num_threads(int(os.environ.get("PGVAR_BENCH_THREADS", "1")))

    command = "python benchmarks/soft_q_learning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command.strip()}\n# seeds {seeds}, {timesteps} steps per run; {versions()}", flush=True)
    print(
        f"# hyperparameters (all learners): {HYPERPARAMETERS}, {N_ENVS} envs, reward normalization",
        flush=True,
    )
    results = []
    for env_id in args.envs:
        for learner in args.learners:
            for seed in seeds:
                result = run_one(env_id, learner, seed, timesteps, config["eval_episodes"])
                results.append(result)
                print(
                    f"{env_id:12s} {learner:15s} seed {seed}: last-10% return {result['final']:8.1f}, "
                    f"eval {result['eval']:8.1f}, {result['seconds']:.0f} s",
                    flush=True,
                )
    text = table(results, args.envs, args.learners)
    print(text)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(f"Command: `{command.strip()}`; seeds {seeds}; {versions()}.\n\n{text}\n")
    plot(results, args.envs, args.learners, timesteps, config["n_bins"], args.out)
    print(f"figure: {args.out}")
    return results


if __name__ == "__main__":
    main()
