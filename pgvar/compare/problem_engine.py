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

import math
import time
from collections.abc import Callable, Sequence

import torch

from pgvar._validation import check_choice, check_positive, check_unit_interval
from pgvar.compare.fitted import FittedCritic, FittedFactorizedBaseline, FittedHorizonValue, FittedValue
from pgvar.compare.results import (
    ComparisonResult,
    EstimatorSummary,
    PairedEstimates,
    library_versions,
    safe_ratio,
)
from pgvar.estimators import (
    CONSTANT_BASELINES,
    all_action_control_variate,
    constant_baseline,
    discounted_returns,
    factorized_action_baseline,
    gae_advantages,
    horizon_episode_flags,
    qprop_action_variance,
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

__all__ = [
    "ALL_ESTIMATORS",
    "ESTIMATORS",
    "PROBLEMS",
    "PROBLEM_SPECIFIC_ESTIMATORS",
    "ProblemEstimators",
    "applicable_problem_estimators",
    "compare_on_problem",
    "make_problem",
    "sample_problem_estimates",
]

#: Built-in problems with exact gradients, by the name ``pgvar compare --problem`` takes.
PROBLEMS: dict[str, Callable[[], ExactGradientProblem]] = {
    "tabular": lambda: TabularMDP(n_states=5, n_actions=3, gamma=0.9, seed=0),
    "bandit": lambda: GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0),
    "lqr": lambda: LinearQuadraticRegulator(seed=0),
}

#: The estimators ``compare_on_problem`` knows, in table order, with what each one uses as the learning signal.
#: The constant baselines have the names of the ``baseline`` option of pgvar's algorithms (``none``, ``mean``,
#: ``optimal``; :data:`pgvar.estimators.CONSTANT_BASELINES`). The Q-Prop rows compute eta by cross-fitting (the
#: default scope of :func:`pgvar.estimators.qprop_eta`: the eta of one half of the episodes from the other half,
#: unbiased); on Discrete problems every Q-Prop row is the all-action control variate (which has no eta).
ESTIMATORS: dict[str, str] = {
    "none": "G_t (REINFORCE, no baseline)",
    "mean": "G_t - mean of the batch's returns",
    "optimal": "G_t - b*, b* = E[|g|^2 G] / E[|g|^2] on the batch (Greensmith et al. 2004)",
    "exact_value": "G_t - V^pi(s_t), the exact state value",
    "gae_fitted_value": "GAE(lambda) with V fitted by least squares on an independent batch",
    "gae1_fitted_value": "GAE(lambda = 1) = G_t - V(s_t) with V fitted by least squares on an independent batch",
    "qprop_fitted_critic": "Q-Prop: G_t - V(s) minus a critic control variate, plus its analytic term (Box: Taylor "
    "CV, conservative eta, cross-fitted; Discrete: all-action CV); V and Q_w fitted on an independent batch",
    "qprop_fixed_eta": "Q-Prop as above with eta = 1 (Box; Discrete: the all-action CV, which has no eta)",
    "qprop_adaptive_eta": "Q-Prop as above with the adaptive eta = Cov / Var_a(A_bar), cross-fitted (Box)",
    "qprop_consistent": "Q-Prop (conservative eta) normalized consistently: the signal centred and divided by its "
    "batch std sigma, eta divided by sigma too; times sigma to the gradient's scale (Tucker et al. 2018's fix)",
    "qprop_as_published": "Q-Prop as above, normalized as published: the signal centred and divided by its batch "
    "std sigma, the analytic term not; times sigma to the gradient's scale (Tucker et al. 2018: biased toward "
    "the critic's gradient)",
}

#: Rows that only some problems can run (``compare_on_problem`` raises ``ValueError`` naming the row elsewhere):
#: not in the default of ``compare_on_problem`` nor of ``pgvar compare``.
PROBLEM_SPECIFIC_ESTIMATORS: dict[str, str] = {
    "horizon_value": "GAE(lambda) with the horizon-aware V(s, t) = V0(s) + (1 - gamma^(T - t)) / (1 - gamma) "
    "r_bar(s) (Tucker et al. 2018, Sec. 6), fitted on an independent batch (finite-horizon problems)",
    "all_action": "G_t - V(s) - (Q_w(s, a) - sum_a' pi(a'|s) Q_w(s, a')) plus sum_a grad pi(a|s) Q_w(s, a) "
    "(Discrete problems; the fitted critic)",
    "factorized_baseline": "sum_k grad log pi_k(a_k|s) (G_t - b_k(s, a_-k)) with per-dimension baselines fitted "
    "on an independent batch (Wu et al. 2018; Box problems with >= 2 action dimensions and a diagonal Gaussian "
    "policy with a log_std parameter)",
}

