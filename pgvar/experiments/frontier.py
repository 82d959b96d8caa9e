r"""The frontier of true reward against divergence from the reference, computed exactly on pgvar's reward-hacking
problems, and what the KL penalty's estimator does to the policy-gradient variance.

Issue 14's three positions, one curve per regularizer (every point exact: no sampling):

- ``"goodhart"``: :class:`~pgvar.problems.GoodhartBandit` with a light-tailed (Gaussian) and two heavy-tailed
  (Student-t, Pareto) proxy errors. **KL penalty**: the optimum :math:`\pi_\beta \propto \pi_{\text{ref}}
  e^{\tilde r/\beta}` at each coefficient; **odds-ratio cap**: the quantilizer at each cap; **early stopping**:
  plain gradient ascent on the logits with the exact gradient of the proxy utility, from the reference (step size
  0.0002 times the number of arms: the first step is the natural-gradient step to :math:`\beta = 5000`), read at the
  first step whose action KL reaches each budget (stopping a run at a KL budget).
- ``"reward_hacking"``: :class:`~pgvar.problems.RewardHackingMDP`. KL penalty (soft value iteration), cap (value
  iteration with a quantilizer per state), early stopping (exact-gradient ascent from the reference's logits, step size 0.5, read at the KL budgets), and
  the **occupancy-measure** :math:`\sqrt{\chi^2}` penalty of ORPO,
  :math:`J(\pi) - \lambda H \sqrt{\chi^2(\mu_\pi(s) \| \mu_{\text{ref}}(s))}`, maximized by Adam on the exact
  objective (it has no closed-form optimum: the point is where the ascent ends, not a proven optimum).

Every point records the proxy and true return, the action KL :math:`\mathbb{E}_{s\sim\mu_\pi}
\mathrm{KL}(\pi(\cdot|s)\|\pi_{\text{ref}}(\cdot|s))` (the x-axis) and, on the MDP, the state-occupancy KL and
:math:`\sqrt{\chi^2}`.

:func:`kl_gradient_variance` measures, on sampled episodes of the same problems, the variance of two estimators of
the KL-penalized policy gradient: k1 in the reward (REINFORCE on :math:`\tilde r_t - \lambda k_1`, unbiased for
:math:`\nabla(J - \lambda H\,\mathrm{KL})`) and k3 in the loss (REINFORCE on :math:`\tilde r` plus
:math:`-\lambda \sum_t \gamma^t \nabla k_3`, as GRPO; biased), each with its bias against the exact gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pgvar._validation import check_cap, check_choice, check_nonnegative, check_positive

__all__ = ["EXACT_PROBLEMS", "FRONTIER_FAMILIES", "exact_frontier", "kl_gradient_variance"]

#: ``--problem`` choices of ``pgvar frontier``.
EXACT_PROBLEMS = ("goodhart", "reward_hacking")
#: The curves, by family name: how each is labelled in tables and plots.
FRONTIER_FAMILIES = {
    "reference": "reference",
    "kl": "KL penalty (coef)",
    "odds_ratio_cap": "odds-ratio cap (c)",
    "early_stopping": "early stopping (step)",
    "om_sqrt_chi2": "state-OM sqrt(chi2) penalty (coef)",
}

#: Default grids (full and ``smoke``) per problem.
_GRIDS: dict[str, dict[str, Any]] = {
    "goodhart": {"kl_coefs": [100.0, 30.0, 10.0, 3.0, 1.0, 0.3], "caps": [1.5, 2.0, 5.0, 20.0, 100.0],
                 "om_coefs": [], "lr": 0.0002, "max_steps": 100_000},
    "reward_hacking": {"kl_coefs": [2.0, 1.0, 0.6, 0.5, 0.3, 0.1], "caps": [1.1, 1.25, 1.5, 2.0, 5.0],
                       "om_coefs": [0.05, 0.1, 0.2, 0.5, 1.0], "lr": 0.5, "max_steps": 10_000},
}  # fmt: skip
_KL_BUDGETS = [0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0]
_N_ARMS = {False: 10_000, True: 300}
#: Arms of the bandit of the variance measurement (per-arm z-scores need every arm sampled many times).
_VARIANCE_ARMS = 20
#: The variance is measured on the early-stopping path, at the first step whose action KL reaches this.
_VARIANCE_KL = 0.1
_ERRORS = ("gaussian", "student_t", "pareto")

Progress = Callable[[str, int, int], None]


def _floats(name: str, values: Sequence[float], check: Callable[[str, float], float]) -> list[float]:
    return [float(check(name, value)) for value in values]


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of a policy that may put zero mass on an action (the quantilizer): 1e-300 there."""
    return probs.clamp_min(1e-300).log()


