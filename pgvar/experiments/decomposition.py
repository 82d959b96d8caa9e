"""The Mirage variance decomposition along a training run, with its states spread over processes.

Tucker et al. 2018 (arXiv:1802.10031) measured the trajectory, action and state terms of the policy-gradient
variance at checkpoints of a training run, averaging 40 batches of 50 states per checkpoint.
:func:`decompose_training` does the same: it trains a model (or takes a saved one), and at each checkpoint draws
``n_states`` states in batches of ``states_per_batch`` with :func:`pgvar.rollouts.sample_nested_rollouts` (each
batch with its own seed, so the batches are independent and the result does not depend on how many processes
ran them), pools them (:meth:`~pgvar.rollouts.NestedRolloutSamples.concatenate`) and decomposes the variance with
:func:`pgvar.measure.variance_decomposition`.

Backends as for sweeps: ``"local"`` runs the batches in this process (``workers=1``) or a spawn process pool;
``"ray"`` on a Ray cluster (``address``) or a local one. The policy and the critic are sent to the workers by
pickling; every worker uses one torch thread.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pgvar._sb3_policy import detached_policy_copy
from pgvar._validation import check_choice, check_positive
from pgvar.experiments.backends import map_jobs

__all__ = ["DECOMPOSITION_ALGORITHMS", "DecompositionRun", "decompose_training"]

#: Algorithms :func:`decompose_training` trains or loads, by lower-case name (Q-Prop ones bring a critic).
DECOMPOSITION_ALGORITHMS = ("qproptrpo", "qpropppo", "trpo", "ppo", "a2c")

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class DecompositionRun:
    """The decomposition at each checkpoint of a run, with its settings (``to_dict`` for JSON)."""

    env_id: str
    algo: str
    gamma: float
    n_states: int
    states_per_batch: int
    horizon: int | None
    seed: int
    #: per checkpoint: ``timesteps``, ``decomposition`` (:meth:`VarianceDecomposition.as_dict`),
    #: ``continuation_steps`` and ``seconds``
    checkpoints: list[dict[str, Any]]
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    #: where it ran (:func:`pgvar.experiments.unit.machine`): platform, CPU capability, threads
    machine: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the command line that produced it, when a command did (``pgvar decompose`` records it)
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _algorithm(name: str) -> Any:
    from pgvar import algos

    classes = {"qproptrpo": algos.QPropTRPO, "qpropppo": algos.QPropPPO, "trpo": algos.TRPO, "ppo": algos.PPO,
               "a2c": algos.A2C}  # fmt: skip
    return classes[name]


def _critic_values(critic: Any, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return critic(observations, actions)[0].flatten()


def _model_critic(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Q-Prop's fitted critic as ``critic(observations, actions) -> [B]`` (picklable), or ``None``."""
    from gymnasium import spaces

    if not hasattr(model, "qprop_critic") or not isinstance(model.action_space, spaces.Box):
        return None
    return functools.partial(_critic_values, model.critic)


def _sample_batch(policy: Any, env_id: str, n_states: int, gamma: float, horizon: int | None, seed: int,
                  critic: Any) -> Any:  # fmt: skip
    """One batch of states (runs in a worker: one torch thread)."""
    from pgvar.rollouts import sample_nested_rollouts

    torch.set_num_threads(1)
    samples = sample_nested_rollouts(policy, env_id, n_states, gamma=gamma, horizon=horizon, seed=seed, critic=critic)
    # plain data, to cross a process boundary (autograd graphs do not)
    detached = {field.name: getattr(samples, field.name).detach() for field in dataclasses.fields(samples)
                if isinstance(getattr(samples, field.name), torch.Tensor)}  # fmt: skip
    baselines = {name: values.detach() for name, values in samples.baselines.items()}
    return dataclasses.replace(samples, baselines=baselines, **detached)