#: Every row, in table order.
ALL_ESTIMATORS: dict[str, str] = {**ESTIMATORS, **PROBLEM_SPECIFIC_ESTIMATORS}

#: The Q-Prop rows of :data:`ESTIMATORS`: (eta rule for Box problems, normalization of the learning signal).
_QPROP_VARIANTS: dict[str, tuple[str, str]] = {
    "qprop_fitted_critic": ("conservative", "none"),
    "qprop_fixed_eta": ("fixed", "none"),
    "qprop_adaptive_eta": ("adaptive", "none"),
    "qprop_consistent": ("conservative", "consistent"),
    "qprop_as_published": ("conservative", "as_published"),
    "all_action": ("fixed", "none"),
}
#: Rows whose learning signal is a return minus a state baseline or a GAE advantage (shared score vectors).
_SIGNAL_ROWS = ("none", "mean", "optimal", "exact_value", "gae_fitted_value", "gae1_fitted_value", "horizon_value")


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


def _action_std(problem: ExactGradientProblem, params: Params, like: torch.Tensor) -> torch.Tensor:
    r"""The per-dimension standard deviation of a diagonal Gaussian policy with a ``log_std`` parameter, expanded
    like ``like`` (``[..., A]``): the adaptive eta's :math:`\operatorname{Var}_a(\bar A \mid s)` and the
    factorized baseline's per-dimension log-probabilities need it."""
    if "log_std" not in params:
        raise ValueError(
            f"this estimator needs a diagonal Gaussian policy with a 'log_std' parameter, {type(problem).__name__}'s "
            f"parameters are {sorted(params)}"
        )
    return params["log_std"].detach().exp().to(like.dtype).expand_as(like)


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
    normalization: str = "none",
    *,
    eta_scope: str = "crossfit",
) -> torch.Tensor:
    r"""One batch's Q-Prop estimate ``[P]``: the residual score-function term plus the analytic term.

    Continuous actions (Gu et al. 2017, Eq. 9): :math:`\bar A = \nabla_a Q_w(s, \mu)(a - \mu)`, eta by
    :func:`qprop_eta` (``eta_rule``, ``eta_scope``; ``"crossfit"`` (default) is unbiased, ``"batch"`` biased by
    :math:`O(1/\sqrt N)` where the covariance is near 0), analytic term :math:`\eta\, \nabla_\theta \mu_\theta(s)^\top \nabla_a Q_w(s, \mu)`.
    Discrete actions: the exact all-action control variate, analytic term
    :math:`\nabla_\theta \sum_a \pi_\theta(a|s) Q_w(s, a)`. Each step carries the policy-gradient theorem's
    :math:`\gamma^t`. ``normalization`` (:func:`qprop_normalize`): ``"as_published"``: the signal is centred and
    divided by its batch std :math:`\sigma` and the analytic term is not; the sum is multiplied by :math:`\sigma`
    to stay in the gradient's scale, so its expectation is about :math:`\nabla J + (\sigma - 1)` times the
    analytic term's (Tucker et al. 2018). ``"consistent"``: eta is divided by :math:`\sigma` too, so the sum times
    :math:`\sigma` is the centred estimator (unbiased up to the :math:`O(1/N)` of the batch-mean centring).
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
        action_variance = None
        if eta_rule == "adaptive":
            action_variance = qprop_action_variance(grad_q, _action_std(problem, params, grad_q))
        eta = qprop_eta(adv_hat, adv_bar, rule=eta_rule, scope=eta_scope, action_variance=action_variance, mask=mask)
        signal = qprop_learning_signal(adv_hat, adv_bar, eta)
        weights = ((discount * eta).unsqueeze(-1) * grad_q)[mask]
        analytic = per_sample_gradients(
            lambda p, obs, w: (mean_action(p, obs.unsqueeze(0)) * w).sum(), params, (observations, weights)
        )
    analytic_sum = flatten_per_sample(analytic).sum(0)
    if normalization != "none":
        sigma = float(signal[mask].std()) if int(mask.sum()) > 1 else 1.0
        centred = qprop_normalize(signal, 1.0, normalization, mask=mask, signal_std=sigma).learning_signal
        residual = torch.einsum("tn,tnp->p", centred * discount * mask, scores)
        if normalization == "consistent":  # eta / sigma in the analytic term: times sigma, it is eta again
            return (sigma * residual + analytic_sum) / batch.n_episodes
        return sigma * (residual + analytic_sum) / batch.n_episodes
    residual = torch.einsum("tn,tnp->p", signal * discount * mask, scores)
    return (residual + analytic_sum) / batch.n_episodes


def _factorized_estimate(
    problem: ExactGradientProblem,
    params: Params,
    batch: EpisodeBatch,
    returns: torch.Tensor,
    baseline: FittedFactorizedBaseline,
    gamma: float,
) -> torch.Tensor:
    r"""One batch's estimate ``[P]`` with Wu et al.'s factorized baseline:
    :math:`\frac1N \sum_{t,n} \gamma^t \sum_k \nabla_\theta \log \pi_k(a_k|s)\, (G_t - b_k(s, a_{-k}))`
    (:func:`pgvar.estimators.factorized_action_baseline`; per-dimension log-probabilities of the diagonal
    Gaussian with mean ``problem.mean_action`` and std ``exp(log_std)``)."""
    if not isinstance(problem, GaussianPolicyProblem):  # checked by compare_on_problem
        raise TypeError(f"{type(problem).__name__} has no mean_action(params, observations)")
    mask = batch.mask
    discount = (gamma ** batch.timesteps.to(returns.dtype))[mask]
    b = baseline(batch.observations, batch.actions, batch.timesteps)[mask]
    mean_action = problem.mean_action

    def weighted_log_probs(p: Params, obs: torch.Tensor, act: torch.Tensor, adv: torch.Tensor, bk: torch.Tensor):
        mu = mean_action(p, obs.unsqueeze(0)).squeeze(0)
        log_std = p["log_std"].to(mu.dtype)
        z = (act.to(mu.dtype) - mu) * torch.exp(-log_std)
        per_dim = -0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)
        return factorized_action_baseline(per_dim.unsqueeze(0), adv.reshape(1), bk.unsqueeze(0)).surrogate

    _action_std(problem, params, batch.actions)  # a clear error without a log_std parameter
    grads = per_sample_gradients(
        weighted_log_probs, params, (batch.observations[mask], batch.actions[mask], returns[mask] * discount, b * discount.unsqueeze(-1))
    )
    return flatten_per_sample(grads).sum(0) / batch.n_episodes


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
    horizon_value: FittedHorizonValue | None = None,
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
        elif name in ("gae_fitted_value", "gae1_fitted_value", "horizon_value"):
            value_fn = horizon_value if name == "horizon_value" else fitted_value
            assert value_fn is not None
            lam = 1.0 if name == "gae1_fitted_value" else gae_lambda
            terminated, truncated = batch.terminated, batch.truncated
            if horizon_value is not None and name == "horizon_value":
                terminated, truncated = horizon_episode_flags(
                    terminated, truncated, batch.timesteps.clamp(max=horizon_value.horizon - 1), horizon=horizon_value.horizon
                )
            values = value_fn(batch.observations, batch.timesteps)
            next_fitted = value_fn(batch.next_observations, batch.timesteps + 1)
            signal = gae_advantages(batch.rewards, values, next_fitted, terminated, truncated, gamma=gamma, gae_lambda=lam)
        else:  # pragma: no cover - names are validated by the caller
            raise AssertionError(name)
        signals[name] = signal * discount * mask
    return signals


def _check_applicable(problem: ExactGradientProblem, estimators: Sequence[str]) -> None:
    """``ValueError`` for a row the problem cannot run (naming the row and why)."""
    discrete = getattr(problem.action_space, "n", None) is not None
    for name in estimators:
        if name in _QPROP_VARIANTS or name == "factorized_baseline":
            if not discrete and not isinstance(problem, GaussianPolicyProblem):
                raise ValueError(
                    f"estimators: {name!r} needs mean_action(params, observations) on a continuous "
                    f"problem, which {type(problem).__name__} does not have"
                )
        if name == "all_action" and not discrete:
            raise ValueError(f"estimators: 'all_action' needs Discrete actions, {type(problem).__name__} has Box")
        if name == "horizon_value" and getattr(problem, "horizon", None) is None:
            raise ValueError(
                f"estimators: 'horizon_value' needs a finite-horizon problem, {type(problem).__name__} has horizon None"
            )
        if name == "factorized_baseline":
            shape: tuple[int, ...] = tuple(getattr(problem.action_space, "shape", None) or ())
            if discrete or len(shape) != 1 or shape[0] < 2:
                raise ValueError(
                    f"estimators: 'factorized_baseline' needs Box actions with >= 2 dimensions, "
                    f"{type(problem).__name__} has {problem.action_space}"
                )


def applicable_problem_estimators(problem: ExactGradientProblem) -> list[str]:
    """The rows of :data:`ALL_ESTIMATORS` that ``problem`` can run, in table order."""
    rows = []
    for name in ALL_ESTIMATORS:
        try:
            _check_applicable(problem, [name])
        except ValueError:
            continue
        rows.append(name)
    return rows


class ProblemEstimators:
    """The problem engine's estimators prepared at one policy: what they fit once (a value function, a critic, a
    horizon-aware value, factorized baselines, all on a batch of their own) and one gradient estimate per batch.

    :meth:`estimates` computes every requested row on one batch (the score vectors are shared); the benchmark
    suite times it one row at a time.

    :param problem: an :class:`~pgvar.problems.base.ExactGradientProblem`
    :param estimators: names from :data:`ESTIMATORS` or :data:`PROBLEM_SPECIFIC_ESTIMATORS`
    :param params: the policy parameters (held fixed)
    :param generator: draws the fitting batch (``max(4 * batch_size, 256)`` episodes)
    :param batch_size: episodes per batch
    :param gae_lambda: lambda of the ``"gae_fitted_value"`` and ``"horizon_value"`` rows
    """

    def __init__(
        self,
        problem: ExactGradientProblem,
        estimators: Sequence[str],
        params: Params,
        generator: torch.Generator,
        *,
        batch_size: int,
        gae_lambda: float = 0.95,
    ) -> None:
        for name in estimators:
            check_choice("estimators", name, ALL_ESTIMATORS)
        _check_applicable(problem, estimators)
        self.problem, self.params, self.estimators = problem, params, list(estimators)
        self.batch_size, self.gae_lambda, self.gamma = batch_size, gae_lambda, float(problem.gamma)
        self.fitted_value: FittedValue | None = None
        self.critic: FittedCritic | None = None
        self.horizon_value: FittedHorizonValue | None = None
        self.factorized: FittedFactorizedBaseline | None = None
        names = set(self.estimators)
        if names - {"none", "mean", "optimal", "exact_value"}:
            # Fitted on their own batch, so that they are independent of the batches they score.
            fit_batch = problem.sample_episodes(params, max(4 * batch_size, 256), generator)
            self.fitted_value = FittedValue.fit(problem, fit_batch, self.gamma)
            if names & set(_QPROP_VARIANTS):
                self.critic = FittedCritic.fit(problem, fit_batch, self.gamma)
            if "horizon_value" in names:
                self.horizon_value = FittedHorizonValue.fit(problem, fit_batch, self.gamma)
            if "factorized_baseline" in names:
                self.factorized = FittedFactorizedBaseline.fit(problem, fit_batch, self.gamma)

    def sample(self, generator: torch.Generator) -> EpisodeBatch:
        """One batch of ``batch_size`` episodes under the fixed policy."""
        return self.problem.sample_episodes(self.params, self.batch_size, generator)

    def estimates(self, batch: EpisodeBatch, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The ``[P]`` gradient estimate of every row in ``names`` (default: all prepared ones) on ``batch``."""
        names = self.estimators if names is None else list(names)
        problem, params, gamma = self.problem, self.params, self.gamma
        out: dict[str, torch.Tensor] = {}
        scores = _score_vectors(problem, params, batch)
        n_episodes = batch.n_episodes
        signal_names = [name for name in names if name in _SIGNAL_ROWS]
        signals = _learning_signals(
            signal_names, problem, params, batch, scores, self.fitted_value, gamma, self.gae_lambda, self.horizon_value
        )
        for name, signal in signals.items():
            out[name] = torch.einsum("tn,tnp->p", signal, scores) / n_episodes
        others = [name for name in names if name not in _SIGNAL_ROWS]
        if others:
            returns = _problem_returns(problem, params, batch, gamma)
            for name in others:
                if name == "factorized_baseline":
                    assert self.factorized is not None
                    out[name] = _factorized_estimate(problem, params, batch, returns, self.factorized, gamma)
                    continue
                assert self.fitted_value is not None and self.critic is not None
                eta_rule, normalization = _QPROP_VARIANTS[name]
                out[name] = _qprop_estimate(
                    problem, params, batch, scores, returns, self.fitted_value, self.critic, gamma, eta_rule,
                    normalization, eta_scope="crossfit",
                )  # fmt: skip
        return {name: out[name] for name in names}


