"""The Mirage experiment with pgvar: TRPO against Q-Prop with consistent and with as-published normalization.

Tucker et al. (2018, "The Mirage of Action-Dependent Baselines", arXiv:1802.10031, Sec. 5) found that the
published Q-Prop divides its learning signal by the batch standard deviation but not its analytic term, which
turns the update into mostly the critic's DDPG-style gradient; with the normalization made consistent, Q-Prop
performed like TRPO (HalfCheetah-v1, 10 seeds, ~5M steps: as published 3247 +- 988, consistent 2025 +- 824,
TRPO 1905 +- 957). This script runs the three learners of that comparison with pgvar:

* ``TRPO``: :class:`pgvar.algos.TRPO`;
* ``QPropTRPO-consistent``: :class:`pgvar.algos.qprop.QPropTRPO`, ``qprop_normalization="consistent"``;
* ``QPropTRPO-as_published``: the same with ``qprop_normalization="as_published"``.

Settings (the official Q-Prop / Mirage ones where SB3 has them): ``n_steps`` 5000 per iteration (``--n-steps``),
gamma 0.99, GAE lambda 0.97, ``target_kl`` 0.01, policy 100x50 tanh (value net 100x50 tanh, SB3's TRPO critic
fitting instead of rllab's linear baseline), advantages normalized over the batch; Q-Prop: conservative eta with
the **per-sample** covariance (``--eta-scope sample``, the ``adapt1`` option both Mirage runs used), critic
100x100 ReLU, Adam 1e-3, batch 64, one critic step per environment step, tau 1e-3, replay 1e6, warm-up 1000.

Curve: return of the training episodes (Monitor, raw rewards), binned by timesteps, mean over seeds with a band of
+- one standard error. Table: per learner, the mean return of the training episodes that ended in the last 10% of
the timesteps, mean over seeds +- the 95% t-interval, and the time per environment step (wall and CPU of the
run's process, with the ratio to TRPO and where Q-Prop's time goes).

    python benchmarks/qprop_mirage.py --steps 1000000 --seeds 5 --workers 2      # the full comparison
    python benchmarks/qprop_mirage.py --steps 40000 --seeds 3 --n-steps 2000     # a small version (~10 min)
    python benchmarks/qprop_mirage.py --speed                                    # time per env step vs PPO/TRPO
    python benchmarks/qprop_mirage.py --smoke                                    # a check that it runs (< 60 s)

``--speed`` times QPropPPO / PPO and QPropTRPO / TRPO with their default hyperparameters (n_steps 2048, one
critic step per environment step) on HalfCheetah-v5: interleaved runs in this process, one thread, each on a fresh
model, minimum over ``--repeats``; CPU time of the process and wall time.

Writes the figure (``docs/_static/qprop_mirage.png`` by default, ``--out``) and a markdown table (``--table``,
default: printed only), and prints the seeds and versions.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium
import matplotlib
import numpy as np
import sb3_contrib
import stable_baselines3
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pgvar.algos import PPO, TRPO  # noqa: E402
from pgvar.algos.qprop import QPropPPO, QPropTRPO  # noqa: E402

LEARNERS = ("TRPO", "QPropTRPO-consistent", "QPropTRPO-as_published")
COLORS = {"TRPO": "tab:gray", "QPropTRPO-consistent": "tab:blue", "QPropTRPO-as_published": "tab:red"}
# Two-sided 95% t quantiles for df = 1..30 (no scipy dependency); df > 30 uses 1.96.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip
TIMED = ("collect_rollouts", "_prepare_qprop_rollout", "_train_policy", "_train_critic", "train")


def versions() -> str:
    import mujoco

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, stable-baselines3 "
        f"{stable_baselines3.__version__}, sb3-contrib {sb3_contrib.__version__}, gymnasium {gymnasium.__version__}, "
        f"mujoco {mujoco.__version__}, {os.cpu_count()} CPUs"
    )


class EpisodeLog(BaseCallback):
    """(timestep at which an episode ended, its return) for every training episode (Monitor's raw rewards)."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: list[tuple[int, float]] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:
                self.episodes.append((self.num_timesteps, float(info["episode"]["r"])))
        return True


def time_methods(model: Any, names: Sequence[str]) -> dict[str, float]:
    """Wrap the model's methods to add up the CPU time spent in each (the instance attribute shadows the class)."""
    totals = dict.fromkeys(names, 0.0)
    for name in names:
        if not hasattr(model, name):
            continue
        method = getattr(model, name)

        def timed(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return _method(*args, **kwargs)
            finally:
                totals[_name] += time.process_time() - start

        setattr(model, name, timed)
    return totals


def make_learner(name: str, env: Any, seed: int, n_steps: int, eta_scope: str, smoke: bool) -> Any:
    net = [16] if smoke else [100, 50]
    common = {
        "n_steps": n_steps,
        # value-function minibatches: the largest divisor of n_steps up to SB3's 128 (no truncated minibatch)
        "batch_size": max(d for d in range(1, 129) if n_steps % d == 0),
        "gamma": 0.99,
        "gae_lambda": 0.97,
        "target_kl": 0.01,
        "seed": seed,
        "policy_kwargs": {"net_arch": {"pi": net, "vf": net}, "activation_fn": torch.nn.Tanh},
    }
    if name == "TRPO":
        return TRPO("MlpPolicy", env, **common)
    normalization = name.split("-", 1)[1]
    qprop = {
        "qprop_eta": "conservative",
        "qprop_eta_scope": eta_scope,
        "qprop_normalization": normalization,
    }
    if smoke:
        qprop.update(qprop_critic_net_arch=[16, 16], qprop_warmup_steps=n_steps, qprop_buffer_size=10_000)
    return QPropTRPO("MlpPolicy", env, **common, **qprop)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one learner on one seed; return its episodes, timing and last Q-Prop logs."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*settotalmass.*")
    env_kwargs = {"max_episode_steps": job["max_episode_steps"]} if job["max_episode_steps"] else None
    env = make_vec_env(job["env"], n_envs=1, seed=job["seed"], env_kwargs=env_kwargs)
    model = make_learner(job["learner"], env, job["seed"], job["n_steps"], job["eta_scope"], job["smoke"])
    totals = time_methods(model, TIMED)
    log = EpisodeLog()
    wall, cpu = time.perf_counter(), time.process_time()
    model.learn(job["steps"], callback=log)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    logged = {k: float(v) for k, v in model.logger.name_to_value.items() if k.startswith("pgvar/")}
    return {**job, "episodes": log.episodes, "wall": wall, "cpu": cpu, "timesteps": model.num_timesteps,
            "method_cpu": totals, "logged": logged}  # fmt: skip


def final_return(result: dict[str, Any], fraction: float = 0.1) -> float:
    """Mean return of the training episodes that ended in the last ``fraction`` of the timesteps (at least one)."""
    episodes = result["episodes"]
    if not episodes:
        return float("nan")
    start = result["timesteps"] * (1 - fraction)
    late = [r for t, r in episodes if t > start] or [episodes[-1][1]]
    return float(np.mean(late))


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval (nan with one value)."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array.mean()), float("nan")
    df = len(array) - 1
    t = T_975[df - 1] if df <= len(T_975) else 1.96
    return float(array.mean()), float(t * array.std(ddof=1) / math.sqrt(len(array)))


def curve(result: dict[str, Any], edges: np.ndarray) -> np.ndarray:
    """Mean return of the episodes ending in each bin (carried forward over empty bins)."""
    values = np.full(len(edges) - 1, np.nan)
    times = np.array([t for t, _ in result["episodes"]])
    returns = np.array([r for _, r in result["episodes"]])
    for i in range(len(edges) - 1):
        mask = (times > edges[i]) & (times <= edges[i + 1])
        if mask.any():
            values[i] = returns[mask].mean()
        elif i > 0:
            values[i] = values[i - 1]
    return values


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    steps = max(r["timesteps"] for r in results)
    edges = np.linspace(0, steps, 21)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for learner in LEARNERS:
        runs = [curve(r, edges) for r in results if r["learner"] == learner]
        if not runs:
            continue
        stacked = np.vstack(runs)
        n = np.sum(~np.isnan(stacked), axis=0)
        with warnings.catch_warnings():  # bins before the first finished episode are all-nan
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(stacked, axis=0)
            spread = np.nanstd(stacked, axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
        sem = np.where(n > 1, spread / np.sqrt(np.maximum(n, 1)), 0.0)
        ax.plot(centers, mean, label=f"{learner} ({len(runs)} seeds)", color=COLORS[learner])
        ax.fill_between(centers, mean - sem, mean + sem, color=COLORS[learner], alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("training episode return")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict[str, Any]]) -> str:
    trpo = [r for r in results if r["learner"] == "TRPO"]
    trpo_cpu = np.mean([r["cpu"] / r["timesteps"] for r in trpo]) if trpo else float("nan")
    trpo_wall = np.mean([r["wall"] / r["timesteps"] for r in trpo]) if trpo else float("nan")
    lines = [
        "| learner | seeds | final return (mean +- 95% CI) | per seed | wall ms/step | CPU ms/step | CPU ratio to TRPO "
        "| CPU ms/step: collect / policy step / critic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for learner in LEARNERS:
        runs = [r for r in results if r["learner"] == learner]
        if not runs:
            continue
        finals = [final_return(r) for r in runs]
        mean, half = mean_interval(finals)
        def per_step(values: list[float], runs: list[dict[str, Any]] = runs) -> float:
            return float(np.mean([v / r["timesteps"] for v, r in zip(values, runs)]) * 1e3)

        wall, cpu = per_step([r["wall"] for r in runs]), per_step([r["cpu"] for r in runs])
        method = {name: per_step([r["method_cpu"].get(name, 0.0) for r in runs]) for name in TIMED}
        policy = method["_train_policy"] if learner != "TRPO" else method["train"]
        lines.append(
            f"| {learner} | {len(runs)} | {mean:.0f} +- {half:.0f} | {', '.join(f'{f:.0f}' for f in finals)} "
            f"| {wall:.2f} | {cpu:.2f} | {cpu / (trpo_cpu * 1e3):.2f} "
            f"| {method['collect_rollouts']:.2f} / {policy:.2f} / {method['_train_critic']:.2f} |"
        )
    lines.append(f"\n(TRPO wall {trpo_wall * 1e3:.2f} ms/step.)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- speed
def speed(env_id: str, steps: int, repeats: int, smoke: bool) -> str:
    """QPropPPO / PPO and QPropTRPO / TRPO per environment step, default hyperparameters, same process."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*settotalmass.*")
    small = {"n_steps": 128, "policy_kwargs": {"net_arch": [16]}} if smoke else {}
    qprop_small = {"qprop_critic_net_arch": [16, 16], "qprop_warmup_steps": 128, "qprop_buffer_size": 10_000} \
        if smoke else {}  # fmt: skip
    pairs = [(PPO, QPropPPO), (TRPO, QPropTRPO)]
    best: dict[str, dict[str, float]] = {}
    for repeat in range(repeats):
        for plain, qprop in pairs:
            order = (plain, qprop) if repeat % 2 == 0 else (qprop, plain)
            for cls in order:
                model = cls("MlpPolicy", make_vec_env(env_id, n_envs=1, seed=repeat), seed=repeat, **small,
                            **(qprop_small if cls in (QPropPPO, QPropTRPO) else {}))  # fmt: skip
                totals = time_methods(model, TIMED)
                wall, cpu = time.perf_counter(), time.process_time()
                model.learn(steps)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                record = {"wall": wall / steps * 1e3, "cpu": cpu / steps * 1e3,
                          **{name: value / steps * 1e3 for name, value in totals.items()}}  # fmt: skip
                previous = best.get(cls.__name__)
                if previous is None or record["cpu"] < previous["cpu"]:
                    best[cls.__name__] = record
    lines = [
        f"Time per environment step on {env_id}, {steps} steps per run, min over {repeats} runs (ms):",
        "| algorithm | wall | CPU | CPU ratio | wall ratio | collect | policy step | critic step | control variate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for plain, qprop in pairs:
        base = best[plain.__name__]
        for cls in (plain, qprop):
            r = best[cls.__name__]
            is_qprop = cls in (QPropPPO, QPropTRPO)
            policy = r["_train_policy"] if is_qprop else r["train"]
            lines.append(
                f"| {cls.__name__} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['cpu'] / base['cpu']:.2f} "
                f"| {r['wall'] / base['wall']:.2f} | {r['collect_rollouts']:.3f} | {policy:.3f} "
                f"| {r['_train_critic'] if is_qprop else 0.0:.3f} | {r['_prepare_qprop_rollout'] if is_qprop else 0.0:.3f} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=1_000_000, help="environment steps per run")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--n-steps", type=int, default=5000, help="environment steps per iteration")
    parser.add_argument("--eta-scope", choices=("sample", "batch"), default="sample")
    parser.add_argument("--learners", nargs="+", choices=LEARNERS, default=list(LEARNERS))
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "_static" / "qprop_mirage.png")
    parser.add_argument("--table", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every run's episodes and timings here")
    parser.add_argument("--speed", action="store_true", help="time per env step against PPO and TRPO instead")
    parser.add_argument("--speed-steps", type=int, default=3 * 2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that everything runs")
    args = parser.parse_args(argv)
    print(versions())
    if args.speed:
        text = speed(args.env, 256 if args.smoke else args.speed_steps, 1 if args.smoke else args.repeats, args.smoke)
        print(text)
        if args.table is not None:
            args.table.write_text(text + "\n")
        return text

    steps, n_steps, seeds = (512, 256, 1) if args.smoke else (args.steps, args.n_steps, args.seeds)
    jobs = [
        {"env": args.env, "learner": learner, "seed": args.first_seed + s, "steps": steps, "n_steps": n_steps,
         "eta_scope": args.eta_scope, "smoke": args.smoke, "max_episode_steps": 64 if args.smoke else None}
        for s in range(seeds) for learner in args.learners
    ]  # fmt: skip
    print(f"{len(jobs)} runs: {args.learners} x seeds {[j['seed'] for j in jobs[:: len(args.learners)]]}, {steps} steps, "
          f"n_steps {n_steps}, eta scope {args.eta_scope}, {args.workers} worker(s)")  # fmt: skip
    start = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(run_one, jobs, chunksize=1)
    else:
        results = [run_one(job) for job in jobs]
    elapsed = time.perf_counter() - start
    title = (f"{args.env}: TRPO vs Q-Prop (consistent / as published normalization)\n{seeds} seed(s), "
             f"{steps} steps, n_steps {n_steps}, conservative eta, {args.eta_scope} scope")  # fmt: skip
    plot(results, args.out, title)
    if args.json is not None:
        args.json.write_text(json.dumps(results))
    text = table(results) + f"\n\nTotal wall time {elapsed:.0f} s; figure: {args.out}"
    print(text)
    if args.table is not None:
        args.table.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
