r"""Paired comparison of policy-gradient estimators on shared batches.

Every estimator sees the *same* sampled batches, so differences between them are not sampling luck. On a
problem whose exact gradient is known (:mod:`pgvar.problems`) each batch of ``N`` episodes gives one estimate
per estimator,

.. math::  \hat g = \frac{1}{N} \sum_{i=1}^N \sum_t \gamma^t\, \nabla_\theta \log \pi_\theta(a_{it}|s_{it})\,
           \big(\Psi_{it}\big),

where the learning signal :math:`\Psi` is the return-to-go minus a baseline, or a GAE advantage. Repeating over
``K`` independent batches gives, per estimator: the bias against the exact gradient with its standard error, the
variance of the batch estimate (trace of its covariance, across batches), the signal-to-noise ratio
:math:`\lVert\nabla J\rVert^2 / \operatorname{tr}\operatorname{Var}[\hat g]`, and the cosine to the exact
gradient. The CLI (``pgvar compare``), the benchmarks and the docs call this module; it returns numbers only.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pgvar._validation import check_choice, check_positive, check_unit_interval
from pgvar.estimators import (
    all_action_control_variate,
    batch_mean_baseline,
    discounted_returns,
    gae_advantages,
    normalize_advantages,
    optimal_constant_baseline,
    qprop_control_variate,
    qprop_eta,
    qprop_learning_signal,
    qprop_normalize,
)
from pgvar.measure import estimate_statistics, flatten, flatten_per_sample, per_sample_gradients
from pgvar.problems import ExactGradientProblem, GaussianBandit, LinearQuadraticRegulator, TabularMDP
from pgvar.problems.base import EpisodeBatch, Params

__all__ = [
    "ENV_BASELINES",
    "ENV_NORMALIZATIONS",
    "PROBLEMS",
    "ESTIMATORS",
    "ComparisonResult",
    "EstimatorSummary",
    "EnvComparisonResult",
    "EnvEstimatorSummary",
    "RolloutBatch",
    "collect_rollout",
    "compare_on_env",
    "compare_on_problem",
    "make_problem",
]

#: Built-in problems with exact gradients, by the name ``pgvar compare --problem`` takes.
PROBLEMS: dict[str, Callable[[], ExactGradientProblem]] = {
    "tabular": lambda: TabularMDP(n_states=5, n_actions=3, gamma=0.9, seed=0),
    "bandit": lambda: GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0),
    "lqr": lambda: LinearQuadraticRegulator(seed=0),
}

#: The estimators ``compare_on_problem`` knows, in table order, with what each one uses as the learning signal.
ESTIMATORS: dict[str, str] = {
    "none": "G_t (REINFORCE, no baseline)",
    "batch_mean": "G_t - mean of the batch's returns",
    "optimal_constant": "G_t - b*, b* = E[|g|^2 G] / E[|g|^2] on the batch (Greensmith et al. 2004)",
    "exact_value": "G_t - V^pi(s_t), the exact state value",
    "gae_fitted_value": "GAE(lambda) with V fitted by least squares on an independent batch",
    "qprop_fitted_critic": "Q-Prop: G_t - V(s) minus a critic control variate, plus its analytic term (Box: Taylor "
    "CV, conservative eta per batch; Discrete: all-action CV); V and Q_w fitted on an independent batch",
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


@dataclass(frozen=True)
class EstimatorSummary:
    """What one estimator did over ``n_batches`` shared batches (all numbers are plain floats).

    :param name: estimator name (a key of :data:`ESTIMATORS`)
    :param description: its learning signal in words
    :param bias_norm: :math:`\\lVert \\bar g - \\nabla J \\rVert` of the mean over batches
    :param bias_max_abs_z: largest per-coordinate :math:`|\\bar g_k - \\nabla J_k| / \\mathrm{SE}_k`
        (a few units for an unbiased estimator; it grows like :math:`\\sqrt{K}` for a biased one)
    :param variance: :math:`\\operatorname{tr}\\operatorname{Var}[\\hat g]` of one batch estimate, across batches
    :param variance_ratio: ``variance`` divided by that of the first estimator of the comparison
    :param snr: :math:`\\lVert \\nabla J \\rVert^2 / \\text{variance}` (exact gradient, so no plug-in bias)
    :param cosine: mean cosine between a batch estimate and the exact gradient
    :param cosine_se: its standard error over the batches
    :param pairwise_cosine: mean cosine between two batch estimates (Ilyas et al. 2020)
    """

    name: str
    description: str
    bias_norm: float
    bias_max_abs_z: float
    variance: float
    variance_ratio: float
    snr: float
    cosine: float
    cosine_se: float
    pairwise_cosine: float


@dataclass(frozen=True)
class ComparisonResult:
    """A comparison's settings and one :class:`EstimatorSummary` per estimator (see :meth:`to_dict`)."""

    problem: str
    batch_size: int
    n_batches: int
    seed: int
    gamma: float
    gae_lambda: float
    n_parameters: int
    exact_gradient_norm: float
    estimators: list[EstimatorSummary]
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything (``json.dumps(result.to_dict())``)."""
        return asdict(self)

    def summary(self, name: str) -> EstimatorSummary:
        """The summary of the estimator called ``name``."""
        for row in self.estimators:
            if row.name == name:
                return row
        raise KeyError(f"no estimator {name!r} in this result; it has {[r.name for r in self.estimators]}")


def library_versions() -> dict[str, str]:
    """Versions that matter for reproducing a number (MuJoCo trajectories drift between releases)."""
    import numpy as np

    import pgvar

    versions = {"pgvar": pgvar.__version__, "torch": torch.__version__, "numpy": np.__version__}
    versions["python"] = platform.python_version()
    for module in ("gymnasium", "stable_baselines3", "sb3_contrib", "mujoco"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:  # pragma: no cover - optional
            pass
    return versions


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


def _value_features(observations: torch.Tensor, timesteps: torch.Tensor, n_states: int | None, horizon: int | None):
    """Features for a least-squares value fit: one-hot states, or a quadratic in continuous observations,
    times a one-hot of the time step on finite-horizon problems (whose values depend on time)."""
    if n_states is not None:
        features = torch.nn.functional.one_hot(observations.long(), n_states).to(torch.float64)
    else:
        x = observations.to(torch.float64).reshape(*observations.shape[:2], -1)
        rows, cols = torch.triu_indices(x.shape[-1], x.shape[-1])
        features = torch.cat([torch.ones_like(x[..., :1]), x, x[..., rows] * x[..., cols]], dim=-1)
    if horizon is not None:
        time = torch.nn.functional.one_hot(timesteps.clamp(max=horizon - 1), horizon).to(torch.float64)
        features = (time.unsqueeze(-1) * features.unsqueeze(-2)).flatten(-2)
    return features


@dataclass
class _FittedValue:
    """A linear value function ``V(s) = phi(s, t) . w`` fitted by ridge regression on Monte Carlo returns."""

    weights: torch.Tensor
    n_states: int | None
    horizon: int | None

    @classmethod
    def fit(cls, problem: ExactGradientProblem, batch: EpisodeBatch, gamma: float, ridge: float = 1e-6):
        n_states = getattr(problem.observation_space, "n", None)
        horizon = getattr(problem, "horizon", None)
        returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=gamma)
        phi = _value_features(batch.observations, batch.timesteps, n_states, horizon)[batch.mask]
        gram = phi.T @ phi + ridge * len(phi) * torch.eye(phi.shape[1], dtype=phi.dtype)
        weights = torch.linalg.solve(gram, phi.T @ returns[batch.mask])
        return cls(weights, n_states, horizon)

    def __call__(self, observations: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return _value_features(observations, timesteps, self.n_states, self.horizon) @ self.weights


@dataclass
class _FittedCritic:
    """A linear critic ``Q_w(s, a) = psi(s, a, t) . w`` fitted by ridge regression on Monte Carlo returns: tabular
    in ``(s, a)`` for discrete problems, quadratic in ``(s, a)`` for continuous ones (exact for a linear-Gaussian
    policy on a quadratic reward), times a one-hot of the time step on finite-horizon problems."""

    weights: torch.Tensor
    n_states: int | None
    n_actions: int | None
    horizon: int | None

    @classmethod
    def fit(cls, problem: ExactGradientProblem, batch: EpisodeBatch, gamma: float, ridge: float = 1e-6):
        critic = cls(torch.empty(0), getattr(problem.observation_space, "n", None),
                     getattr(problem.action_space, "n", None), getattr(problem, "horizon", None))
        returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=gamma)
        psi = critic.features(batch.observations, batch.actions, batch.timesteps)[batch.mask]
        gram = psi.T @ psi + ridge * len(psi) * torch.eye(psi.shape[1], dtype=psi.dtype)
        critic.weights = torch.linalg.solve(gram, psi.T @ returns[batch.mask])
        return critic

    def features(self, observations: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.n_actions is not None:
            assert self.n_states is not None
            pairs = observations.long() * self.n_actions + actions.long()
            return _value_features(pairs, timesteps, self.n_states * self.n_actions, self.horizon)
        lead = observations.shape[:2]
        joint = torch.cat([observations.reshape(*lead, -1), actions.reshape(*lead, -1)], dim=-1)
        return _value_features(joint, timesteps, None, self.horizon)

    def __call__(self, observations: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.features(observations, actions, timesteps) @ self.weights

    def all_actions(self, observations: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``Q_w(s, a)`` for every discrete action: ``[T, N, A]``."""
        assert self.n_actions is not None
        return torch.stack(
            [self(observations, torch.full_like(observations, a), timesteps) for a in range(self.n_actions)], -1
        )