def sample_problem_estimates(
    problem: ExactGradientProblem | str,
    estimators: Sequence[str],
    *,
    batch_size: int = 32,
    n_batches: int = 200,
    seed: int = 0,
    gae_lambda: float = 0.95,
    sampling_seed: int | None = None,
) -> PairedEstimates:
    """``n_batches`` estimates of every row in ``estimators`` on shared batches, against the exact gradient.

    The same sampling as :func:`compare_on_problem` (same seed, same batches), returning the raw estimates for
    :func:`pgvar.compare.estimator_metrics` and the benchmark suite.

    :param problem: a problem or a built-in name (:data:`PROBLEMS`)
    :param estimators: rows of :data:`ALL_ESTIMATORS` that the problem can run
    :param batch_size: episodes per batch
    :param n_batches: batches (>= 2)
    :param seed: seeds the policy parameters and the sampling
    :param gae_lambda: lambda of the GAE rows
    :param sampling_seed: seeds the sampling instead (same policy, other batches); ``None``: ``seed``
    :return: :class:`~pgvar.compare.PairedEstimates` (``exact=True``)
    """
    name = problem if isinstance(problem, str) else type(problem).__name__
    if isinstance(problem, str):
        problem = make_problem(problem)
    batch_size = int(check_positive("batch_size", batch_size, integer=True))
    n_batches = int(check_positive("n_batches", n_batches, integer=True))
    if n_batches < 2:
        raise ValueError(f"n_batches must be >= 2 (the variance is measured across batches), got {n_batches}")
    generator = torch.Generator().manual_seed(seed if sampling_seed is None else sampling_seed)
    params = problem.initial_parameters(seed)
    exact = flatten(problem.exact_policy_gradient(params))
    start = time.perf_counter()
    prepared = ProblemEstimators(problem, estimators, params, generator, batch_size=batch_size, gae_lambda=gae_lambda)
    seconds = {"fit": time.perf_counter() - start, "sampling": 0.0, "estimates": 0.0}
    estimates = {row: torch.empty(n_batches, exact.numel(), dtype=exact.dtype) for row in prepared.estimators}
    first = None
    for k in range(n_batches):
        start = time.perf_counter()
        batch = prepared.sample(generator)
        seconds["sampling"] += time.perf_counter() - start
        start = time.perf_counter()
        for row, value in prepared.estimates(batch).items():
            estimates[row][k] = value
        seconds["estimates"] += time.perf_counter() - start
        first = batch if first is None else first
    return PairedEstimates(
        group=name,
        estimates=estimates,
        reference=exact,
        exact=True,
        batch_size=batch_size,
        batch_unit="episodes",
        estimator=prepared,
        timing_batch=first,
        seconds=seconds,
        settings={
            "problem": name, "batch_size": batch_size, "n_batches": n_batches, "seed": seed,
            "gamma": float(problem.gamma), "gae_lambda": gae_lambda, "n_parameters": int(exact.numel()),
            "exact_gradient_norm": float(exact.norm()), "reference": "exact gradient",
        },
        versions=library_versions(),
    )  # fmt: skip


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
    :param estimators: names from :data:`ESTIMATORS` (every problem runs them; the default: all) or
        :data:`PROBLEM_SPECIFIC_ESTIMATORS`
    :param batch_size: episodes per batch (one gradient estimate per batch)
    :param n_batches: independent batches (>= 2: the variance is measured across them)
    :param seed: seeds the policy parameters and the sampling
    :param gae_lambda: lambda of the ``"gae_fitted_value"`` and ``"horizon_value"`` estimators
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
        check_choice("estimators", name, ALL_ESTIMATORS)
    batch_size = int(check_positive("batch_size", batch_size, integer=True))
    n_batches = int(check_positive("n_batches", n_batches, integer=True))
    if n_batches < 2:
        raise ValueError(f"n_batches must be >= 2 (the variance is measured across batches), got {n_batches}")
    gae_lambda = check_unit_interval("gae_lambda", gae_lambda)
    gamma = float(problem.gamma)

    generator = torch.Generator().manual_seed(seed)
    params = problem.initial_parameters(seed)
    exact = flatten(problem.exact_policy_gradient(params))
    prepared = ProblemEstimators(problem, estimators, params, generator, batch_size=batch_size, gae_lambda=gae_lambda)
    estimates = {name: torch.empty(n_batches, exact.numel(), dtype=exact.dtype) for name in estimators}
    for k in range(n_batches):
        for name, value in prepared.estimates(prepared.sample(generator)).items():
            estimates[name][k] = value
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
        description=ALL_ESTIMATORS[name],
        bias_norm=float(stats.bias_norm),
        bias_max_abs_z=float(stats.max_abs_z),
        variance=float(stats.variance_trace),
        variance_ratio=safe_ratio(stats.variance_trace, first_variance),
        snr=safe_ratio(exact_sq_norm, stats.variance_trace),
        cosine=float(stats.cosine_to_reference),
        cosine_se=float(stats.cosine_to_reference_se),
        pairwise_cosine=float(stats.pairwise_cosine),
    )
