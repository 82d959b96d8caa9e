r"""A one-step contextual bandit with a linear-Gaussian policy and a closed-form expected reward.

Context :math:`s \sim \mathcal{N}(m, I)`, action :math:`a \sim \pi_\theta(\cdot|s) = \mathcal{N}(W s + b,
\operatorname{diag}(\sigma^2))` with :math:`\sigma = \exp(\text{log\_std})`, one reward, then the episode ends.
Both reward families make :math:`J(\theta) = \mathbb{E}[r]` a polynomial in the first two moments of
:math:`(s, a)`, so :math:`J` is written in closed form and its exact gradient is autograd of that closed form
(float64). :meth:`GaussianBandit.exact_expectation` computes any other population expectation (for instance
the exact variance of a score-function estimator) by Gauss-Hermite quadrature, exactly for polynomials.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from pgvar._validation import check_choice, check_positive
from pgvar.problems.base import EpisodeBatch, Params, check_parameters

__all__ = ["GaussianBandit"]

_DTYPE = torch.float64
REWARD_KINDS = ("quadratic", "linear")


class GaussianBandit(gym.Env):
    r"""A contextual Gaussian bandit whose exact policy gradient is known (a ``gymnasium.Env``).

    Policy parameters ``params = {"weight": W [d_a, d_s], "bias": b [d_a], "log_std": [d_a]}``:

    .. math:: a \sim \mathcal{N}(W s + b, \operatorname{diag}(e^{2\,\text{log\_std}})), \qquad s \sim \mathcal{N}(m, I).

    Rewards (all constants drawn from ``seed``; :math:`H` positive definite, :math:`r_0` an offset in
    ``[2, 4]`` so that returns are far from 0 and baselines matter):

    - ``"quadratic"``: :math:`r = r_0 - (a - K s - k)^\top H (a - K s - k)`, so with :math:`e = (W - K) s + b - k`,
      :math:`J = r_0 - \mu_e^\top H \mu_e - \operatorname{tr}\big(H [(W - K)(W - K)^\top + \operatorname{diag}(\sigma^2)]\big)`,
      :math:`\mu_e = (W - K) m + b - k`.
    - ``"linear"``: :math:`r = r_0 + (C s + c)^\top a`, so
      :math:`J = r_0 + (C m + c)^\top (W m + b) + \operatorname{tr}(C^\top W)` (independent of :math:`\sigma`).

    The episode is one step: ``terminated=True``, ``gamma = 1`` (any discount gives the same objective), and the
    observation returned by :meth:`step` (``next_observations``) is the context again; it is never bootstrapped
    from. Spaces are unbounded ``Box`` es (float64); the reward uses the action as given, never clipped.

    :param obs_dim: context dimension :math:`d_s` (> 0)
    :param action_dim: action dimension :math:`d_a` (> 0)
    :param reward: ``"quadratic"`` or ``"linear"``
    :param seed: seed of the reward constants and the context mean

    >>> bandit = GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0)
    >>> params = bandit.initial_parameters(seed=1)
    >>> sorted(bandit.exact_policy_gradient(params))
    ['bias', 'log_std', 'weight']
    >>> J_closed = bandit.exact_return(params)
    >>> J_quad = bandit.exact_expectation(params, lambda s, a: bandit.reward(s, a))
    >>> bool(torch.isclose(J_closed, J_quad))
    True
    """

    metadata: dict[str, Any] = {"render_modes": []}
    gamma: float = 1.0

    def __init__(
        self, obs_dim: int = 2, action_dim: int = 2, reward: str = "quadratic", seed: int = 0
    ) -> None:
        super().__init__()
        self.obs_dim = int(check_positive("obs_dim", obs_dim, integer=True))
        self.action_dim = int(check_positive("action_dim", action_dim, integer=True))
        self.reward_kind = check_choice("reward", reward, REWARD_KINDS)
        self.problem_seed = seed
        self.gamma = 1.0
        self.horizon: int | None = 1  # every episode is one step

        rng = np.random.default_rng(seed)
        ds, da = self.obs_dim, self.action_dim

        def as_tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, dtype=_DTYPE)

        self.context_mean = as_tensor(rng.standard_normal(ds))  # m
        self.reward_offset = float(rng.uniform(2.0, 4.0))  # r_0
        # quadratic: r = r0 - (a - K s - k)^T H (a - K s - k)
        self.target_gain = as_tensor(rng.standard_normal((da, ds)) / np.sqrt(ds))  # K
        self.target_offset = as_tensor(rng.standard_normal(da))  # k
        root = rng.standard_normal((da, da))
        self.reward_hessian = as_tensor(root @ root.T / da + 0.5 * np.eye(da))  # H (positive definite)
        # linear: r = r0 + (C s + c)^T a
        self.reward_gain = as_tensor(rng.standard_normal((da, ds)) / np.sqrt(ds))  # C
        self.reward_bias = as_tensor(rng.standard_normal(da))  # c

        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(ds,), dtype=np.float64)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, shape=(da,), dtype=np.float64)
        self._context: np.ndarray | None = None

    # ------------------------------------------------------------------ policy
    def _params(self, params: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_parameters(
            params,
            {
                "weight": (self.action_dim, self.obs_dim),
                "bias": (self.action_dim,),
                "log_std": (self.action_dim,),
            },
        )
        return params["weight"].to(_DTYPE), params["bias"].to(_DTYPE), params["log_std"].to(_DTYPE)

    def initial_parameters(self, seed: int | None = None) -> Params:
        """A seeded non-optimal point: ``W, b ~ N(0, 0.5^2)``, ``log_std ~ U(log 0.5, log 1)`` per coordinate.

        :param seed: seed of the draw (``None``: 0)
        :return: ``{"weight": [d_a, d_s], "bias": [d_a], "log_std": [d_a]}``, float64
        """
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        da, ds = self.action_dim, self.obs_dim
        return {
            "weight": 0.5 * torch.randn(da, ds, generator=generator, dtype=_DTYPE),
            "bias": 0.5 * torch.randn(da, generator=generator, dtype=_DTYPE),
            "log_std": torch.empty(da, dtype=_DTYPE).uniform_(np.log(0.5), 0.0, generator=generator),
        }

    def log_prob(self, params: Params, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \mathcal{N}(a; W s + b, \operatorname{diag}(\sigma^2))`, summed over action coordinates.

        :param params: policy parameters
        :param observations: ``[..., d_s]``
        :param actions: ``[..., d_a]``
        :return: ``[...]``, differentiable in ``params`` (works under :func:`torch.func.vmap`)
        """
        log_std = self._params(params)[2]
        z = (actions.to(_DTYPE) - self.mean_action(params, observations)) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)

    def mean_action(self, params: Params, observations: torch.Tensor) -> torch.Tensor:
        r"""The policy mean :math:`\mu_\theta(s) = W s + b`, differentiable in ``params`` (Q-Prop's Taylor point).

        :param params: policy parameters
        :param observations: ``[..., d_s]``
        :return: ``[..., d_a]``
        """
        weight, bias, _ = self._params(params)
        return observations.to(_DTYPE) @ weight.T + bias

    def sample_actions(
        self, params: Params, observations: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw :math:`a = W s + b + \\sigma \\odot \\varepsilon`, :math:`\\varepsilon \\sim \\mathcal{N}(0, I)` (no gradient).

        :param params: policy parameters
        :param observations: ``[..., d_s]``
        :param generator: torch random generator (``None``: the global one)
        :return: ``[..., d_a]``
        """
        with torch.no_grad():
            weight, bias, log_std = self._params(params)
            noise = torch.randn(*observations.shape[:-1], self.action_dim, generator=generator, dtype=_DTYPE)
            return observations.to(_DTYPE) @ weight.T + bias + torch.exp(log_std) * noise

    # ------------------------------------------------------------------ rewards and exact quantities
    def reward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The reward :math:`r(s, a)` (deterministic given context and action), shape ``[...]``.

        :param observations: ``[..., d_s]``
        :param actions: ``[..., d_a]`` (used as given, never clipped)
        """
        s, a = observations.to(_DTYPE), actions.to(_DTYPE)
        if self.reward_kind == "quadratic":
            e = a - s @ self.target_gain.T - self.target_offset
            return self.reward_offset - ((e @ self.reward_hessian) * e).sum(-1)
        return self.reward_offset + ((s @ self.reward_gain.T + self.reward_bias) * a).sum(-1)

    def exact_return(self, params: Params) -> torch.Tensor:
        r""":math:`J(\theta) = \mathbb{E}_{s, a}[r(s, a)]` in closed form (see the class docstring); differentiable."""
        weight, bias, log_std = self._params(params)
        m = self.context_mean
        if self.reward_kind == "quadratic":
            gap = weight - self.target_gain
            mean_e = gap @ m + bias - self.target_offset
            cov_e = gap @ gap.T + torch.diag(torch.exp(2 * log_std))
            return (
                self.reward_offset
                - mean_e @ self.reward_hessian @ mean_e
                - (self.reward_hessian * cov_e).sum()
            )
        return (
            self.reward_offset
            + (self.reward_gain @ m + self.reward_bias) @ (weight @ m + bias)
            + (self.reward_gain * weight).sum()
            + 0.0 * log_std.sum()  # keeps log_std in the graph: its gradient is exactly 0
        )

    def exact_policy_gradient(self, params: Params) -> Params:
        r""":math:`\nabla_\theta J`: autograd of the closed-form :meth:`exact_return` in float64 (detached)."""
        leaves = {name: value.detach().to(_DTYPE).requires_grad_(True) for name, value in params.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(self.exact_return(leaves), list(leaves.values()))
        return {name: g.detach() for name, g in zip(leaves, grads)}

    def exact_state_values(
        self, params: Params, observations: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        r""":math:`V^\pi(s) = \mathbb{E}_{a \sim \pi(\cdot|s)}[r(s, a)]` at ``observations [..., d_s]``; ``timesteps`` ignored.

        Quadratic: :math:`r_0 - e^\top H e - \operatorname{tr}(H \operatorname{diag}\sigma^2)`,
        :math:`e = (W - K) s + b - k`. Linear: :math:`r_0 + (C s + c)^\top (W s + b)`.
        """
        weight, bias, log_std = self._params(params)
        means = observations.to(_DTYPE) @ weight.T + bias
        if self.reward_kind == "quadratic":
            return (
                self.reward(observations, means)
                - (torch.diagonal(self.reward_hessian) * torch.exp(2 * log_std)).sum()
            )
        return self.reward(observations, means)

    def exact_action_values(
        self,
        params: Params,
        observations: torch.Tensor,
        actions: torch.Tensor,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`Q^\pi(s, a) = r(s, a)` (one step); ``params`` and ``timesteps`` are unused."""
        return self.reward(observations, actions)

    def exact_expectation(
        self,
        params: Params,
        function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        points_per_dim: int = 5,
    ) -> torch.Tensor:
        r""":math:`\mathbb{E}_{s \sim \mathcal{N}(m, I),\, a \sim \pi_\theta(\cdot|s)}[f(s, a)]` by Gauss-Hermite quadrature.

        Writes :math:`s = m + z`, :math:`a = W s + b + \sigma \odot \varepsilon` with :math:`(z, \varepsilon)` standard
        normal and takes the tensor product of ``points_per_dim`` probabilists' Hermite nodes per coordinate, which
        is exact when :math:`f` is a polynomial of degree at most ``2 * points_per_dim - 1`` in each coordinate of
        :math:`(z, \varepsilon)`. The default 5 covers degree 9, enough for the second moment of a score-function
        estimator, :math:`\mathbb{E}[\lVert g \rVert^2 (r - b)^2]` (degree 8 per coordinate), with either reward.
        Costs ``points_per_dim ** (d_s + d_a)`` evaluations of ``f``.

        :param params: policy parameters (differentiable through the nodes)
        :param function: ``f(observations [M, d_s], actions [M, d_a]) -> [M, ...]``
        :param points_per_dim: quadrature nodes per coordinate (> 0)
        :return: ``[...]``, the exact expectation for polynomial ``f``
        """
        points_per_dim = int(check_positive("points_per_dim", points_per_dim, integer=True))
        weight, bias, log_std = self._params(params)
        nodes_1d, weights_1d = np.polynomial.hermite_e.hermegauss(points_per_dim)
        weights_1d = weights_1d / weights_1d.sum()
        dims = self.obs_dim + self.action_dim
        grid = torch.as_tensor(np.array(list(itertools.product(nodes_1d, repeat=dims))), dtype=_DTYPE)
        node_weights = torch.as_tensor(
            np.prod(np.array(list(itertools.product(weights_1d, repeat=dims))), axis=1), dtype=_DTYPE
        )
        observations = self.context_mean + grid[:, : self.obs_dim]
        actions = observations @ weight.T + bias + torch.exp(log_std) * grid[:, self.obs_dim :]
        values = function(observations, actions)
        return torch.tensordot(node_weights, values, dims=([0], [0]))

    # ------------------------------------------------------------------ sampling
    def sample_episodes(
        self, params: Params, n_episodes: int, generator: torch.Generator | None = None
    ) -> EpisodeBatch:
        """``n_episodes`` one-step episodes, vectorized: ``T = 1``, every step ``terminated``.

        :param params: policy parameters
        :param n_episodes: number of episodes ``N`` (> 0)
        :param generator: torch random generator (``None``: a fresh unseeded one)
        :return: an :class:`EpisodeBatch` with ``[1, N, d_s]`` observations and ``[1, N, d_a]`` actions
        """
        n_episodes = int(check_positive("n_episodes", n_episodes, integer=True))
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        with torch.no_grad():
            contexts = self.context_mean + torch.randn(
                n_episodes, self.obs_dim, generator=generator, dtype=_DTYPE
            )
            actions = self.sample_actions(params, contexts, generator)
            rewards = self.reward(contexts, actions)
            ones = torch.ones(1, n_episodes, dtype=torch.bool)
            return EpisodeBatch(
                observations=contexts.unsqueeze(0),
                actions=actions.unsqueeze(0),
                rewards=rewards.unsqueeze(0),
                next_observations=contexts.unsqueeze(0).clone(),
                terminated=ones,
                truncated=torch.zeros_like(ones),
                mask=ones.clone(),
                timesteps=torch.zeros(1, n_episodes, dtype=torch.long),
            )

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw a context :math:`s \\sim \\mathcal{N}(m, I)`; returns ``(s, {})``.

        ``options={"context": s}`` uses ``s`` instead (the draw is made either way).
        """
        super().reset(seed=seed)
        self._context = self.context_mean.numpy() + self.np_random.standard_normal(self.obs_dim)
        if options is not None and "context" in options:
            context = np.asarray(options["context"], dtype=np.float64)
            if context.shape != (self.obs_dim,):
                raise ValueError(f"options['context'] must have shape ({self.obs_dim},), got {context.shape}")
            self._context = context.copy()
        return self._context.copy(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Pay :math:`r(s, a)` for the unclipped action and end the episode (returns the context again)."""
        if self._context is None:
            raise RuntimeError("GaussianBandit.step() called before reset()")
        action_array = np.asarray(action, dtype=np.float64)
        if action_array.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {action_array.shape}")
        reward = float(self.reward(torch.as_tensor(self._context), torch.as_tensor(action_array)))
        return self._context.copy(), reward, True, False, {}