def _qprop_estimate(
    problem: ExactGradientProblem,
    params: Params,
    batch: EpisodeBatch,
    scores: torch.Tensor,
    returns: torch.Tensor,
    fitted_value: _FittedValue,
    critic: _FittedCritic,
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
        mean_action = problem.mean_action  # type: ignore[attr-defined]
        mu = mean_action(params, batch.observations).detach()
        at_mean = mu.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad_q,) = torch.autograd.grad(critic(batch.observations, at_mean, batch.timesteps).sum(), at_mean)
        adv_bar = qprop_control_variate(grad_q, batch.actions.to(mu.dtype), mu)
        eta = qprop_eta(adv_hat, adv_bar, rule=eta_rule, scope="batch", mask=mask)
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
    fitted_value: _FittedValue | None,
    gamma: float,
    gae_lambda: float,
) -> dict[str, torch.Tensor]:
    """The ``[T, N]`` learning signal of every estimator on one batch (before the ``gamma ** t`` weight)."""
    mask = batch.mask
    returns = _problem_returns(problem, params, batch, gamma)
    discount = gamma ** batch.timesteps.to(returns.dtype)
    signals: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "none":
            signal = returns
        elif name == "batch_mean":
            signal = returns - batch_mean_baseline(returns, mask)
        elif name == "optimal_constant":
            weighted_sq_norms = (discount.unsqueeze(-1) * scores).square().sum(-1)
            signal = returns - optimal_constant_baseline(returns, weighted_sq_norms, mask)
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
        fitted_value = _FittedValue.fit(problem, fit_batch, gamma)
        if qprop_names:
            if getattr(problem.action_space, "n", None) is None and not hasattr(problem, "mean_action"):
                raise ValueError(
                    f"estimators: {qprop_names[0]!r} needs mean_action(params, observations) on a continuous "
                    f"problem, which {type(problem).__name__} does not have"
                )
            critic = _FittedCritic.fit(problem, fit_batch, gamma)

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

    rows = []
    first_variance = None
    for name in estimators:
        stats = estimate_statistics(estimates[name], reference=exact)
        first_variance = stats.variance_trace if first_variance is None else first_variance
        rows.append(
            EstimatorSummary(
                name=name,
                description=ESTIMATORS[name],
                bias_norm=float(stats.bias_norm),
                bias_max_abs_z=float(stats.max_abs_z),
                variance=float(stats.variance_trace),
                variance_ratio=float(stats.variance_trace / first_variance),
                snr=float(exact.square().sum() / stats.variance_trace),
                cosine=float(stats.cosine_to_reference),
                cosine_se=float(stats.cosine_to_reference_se),
                pairwise_cosine=float(stats.pairwise_cosine),
            )
        )
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


