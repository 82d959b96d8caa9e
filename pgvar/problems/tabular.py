r"""A random finite MDP with a tabular softmax policy, solved exactly by linear algebra.

Every step from state :math:`s` with action :math:`a` pays :math:`r(s, a)`, then ends the episode with
probability :math:`\beta(s, a)` and otherwise moves to :math:`s' \sim P(\cdot|s, a)`. With
:math:`P_\pi(s, s') = \sum_a \pi(a|s) (1 - \beta(s, a)) P(s'|s, a)` (substochastic: termination leaves it),
everything about the policy :math:`\pi = \operatorname{softmax}(\text{logits})` is a linear solve:

.. math::

    V^\pi = (I - \gamma P_\pi)^{-1} r_\pi, \qquad
    Q^\pi(s, a) = r(s, a) + \gamma (1 - \beta(s, a)) \sum_{s'} P(s'|s, a) V^\pi(s'), \qquad
    J = \rho_0^\top V^\pi,

and the policy-gradient theorem (Sutton et al., 2000, Theorem 1) with the discounted visitation
:math:`d^\top = \rho_0^\top (I - \gamma P_\pi)^{-1}` gives
:math:`\partial J / \partial \text{logits}(s, a) = d(s)\, \pi(a|s)\, (Q^\pi(s, a) - V^\pi(s))`.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from pgvar._validation import check_positive, check_unit_interval
from pgvar.problems.base import EpisodeBatch, Params, check_parameters

__all__ = ["TabularMDP"]

_DTYPE = torch.float64


#: Largest default time limit: below the termination_prob this implies, pass ``max_episode_steps`` explicitly.
_MAX_DEFAULT_STEPS = 100_000
_TRUNCATION_BOUND = 1e-10


def _default_time_limit(termination_prob: float) -> int:
    """Steps after which an episode survives with probability at most 1e-10, or ``ValueError`` above 100,000."""
    if termination_prob >= 1.0:
        return 1
    steps = math.log(_TRUNCATION_BOUND) / math.log1p(-termination_prob)
    if steps > _MAX_DEFAULT_STEPS:
        smallest = -math.expm1(math.log(_TRUNCATION_BOUND) / _MAX_DEFAULT_STEPS)
        raise ValueError(
            f"termination_prob must be in [{smallest:.3g}, 1] when max_episode_steps is None, got "
            f"{termination_prob!r}: episodes would last about {1 / termination_prob:.3g} steps and the default "
            f"time limit would be {steps:.3g} steps (> {_MAX_DEFAULT_STEPS:,}); pass max_episode_steps to allow it"
        )
    return math.ceil(steps)


def _categorical_from_uniform(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first index whose cumulative probability exceeds ``u`` (``cdf`` is ``[..., K]``)."""
    return (cdf < uniforms.unsqueeze(-1)).sum(-1).clamp_max(cdf.shape[-1] - 1)