def _evaluate(problem: Any, log_probs: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        point = {
            "true_return": float(problem.exact_true_return(log_probs)),
            "proxy_return": float(problem.exact_proxy_return(log_probs)),
            "kl": float(problem.exact_divergence(log_probs, "kl", "action")),
        }
        if problem.n_states > 1:
            point["kl_state"] = float(problem.exact_divergence(log_probs, "kl", "state"))
            point["sqrt_chi2_state"] = float(problem.exact_divergence(log_probs, "sqrt_chi2", "state"))
    return point


def _gradient_ascent_path(problem: Any, kl_budgets: Sequence[float], lr: float,
                          max_steps: int) -> list[tuple[int, torch.Tensor]]:  # fmt: skip
    """Plain ascent ``logits += lr * grad J`` (exact gradient of the proxy return) from the reference's logits,
    stopped at the first step whose action KL reaches each budget; the last point is where the ascent is after
    ``max_steps`` when a budget is never reached (the ascent converged below it)."""
    logits = problem.reference_log_probs.clone()
    budgets = sorted(kl_budgets)
    path: list[tuple[int, torch.Tensor]] = []
    for step in range(1, max_steps + 1):
        logits = logits + lr * problem.exact_policy_gradient(logits)["logits"]
        kl = float(problem.exact_divergence(logits, "kl", "action"))
        while budgets and kl >= budgets[0]:
            budgets.pop(0)
            if not path or path[-1][0] != step:
                path.append((step, torch.log_softmax(logits, -1)))
        if not budgets:
            return path
    path.append((max_steps, torch.log_softmax(logits, -1)))
    return path


def _occupancy_penalty_optimum(problem: Any, coef: float, steps: int, lr: float = 0.05) -> torch.Tensor:
    """Adam on the exact :math:`J - \\lambda H \\sqrt{\\chi^2}(\\mu_\\pi(s)\\|\\mu_{\\text{ref}}(s))` from the reference."""
    logits = problem.reference_log_probs.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        objective = problem.exact_regularized_objective(logits, coef, "sqrt_chi2", "state")
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
    return torch.log_softmax(logits.detach(), -1)


def _problem_points(label: str, problem: Any, grid: dict[str, Any], om_steps: int,
                    report: Callable[[], None]) -> list[dict[str, Any]]:  # fmt: skip
    def point(family: str, parameter: float | None, log_probs: torch.Tensor) -> dict[str, Any]:
        report()
        return {"problem": label, "family": family, "parameter": parameter, **_evaluate(problem, log_probs)}

    bandit = problem.n_states == 1
    points = [point("reference", None, problem.reference_log_probs)]
    for coef in grid["kl_coefs"]:
        log_probs = problem.kl_optimum(coef).log()[None] if bandit else problem.kl_regularized_optimum(coef)
        points.append(point("kl", coef, log_probs))
    for cap in grid["caps"]:
        points.append(point("odds_ratio_cap", cap, _log_probs(problem.cap_optimum(cap))))
    lr = grid["lr"] * (problem.n_actions if bandit else 1.0)
    for step, log_probs in _gradient_ascent_path(problem, grid["kl_budgets"], lr, grid["max_steps"]):
        points.append(point("early_stopping", float(step), log_probs))
    for coef in grid["om_coefs"]:
        points.append(point("om_sqrt_chi2", coef, _occupancy_penalty_optimum(problem, coef, om_steps)))
    return points


def kl_gradient_variance(problem: Any, log_probs: torch.Tensor, coef: float, n_episodes: int,
                         seed: int = 0) -> dict[str, dict[str, float]]:  # fmt: skip
    r"""Variance and bias of two per-episode estimators of :math:`\nabla_{\text{logits}}(J - \lambda H\,\mathrm{KL})`.

    For episode :math:`i` with steps :math:`t`, score :math:`\psi_t = \nabla \log\pi(a_t|s_t)`, ratio
    :math:`\rho_t = \pi_{\text{ref}}(a_t|s_t)/\pi(a_t|s_t)` and :math:`k_1 = -\log\rho`,
    :math:`k_3 = \rho - 1 - \log\rho`:

    .. math::  g^{k_1}_i = \sum_t \gamma^t \psi_t \sum_{t' \ge t} \gamma^{t'-t} (\tilde r_{t'} - \lambda k_{1,t'}),
               \qquad
               g^{k_3}_i = \sum_t \gamma^t \psi_t \sum_{t' \ge t} \gamma^{t'-t} \tilde r_{t'}
                           - \lambda \sum_t \gamma^t (1 - \rho_t) \psi_t

    (:math:`\nabla k_3 = (1 - \rho)\psi` with the actions held fixed). ``"penalty"`` is the penalty's own part of
    each estimator (:math:`\lambda` times the k1 returns' term, or the k3 sum). Statistics with
    :func:`pgvar.measure.gradient_statistics` (per-episode rows) and :func:`pgvar.measure.estimate_statistics`
    (bias against the exact gradient, :meth:`~pgvar.problems.ReferenceRegularizedMDP.exact_regularized_gradient`).

    :param problem: a :class:`~pgvar.problems.ReferenceRegularizedMDP`
    :param log_probs: ``[S, A]`` the policy at which to measure (softmax logits)
    :param coef: :math:`\lambda \ge 0`
    :param n_episodes: sampled episodes (>= 2)
    :param seed: seed of the episodes
    :return: ``{"k1_reward": {...}, "k3_loss": {...}}``, each with ``variance_trace`` (per episode, unbiased) and
        its standard error ``variance_trace_se``, ``penalty_variance_trace`` (and ``_se``), ``bias_norm`` and
        ``max_abs_z`` (largest coordinate of the bias in standard errors)
    """
    from pgvar.measure import estimate_statistics, gradient_statistics

    coef = float(check_nonnegative("coef", coef))
    n_episodes = int(check_positive("n_episodes", n_episodes, integer=True))
    logits = log_probs.detach().to(torch.float64)
    batch = problem.sample_episodes(logits, n_episodes, torch.Generator().manual_seed(seed))
    states, actions, mask = batch.observations, batch.actions, batch.mask
    probs = torch.softmax(logits, -1)
    log_pi = torch.log_softmax(logits, -1)[states, actions]
    log_ratio = problem.reference_log_probs[states, actions] - log_pi  # log rho
    k1 = -log_ratio
    k3 = log_ratio.exp() - 1.0 - log_ratio
    discount = problem.gamma ** batch.timesteps.to(torch.float64)
    steps, n = states.shape

    def returns_to_go(rewards: torch.Tensor) -> torch.Tensor:
        out, running = torch.zeros_like(rewards), torch.zeros(n, dtype=torch.float64)
        for t in reversed(range(steps)):
            running = rewards[t] + problem.gamma * running
            out[t] = running
        return out

    def per_episode(weights: torch.Tensor) -> torch.Tensor:
        """``sum_t w_t psi_t`` per episode, ``[N, S * A]``: the score of a softmax is onehot(a) - pi(s)."""
        weights = torch.where(mask, weights, torch.zeros_like(weights))
        S, A = probs.shape
        grads = torch.zeros(n, S, A, dtype=torch.float64)
        episode = torch.arange(n).expand(steps, n)
        grads.index_put_((episode.reshape(-1), states.reshape(-1), actions.reshape(-1)), weights.reshape(-1),
                         accumulate=True)  # fmt: skip
        state_weight = torch.zeros(n, S, dtype=torch.float64)
        state_weight.index_put_((episode.reshape(-1), states.reshape(-1)), weights.reshape(-1), accumulate=True)
        return (grads - state_weight[..., None] * probs).reshape(n, S * A)

    proxy = per_episode(discount * returns_to_go(batch.rewards))
    penalties = {"k1_reward": per_episode(discount * returns_to_go(-coef * k1)),
                 "k3_loss": per_episode(-coef * discount * (1.0 - log_ratio.exp()))}  # fmt: skip
    del k3  # its value is not what the loss differentiates; its gradient is (1 - rho) psi
    exact = problem.exact_regularized_gradient(logits, coef, "kl", "action")["logits"].reshape(-1)

    def trace_and_se(rows: torch.Tensor) -> tuple[float, float]:
        stats = gradient_statistics(rows)
        squared = ((rows - rows.mean(0)) ** 2).sum(-1) * n / (n - 1)
        return stats.covariance_trace, float(squared.std() / math.sqrt(n))

    out = {}
    for name, penalty in penalties.items():
        total = proxy + penalty
        variance, variance_se = trace_and_se(total)
        penalty_variance, penalty_se = trace_and_se(penalty)
        bias = estimate_statistics(total, reference=exact)
        out[name] = {"variance_trace": variance, "variance_trace_se": variance_se,
                     "penalty_variance_trace": penalty_variance, "penalty_variance_trace_se": penalty_se,
                     "bias_norm": float(bias.bias_norm or 0.0), "max_abs_z": float(bias.max_abs_z or 0.0)}  # fmt: skip
    return out


def exact_frontier(
    problem: str = "reward_hacking",
    *,
    kl_coefs: Sequence[float] | None = None,
    caps: Sequence[float] | None = None,
    om_coefs: Sequence[float] | None = None,
    kl_budgets: Sequence[float] | None = None,
    om_steps: int = 2000,
    variance_coef: float | None = None,
    variance_episodes: int = 4000,
    smoke: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every point of every curve of ``problem`` (one of :data:`EXACT_PROBLEMS`), exactly, and the k1 / k3
    gradient variance where the early-stopping path reaches action KL 0.1.

    :param problem: ``"goodhart"`` (one bandit per error family, drawn from ``seed``) or ``"reward_hacking"``
    :param kl_coefs: KL coefficients (default: the problem's grid)
    :param caps: odds-ratio caps ``>= 1``
    :param om_coefs: coefficients of the state-occupancy sqrt(chi2) penalty (reward-hacking MDP only)
    :param kl_budgets: early stopping: the ascent is read at the first step whose action KL reaches each budget
    :param om_steps: Adam steps of the occupancy-penalized ascent
    :param variance_coef: the KL coefficient of the variance measurement (default: the third of ``kl_coefs``)
    :param variance_episodes: sampled episodes of the variance measurement
    :param smoke: a small version for tests (300 arms, short grids and ascents)
    :param seed: seeds the bandits and the sampled episodes
    :return: a JSON-ready dict: ``mode``, ``settings``, ``points``, ``gradient_variance``, ``versions``
    """
    from pgvar.compare import library_versions
    from pgvar.problems import GoodhartBandit, RewardHackingMDP

    check_choice("problem", problem, EXACT_PROBLEMS)
    grid = {**_GRIDS[problem], "kl_budgets": list(_KL_BUDGETS)}
    if smoke:
        grid = {**grid, "kl_coefs": grid["kl_coefs"][::2], "caps": grid["caps"][::2],
                "om_coefs": grid["om_coefs"][:1], "kl_budgets": _KL_BUDGETS[:3],
                "max_steps": 2000}  # fmt: skip
        om_steps, variance_episodes = min(om_steps, 50), min(variance_episodes, 200)
    for name, values, check in (("kl_coefs", kl_coefs, check_positive), ("caps", caps, check_cap),
                                ("om_coefs", om_coefs, check_positive)):  # fmt: skip
        if values is not None:
            grid[name] = _floats(name, values, check)
    if om_coefs and problem == "goodhart":
        raise ValueError("om_coefs applies to problem='reward_hacking' only (a bandit has one state)")
    if kl_budgets is not None:
        grid["kl_budgets"] = _floats("kl_budgets", kl_budgets, check_positive)
    if not grid["kl_budgets"]:
        raise ValueError("kl_budgets must hold at least one budget, got []")
    if not grid["kl_coefs"]:
        raise ValueError("kl_coefs must hold at least one coefficient, got []")
    om_steps = int(check_positive("om_steps", om_steps, integer=True))
    coef = float(check_positive("variance_coef", variance_coef) if variance_coef is not None
                 else grid["kl_coefs"][min(2, len(grid["kl_coefs"]) - 1)])  # fmt: skip
    n_arms = _N_ARMS[smoke]
    problems: dict[str, Any] = ({f"goodhart/{error}": GoodhartBandit(n_arms=n_arms, error=error, seed=seed) for error in _ERRORS}
                if problem == "goodhart" else {"reward_hacking": RewardHackingMDP()})  # fmt: skip
    per_problem = 1 + len(grid["kl_coefs"]) + len(grid["caps"]) + len(grid["kl_budgets"]) + len(grid["om_coefs"])
    total, done = per_problem * len(problems), 0

    def report() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("points", done, total)

    points, variances = [], []
    for label, instance in problems.items():
        points += _problem_points(label, instance, grid, om_steps, report)
        # the variance is measured where the early-stopping path first reaches KL 0.1 (a policy off the reference)
        if instance.n_states == 1:  # every arm sampled often enough for the z-scores: a 20-arm twin
            instance = GoodhartBandit(n_arms=_VARIANCE_ARMS, error=instance.error, seed=seed)
        lr = grid["lr"] * (instance.n_actions if instance.n_states == 1 else 1.0)
        ((middle, log_probs),) = _gradient_ascent_path(instance, [_VARIANCE_KL], lr, grid["max_steps"])[:1]
        for name, stats in kl_gradient_variance(instance, log_probs, coef, variance_episodes, seed).items():
            variances.append({"problem": label, "policy": f"early stopping at KL {_VARIANCE_KL} (step {middle})", "coef": coef,
                              "n_arms": instance.n_actions if instance.n_states == 1 else None,
                              "estimator": name, "episodes": variance_episodes, **stats})  # fmt: skip
    settings = {"problem": problem, "smoke": smoke, "seed": seed, "n_arms": n_arms if problem == "goodhart" else None,
                "om_steps": om_steps, **grid}  # fmt: skip
    return {"mode": problem, "settings": settings, "points": points, "gradient_variance": variances,
            "versions": library_versions()}  # fmt: skip