# ---------------------------------------------------------------------------------------------------------
# Real environments: an SB3 policy held fixed, many independent batches, a large-batch reference gradient.

#: Baselines compared on a gymnasium environment (the ``baseline`` options of pgvar's algorithms).
ENV_BASELINES: dict[str, str] = {
    "value": "GAE(lambda) with the policy's learned V (SB3's default)",
    "none": "G_t, the return-to-go bootstrapped from V at truncations and at the rollout's end",
    "mean": "G_t - mean of the batch's returns",
    "optimal": "G_t - b*, b* = E[|g|^2 G] / E[|g|^2] with per-sample score norms",
}
#: Advantage normalizations compared on a gymnasium environment.
ENV_NORMALIZATIONS = ("minibatch", "batch", "none")


@dataclass(frozen=True)
class RolloutBatch:
    """``n_steps`` steps of ``N`` parallel environments under a fixed policy, time-major ``[T, N]``.

    ``next_values[t]`` is the value of the true successor of step ``t`` (the final observation at a
    truncation); rewards are the environment's raw rewards (no bootstrap folded in, unlike SB3's buffer).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor


def collect_rollout(policy: Any, env: Any, n_steps: int, last_obs: Any) -> tuple[RolloutBatch, Any]:
    """Run ``policy`` (an SB3 ``ActorCriticPolicy``) for ``n_steps`` steps of the ``VecEnv`` ``env``.

    :return: the batch and the observation to continue from
    """
    import numpy as np
    from gymnasium import spaces

    rows: dict[str, list[Any]] = {k: [] for k in ("obs", "act", "rew", "val", "term", "trunc", "final")}
    obs = last_obs
    for _ in range(n_steps):
        with torch.no_grad():
            obs_tensor = policy.obs_to_tensor(obs)[0]
            actions, values, _ = policy(obs_tensor)
        actions_np = actions.cpu().numpy()
        env_actions = actions_np
        if isinstance(env.action_space, spaces.Box):  # SB3 clips what the env sees, and stores the raw action
            env_actions = np.clip(actions_np, env.action_space.low, env.action_space.high)
        new_obs, rewards, dones, infos = env.step(env_actions)
        truncated = np.array([bool(d and info.get("TimeLimit.truncated", False)) for d, info in zip(dones, infos)])
        final = np.full(len(dones), np.nan, dtype=np.float64)
        for i in np.flatnonzero(truncated):
            with torch.no_grad():
                terminal = policy.obs_to_tensor(infos[i]["terminal_observation"])[0]
                final[i] = float(policy.predict_values(terminal).squeeze())
        rows["obs"].append(obs_tensor)
        rows["act"].append(actions)
        rows["rew"].append(torch.as_tensor(rewards, dtype=torch.float32))
        rows["val"].append(values.flatten())
        rows["term"].append(torch.as_tensor(dones & ~truncated))
        rows["trunc"].append(torch.as_tensor(truncated))
        rows["final"].append(torch.as_tensor(final, dtype=torch.float32))
        obs = new_obs
    with torch.no_grad():
        last_values = policy.predict_values(policy.obs_to_tensor(obs)[0]).flatten()
    values = torch.stack(rows["val"])
    truncated_t = torch.stack(rows["trunc"])
    next_values = torch.cat([values[1:], last_values[None]])
    next_values = torch.where(truncated_t, torch.stack(rows["final"]), next_values)
    batch = RolloutBatch(
        observations=torch.stack(rows["obs"]),
        actions=torch.stack(rows["act"]),
        rewards=torch.stack(rows["rew"]),
        values=values,
        next_values=next_values,
        terminated=torch.stack(rows["term"]),
        truncated=truncated_t,
    )
    return batch, obs


@dataclass(frozen=True)
class EnvEstimatorSummary:
    """One baseline x normalization choice over ``n_batches`` batches at a fixed policy.

    Normalization rescales the gradient, so every number here is scale-free.

    :param baseline: a key of :data:`ENV_BASELINES`
    :param normalization: one of :data:`ENV_NORMALIZATIONS`
    :param snr: :math:`\\lVert \\bar g \\rVert^2 / \\operatorname{tr}\\operatorname{Var}[\\hat g]` (plug-in)
    :param snr_debiased: the same with the mean's own noise removed,
        :math:`(\\lVert \\bar g \\rVert^2 - \\operatorname{tr}\\operatorname{Var}/K) / \\operatorname{tr}\\operatorname{Var}`
    :param cosine: mean cosine between a batch estimate and the reference gradient
    :param cosine_se: its standard error over the batches
    :param pairwise_cosine: mean cosine between two batch estimates
    """

    baseline: str
    normalization: str
    snr: float
    snr_debiased: float
    cosine: float
    cosine_se: float
    pairwise_cosine: float


@dataclass(frozen=True)
class EnvComparisonResult:
    """Settings of an environment comparison and one :class:`EnvEstimatorSummary` per choice."""

    env_id: str
    batch_steps: int
    n_envs: int
    n_batches: int
    reference_batches: int
    trained_steps: int
    seed: int
    gamma: float
    gae_lambda: float
    minibatch_size: int
    reference: str
    estimators: list[EnvEstimatorSummary]
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything."""
        return asdict(self)

    def summary(self, baseline: str, normalization: str) -> EnvEstimatorSummary:
        """The summary of one baseline x normalization choice."""
        for row in self.estimators:
            if (row.baseline, row.normalization) == (baseline, normalization):
                return row
        raise KeyError(f"no estimator ({baseline!r}, {normalization!r}) in this result")


