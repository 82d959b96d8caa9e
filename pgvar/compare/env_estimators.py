r"""Every policy-gradient estimator the environment engine knows, at a fixed SB3 policy, one batch at a time.

:class:`EnvEstimators` fits what its rows need once (a critic, a horizon-aware value, factorized baselines:
:mod:`pgvar.compare.env_fitted`) on batches of their own, then :meth:`EnvEstimators.estimates` returns each row's
gradient estimate on a :class:`~pgvar.rollouts.RolloutBatch`: the gradient over the actor's parameters of

.. math::  \frac{1}{M} \sum_{i=1}^M \ell_i \log \pi_\theta(a_i|s_i) \;[+\ \text{the row's analytic term}]

(PPO's gradient at ratio 1), with the row's learning signal :math:`\ell` from :mod:`pgvar.estimators`. No row
normalizes except where the normalization is the row (``qprop_consistent``, ``qprop_as_published``, whose
estimates are multiplied back by the signal's std :math:`\sigma` to stay in the gradient's scale, as in the
problem engine). :func:`sample_env_estimates` samples the shared batches and the large-batch reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from gymnasium import spaces

from pgvar._sb3_policy import actor_parameter_names, flatten_time_major, log_prob_loss, policy_log_prob
from pgvar._validation import check_choice, check_positive
from pgvar.compare.env_fitted import EnvCritic, EnvFactorizedBaseline, EnvHorizonValue, bootstrapped_returns
from pgvar.compare.results import PairedEstimates, library_versions
from pgvar.estimators import (
    all_action_control_variate,
    constant_baseline,
    factorized_action_baseline,
    gae_advantages,
    qprop_action_variance,
    qprop_control_variate,
    qprop_eta,
    qprop_learning_signal,
    qprop_normalize,
)
from pgvar.measure import per_sample_grad_sq_norms
from pgvar.rollouts import RolloutBatch, collect_rollout, monte_carlo_values

__all__ = ["ENV_ESTIMATORS", "EnvEstimators", "applicable_env_estimators", "sample_env_estimates"]

#: The rows of :class:`EnvEstimators`, in table order. Names shared with the problem engine
#: (:data:`pgvar.compare.ESTIMATORS`) mean the same estimator there.
ENV_ESTIMATORS: dict[str, str] = {
    "none": "G_t, the return-to-go bootstrapped from V at truncations and at the rollout's end",
    "mean": "G_t - mean of the batch's returns",
    "optimal": "G_t - b*, b* = E[|g|^2 G] / E[|g|^2] with per-sample score norms (Greensmith et al. 2004)",
    "value": "GAE(lambda) with the policy's learned V (SB3's default estimator, without normalization)",
    "value_lambda1": "GAE(lambda = 1) = G_t - V(s_t) with the policy's learned V",
    "mc_value": "G_t - V_MC(s_t), V_MC the mean of Monte Carlo continuations from the restored simulator state "
    "(Ilyas et al. 2020's 'true V'; bootstrapped from the learned V after mc_horizon steps)",
    "horizon_value": "GAE(lambda) with a horizon-aware V(s, t) = V0(s) + (1 - gamma^(T - t)) / (1 - gamma) r_bar(s) "
    "fitted by L-BFGS on horizon_aware_value_loss (Tucker et al. 2018, Sec. 6)",
    "qprop_fitted_critic": "Q-Prop: GAE(lambda) minus the critic's Taylor control variate, conservative eta "
    "cross-fitted over halves of the envs, plus the analytic term (Box; Discrete: the all-action CV)",
    "qprop_fixed_eta": "Q-Prop as above with eta = 1",
    "qprop_adaptive_eta": "Q-Prop as above with the adaptive eta = Cov / Var_a(A_bar), cross-fitted",
    "qprop_consistent": "Q-Prop (conservative eta) normalized consistently (eta / sigma too), times sigma",
    "qprop_as_published": "Q-Prop (conservative eta) normalized as published (the analytic term unscaled), times "
    "sigma: biased toward the critic's gradient (Tucker et al. 2018)",
    "all_action": "GAE(lambda) - (Q_w(s, a) - sum_a' pi(a'|s) Q_w(s, a')) plus grad sum_a pi(a|s) Q_w(s, a) "
    "(Discrete)",
    "factorized_baseline": "sum_k grad log pi_k(a_k|s) (GAE(lambda) - b_k(s, a_-k)), b_k fitted to the advantage "
    "(Wu et al. 2018; Box with >= 2 action dimensions)",
}

_CONSTANT = ("none", "mean", "optimal")
_QPROP: dict[str, tuple[str, str]] = {
    "qprop_fitted_critic": ("conservative", "none"),
    "qprop_fixed_eta": ("fixed", "none"),
    "qprop_adaptive_eta": ("adaptive", "none"),
    "qprop_consistent": ("conservative", "consistent"),
    "qprop_as_published": ("conservative", "as_published"),
    "all_action": ("fixed", "none"),
}

Progress = Callable[[str, int, int], None]


class _ActorGradients:
    """Gradients over the actor's parameters of an SB3 policy held fixed (``pgvar._sb3_policy``'s rule)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.names = sorted(actor_parameter_names(policy))  # flattened in sorted name order, as pgvar.measure does
        named = dict(policy.named_parameters())
        self.params = [named[name] for name in self.names]

    def log_probs(self, batch: RolloutBatch) -> torch.Tensor:
        """``log pi(a|s)`` of every step of the batch, ``[T * N]`` in time-major order (differentiable)."""
        return policy_log_prob(self.policy, flatten_time_major(batch.observations), flatten_time_major(batch.actions))

    def gradient(self, advantages: torch.Tensor, log_probs: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """``grad (1/M) sum_i A_i log pi(a_i|s_i)``, flattened in name order, float64 (``A`` is detached)."""
        return self.surrogate_gradient((advantages.reshape(-1).detach() * log_probs).mean(), retain_graph)

    def surrogate_gradient(self, surrogate: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        """``grad surrogate`` over the actor's parameters, flattened in name order, float64."""
        grads = torch.autograd.grad(surrogate, self.params, retain_graph=retain_graph, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)]
        ).double()

    def score_sq_norms(self, batch: RolloutBatch) -> torch.Tensor:
        """``||grad log pi(a_t|s_t)||^2`` of every step, ``[T, N]`` float32 (the optimal baseline's weights)."""
        sq_norms = per_sample_grad_sq_norms(
            self.policy,
            log_prob_loss(weighted=False),
            (flatten_time_major(batch.actions), flatten_time_major(batch.observations)),
            params=self.names,
        )
        return sq_norms.reshape(batch.rewards.shape).float()