class TabularMDP(gym.Env):
    r"""A seeded random finite MDP whose exact policy gradient is known (a ``gymnasium.Env``).

    Rewards :math:`r(s, a) \sim \mathcal{N}(0, 1)` (deterministic given ``(s, a)``), transition rows
    :math:`P(\cdot|s, a)` and the initial distribution :math:`\rho_0` are drawn from a flat Dirichlet, and the
    termination probabilities :math:`\beta(s, a)` uniformly from ``[termination_prob, min(1, 2 termination_prob)]``,
    so every episode ends with probability 1 and the objective

    .. math:: J(\theta) = \mathbb{E}\Big[\sum_{t \ge 0} \gamma^t r(s_t, a_t)\Big]

    is finite even with :math:`\gamma = 1`. The policy is a tabular softmax, ``params = {"logits": [S, A]}``.
    The exact quantities ignore the time limit ``max_episode_steps``: by default it is chosen so that
    :math:`(1 - \text{termination\_prob})^{\text{max\_episode\_steps}} \le 10^{-10}`, an upper bound on the
    probability that an episode is truncated (:meth:`truncation_probability` gives the exact value).

    Observations are ``Discrete(n_states)``, actions ``Discrete(n_actions)``. The constructor's ``seed`` draws the
    MDP; ``reset(seed=...)`` seeds the environment's sampling. :meth:`step` and :meth:`sample_episodes` draw the
    same events in the same order: the termination coin of step ``t`` with ``u < beta(s, a)``, then the next
    state by inverse CDF (the next state is drawn also when the episode terminates, so that
    ``next_observations`` is always a valid state; it is never bootstrapped from).

    :param n_states: number of states ``S`` (> 0)
    :param n_actions: number of actions ``A`` (> 0)
    :param gamma: discount factor in ``[0, 1]``
    :param termination_prob: smallest per-step termination probability, in ``(0, 1]`` (at least about
        ``2.3e-4`` without ``max_episode_steps``, so that the default time limit stays <= 100,000 steps)
    :param seed: seed of the random MDP
    :param max_episode_steps: time limit after which an episode is truncated (``None``: see above)

    >>> mdp = TabularMDP(n_states=3, n_actions=2, seed=0)
    >>> params = mdp.initial_parameters(seed=1)
    >>> grad = mdp.exact_policy_gradient(params)["logits"]
    >>> grad.shape
    torch.Size([3, 2])
    >>> bool(torch.allclose(grad.sum(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12))  # shift invariance
    True
    >>> J = mdp.exact_return(params)
    >>> bool(torch.isclose(J, mdp.initial_state_probs @ mdp.exact_state_values(params)))
    True
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        n_states: int = 5,
        n_actions: int = 3,
        gamma: float = 0.9,
        termination_prob: float = 0.1,
        seed: int = 0,
        max_episode_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.n_states = int(check_positive("n_states", n_states, integer=True))
        self.n_actions = int(check_positive("n_actions", n_actions, integer=True))
        self.gamma = check_unit_interval("gamma", gamma)
        self.horizon: int | None = None  # episodes end at random: the values do not depend on the time step
        termination_prob = check_unit_interval("termination_prob", termination_prob, open_low=True)
        self.termination_prob = termination_prob
        if max_episode_steps is None:
            max_episode_steps = _default_time_limit(termination_prob)
        self.max_episode_steps = int(check_positive("max_episode_steps", max_episode_steps, integer=True))
        self.problem_seed = seed

        rng = np.random.default_rng(seed)
        S, A = self.n_states, self.n_actions
        self.transition_probs = torch.as_tensor(
            rng.dirichlet(np.ones(S), size=(S, A)), dtype=_DTYPE
        )  # [S, A, S']
        self.reward_table = torch.as_tensor(rng.standard_normal((S, A)), dtype=_DTYPE)  # r(s, a)
        high = min(1.0, 2.0 * termination_prob)
        self.termination_probs = torch.as_tensor(
            rng.uniform(termination_prob, high, size=(S, A)), dtype=_DTYPE
        )
        self.initial_state_probs = torch.as_tensor(rng.dirichlet(np.ones(S)), dtype=_DTYPE)  # rho_0

        self._transition_cdf = self.transition_probs.cumsum(-1)
        self._initial_cdf = self.initial_state_probs.cumsum(-1)
        self._np_transition_cdf = self._transition_cdf.numpy()
        self._np_initial_cdf = self._initial_cdf.numpy()
        self._np_rewards = self.reward_table.numpy()
        self._np_termination = self.termination_probs.numpy()

        self.observation_space = gym.spaces.Discrete(S)
        self.action_space = gym.spaces.Discrete(A)
        self._state: int | None = None
        self._elapsed_steps = 0

    # ------------------------------------------------------------------ policy
    def _logits(self, params_or_logits: Params | torch.Tensor) -> torch.Tensor:
        params = params_or_logits if isinstance(params_or_logits, dict) else {"logits": params_or_logits}
        check_parameters(params, {"logits": (self.n_states, self.n_actions)})
        return params["logits"].to(_DTYPE)

    def initial_parameters(self, seed: int | None = None) -> Params:
        """Logits drawn i.i.d. from :math:`\\mathcal{N}(0, 1)` (seeded): a stochastic policy far from optimal.

        :param seed: seed of the draw (``None``: 0)
        :return: ``{"logits": [S, A]}``, float64
        """
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        return {"logits": torch.randn(self.n_states, self.n_actions, generator=generator, dtype=_DTYPE)}

    def policy_probs(self, params_or_logits: Params | torch.Tensor) -> torch.Tensor:
        r""":math:`\pi(a|s) = \operatorname{softmax}_a(\text{logits}(s, \cdot))`, shape ``[S, A]``, differentiable."""
        return torch.softmax(self._logits(params_or_logits), dim=-1)

    def log_prob(self, params: Params, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \pi(a|s)` for integer ``observations`` and ``actions`` of any common shape.

        Differentiable in ``params["logits"]`` (works under :func:`torch.func.vmap`).

        :param params: ``{"logits": [S, A]}``
        :param observations: long tensor of states
        :param actions: long tensor of actions, same shape
        :return: float64 tensor of that shape
        """
        log_probs = torch.log_softmax(self._logits(params), dim=-1).reshape(-1)
        flat_index = observations.long() * self.n_actions + actions.long()  # gather: vmap-friendly indexing
        return log_probs.gather(0, flat_index.reshape(-1)).reshape(flat_index.shape)

    def sample_actions(
        self,
        params: Params | torch.Tensor,
        observations: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw :math:`a \\sim \\pi(\\cdot|s)` for each state in ``observations`` (any shape; inverse CDF, no gradient).

        :param params: ``{"logits": [S, A]}`` or the logits tensor
        :param observations: long tensor of states
        :param generator: torch random generator (``None``: the global one)
        :return: long tensor of actions, the shape of ``observations``
        """
        with torch.no_grad():
            cdf = self.policy_probs(params).cumsum(-1)[observations.long()]
            uniforms = torch.rand(observations.shape, generator=generator, dtype=_DTYPE)
            return _categorical_from_uniform(cdf, uniforms)

    # ------------------------------------------------------------------ exact quantities
    def _continuation_matrix(self, probs: torch.Tensor) -> torch.Tensor:
        """``P_pi[s, s'] = sum_a pi(a|s) (1 - beta(s, a)) P(s'|s, a)``."""
        return torch.einsum("sa,sa,sat->st", probs, 1.0 - self.termination_probs, self.transition_probs)

    def _solve(
        self, params_or_logits: Params | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pi [S, A], V [S], Q [S, A])`` exactly."""
        probs = self.policy_probs(params_or_logits)
        eye = torch.eye(self.n_states, dtype=_DTYPE)
        reward_pi = (probs * self.reward_table).sum(-1)
        values = torch.linalg.solve(eye - self.gamma * self._continuation_matrix(probs), reward_pi)
        q_values = self.reward_table + self.gamma * (1.0 - self.termination_probs) * (
            self.transition_probs @ values
        )
        return probs, values, q_values

    def exact_return(self, params: Params | torch.Tensor) -> torch.Tensor:
        r""":math:`J = \rho_0^\top (I - \gamma P_\pi)^{-1} r_\pi`, a scalar differentiable in the logits."""
        return self.initial_state_probs @ self._solve(params)[1]

    def exact_q_values(self, params: Params | torch.Tensor) -> torch.Tensor:
        r"""The table :math:`Q^\pi(s, a) = r(s, a) + \gamma (1 - \beta(s, a)) P(\cdot|s, a)^\top V^\pi`, ``[S, A]``."""
        return self._solve(params)[2]

    def exact_state_values(
        self,
        params: Params | torch.Tensor,
        observations: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`V^\pi(s) = (I - \gamma P_\pi)^{-1} r_\pi` at ``observations`` (any shape), or the table ``[S]``.

        :param params: ``{"logits": [S, A]}`` or the logits tensor
        :param observations: long tensor of states; ``None`` returns the whole table
        :param timesteps: ignored (the problem is stationary)
        """
        values = self._solve(params)[1]
        return values if observations is None else values[observations.long()]

    def exact_action_values(
        self,
        params: Params | torch.Tensor,
        observations: torch.Tensor,
        actions: torch.Tensor,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`Q^\pi(s, a)` at each ``(observation, action)`` pair (any common shape); ``timesteps`` ignored."""
        return self._solve(params)[2][observations.long(), actions.long()]

    def exact_discounted_visitation(self, params: Params | torch.Tensor) -> torch.Tensor:
        r""":math:`d^\top = \rho_0^\top (I - \gamma P_\pi)^{-1}`: :math:`d(s) = \sum_t \gamma^t \Pr(s_t = s)`, ``[S]``."""
        probs = self.policy_probs(params)
        eye = torch.eye(self.n_states, dtype=_DTYPE)
        return torch.linalg.solve(
            (eye - self.gamma * self._continuation_matrix(probs)).T, self.initial_state_probs
        )

    def exact_policy_gradient(self, params_or_logits: Params | torch.Tensor) -> Params:
        r"""The policy gradient theorem, solved exactly (no autograd).

        .. math::

            \frac{\partial J}{\partial \text{logits}(s, a)}
                = \sum_{s'} d(s') \sum_{a'} \frac{\partial \pi(a'|s')}{\partial \text{logits}(s, a)} Q^\pi(s', a')
                = d(s)\, \pi(a|s)\, \big(Q^\pi(s, a) - V^\pi(s)\big)

        :param params_or_logits: ``{"logits": [S, A]}`` or the logits tensor
        :return: ``{"logits": [S, A]}`` (detached)
        """
        with torch.no_grad():
            probs, values, q_values = self._solve(params_or_logits)
            visitation = self.exact_discounted_visitation(params_or_logits)
            return {"logits": visitation[:, None] * probs * (q_values - values[:, None])}

    def truncation_probability(self, params: Params | torch.Tensor) -> torch.Tensor:
        r"""Probability that an episode is still running after ``max_episode_steps`` steps (and so is truncated).

        .. math:: \Pr(\text{truncated}) = \rho_0^\top P_\pi^{H} \mathbf{1}, \quad H = \text{max\_episode\_steps}

        with the undiscounted substochastic :math:`P_\pi`. The exact quantities of this class ignore truncation;
        their error is at most of this order times the largest value.
        """
        with torch.no_grad():
            continuation = self._continuation_matrix(self.policy_probs(params))
            alive = self.initial_state_probs @ torch.linalg.matrix_power(continuation, self.max_episode_steps)
            return alive.sum()

    # ------------------------------------------------------------------ sampling
    def sample_episodes(
        self, params: Params | torch.Tensor, n_episodes: int, generator: torch.Generator | None = None
    ) -> EpisodeBatch:
        """``n_episodes`` independent episodes under the softmax policy, vectorized over episodes.

        Loops over time only, until every episode has ended (or ``max_episode_steps``). Padding after an
        episode's end has state 0, action 0, reward 0, ``mask`` False and both flags False.

        :param params: ``{"logits": [S, A]}`` or the logits tensor
        :param n_episodes: number of episodes ``N`` (> 0)
        :param generator: torch random generator (``None``: a fresh unseeded one)
        :return: an :class:`EpisodeBatch` with long ``[T, N]`` observations and actions
        """
        n_episodes = int(check_positive("n_episodes", n_episodes, integer=True))
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        with torch.no_grad():
            states = _categorical_from_uniform(
                self._initial_cdf.expand(n_episodes, -1),
                torch.rand(n_episodes, generator=generator, dtype=_DTYPE),
            )
            alive = torch.ones(n_episodes, dtype=torch.bool)
            rows: dict[str, list[torch.Tensor]] = {
                k: [] for k in ("obs", "act", "rew", "next", "term", "trunc", "mask")
            }
            for t in range(self.max_episode_steps):
                if not bool(alive.any()):
                    break
                actions = self.sample_actions(params, states, generator)
                uniforms = torch.rand(2, n_episodes, generator=generator, dtype=_DTYPE)
                terminated = uniforms[0] < self.termination_probs[states, actions]
                next_states = _categorical_from_uniform(self._transition_cdf[states, actions], uniforms[1])
                truncated = ~terminated & (t + 1 >= self.max_episode_steps)
                rows["obs"].append(torch.where(alive, states, 0))
                rows["act"].append(torch.where(alive, actions, 0))
                rows["rew"].append(torch.where(alive, self.reward_table[states, actions], 0.0))
                rows["next"].append(torch.where(alive, next_states, 0))
                rows["term"].append(alive & terminated)
                rows["trunc"].append(alive & truncated)
                rows["mask"].append(alive)
                alive = alive & ~terminated & ~truncated
                states = next_states
            stacked = {k: torch.stack(v) for k, v in rows.items()}
            horizon = stacked["rew"].shape[0]
            return EpisodeBatch(
                observations=stacked["obs"],
                actions=stacked["act"],
                rewards=stacked["rew"],
                next_observations=stacked["next"],
                terminated=stacked["term"],
                truncated=stacked["trunc"],
                mask=stacked["mask"],
                timesteps=torch.arange(horizon).unsqueeze(1).expand(horizon, n_episodes).clone(),
            )

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Start an episode at :math:`s_0 \\sim \\rho_0`; returns ``(state, {})``.

        ``options={"state": s}`` starts at ``s`` instead (to restart from a sampled state, e.g. for the
        Mirage variance decomposition); the initial draw is made either way, so the random stream is the same.
        """
        super().reset(seed=seed)
        state = int(np.searchsorted(self._np_initial_cdf, self.np_random.random(), side="left"))
        if options is not None and "state" in options:
            state = int(options["state"])
            if not 0 <= state < self.n_states:
                raise ValueError(
                    f"options['state'] must be in [0, {self.n_states}), got {options['state']!r}"
                )
        self._state = min(state, self.n_states - 1)
        self._elapsed_steps = 0
        return self._state, {}

    def step(self, action: Any) -> tuple[int, float, bool, bool, dict[str, Any]]:
        """Pay :math:`r(s, a)`, end with probability :math:`\\beta(s, a)`, else move to :math:`s' \\sim P(\\cdot|s, a)`.

        Truncates (``truncated=True``) after ``max_episode_steps`` steps of a non-terminated episode.
        """
        if self._state is None:
            raise RuntimeError("TabularMDP.step() called before reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an integer in [0, {self.n_actions}), got {action!r}")
        state, action = self._state, int(action)
        reward = float(self._np_rewards[state, action])
        terminated = bool(self.np_random.random() < self._np_termination[state, action])
        next_state = int(
            np.searchsorted(self._np_transition_cdf[state, action], self.np_random.random(), side="left")
        )
        next_state = min(next_state, self.n_states - 1)
        self._elapsed_steps += 1
        truncated = not terminated and self._elapsed_steps >= self.max_episode_steps
        self._state = next_state
        return next_state, reward, terminated, truncated, {}
