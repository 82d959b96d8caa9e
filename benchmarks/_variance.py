"""The variance suite's configuration: environments, checkpoints, estimators, sizes, and one group's numbers.

A *group* is one environment (or exact problem) at one policy checkpoint. Its batches are sampled once and every
estimator is measured on the same batches (:func:`pgvar.compare.sample_problem_estimates`,
:func:`pgvar.compare.sample_env_estimates`); :func:`group_rows` turns them into one JSON-ready row per estimator
(the ``extra_info`` of its benchmark). The suite's estimator names (:data:`SUITE_ESTIMATORS`) map to the names of
the two engines; the reference of every group is ``value`` (learned V + GAE(0.95), SB3's default, unnormalized).

Sizes (``--variance-size`` or ``PGVAR_VARIANCE_SIZE``; the smoke size when pytest-benchmark is disabled, as in the
README's test command): see :data:`SIZES`. Checkpoints are trained by :func:`checkpoint` with :class:`pgvar.PPO` and
a fixed seed, and cached under ``.benchmarks/pgvar-variance/`` (``--variance-model ENV_ID=PATH`` uses a saved zip
instead, as the only checkpoint ``user`` of that environment).
"""

from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgvar.compare import (
    PROBLEMS,
    PairedEstimates,
    applicable_env_estimators,
    applicable_problem_estimators,
    estimator_metrics,
    library_versions,
    sample_env_estimates,
    sample_problem_estimates,
)
from pgvar.compare.results import safe_ratio

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".benchmarks" / "pgvar-variance"
SEED = 0
THREADS = int(os.environ.get("PGVAR_BENCH_THREADS", "1"))
REFERENCE = "value"
#: |bias z| at or above this on an exact problem flags an estimator as biased (the acceptance bound).
BIAS_Z = 4.0


@dataclass(frozen=True)
class SuiteEstimator:
    """One estimator of the suite: its problem-engine and env-engine names and whether it is unbiased in theory."""

    name: str
    problem: str | None
    env: str | None
    unbiased: bool
    note: str = ""


#: The suite's estimators, in table order (``None``: the engine has no such row).
SUITE_ESTIMATORS: tuple[SuiteEstimator, ...] = (
    SuiteEstimator("none", "none", "none", True, "REINFORCE, no baseline"),
    SuiteEstimator("mean", "mean", "mean", False, "same-batch mean: O(1/N) bias"),
    SuiteEstimator("optimal", "optimal", "optimal", False, "same-batch optimal constant, unnormalized: O(1/N) bias"),
    SuiteEstimator("value", "gae_fitted_value", "value", False, "learned V + GAE(0.95) (reference); problems: V fitted"),
    SuiteEstimator("value_lambda1", "gae1_fitted_value", "value_lambda1", True, "learned V + GAE(1)"),
    SuiteEstimator("true_value", "exact_value", "mc_value", True, "problems: exact V; envs: Monte Carlo V by state restore"),
    SuiteEstimator("horizon_value", "horizon_value", "horizon_value", False, "horizon-aware V + GAE(0.95)"),
    SuiteEstimator("qprop_fixed", "qprop_fixed_eta", "qprop_fixed_eta", True, "Q-Prop, eta = 1"),
    SuiteEstimator("qprop_conservative", "qprop_fitted_critic", "qprop_fitted_critic", True, "Q-Prop, conservative eta, cross-fitted"),
    SuiteEstimator("qprop_adaptive", "qprop_adaptive_eta", "qprop_adaptive_eta", True, "Q-Prop, adaptive eta, cross-fitted"),
    SuiteEstimator("qprop_consistent", "qprop_consistent", "qprop_consistent", False, "Q-Prop normalized consistently: O(1/N) centring bias"),
    SuiteEstimator("qprop_as_published", "qprop_as_published", "qprop_as_published", False, "Q-Prop normalized as published: biased"),
    SuiteEstimator("all_action", "all_action", "all_action", True, "all-action control variate (Discrete)"),
    SuiteEstimator("factorized", "factorized_baseline", "factorized_baseline", True, "factorized action-dependent baseline (Box, K >= 2)"),
)  # fmt: skip
BY_NAME = {e.name: e for e in SUITE_ESTIMATORS}
#: On Discrete actions every Q-Prop eta rule is the all-action control variate (it has no eta): these rows would
#: repeat ``all_action`` and are left out there.
DISCRETE_DUPLICATES = ("qprop_fixed", "qprop_conservative", "qprop_adaptive")

PROBLEM_GROUPS = ("tabular", "bandit", "lqr")
#: Environments and their training budget (steps) of the ``late`` checkpoint at the full size.
ENVIRONMENTS: dict[str, int] = {
    "CartPole-v1": 50_000,
    "Acrobot-v1": 50_000,
    "Pendulum-v1": 100_000,
    "HalfCheetah-v5": 100_000,
    "Hopper-v5": 100_000,
    "Humanoid-v5": 50_000,
}
#: Fraction of the budget of each checkpoint (Humanoid: ``late`` only, it is slow).
CHECKPOINTS = {"early": 0.1, "middle": 0.5, "late": 1.0}
ONE_CHECKPOINT = {"Humanoid-v5": ("late",)}
MUJOCO = ("HalfCheetah-v5", "Hopper-v5", "Humanoid-v5")


