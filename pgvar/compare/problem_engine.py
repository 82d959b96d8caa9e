r"""The problem engine: paired comparison of policy-gradient estimators on problems with an exact gradient.

Every estimator sees the *same* sampled batches, so differences between them are not sampling luck. On a
problem whose exact gradient is known (:mod:`pgvar.problems`) each batch of ``N`` episodes gives one estimate
per estimator,

.. math::  \hat g = \frac{1}{N} \sum_{i=1}^N \sum_t \gamma^t\, \nabla_\theta \log \pi_\theta(a_{it}|s_{it})\,
           \big(\Psi_{it}\big),

where the learning signal :math:`\Psi` is the return-to-go minus a baseline, or a GAE advantage. Repeating over
``K`` independent batches gives, per estimator: the bias against the exact gradient with its standard error, the
variance of the batch estimate (trace of its covariance, across batches), the signal-to-noise ratio
:math:`\lVert\nabla J\rVert^2 / \operatorname{tr}\operatorname{Var}[\hat g]`, and the cosine to the exact
gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pgvar._validation import check_choice, check_positive, check_unit_interval
from pgvar.compare.fitted import FittedCritic, FittedValue
from pgvar.compare.results import ComparisonResult, EstimatorSummary, library_versions, safe_ratio
from pgvar.estimators import (
    CONSTANT_BASELINES,
    all_action_control_variate,
    constant_baseline,
    discounted_returns,
    gae_advantages,
    qprop_control_variate,
    qprop_eta,
    qprop_learning_signal,
    qprop_normalize,
)
from pgvar.measure import (
    EstimateStatistics,
    estimate_statistics,
    flatten,
    flatten_per_sample,
    per_sample_gradients,
)
from pgvar.problems import (
    ExactGradientProblem,
    GaussianBandit,
    GaussianPolicyProblem,
    LinearQuadraticRegulator,
    TabularMDP,
)
from pgvar.problems.base import EpisodeBatch, Params

__all__ = ["ESTIMATORS", "PROBLEMS", "compare_on_problem", "make_problem"]

#: Built-in problems with exact gradients, by the name ``pgvar compare --problem`` takes.
PROBLEMS: dict[str, Callable[[], ExactGradientProblem]] = {
    "tabular": lambda: TabularMDP(n_states=5, n_actions=3, gamma=0.9, seed=0),
    "bandit": lambda: GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0),
    "lqr": lambda: LinearQuadraticRegulator(seed=0),
}

#: The estimators ``compare_on_problem`` knows, in table order, with what each one uses as the learning signal.
#: The constant baselines have the names of the ``baseline`` option of pgvar's algorithms (``none``, ``mean``,
#: ``optimal``; :data:`pgvar.estimators.CONSTANT_BASELINES`).
ESTIMATORS: dict[str, str] = {
    "none": "G_t (REINFORCE, no baseline)",
    "mean": "G_t - mean of the batch's returns",
    "optimal": "G_t - b*, b* = E[|g|^2 G] / E[|g|^2] on the batch (Greensmith et al. 2004)",
    "exact_value": "G_t - V^pi(s_t), the exact state value",
    "gae_fitted_value": "GAE(lambda) with V fitted by least squares on an independent batch",
    "qprop_fitted_critic": "Q-Prop: G_t - V(s) minus a critic control variate, plus its analytic term (Box: Taylor "
    "CV, conservative eta cross-fitted over episode halves; Discrete: all-action CV); V and Q_w fitted on an independent batch",
    "qprop_fixed_eta": "Q-Prop as above with eta = 1 (Box; Discrete: the all-action CV, which has no eta)",
    "qprop_as_published": "Q-Prop as above, normalized as published: the signal centred and divided by its batch "
    "std sigma, the analytic term not; times sigma to the gradient's scale (Tucker et al. 2018: biased toward "
    "the critic's gradient)",
}

#: The Q-Prop rows of :data:`ESTIMATORS`: (eta rule for Box problems, normalized as published).
_QPROP_VARIANTS: dict[str, tuple[str, bool]] = {
    "qprop_fitted_critic": ("conservative", False),
    "qprop_fixed_eta": ("fixed", False),
    "qprop_as_published": ("conservative", True),
}


def make_problem(name: str) -> ExactGradientProblem:
    """Build a built-in problem by name (``"tabular"``, ``"bandit"``, ``"lqr"``)."""
    check_choice("problem", name, PROBLEMS)
    return PROBLEMS[name]()


def _score_vectors(problem: ExactGradientProblem, params: Params, batch: EpisodeBatch) -> torch.Tensor:
    """``grad_theta log pi(a_t|s_t)`` of every valid step, scattered into ``[T, N, P]`` (zeros on padding).

    Per-sample gradients of the problem's batched ``log_prob``, each sample given a leading dimension of one (a
    0-d index tensor under ``vmap`` would need ``.item()``).
    """
    mask = batch.mask
    grads = per_sample_gradients(
        lambda p, obs, act: problem.log_prob(p, obs.unsqueeze(0), act.unsqueeze(0)).sum(),
        params,
        (batch.observations[mask], batch.actions[mask]),
    )
    flat = flatten_per_sample(grads)
    scores = flat.new_zeros((*mask.shape, flat.shape[1]))
    scores[mask] = flat
    return scores


def _qprop_estimate(
    problem: ExactGradientProblem,
    params: Params,
    batch: EpisodeBatch,
    scores: torch.Tensor,
    returns: torch.Tensor,
    fitted_value: FittedValue,
    critic: FittedCritic,
    gamma: float,
    eta_rule: str = "conservative",
    as_published: bool = False,
) -> torch.Tensor:
    r"""One batch's Q-Prop estimate ``[P]``: the residual score-function term plus the analytic term.

    Continuous actions (Gu et al. 2017, Eq. 9): :math:`\bar A = \nabla_a Q_w(s, \mu)(a - \mu)`, conservative
    eta from the batch covariance (unbiased up to O(1/N)), analytic term
    :math:`\eta\, \nabla_\theta \mu_\theta(s)^\top \nabla_a Q_w(s, \mu)`. Discrete actions: the exact
    all-action control variate, analytic term :math:`\nabla_\theta \sum_a \pi_\theta(a|s) Q_w(s, a)`. Each
    step carries the policy-gradient theorem's :math:`\gamma^t`. ``eta_rule`` is :func:`qprop_eta`'s rule (batch
    scope; Box only). ``as_published``: the signal is centred and divided by its batch std :math:`\sigma`
    (:func:`qprop_normalize`, ``"as_published"``) and the analytic term is not; the sum is multiplied by
    :math:`\sigma` to stay in the gradient's scale, so its expectation is about :math:`\nabla J + (\sigma - 1)`
    times the analytic term's (Tucker et al. 2018).
    """
    mask = batch.mask
    discount = gamma ** batch.timesteps.to(returns.dtype)
    adv_hat = returns - fitted_value(batch.observations, batch.timesteps)
    observations = batch.observations[mask]
    if critic.n_actions is not None:
        n_actions = critic.n_actions
        all_actions = torch.arange(n_actions)
        q_all = critic.all_actions(batch.observations, batch.timesteps)
        log_probs = problem.log_prob(
            params, batch.observations.unsqueeze(-1).expand(*mask.shape, n_actions), all_actions.expand(*mask.shape, n_actions)
        ).detach()
        signal = all_action_control_variate(q_all, log_probs.exp(), batch.actions, adv_hat, mask=mask).learning_signal
        weights = (discount.unsqueeze(-1) * q_all)[mask]
        analytic = per_sample_gradients(
            lambda p, obs, w: (problem.log_prob(p, obs.expand(n_actions), all_actions).exp() * w).sum(),
            params,
            (observations, weights),
        )
    else:
        if not isinstance(problem, GaussianPolicyProblem):  # checked by compare_on_problem
            raise TypeError(f"{type(problem).__name__} has no mean_action(params, observations)")
        mean_action = problem.mean_action
        mu = mean_action(params, batch.observations).detach()
        at_mean = mu.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad_q,) = torch.autograd.grad(critic(batch.observations, at_mean, batch.timesteps).sum(), at_mean)
        adv_bar = qprop_control_variate(grad_q, batch.actions.to(mu.dtype), mu)
        eta = qprop_eta(adv_hat, adv_bar, rule=eta_rule, scope="crossfit", mask=mask)  # halves of the episodes
        signal = qprop_learning_signal(adv_hat, adv_bar, eta)
        weights = ((discount * eta).unsqueeze(-1) * grad_q)[mask]
        analytic = per_sample_gradients(
            lambda p, obs, w: (mean_action(p, obs.unsqueeze(0)) * w).sum(), params, (observations, weights)
        )
    analytic_sum = flatten_per_sample(analytic).sum(0)
    if as_published:
        sigma = float(signal[mask].std()) if int(mask.sum()) > 1 else 1.0
        centred = qprop_normalize(signal, 1.0, "as_published", mask=mask, signal_std=sigma).learning_signal
        residual = torch.einsum("tn,tnp->p", centred * discount * mask, scores)
        return sigma * (residual + analytic_sum) / batch.n_episodes
    residual = torch.einsum("tn,tnp->p", signal * discount * mask, scores)
    return (residual + analytic_sum) / batch.n_episodes


def _problem_returns(problem: ExactGradientProblem, params: Params, batch: EpisodeBatch, gamma: float) -> torch.Tensor:
    """Discounted returns-to-go, bootstrapped only where an episode was cut by the time limit, from the exact
    value of its final state (so that no estimator inherits a truncation bias)."""
    next_values = torch.where(
        batch.truncated,
        problem.exact_state_values(params, batch.next_observations, batch.timesteps + 1),
        torch.zeros_like(batch.rewards),
    )
    return discounted_returns(batch.rewards, batch.terminated, batch.truncated, next_values, gamma=gamma)


def _learning_signals(
    names: Sequence[str],
    problem: ExactGradientProblem,
    params: Params,
    batch: EpisodeBatch,
    scores: torch.Tensor,
    fitted_value: FittedValue | None,
    gamma: float,
    gae_lambda: float,
) -> dict[str, torch.Tensor]:
    """The ``[T, N]`` learning signal of every estimator on one batch (before the ``gamma ** t`` weight)."""
    mask = batch.mask
    returns = _problem_returns(problem, params, batch, gamma)
    discount = gamma ** batch.timesteps.to(returns.dtype)
    signals: dict[str, torch.Tensor] = {}
    for name in names:
        if name in CONSTANT_BASELINES:
            # The optimal constant weights each return by the squared norm of its gamma^t-weighted score.
            sq_norms = (discount.unsqueeze(-1) * scores).square().sum(-1) if name == "optimal" else None
            signal = returns - constant_baseline(name, returns, mask, score_sq_norms=sq_norms)
        elif name == "exact_value":
            signal = returns - problem.exact_state_values(params, batch.observations, batch.timesteps)
        elif name == "gae_fitted_value":
            assert fitted_value is not None
            values = fitted_value(batch.observations, batch.timesteps)
            next_fitted = fitted_value(batch.next_observations, batch.timesteps + 1)
            signal = gae_advantages(
                batch.rewards, values, next_fitted, batch.terminated, batch.truncated, gamma=gamma, gae_lambda=gae_lambda
            )
        else:  # pragma: no cover - names are validated by the caller
            raise AssertionError(name)
        signals[name] = signal * discount * mask
    return signals


def compare_on_problem(
    problem: ExactGradientProblem | str = "tabular",
    *,
    estimators: Sequence[str] = tuple(ESTIMATORS),
    batch_size: int = 32,
    n_batches: int = 200,
    seed: int = 0,
    gae_lambda: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> ComparisonResult:
    """Compare estimators of :math:`\\nabla J` on shared batches of a problem whose exact gradient is known.

    :param problem: an :class:`~pgvar.problems.base.ExactGradientProblem` or a built-in name (:data:`PROBLEMS`)
    :param estimators: names from :data:`ESTIMATORS`
    :param batch_size: episodes per batch (one gradient estimate per batch)
    :param n_batches: independent batches (>= 2: the variance is measured across them)
    :param seed: seeds the policy parameters and the sampling
    :param gae_lambda: lambda of the ``"gae_fitted_value"`` estimator
    :param progress: called with the number of batches done after each batch (a progress bar's hook)
    :return: a :class:`ComparisonResult`

    >>> result = compare_on_problem("bandit", estimators=["none", "exact_value"], batch_size=16, n_batches=20)
    >>> result.summary("exact_value").variance < result.summary("none").variance
    True
    """
    problem_name = problem if isinstance(problem, str) else type(problem).__name__
    if isinstance(problem, str):
        problem = make_problem(problem)
    estimators = list(estimators)
    if not estimators:
        raise ValueError("estimators must name at least one estimator, got an empty list")
    for name in estimators:
        check_choice("estimators", name, ESTIMATORS)
    batch_size = int(check_positive("batch_size", batch_size, integer=True))
    n_batches = int(check_positive("n_batches", n_batches, integer=True))
    if n_batches < 2:
        raise ValueError(f"n_batches must be >= 2 (the variance is measured across batches), got {n_batches}")
    gae_lambda = check_unit_interval("gae_lambda", gae_lambda)
    gamma = float(problem.gamma)

    generator = torch.Generator().manual_seed(seed)
    params = problem.initial_parameters(seed)
    exact = flatten(problem.exact_policy_gradient(params))
    fitted_value = critic = None
    qprop_names = [name for name in estimators if name in _QPROP_VARIANTS]
    if "gae_fitted_value" in estimators or qprop_names:
        # Fitted on their own batch, so that they are independent of the batches they score.
        fit_batch = problem.sample_episodes(params, max(4 * batch_size, 256), generator)
        fitted_value = FittedValue.fit(problem, fit_batch, gamma)
        if qprop_names:
            if getattr(problem.action_space, "n", None) is None and not isinstance(problem, GaussianPolicyProblem):
                raise ValueError(
                    f"estimators: {qprop_names[0]!r} needs mean_action(params, observations) on a continuous "
                    f"problem, which {type(problem).__name__} does not have"
                )
            critic = FittedCritic.fit(problem, fit_batch, gamma)

    estimates = {name: torch.empty(n_batches, exact.numel(), dtype=exact.dtype) for name in estimators}
    for k in range(n_batches):
        batch = problem.sample_episodes(params, batch_size, generator)
        scores = _score_vectors(problem, params, batch)
        signal_names = [name for name in estimators if name not in _QPROP_VARIANTS]
        signals = _learning_signals(signal_names, problem, params, batch, scores, fitted_value, gamma, gae_lambda)
        for name, signal in signals.items():
            estimates[name][k] = torch.einsum("tn,tnp->p", signal, scores) / batch_size
        if critic is not None:
            assert fitted_value is not None
            returns = _problem_returns(problem, params, batch, gamma)
            for name in qprop_names:
                eta_rule, as_published = _QPROP_VARIANTS[name]
                estimates[name][k] = _qprop_estimate(
                    problem, params, batch, scores, returns, fitted_value, critic, gamma, eta_rule, as_published
                )
        if progress is not None:
            progress(k + 1)

    all_stats = [estimate_statistics(estimates[name], reference=exact) for name in estimators]
    rows = [
        _summary(name, stats, float(exact.square().sum()), all_stats[0].variance_trace)
        for name, stats in zip(estimators, all_stats)
    ]
    return ComparisonResult(
        problem=problem_name,
        batch_size=batch_size,
        n_batches=n_batches,
        seed=seed,
        gamma=gamma,
        gae_lambda=gae_lambda,
        n_parameters=exact.numel(),
        exact_gradient_norm=float(exact.norm()),
        estimators=rows,
        versions=library_versions(),
    )


def _summary(name: str, stats: EstimateStatistics, exact_sq_norm: float, first_variance: float) -> EstimatorSummary:
    """One row of the result from the statistics of an estimator's batch estimates (given a reference)."""
    assert stats.bias_norm is not None and stats.max_abs_z is not None
    assert stats.cosine_to_reference is not None and stats.cosine_to_reference_se is not None
    return EstimatorSummary(
        name=name,
        description=ESTIMATORS[name],
        bias_norm=float(stats.bias_norm),
        bias_max_abs_z=float(stats.max_abs_z),
        variance=float(stats.variance_trace),
        variance_ratio=safe_ratio(stats.variance_trace, first_variance),
        snr=safe_ratio(exact_sq_norm, stats.variance_trace),
        cosine=float(stats.cosine_to_reference),
        cosine_se=float(stats.cosine_to_reference_se),
        pairwise_cosine=float(stats.pairwise_cosine),
    )
