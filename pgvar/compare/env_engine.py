r"""The environment engine: baseline x normalization choices of the policy gradient on a real gymnasium env.

No exact gradient is known on a real environment, so the engine holds an SB3 policy fixed and measures, on the
same batches, every choice's batch estimate against a reference gradient pooled from further batches:

1. :func:`_fixed_policy`: train a :class:`pgvar.PPO` briefly (or take the given model) and freeze it.
2. :func:`_reference_gradient`: the mean over ``reference_batches`` batches of the unbiased GAE(lambda = 1)
   estimate with the learned V, without normalization.
3. :func:`_batch_estimates`: per batch (:func:`pgvar.rollouts.collect_rollout`), each baseline's advantages
   (:func:`_advantages`, from :mod:`pgvar.estimators`) under each normalization, and the gradient of
   :math:`\tfrac{1}{M}\sum_i \tilde A_i \log \pi_\theta(a_i|s_i)` over the actor's parameters.
4. :func:`_env_summaries`: SNR (plug-in and debiased) and cosines per choice (:func:`pgvar.measure.estimate_statistics`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pgvar._validation import check_choice, check_positive
from pgvar.compare.env_estimators import _ActorGradients, _advantages, _gae
from pgvar.compare.results import EnvComparisonResult, EnvEstimatorSummary, library_versions, safe_ratio
from pgvar.estimators import normalize_advantages
from pgvar.measure import estimate_statistics
from pgvar.rollouts import RolloutBatch, collect_rollout

__all__ = ["ENV_BASELINES", "ENV_NORMALIZATIONS", "compare_on_env"]

#: Baselines compared on a gymnasium environment: the ``baseline`` options of pgvar's algorithms.
ENV_BASELINES: dict[str, str] = {
    "value": "GAE(lambda) with the policy's learned V (SB3's default)",
    "none": "G_t, the return-to-go bootstrapped from V at truncations and at the rollout's end",
    "mean": "G_t - mean of the batch's returns",
    "optimal": "G_t - b*, b* = E[|g|^2 G] / E[|g|^2] with per-sample score norms",
}
#: Advantage normalizations compared on a gymnasium environment.
ENV_NORMALIZATIONS = ("minibatch", "batch", "none")

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------- the policy
def _progress_callback(progress: Progress | None, total: int) -> Any:
    """An SB3 callback that reports training progress as ``progress("training", steps, total)``."""
    from stable_baselines3.common.callbacks import BaseCallback

    class ProgressCallback(BaseCallback):
        def _on_step(self) -> bool:
            if progress is not None and self.n_calls % 64 == 0:
                progress("training", min(self.num_timesteps, total), total)
            return True

    return ProgressCallback()


def _fixed_policy(model: Any, env: Any, train_steps: int, seed: int, progress: Progress | None) -> tuple[Any, int]:
    """``(model, steps it was trained)``: the given model, or a :class:`pgvar.PPO` trained ``train_steps`` steps;
    its policy is put in evaluation mode."""
    if model is None:
        from pgvar.algos import PPO

        model = PPO("MlpPolicy", env, seed=seed, device="cpu")
        if train_steps > 0:
            model.learn(train_steps, callback=_progress_callback(progress, train_steps))
    model.policy.set_training_mode(False)
    return model, int(getattr(model, "num_timesteps", 0))


def _reference_gradient(
    actor: _ActorGradients,
    env: Any,
    n_steps: int,
    last_obs: Any,
    n_batches: int,
    gamma: float,
    progress: Progress | None,
) -> tuple[torch.Tensor, Any]:
    """The mean of ``n_batches`` batch estimates of GAE(lambda = 1) with the learned V, no normalization."""
    total = None
    for k in range(n_batches):
        batch, last_obs = collect_rollout(actor.policy, env, n_steps, last_obs)
        gradient = actor.gradient(_gae(batch, gamma, 1.0), actor.log_probs(batch))
        total = gradient if total is None else total + gradient
        if progress is not None:
            progress("reference", k + 1, n_batches)
    assert total is not None
    return total / n_batches, last_obs


def _normalized_gradients(
    actor: _ActorGradients,
    batch: RolloutBatch,
    advantages: dict[str, torch.Tensor],
    normalizations: Sequence[str],
    minibatch_size: int,
    generator: torch.Generator,
) -> dict[tuple[str, str], torch.Tensor]:
    """The gradient estimate of every (baseline, normalization) on one batch. ``"minibatch"`` normalizes each
    minibatch of a random permutation separately, as one PPO epoch does (the mean over them is the gradient)."""
    log_probs = actor.log_probs(batch)
    minibatches = list(torch.randperm(batch.rewards.numel(), generator=generator).split(minibatch_size))
    out = {}
    for baseline, signal in advantages.items():
        for mode in normalizations:
            indices = minibatches if mode == "minibatch" else None
            normalized = normalize_advantages(signal, mode, minibatch_indices=indices)
            out[(baseline, mode)] = actor.gradient(normalized, log_probs, retain_graph=True)
    return out


def _batch_estimates(
    actor: _ActorGradients,
    env: Any,
    n_steps: int,
    last_obs: Any,
    n_batches: int,
    baselines: Sequence[str],
    normalizations: Sequence[str],
    gamma: float,
    gae_lambda: float,
    minibatch_size: int,
    generator: torch.Generator,
    progress: Progress | None,
) -> dict[tuple[str, str], list[torch.Tensor]]:
    """``n_batches`` gradient estimates of every (baseline, normalization), each batch shared by all choices."""
    estimates: dict[tuple[str, str], list[torch.Tensor]] = {}
    for k in range(n_batches):
        batch, last_obs = collect_rollout(actor.policy, env, n_steps, last_obs)
        advantages = _advantages(batch, baselines, gamma, gae_lambda, functools.partial(actor.score_sq_norms, batch))
        gradients = _normalized_gradients(actor, batch, advantages, normalizations, minibatch_size, generator)
        for key, value in gradients.items():
            estimates.setdefault(key, []).append(value)
        if progress is not None:
            progress("batches", k + 1, n_batches)
    return estimates


def _env_summaries(
    estimates: dict[tuple[str, str], list[torch.Tensor]], reference: torch.Tensor, n_batches: int
) -> list[EnvEstimatorSummary]:
    """One row per choice: SNR (plug-in and debiased) and cosines against the reference."""
    rows = []
    for (baseline, mode), values in estimates.items():
        stats = estimate_statistics(torch.stack(values), reference=reference)
        assert stats.cosine_to_reference is not None and stats.cosine_to_reference_se is not None
        variance, mean_sq = stats.variance_trace, stats.mean_norm**2
        rows.append(
            EnvEstimatorSummary(
                baseline=baseline,
                normalization=mode,
                snr=safe_ratio(mean_sq, variance),
                snr_debiased=safe_ratio(mean_sq - variance / n_batches, variance),
                cosine=float(stats.cosine_to_reference),
                cosine_se=float(stats.cosine_to_reference_se),
                pairwise_cosine=float(stats.pairwise_cosine),
            )
        )
    return rows


def _check_env_arguments(
    baselines: Sequence[str],
    normalizations: Sequence[str],
    n_envs: int,
    n_steps: int,
    n_batches: int,
    reference_batches: int,
    train_steps: int,
) -> None:
    for name in baselines:
        check_choice("baselines", name, ENV_BASELINES)
    for name in normalizations:
        check_choice("normalizations", name, ENV_NORMALIZATIONS)
    if not baselines or not normalizations:
        raise ValueError("baselines and normalizations must each name at least one choice, got an empty list")
    for arg, value in (("n_envs", n_envs), ("n_steps", n_steps), ("n_batches", n_batches)):
        check_positive(arg, value, integer=True)
    check_positive("reference_batches", reference_batches, integer=True)
    if n_batches < 2:
        raise ValueError(f"n_batches must be >= 2 (the variance is measured across batches), got {n_batches}")
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise ValueError(f"train_steps must be a whole number >= 0, got {train_steps!r}")


# ------------------------------------------------------------------------------------------------ engine
def compare_on_env(
    env_id: str = "CartPole-v1",
    *,
    model: Any = None,
    train_steps: int = 20_000,
    baselines: Sequence[str] = tuple(ENV_BASELINES),
    normalizations: Sequence[str] = ENV_NORMALIZATIONS,
    n_envs: int = 8,
    n_steps: int = 256,
    n_batches: int = 30,
    reference_batches: int = 30,
    seed: int = 0,
    progress: Progress | None = None,
) -> EnvComparisonResult:
    """Compare baseline x normalization choices of the policy gradient at a fixed SB3 policy on a real env.

    The policy is trained briefly with :class:`pgvar.PPO` (or ``model`` is used as it is), then held fixed.
    ``n_batches`` independent batches of ``n_steps x n_envs`` steps are collected; every choice computes its
    advantages on the same batches (:mod:`pgvar.estimators`) and its policy-gradient estimate
    :math:`\\nabla_\\theta \\tfrac{1}{M}\\sum_i \\tilde A_i \\log \\pi_\\theta(a_i|s_i)` (PPO's gradient at ratio 1)
    over the actor's parameters; ``"minibatch"`` normalization averages the gradients of minibatches of the
    model's ``batch_size``, normalized separately, as one PPO epoch does. The reference gradient is the mean,
    over ``reference_batches`` further batches, of the unbiased GAE(lambda = 1) estimate with the learned V
    (no normalization).

    :param env_id: a gymnasium id (MuJoCo ids need ``gymnasium[mujoco]``)
    :param model: an SB3 on-policy model (PPO, A2C, TRPO or pgvar's); ``None`` trains a :class:`pgvar.PPO`
    :param train_steps: environment steps of that training (0: the untrained policy)
    :param baselines: keys of :data:`ENV_BASELINES` (the ``baseline`` options of pgvar's algorithms)
    :param normalizations: members of :data:`ENV_NORMALIZATIONS`
    :param n_envs: parallel environments of the sampling ``VecEnv``
    :param n_steps: steps per environment in one batch
    :param n_batches: batches measured (>= 2)
    :param reference_batches: batches pooled into the reference gradient (>= 1)
    :param seed: seeds training, environments and minibatch shuffling
    :param progress: called as ``progress(stage, done, total)``
    :return: an :class:`EnvComparisonResult`
    """
    from stable_baselines3.common.env_util import make_vec_env

    _check_env_arguments(baselines, normalizations, n_envs, n_steps, n_batches, reference_batches, train_steps)
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    try:
        model, trained = _fixed_policy(model, env, train_steps, seed, progress)
        gamma, gae_lambda = float(model.gamma), float(model.gae_lambda)
        minibatch_size = int(getattr(model, "batch_size", None) or n_steps * n_envs)
        actor = _ActorGradients(model.policy)
        generator = torch.Generator().manual_seed(seed)
        last_obs = env.reset()
        reference, last_obs = _reference_gradient(actor, env, n_steps, last_obs, reference_batches, gamma, progress)
        estimates = _batch_estimates(
            actor,
            env,
            n_steps,
            last_obs,
            n_batches,
            baselines,
            normalizations,
            gamma,
            gae_lambda,
            minibatch_size,
            generator,
            progress,
        )
    finally:
        env.close()
    return EnvComparisonResult(
        env_id=env_id,
        batch_steps=n_steps * n_envs,
        n_envs=n_envs,
        n_batches=n_batches,
        reference_batches=reference_batches,
        trained_steps=trained,
        seed=seed,
        gamma=gamma,
        gae_lambda=gae_lambda,
        minibatch_size=minibatch_size,
        reference=f"mean of {reference_batches} batch estimates of GAE(lambda=1) with the learned V, no normalization",
        estimators=_env_summaries(estimates, reference, n_batches),
        versions=library_versions(),
    )