@dataclass(frozen=True)
class Size:
    """Sizes of one run of the suite."""

    name: str
    problem_batch: int
    problem_batches: int
    n_envs: int
    n_steps: int
    env_batches: int
    reference_batches: int
    fit_steps: int
    budget_scale: float  # times ENVIRONMENTS' budgets
    rounds: int  # benchmark rounds per estimator
    environments: tuple[str, ...]
    checkpoints: tuple[str, ...]
    mc_rollouts: int = 4
    mc_horizon: int = 64
    mc_envs: tuple[str, ...] = ()  # environments whose groups include the Monte Carlo V row
    extra: dict[str, Any] = field(default_factory=dict)


SIZES: dict[str, Size] = {
    # Seconds: every code path once (problems, one Discrete and one Box env, untrained policies).
    "smoke": Size("smoke", 8, 4, 2, 16, 3, 2, 20, 0.0, 1, ("CartPole-v1", "Pendulum-v1"), ("early",),
                  mc_rollouts=1, mc_horizon=4, mc_envs=("CartPole-v1",)),
    # Minutes: what docs/results.md is generated from.
    "small": Size("small", 16, 100, 4, 128, 10, 10, 300, 0.2, 3, tuple(ENVIRONMENTS), ("early", "late"),
                  mc_rollouts=2, mc_horizon=16, mc_envs=("CartPole-v1",)),
    # The default full suite: 30 batches of 2048 steps per group.
    "full": Size("full", 32, 200, 8, 256, 30, 30, 1000, 1.0, 5, tuple(ENVIRONMENTS), tuple(CHECKPOINTS)),
}  # fmt: skip


def size_name(config: Any) -> str:
    """The size of this run: ``--variance-size``, else ``PGVAR_VARIANCE_SIZE``, else smoke when benchmarks are
    disabled (the README's test command) and full when they are enabled."""
    chosen = None
    try:
        chosen = config.getoption("variance_size")
    except ValueError:
        pass
    chosen = chosen or os.environ.get("PGVAR_VARIANCE_SIZE")
    if chosen:
        if chosen not in SIZES:
            raise ValueError(f"--variance-size must be one of {sorted(SIZES)}, got {chosen!r}")
        return chosen
    from conftest import is_smoke

    return "smoke" if is_smoke(config) else "full"


def user_models(config: Any) -> dict[str, str]:
    """``--variance-model ENV_ID=PATH`` (repeatable) as ``{env_id: path}``."""
    try:
        values = config.getoption("variance_model") or []
    except ValueError:
        values = []
    models = {}
    for value in values:
        env_id, sep, path = value.partition("=")
        if not sep or not path:
            raise ValueError(f"--variance-model must be ENV_ID=PATH, got {value!r}")
        models[env_id] = path
    return models


def groups(size: Size, models: dict[str, str], with_mc: bool) -> list[tuple[str, str]]:
    """``(environment, checkpoint)`` of every group of a run, problems first."""
    out = [(problem, "exact") for problem in PROBLEM_GROUPS]
    for env_id in size.environments:
        if env_id in models:
            out.append((env_id, "user"))
            continue
        allowed = ONE_CHECKPOINT.get(env_id, tuple(CHECKPOINTS))
        checkpoints = [c for c in size.checkpoints if c in allowed] or [allowed[-1]]
        out += [(env_id, c) for c in checkpoints]
    return out


def estimators_of(env_id: str, size: Size, with_mc: bool) -> list[SuiteEstimator]:
    """The suite estimators a group of ``env_id`` runs (the rows its engine can run)."""
    if env_id in PROBLEMS:
        problem = PROBLEMS[env_id]()
        available = set(applicable_problem_estimators(problem))
        discrete = getattr(problem.action_space, "n", None) is not None
        return [
            e for e in SUITE_ESTIMATORS
            if e.problem in available and not (discrete and e.name in DISCRETE_DUPLICATES)
        ]  # fmt: skip
    import gymnasium as gym

    env = gym.make(env_id)
    try:
        space = env.action_space
    finally:
        env.close()
    available = set(applicable_env_estimators(space, env_id))
    if not (with_mc or env_id in size.mc_envs):
        available.discard("mc_value")
    discrete = isinstance(space, gym.spaces.Discrete)
    return [e for e in SUITE_ESTIMATORS if e.env in available and not (discrete and e.name in DISCRETE_DUPLICATES)]


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_steps(env_id: str, checkpoint: str, size: Size) -> int:
    return int(round(ENVIRONMENTS[env_id] * size.budget_scale * CHECKPOINTS[checkpoint]))