def _env_signals(
    batch: RolloutBatch,
    baselines: Sequence[str],
    gamma: float,
    gae_lambda: float,
    score_sq_norms: Callable[[], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The ``[T, N]`` advantage of each baseline on one batch, from :mod:`pgvar.estimators`."""
    args = (batch.rewards, batch.values, batch.next_values, batch.terminated, batch.truncated)
    returns = None
    if set(baselines) - {"value"}:
        returns = discounted_returns(
            batch.rewards, batch.terminated, batch.truncated, batch.next_values, gamma=gamma
        )
    signals = {}
    for name in baselines:
        if name == "value":
            signals[name] = gae_advantages(*args, gamma=gamma, gae_lambda=gae_lambda)
        elif name == "none":
            signals[name] = returns
        elif name == "mean":
            signals[name] = returns - batch_mean_baseline(returns)
        elif name == "optimal":
            signals[name] = returns - optimal_constant_baseline(returns, score_sq_norms().reshape(returns.shape).float())
    return signals


def _ProgressCallback(progress: Callable[[str, int, int], None] | None, total: int) -> Any:
    """An SB3 callback that reports training progress as ``progress("training", steps, total)``."""
    from stable_baselines3.common.callbacks import BaseCallback

    class ProgressCallback(BaseCallback):
        def _on_step(self) -> bool:
            if progress is not None and self.n_calls % 64 == 0:
                progress("training", min(self.num_timesteps, total), total)
            return True

    return ProgressCallback()


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
    progress: Callable[[str, int, int], None] | None = None,
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
    :param baselines: keys of :data:`ENV_BASELINES`
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

    from pgvar.algos._mixin import is_actor_parameter
    from pgvar.measure import per_sample_grad_sq_norms

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

    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    if model is None:
        from pgvar.algos import PPO

        model = PPO("MlpPolicy", env, seed=seed, device="cpu")
        if train_steps > 0:
            model.learn(train_steps, callback=_ProgressCallback(progress, train_steps))
        trained = int(model.num_timesteps)
    else:
        trained = int(getattr(model, "num_timesteps", 0))
    policy = model.policy
    policy.set_training_mode(False)
    gamma, gae_lambda = float(model.gamma), float(model.gae_lambda)
    minibatch_size = int(getattr(model, "batch_size", None) or n_steps * n_envs)
    actor = {name: p for name, p in policy.named_parameters() if is_actor_parameter(name)}
    names = sorted(actor)
    generator = torch.Generator().manual_seed(seed)

    def log_probs(observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        flat_actions = actions.long().flatten() if actions.dtype in (torch.int32, torch.int64) else actions
        return policy.get_distribution(observations).log_prob(flat_actions)

    def gradients(batch: RolloutBatch, signals: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
        m = batch.rewards.numel()
        observations = batch.observations.reshape(m, *batch.observations.shape[2:])
        actions = batch.actions.reshape(m, *batch.actions.shape[2:])
        logp = log_probs(observations, actions)
        permutation = torch.randperm(m, generator=generator)
        minibatches = list(permutation.split(minibatch_size))
        out = {}
        for baseline, signal in signals.items():
            for mode in normalizations:
                if mode == "minibatch":
                    adv = normalize_advantages(signal, "minibatch", minibatch_indices=minibatches)
                else:
                    adv = normalize_advantages(signal, mode)
                grads = torch.autograd.grad(
                    (adv.reshape(-1).detach() * logp).mean(), [actor[n] for n in names], retain_graph=True
                )
                out[(baseline, mode)] = torch.cat([g.reshape(-1) for g in grads]).double()
        return out

    def sq_norms_for(batch: RolloutBatch) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            m = batch.rewards.numel()
            return per_sample_grad_sq_norms(
                policy,
                lambda module, obs, act: module.get_distribution(obs).log_prob(
                    act.long().flatten() if act.dtype in (torch.int32, torch.int64) else act
                ).sum(),
                (batch.observations.reshape(m, *batch.observations.shape[2:]), batch.actions.reshape(m, *batch.actions.shape[2:])),
                params=names,
            )

        return compute

    last_obs = env.reset()
    reference_sum = None
    for k in range(reference_batches):
        batch, last_obs = collect_rollout(policy, env, n_steps, last_obs)
        advantage = gae_advantages(
            batch.rewards, batch.values, batch.next_values, batch.terminated, batch.truncated, gamma=gamma, gae_lambda=1.0
        )
        logp = log_probs(batch.observations.reshape(-1, *batch.observations.shape[2:]), batch.actions.reshape(-1, *batch.actions.shape[2:]))
        grads = torch.autograd.grad((advantage.reshape(-1) * logp).mean(), [actor[n] for n in names])
        flat = torch.cat([g.reshape(-1) for g in grads]).double()
        reference_sum = flat if reference_sum is None else reference_sum + flat
        if progress is not None:
            progress("reference", k + 1, reference_batches)
    reference = reference_sum / reference_batches

    estimates: dict[tuple[str, str], list[torch.Tensor]] = {}
    for k in range(n_batches):
        batch, last_obs = collect_rollout(policy, env, n_steps, last_obs)
        signals = _env_signals(batch, baselines, gamma, gae_lambda, sq_norms_for(batch))
        for key, value in gradients(batch, signals).items():
            estimates.setdefault(key, []).append(value)
        if progress is not None:
            progress("batches", k + 1, n_batches)
    env.close()

    rows = []
    for (baseline, mode), values in estimates.items():
        stats = estimate_statistics(torch.stack(values), reference=reference)
        variance = stats.variance_trace
        rows.append(
            EnvEstimatorSummary(
                baseline=baseline,
                normalization=mode,
                snr=float(stats.mean_norm**2 / variance),
                snr_debiased=float((stats.mean_norm**2 - variance / n_batches) / variance),
                cosine=float(stats.cosine_to_reference),
                cosine_se=float(stats.cosine_to_reference_se),
                pairwise_cosine=float(stats.pairwise_cosine),
            )
        )
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
        estimators=rows,
        versions=library_versions(),
    )