def _gae(batch: RolloutBatch, gamma: float, gae_lambda: float) -> torch.Tensor:
    return gae_advantages(
        batch.rewards, batch.values, batch.next_values, batch.terminated, batch.truncated, gamma=gamma, gae_lambda=gae_lambda
    )


def _advantages(
    batch: RolloutBatch,
    baselines: Sequence[str],
    gamma: float,
    gae_lambda: float,
    score_sq_norms: Callable[[], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The ``[T, N]`` advantage of each baseline on one batch, from :mod:`pgvar.estimators`.

    ``"value"``: GAE with the learned V; a constant baseline: the return-to-go (bootstrapped from V at truncations
    and at the rollout's end) minus :func:`pgvar.estimators.constant_baseline`. ``score_sq_norms`` is called
    only for ``"optimal"``.
    """
    signals = {}
    returns = None
    for name in baselines:
        if name == "value":
            signals[name] = _gae(batch, gamma, gae_lambda)
            continue
        if returns is None:
            returns = bootstrapped_returns(batch, gamma)
        sq_norms = score_sq_norms() if name == "optimal" else None
        signals[name] = returns - constant_baseline(name, returns, score_sq_norms=sq_norms)
    return signals


def _time_limit(env_id: str) -> int | None:
    import gymnasium as gym

    spec = gym.spec(env_id)
    return None if spec is None else spec.max_episode_steps


def applicable_env_estimators(action_space: spaces.Space, env_id: str | None = None) -> list[str]:
    """The rows of :data:`ENV_ESTIMATORS` an environment with this action space can run (``horizon_value`` needs
    a time limit; ``mc_value`` a simulator whose state can be restored, which is checked when sampling)."""
    discrete = isinstance(action_space, spaces.Discrete)
    rows = []
    for name in ENV_ESTIMATORS:
        if name == "all_action" and not discrete:
            continue
        if name == "factorized_baseline" and (discrete or int(sum(action_space.shape or (1,))) < 2):
            continue
        if name == "horizon_value" and env_id is not None and _time_limit(env_id) is None:
            continue
        rows.append(name)
    return rows


class EnvEstimators:
    """The environment engine's rows prepared at a fixed policy (see the module docstring).

    :param model: an SB3 on-policy model (its policy is held fixed; ``gamma`` and ``gae_lambda`` are its own)
    :param env_id: the gymnasium id the batches come from (the time limit; the Monte Carlo continuations)
    :param estimators: rows of :data:`ENV_ESTIMATORS`
    :param fit_batches: batches independent of those to be scored, to fit the critic, the horizon-aware value and
        the factorized baselines on
    :param seed: seeds the fits and the Monte Carlo continuations
    :param mc_rollouts: continuations per state of ``"mc_value"``
    :param mc_horizon: most steps of one continuation (then bootstrapped from the learned V); ``None``: to the end
    :param fit_steps: Adam steps of the critic and the factorized baselines
    """

    def __init__(
        self,
        model: Any,
        env_id: str,
        estimators: Sequence[str],
        fit_batches: Sequence[RolloutBatch],
        *,
        seed: int = 0,
        mc_rollouts: int = 4,
        mc_horizon: int | None = 64,
        fit_steps: int = 1000,
    ) -> None:
        policy = model.policy
        applicable = applicable_env_estimators(policy.action_space, env_id)
        for name in estimators:
            check_choice("estimators", name, ENV_ESTIMATORS)
            if name not in applicable:
                raise ValueError(
                    f"estimators: {name!r} cannot run on {env_id} ({policy.action_space}); it can run {applicable}"
                )
        check_positive("mc_rollouts", mc_rollouts, integer=True)
        self.model, self.policy, self.env_id, self.estimators = model, policy, env_id, list(estimators)
        self.gamma, self.gae_lambda = float(model.gamma), float(model.gae_lambda)
        self.seed, self.mc_rollouts, self.mc_horizon = seed, mc_rollouts, mc_horizon
        self.discrete = isinstance(policy.action_space, spaces.Discrete)
        self.actor = _ActorGradients(policy)
        names = set(self.estimators)
        n_actions = int(policy.action_space.n) if self.discrete else None
        self.critic = self.horizon_value = self.factorized = None
        if names & set(_QPROP):
            self.critic = EnvCritic.fit(fit_batches, self.gamma, discrete=self.discrete, n_actions=n_actions, seed=seed,
                                        steps=fit_steps)  # fmt: skip
        if "horizon_value" in names:
            horizon = _time_limit(env_id)
            assert horizon is not None
            self.horizon_value = EnvHorizonValue.fit(fit_batches, horizon=horizon, gamma=self.gamma, seed=seed)
        if "factorized_baseline" in names:
            self.factorized = EnvFactorizedBaseline.fit(
                fit_batches, gamma=self.gamma, gae_lambda=self.gae_lambda, seed=seed, steps=fit_steps
            )

    @property
    def needs_states(self) -> bool:
        """Whether a row needs the simulator states of the batch (``collect_rollout(record_states=True)``)."""
        return "mc_value" in self.estimators

    # ------------------------------------------------------------------------------------------ the rows
    def _signal(self, name: str, batch: RolloutBatch) -> torch.Tensor:
        """``[T, N]`` learning signal of a row that is a return minus a state baseline or a GAE advantage."""
        if name in _CONSTANT or name == "value":
            return _advantages(batch, [name], self.gamma, self.gae_lambda, lambda: self.actor.score_sq_norms(batch))[name]
        if name == "value_lambda1":
            return _gae(batch, self.gamma, 1.0)
        if name == "horizon_value":
            assert self.horizon_value is not None
            with torch.no_grad():
                return self.horizon_value.advantages(batch, self.gae_lambda)
        assert name == "mc_value"
        if batch.states is None or batch.timesteps is None:
            raise ValueError("'mc_value' needs a batch collected with collect_rollout(..., record_states=True)")
        values = monte_carlo_values(
            self.policy, self.env_id, [s for row in batch.states for s in row],
            flatten_time_major(batch.observations), batch.timesteps.flatten(), gamma=self.gamma,
            n_rollouts=self.mc_rollouts, horizon=self.mc_horizon, seed=self.seed,
        )  # fmt: skip
        return bootstrapped_returns(batch, self.gamma) - values.reshape(batch.rewards.shape).to(batch.rewards.dtype)

    def _critic_estimate(self, name: str, batch: RolloutBatch) -> torch.Tensor:
        """Q-Prop (Box: Taylor control variate; Discrete: all-action) under its eta rule and normalization."""
        assert self.critic is not None
        eta_rule, normalization = _QPROP[name]
        shape = batch.rewards.shape
        obs, actions = flatten_time_major(batch.observations), flatten_time_major(batch.actions)
        distribution = self.policy.get_distribution(obs)
        log_probs = distribution.log_prob(actions.long().flatten() if self.discrete else actions)
        adv_hat = _gae(batch, self.gamma, self.gae_lambda)
        if self.discrete:
            with torch.no_grad():
                q_all = self.critic.all_actions(obs)
            out = all_action_control_variate(q_all, distribution.distribution.probs, actions.long().flatten(),
                                             adv_hat.flatten())  # fmt: skip
            signal, analytic = out.learning_signal.reshape(shape), out.surrogate
        else:
            mu = distribution.distribution.mean
            at_mean = mu.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                (grad_q,) = torch.autograd.grad(self.critic(obs, at_mean).sum(), at_mean)
            adv_bar = qprop_control_variate(grad_q, actions, mu.detach()).reshape(shape)
            variance = None
            if eta_rule == "adaptive":
                std = distribution.distribution.stddev.detach()
                variance = qprop_action_variance(grad_q, std).reshape(shape)
            eta = qprop_eta(adv_hat, adv_bar, rule=eta_rule, scope="crossfit", action_variance=variance)
            signal = qprop_learning_signal(adv_hat, adv_bar, eta)
            analytic = (eta.reshape(-1, 1) * grad_q * mu).sum(-1).mean()
        if normalization == "none":
            return self.actor.surrogate_gradient((signal.flatten() * log_probs).mean() + analytic)
        sigma = float(signal.std())
        centred = qprop_normalize(signal, 1.0, normalization, signal_std=sigma).learning_signal
        residual = (centred.flatten() * log_probs).mean()
        if normalization == "consistent":  # eta / sigma in the analytic term: times sigma, it is eta again
            return self.actor.surrogate_gradient(sigma * residual + analytic)
        return self.actor.surrogate_gradient(sigma * (residual + analytic))

    def _factorized_estimate(self, batch: RolloutBatch) -> torch.Tensor:
        assert self.factorized is not None
        obs, actions = flatten_time_major(batch.observations), flatten_time_major(batch.actions)
        per_dimension = self.policy.get_distribution(obs).distribution.log_prob(actions)  # [M, K]
        with torch.no_grad():
            baselines = self.factorized(obs, actions)
        adv_hat = _gae(batch, self.gamma, self.gae_lambda).flatten()
        return self.actor.surrogate_gradient(factorized_action_baseline(per_dimension, adv_hat, baselines).surrogate)

    def estimates(self, batch: RolloutBatch, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The ``[P]`` gradient estimate (float64, actor parameters in sorted name order) of every row in ``names``
        (default: all prepared ones) on ``batch``."""
        names = self.estimators if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        signal_rows = [n for n in names if n in _CONSTANT or n in ("value", "value_lambda1", "horizon_value", "mc_value")]
        if signal_rows:
            log_probs = self.actor.log_probs(batch)
            for name in signal_rows:
                out[name] = self.actor.gradient(self._signal(name, batch), log_probs, retain_graph=True)
        for name in names:
            if name in _QPROP:
                out[name] = self._critic_estimate(name, batch)
            elif name == "factorized_baseline":
                out[name] = self._factorized_estimate(batch)
        return {name: out[name] for name in names}


def sample_env_estimates(
    model: Any,
    env_id: str,
    estimators: Sequence[str],
    *,
    n_envs: int = 8,
    n_steps: int = 256,
    n_batches: int = 30,
    reference_batches: int = 30,
    seed: int = 0,
    mc_rollouts: int = 4,
    mc_horizon: int | None = 64,
    fit_steps: int = 1000,
    progress: Progress | None = None,
) -> PairedEstimates:
    """Sample ``n_batches`` shared batches at the fixed policy of ``model`` and every row's estimate on each.

    First ``reference_batches`` batches: the reference gradient (the mean of their unbiased GAE(lambda = 1)
    estimates with the learned V, no normalization) and the data the rows' critic, horizon-aware value and
    factorized baselines are fitted on. Then ``n_batches`` batches, each scored by every row.

    :param model: an SB3 on-policy model
    :param env_id: a gymnasium id (the environments are ``make_vec_env(env_id, n_envs, seed=seed)``)
    :param estimators: rows of :data:`ENV_ESTIMATORS`
    :param n_envs: parallel environments
    :param n_steps: steps per environment in one batch (a batch is ``n_steps * n_envs`` steps)
    :param n_batches: batches measured (>= 2)
    :param reference_batches: batches of the reference gradient and of the fits (>= 2)
    :param seed: seeds the environments, the fits and the continuations
    :param mc_rollouts: continuations per state of ``"mc_value"``
    :param mc_horizon: most steps of one continuation
    :param fit_steps: Adam steps of the fitted networks
    :param progress: called as ``progress(stage, done, total)``
    :return: :class:`~pgvar.compare.PairedEstimates` (``exact=False``)
    """
    from stable_baselines3.common.env_util import make_vec_env

    for arg, value in (("n_envs", n_envs), ("n_steps", n_steps), ("n_batches", n_batches)):
        check_positive(arg, value, integer=True)
    if n_batches < 2 or reference_batches < 2:
        raise ValueError(f"n_batches and reference_batches must be >= 2, got {n_batches} and {reference_batches}")
    seconds: dict[str, float] = {}
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    try:
        model.policy.set_training_mode(False)
        actor = _ActorGradients(model.policy)
        gamma = float(model.gamma)
        last_obs = env.reset()
        start = time.perf_counter()
        fit_batches: list[RolloutBatch] = []
        reference: torch.Tensor | None = None
        for k in range(reference_batches):
            batch, last_obs = collect_rollout(model.policy, env, n_steps, last_obs)
            fit_batches.append(batch)
            gradient = actor.gradient(_gae(batch, gamma, 1.0), actor.log_probs(batch))
            reference = gradient if reference is None else reference + gradient
            if progress is not None:
                progress("reference", k + 1, reference_batches)
        assert reference is not None
        seconds["reference"] = time.perf_counter() - start
        start = time.perf_counter()
        prepared = EnvEstimators(model, env_id, estimators, fit_batches, seed=seed, mc_rollouts=mc_rollouts,
                                 mc_horizon=mc_horizon, fit_steps=fit_steps)  # fmt: skip
        seconds["fit"] = time.perf_counter() - start
        estimates: dict[str, list[torch.Tensor]] = {name: [] for name in estimators}
        seconds["sampling"] = seconds["estimates"] = 0.0
        batches: list[RolloutBatch] = []
        for k in range(n_batches):
            start = time.perf_counter()
            batch, last_obs = collect_rollout(model.policy, env, n_steps, last_obs, record_states=prepared.needs_states)
            seconds["sampling"] += time.perf_counter() - start
            start = time.perf_counter()
            for name, estimate in prepared.estimates(batch).items():
                estimates[name].append(estimate)
            seconds["estimates"] += time.perf_counter() - start
            if k == 0:
                batches.append(batch)
            if progress is not None:
                progress("batches", k + 1, n_batches)
    finally:
        env.close()
    return PairedEstimates(
        group=env_id,
        estimates={name: torch.stack(values) for name, values in estimates.items()},
        reference=reference / reference_batches,
        exact=False,
        batch_size=n_steps * n_envs,
        batch_unit="steps",
        estimator=prepared,
        timing_batch=batches[0],
        seconds=seconds,
        settings={
            "env_id": env_id, "n_envs": n_envs, "n_steps": n_steps, "n_batches": n_batches,
            "reference_batches": reference_batches, "seed": seed, "gamma": gamma, "gae_lambda": float(model.gae_lambda),
            "trained_steps": int(getattr(model, "num_timesteps", 0)), "mc_rollouts": mc_rollouts,
            "mc_horizon": mc_horizon, "reference": "mean of reference_batches GAE(lambda=1) estimates, learned V",
            "n_parameters": int(reference.numel()),
        },
        versions=library_versions(),
    )  # fmt: skip