def checkpoint(env_id: str, checkpoint_name: str, size: Size, models: dict[str, str]) -> Any:
    """The fixed policy of a group: a user zip, or a :class:`pgvar.PPO` (4 envs x 512 steps per update, SB3's
    other defaults) trained with seed :data:`SEED` to the checkpoint's step count, cached (0 steps: untrained). One
    training run per environment saves every checkpoint on the way; a checkpoint holds the policy of the last
    update before its step count (an update every 2048 steps)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from pgvar import PPO

    if checkpoint_name == "user":
        return PPO.load(models[env_id], device="cpu")
    steps = checkpoint_steps(env_id, checkpoint_name, size)
    if steps == 0:
        return PPO("MlpPolicy", env_id, seed=SEED, device="cpu", n_steps=512)
    versions = library_versions()
    tag = "_".join(f"{k}{versions[k]}" for k in ("stable_baselines3", "gymnasium", "mujoco", "torch") if k in versions)

    def path(n: int) -> Path:
        return CACHE / "checkpoints" / f"{env_id}_seed{SEED}_steps{n}_{tag}.zip"

    if not path(steps).exists():
        milestones = sorted({checkpoint_steps(env_id, c, size) for c in CHECKPOINTS} - {0})
        env = make_vec_env(env_id, n_envs=4, seed=SEED)
        model = PPO("MlpPolicy", env, seed=SEED, device="cpu", n_steps=512)

        class Save(BaseCallback):
            def _on_step(self) -> bool:
                for n in milestones:
                    if self.num_timesteps == n:
                        self.model.save(path(n))
                return True

        path(steps).parent.mkdir(parents=True, exist_ok=True)
        model.learn(max(milestones), callback=Save())
        for n in milestones:  # milestones that are not a multiple of the env count land on the next step
            if not path(n).exists():
                model.save(path(n))
        env.close()
    return PPO.load(path(steps), device="cpu")


# --------------------------------------------------------------------------------------------------- a group
def sample_group(env_id: str, checkpoint_name: str, size: Size, models: dict[str, str], with_mc: bool) -> PairedEstimates:
    """Sample one group's shared batches and every suite estimator's estimates on them."""
    rows = estimators_of(env_id, size, with_mc)
    if env_id in PROBLEMS:
        return sample_problem_estimates(
            env_id, [e.problem for e in rows if e.problem], batch_size=size.problem_batch,
            n_batches=size.problem_batches, seed=SEED,
        )  # fmt: skip
    model = checkpoint(env_id, checkpoint_name, size, models)
    return sample_env_estimates(
        model, env_id, [e.env for e in rows if e.env], n_envs=size.n_envs, n_steps=size.n_steps,
        n_batches=size.env_batches, reference_batches=size.reference_batches, seed=SEED,
        mc_rollouts=size.mc_rollouts, mc_horizon=size.mc_horizon, fit_steps=size.fit_steps,
    )  # fmt: skip


def engine_name(estimator: SuiteEstimator, exact: bool) -> str:
    name = estimator.problem if exact else estimator.env
    assert name is not None
    return name


def machine() -> str:
    """CPU model, cores and platform of this machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch threads {torch.get_num_threads()}"


def command() -> str:
    """The command line of this run, as ``python -m pytest ...``."""
    return "python -m pytest " + " ".join(sys.argv[1:])


def group_rows(paired: PairedEstimates, names: list[str], group: str, checkpoint_name: str, size: str) -> dict[str, dict]:
    """One JSON-ready row per suite estimator of a group: :func:`pgvar.compare.estimator_metrics`, the variance
    ratio to the reference (with its standard error by the delta method, batches paired), the bias flag on exact
    problems, and the group's settings, versions, machine, command and stage times."""
    metrics = {}
    for name in names:
        estimator = BY_NAME[name]
        estimates = paired.estimates[engine_name(estimator, paired.exact)]
        metrics[name] = estimator_metrics(estimates, paired.reference, exact=paired.exact, batch_size=paired.batch_size)
    reference = metrics.get(REFERENCE)
    rows = {}
    for name, row in metrics.items():
        estimator = BY_NAME[name]
        if reference is not None:
            row["variance_ratio"] = safe_ratio(row["variance"], reference["variance"])
            rel = [
                safe_ratio(row["variance_se"], row["variance"]),
                safe_ratio(reference["variance_se"], reference["variance"]),
            ]
            row["variance_ratio_se"] = row["variance_ratio"] * math.sqrt(sum(r * r for r in rel if math.isfinite(r)))
        if paired.exact:
            row["flag_biased"] = bool(row["bias_max_abs_z"] >= BIAS_Z)
        row.update(
            estimator=name,
            engine_estimator=engine_name(estimator, paired.exact),
            unbiased_in_theory=estimator.unbiased,
            note=estimator.note,
            group=group,
            environment=paired.group,
            checkpoint=checkpoint_name,
            size=size,
            reference_estimator=REFERENCE,
            batch_size=paired.batch_size,
            batch_unit=paired.batch_unit,
            exact=paired.exact,
            settings=paired.settings,
            group_seconds={k: round(v, 3) for k, v in paired.seconds.items()},
            versions=paired.versions,
            machine=machine(),
            command=command(),
            seed=SEED,
        )
        rows[name] = row
    return rows