def _report(progress: Progress | None, stage: str, total: int, done: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _run_batches(jobs: list[tuple[Any, ...]], backend: str, workers: int, address: str | None,
                 report: Callable[[int], None]) -> list[Any]:  # fmt: skip
    results: list[Any] = [None] * len(jobs)
    if backend == "local" and workers == 1:
        threads = torch.get_num_threads()
        try:
            for index, job in enumerate(jobs):
                results[index] = _sample_batch(*job)
                report(index + 1)
        finally:
            torch.set_num_threads(threads)
        return results
    done = 0

    def collect(index: int, result: Any) -> None:
        nonlocal done
        results[index] = result
        done += 1
        report(done)

    map_jobs(_sample_batch, jobs, backend=backend, workers=workers, address=address, on_result=collect)
    return results


def decompose_training(
    env_id: str,
    *,
    model: Any = None,
    algo: str = "qproptrpo",
    algo_kwargs: dict[str, Any] | None = None,
    checkpoints: Sequence[int] = (0,),
    n_states: int = 64,
    states_per_batch: int = 50,
    horizon: int | None = None,
    gamma: float | None = None,
    state_baseline: str = "mc_value",
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> DecompositionRun:
    """The Mirage decomposition at each of ``checkpoints`` (environment steps) of a training run.

    :param env_id: a gymnasium id whose state can be restored (MuJoCo or classic control)
    :param model: a trained SB3 model to measure as it is (then ``checkpoints`` must be ``(0,)``: no training)
    :param algo: the class to train when ``model`` is ``None``, one of :data:`DECOMPOSITION_ALGORITHMS`
        (``qproptrpo``, the default, brings a critic: the ``"qprop"`` baseline)
    :param algo_kwargs: its constructor arguments
    :param checkpoints: training steps at which to measure, increasing (SB3 trains whole rollouts, so the
        measured step can be a little later; the run records it)
    :param n_states: states per checkpoint
    :param states_per_batch: states per independent batch (the unit of work of a worker; the paper's 50)
    :param horizon: most steps of one continuation (``None``: to the time limit)
    :param gamma: discount of the returns (default: the model's ``gamma``)
    :param state_baseline: the baseline of the state-term estimate
    :param backend: ``"local"`` or ``"ray"``
    :param workers: processes (local) or CPUs of a local Ray
    :param address: Ray only: an existing cluster
    :param seed: seeds the training and the state sampling
    :param progress: called as ``progress(stage, done, total)``
    """
    from pgvar.compare import library_versions
    from pgvar.experiments.unit import machine
    from pgvar.rollouts import NestedRolloutSamples

    check_choice("backend", backend, ("local", "ray"))
    check_positive("n_states", n_states, integer=True)
    check_positive("states_per_batch", states_per_batch, integer=True)
    check_positive("workers", workers, integer=True)
    if address is not None and backend != "ray":
        raise ValueError(f"address is for backend='ray' only, got backend={backend!r}")
    steps = [int(step) for step in checkpoints]
    if not steps or any(step < 0 for step in steps) or steps != sorted(set(steps)):
        raise ValueError(f"checkpoints must be increasing whole numbers >= 0, got {list(checkpoints)}")
    if model is not None and steps != [0]:
        raise ValueError(f"checkpoints must be [0] with a given model (it is measured as it is), got {steps}")
    if model is None:
        check_choice("algo", algo, DECOMPOSITION_ALGORITHMS)
        model = _algorithm(algo)("MlpPolicy", env_id, seed=seed, device="cpu", **(algo_kwargs or {}))
    gamma = float(model.gamma if gamma is None else gamma)
    critic = _model_critic(model)
    sizes = [min(states_per_batch, n_states - start) for start in range(0, n_states, states_per_batch)]
    measured = []
    for step in steps:
        if step > model.num_timesteps:
            if progress is not None:
                progress("training", int(model.num_timesteps), step)
            model.learn(step - model.num_timesteps, reset_num_timesteps=False)
        started = time.perf_counter()
        model.policy.set_training_mode(False)
        policy = model.policy if backend == "local" and workers == 1 else detached_policy_copy(model.policy)
        jobs = [(policy, env_id, size, gamma, horizon, seed + 7919 * (index + 1) + step, critic)
                for index, size in enumerate(sizes)]  # fmt: skip
        report = functools.partial(_report, progress, f"states at step {model.num_timesteps}", len(jobs))
        batches = _run_batches(jobs, backend, workers, address, report)
        samples = NestedRolloutSamples.concatenate(batches)
        measured.append({
            "timesteps": int(model.num_timesteps),
            "decomposition": samples.decomposition(state_baseline).as_dict(),
            "continuation_steps": int(samples.continuation_steps.sum()),
            "seconds": time.perf_counter() - started,
        })  # fmt: skip
    return DecompositionRun(env_id=env_id, algo=type(model).__name__, gamma=gamma, n_states=n_states,
                            states_per_batch=states_per_batch, horizon=horizon, seed=seed, checkpoints=measured,
                            versions=library_versions(), machine=machine())  # fmt: skip
