r"""A finite-horizon linear-quadratic regulator with a linear-Gaussian policy, solved exactly.

.. math::

    x_0 \sim \mathcal{N}(m_0, S_0), \quad u_t \sim \mathcal{N}(K x_t, \Sigma), \quad
    x_{t+1} = A x_t + B u_t + w_t,\; w_t \sim \mathcal{N}(0, W), \quad
    r_t = -(x_t^\top Q x_t + u_t^\top R u_t), \quad J = \mathbb{E}\Big[\sum_{t=0}^{H-1} \gamma^t r_t\Big],

with :math:`\Sigma = \operatorname{diag}(e^{2\,\text{log\_std}})`. The exact return propagates the state mean and
covariance forward; the exact gradient uses the backward (adjoint) recursion of the value matrices

.. math::

    P_H = 0,\; c_H = 0, \qquad
    P_t = Q + K^\top R K + \gamma (A + B K)^\top P_{t+1} (A + B K), \qquad
    c_t = \operatorname{tr}(R \Sigma) + \gamma \operatorname{tr}\big(P_{t+1} (B \Sigma B^\top + W)\big) + \gamma c_{t+1},

so that :math:`V^\pi_t(x) = -(x^\top P_t x + c_t)` and, with :math:`M_t = \mathbb{E}[x_t x_t^\top]`,

.. math::

    \nabla_K J = -2 \sum_{t<H} \gamma^t \big[(R + \gamma B^\top P_{t+1} B) K + \gamma B^\top P_{t+1} A\big] M_t,
    \qquad
    \nabla_{\text{log\_std}} J = -2\, \sigma^2 \odot \operatorname{diag}\Big(\sum_{t<H} \gamma^t
        (R + \gamma B^\top P_{t+1} B)\Big).

This is the policy-gradient theorem :math:`\sum_t \gamma^t \mathbb{E}_{x_t}[\nabla_\theta \mathbb{E}_{u \sim
\pi}[Q^\pi_t(x_t, u)]]` with :math:`Q^\pi_t` quadratic (the analytic gradient of Tucker et al. 2018,
arXiv:1802.10031, Sec. 3.1 / their ``GlobalLQG``, and of Fazel et al. 2018, arXiv:1801.05039, Lemma 1, for a
stochastic policy and a finite horizon).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from pgvar._validation import check_positive, check_unit_interval
from pgvar.problems.base import EpisodeBatch, Params, check_parameters

__all__ = ["LinearQuadraticRegulator"]

_DTYPE = torch.float64


def _random_spd(rng: np.random.Generator, dim: int, scale: float, floor: float) -> np.ndarray:
    """``scale * (L L^T / dim + floor I)``: a random symmetric positive definite matrix."""
    root = rng.standard_normal((dim, dim))
    return scale * (root @ root.T / dim + floor * np.eye(dim))


class LinearQuadraticRegulator(gym.Env):
    r"""A seeded random finite-horizon LQR whose exact policy gradient is known (a ``gymnasium.Env``).

    Parameters ``params = {"gain": K [d_u, d_x], "log_std": [d_u]}``; see the module docstring for the dynamics,
    the exact return and the adjoint gradient. The system matrices are drawn from ``seed``: :math:`A` a random
    matrix rescaled to spectral radius 0.95, :math:`B` Gaussian, :math:`Q, R, W, S_0` random positive definite,
    :math:`m_0` Gaussian.

    Episodes last exactly ``horizon`` steps. The horizon is part of the problem (the objective sums
    :math:`t < H` only), so the last step is ``terminated=True`` (no bootstrap), never ``truncated``, in both
    :meth:`step` and :meth:`sample_episodes`; ``next_observations`` at that step is the true :math:`x_H`.
    Values are time dependent: :meth:`exact_state_values` takes the ``timesteps``. The observation is
    :math:`x_t` (float64, unbounded ``Box``), followed by :math:`t / H` when ``observe_time`` is true (the policy
    uses only :math:`x_t`). Actions are an unbounded ``Box``; the reward and the dynamics use them unclipped.

    :param state_dim: :math:`d_x` (> 0)
    :param action_dim: :math:`d_u` (> 0)
    :param horizon: :math:`H`, the number of steps (> 0)
    :param gamma: discount factor in ``[0, 1]``
    :param seed: seed of the system matrices
    :param observe_time: append :math:`t / H` to the observation (makes the env Markov for a learned critic)

    >>> lqr = LinearQuadraticRegulator(state_dim=2, action_dim=1, horizon=5, gamma=0.9, seed=0)
    >>> params = lqr.initial_parameters(seed=1)
    >>> K = params["gain"].clone().requires_grad_(True)
    >>> J = lqr.exact_return({"gain": K, "log_std": params["log_std"]})
    >>> (autograd,) = torch.autograd.grad(J, K)
    >>> bool(torch.allclose(autograd, lqr.exact_policy_gradient(params)["gain"]))
    True
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        state_dim: int = 2,
        action_dim: int = 1,
        horizon: int = 10,
        gamma: float = 1.0,
        seed: int = 0,
        observe_time: bool = False,
    ) -> None:
        super().__init__()
        self.state_dim = int(check_positive("state_dim", state_dim, integer=True))
        self.action_dim = int(check_positive("action_dim", action_dim, integer=True))
        self.horizon = int(check_positive("horizon", horizon, integer=True))
        self.gamma = check_unit_interval("gamma", gamma)
        self.observe_time = bool(observe_time)
        self.problem_seed = seed

        rng = np.random.default_rng(seed)
        dx, du = self.state_dim, self.action_dim
        raw = rng.standard_normal((dx, dx))
        dynamics = 0.95 * raw / max(np.abs(np.linalg.eigvals(raw)).max(), 1e-12)

        def as_tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, dtype=_DTYPE)

        self.dynamics = as_tensor(dynamics)  # A [dx, dx]
        self.control = as_tensor(rng.standard_normal((dx, du)) / np.sqrt(dx))  # B [dx, du]
        self.state_cost = as_tensor(_random_spd(rng, dx, 1.0, 0.5))  # Q
        self.control_cost = as_tensor(_random_spd(rng, du, 0.2, 0.5))  # R
        self.noise_cov = as_tensor(_random_spd(rng, dx, 0.02, 0.5))  # W
        self.initial_mean = as_tensor(rng.standard_normal(dx))  # m0
        self.initial_cov = as_tensor(_random_spd(rng, dx, 0.1, 0.5))  # S0
        self._noise_chol = torch.linalg.cholesky(self.noise_cov)
        self._initial_chol = torch.linalg.cholesky(self.initial_cov)
        self._np = {
            name: getattr(self, name).numpy()
            for name in ("dynamics", "control", "state_cost", "control_cost", "initial_mean")
        }
        self._np["noise_chol"] = self._noise_chol.numpy()
        self._np["initial_chol"] = self._initial_chol.numpy()

        obs_dim = dx + int(self.observe_time)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float64)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, shape=(du,), dtype=np.float64)
        self._state: np.ndarray | None = None
        self._t = 0

    # ------------------------------------------------------------------ policy
    def _params(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        check_parameters(params, {"gain": (self.action_dim, self.state_dim), "log_std": (self.action_dim,)})
        return params["gain"].to(_DTYPE), params["log_std"].to(_DTYPE)

    def initial_parameters(self, seed: int | None = None) -> Params:
        """A seeded non-optimal point: ``gain ~ N(0, 0.3^2)``, ``log_std ~ U(log 0.3, log 0.6)`` per coordinate.

        :param seed: seed of the draw (``None``: 0)
        :return: ``{"gain": [d_u, d_x], "log_std": [d_u]}``, float64
        """
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        return {
            "gain": 0.3 * torch.randn(self.action_dim, self.state_dim, generator=generator, dtype=_DTYPE),
            "log_std": torch.empty(self.action_dim, dtype=_DTYPE).uniform_(
                np.log(0.3), np.log(0.6), generator=generator
            ),
        }

    def _states(self, observations: torch.Tensor) -> torch.Tensor:
        return observations[..., : self.state_dim].to(_DTYPE)

    def _observations(self, states: torch.Tensor, t: int) -> torch.Tensor:
        if not self.observe_time:
            return states
        return torch.cat([states, torch.full_like(states[..., :1], t / self.horizon)], dim=-1)

    def log_prob(self, params: Params, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \mathcal{N}(u; K x, \operatorname{diag}(\sigma^2))`, summed over action coordinates.

        :param params: ``{"gain", "log_std"}``
        :param observations: ``[..., obs_dim]`` (the time feature, if any, is ignored)
        :param actions: ``[..., d_u]``
        :return: ``[...]``, differentiable in ``params`` (works under :func:`torch.func.vmap`)
        """
        log_std = self._params(params)[1]
        z = (actions.to(_DTYPE) - self.mean_action(params, observations)) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)

    def mean_action(self, params: Params, observations: torch.Tensor) -> torch.Tensor:
        r"""The policy mean :math:`\mu_\theta(x) = K x`, differentiable in ``params`` (Q-Prop's Taylor point).

        :param params: ``{"gain", "log_std"}``
        :param observations: ``[..., obs_dim]`` (the time feature, if any, is ignored)
        :return: ``[..., d_u]``
        """
        return self._states(observations) @ self._params(params)[0].T

    def sample_actions(
        self, params: Params, observations: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw :math:`u = K x + \\sigma \\odot \\varepsilon`, :math:`\\varepsilon \\sim \\mathcal{N}(0, I)` (no gradient).

        :param params: policy parameters
        :param observations: ``[..., obs_dim]`` (the time feature, if any, is ignored)
        :param generator: torch random generator (``None``: the global one)
        :return: ``[..., d_u]``
        """
        with torch.no_grad():
            gain, log_std = self._params(params)
            noise = torch.randn(*observations.shape[:-1], self.action_dim, generator=generator, dtype=_DTYPE)
            return self._states(observations) @ gain.T + torch.exp(log_std) * noise

    def reward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        r""":math:`r(x, u) = -(x^\top Q x + u^\top R u)`, shape ``[...]`` (actions unclipped)."""
        x, u = self._states(observations), actions.to(_DTYPE)
        return -(((x @ self.state_cost) * x).sum(-1) + ((u @ self.control_cost) * u).sum(-1))

    # ------------------------------------------------------------------ exact quantities
    def exact_state_moments(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Means :math:`m_t` ``[H, d_x]`` and covariances :math:`S_t` ``[H, d_x, d_x]`` of :math:`x_t`, :math:`t < H`.

        .. math:: m_{t+1} = (A + B K) m_t, \qquad S_{t+1} = (A + BK) S_t (A + BK)^\top + B \Sigma B^\top + W
        """
        gain, log_std = self._params(params)
        closed_loop = self.dynamics + self.control @ gain
        injected = self.control @ torch.diag(torch.exp(2 * log_std)) @ self.control.T + self.noise_cov
        means, covs = [self.initial_mean], [self.initial_cov]
        for _ in range(self.horizon - 1):
            means.append(closed_loop @ means[-1])
            covs.append(closed_loop @ covs[-1] @ closed_loop.T + injected)
        return torch.stack(means), torch.stack(covs)

    def exact_return(self, params: Params) -> torch.Tensor:
        r"""Exact :math:`J = -\sum_{t<H} \gamma^t \big[\operatorname{tr}((Q + K^\top R K)(S_t + m_t m_t^\top))
        + \operatorname{tr}(R \Sigma)\big]` by forward moment propagation; differentiable."""
        gain, log_std = self._params(params)
        means, covs = self.exact_state_moments(params)
        second_moments = covs + means.unsqueeze(-1) * means.unsqueeze(-2)
        stage_cost = self.state_cost + gain.T @ self.control_cost @ gain
        per_step = (stage_cost * second_moments).sum((-2, -1)) + (
            torch.diagonal(self.control_cost) * torch.exp(2 * log_std)
        ).sum()
        discounts = self.gamma ** torch.arange(self.horizon, dtype=_DTYPE)
        return -(discounts * per_step).sum()

    def value_matrices(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The backward recursion: :math:`P_t` ``[H + 1, d_x, d_x]`` and :math:`c_t` ``[H + 1]`` (module docstring).

        :math:`V^\pi_t(x) = -(x^\top P_t x + c_t)`, with :math:`P_H = 0`, :math:`c_H = 0`.
        """
        gain, log_std = self._params(params)
        policy_cov = torch.diag(torch.exp(2 * log_std))
        closed_loop = self.dynamics + self.control @ gain
        stage_cost = self.state_cost + gain.T @ self.control_cost @ gain
        injected = self.control @ policy_cov @ self.control.T + self.noise_cov
        control_noise_cost = (self.control_cost * policy_cov).sum()
        matrices = [torch.zeros(self.state_dim, self.state_dim, dtype=_DTYPE)]
        constants = [torch.zeros((), dtype=_DTYPE)]
        for _ in range(self.horizon):
            following, following_constant = matrices[-1], constants[-1]
            matrices.append(stage_cost + self.gamma * closed_loop.T @ following @ closed_loop)
            constants.append(
                control_noise_cost
                + self.gamma * (following * injected).sum()
                + self.gamma * following_constant
            )
        return torch.stack(matrices[::-1]), torch.stack(constants[::-1])

    def exact_state_values(
        self, params: Params, observations: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        r""":math:`V^\pi_t(x) = -(x^\top P_t x + c_t)` for each entry, ``t = timesteps`` in ``[0, H]`` (0 at ``t = H``).

        :param params: policy parameters
        :param observations: ``[..., obs_dim]``
        :param timesteps: long ``[...]``
        """
        timesteps = torch.as_tensor(timesteps).long()
        if bool(((timesteps < 0) | (timesteps > self.horizon)).any()):
            raise ValueError(
                f"timesteps must be in [0, {self.horizon}], got values in "
                f"[{int(timesteps.min())}, {int(timesteps.max())}]"
            )
        matrices, constants = self.value_matrices(params)
        x = self._states(observations)
        quadratic = (x.unsqueeze(-2) @ matrices[timesteps] @ x.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        return -(quadratic + constants[timesteps])

    def exact_action_values(
        self, params: Params, observations: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        r""":math:`Q^\pi_t(x, u) = r(x, u) - \gamma\big[y^\top P_{t+1} y + \operatorname{tr}(P_{t+1} W) + c_{t+1}\big]`,
        :math:`y = A x + B u`, for ``t = timesteps`` in ``[0, H)``."""
        timesteps = torch.as_tensor(timesteps).long()
        if bool(((timesteps < 0) | (timesteps >= self.horizon)).any()):
            raise ValueError(
                f"timesteps must be in [0, {self.horizon}), got values in "
                f"[{int(timesteps.min())}, {int(timesteps.max())}]"
            )
        matrices, constants = self.value_matrices(params)
        following, following_constant = matrices[timesteps + 1], constants[timesteps + 1]
        mean_next = self._states(observations) @ self.dynamics.T + actions.to(_DTYPE) @ self.control.T
        quadratic = (mean_next.unsqueeze(-2) @ following @ mean_next.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        noise_term = (following * self.noise_cov).sum((-2, -1))
        return self.reward(observations, actions) - self.gamma * (quadratic + noise_term + following_constant)

    def exact_policy_gradient(self, params: Params) -> Params:
        r""":math:`\nabla_K J` and :math:`\nabla_{\text{log\_std}} J` by the adjoint recursion (module docstring).

        No autograd: forward second moments :math:`M_t` and backward value matrices :math:`P_{t+1}`.

        :return: ``{"gain": [d_u, d_x], "log_std": [d_u]}`` (detached)
        """
        with torch.no_grad():
            gain, log_std = self._params(params)
            means, covs = self.exact_state_moments(params)
            second_moments = covs + means.unsqueeze(-1) * means.unsqueeze(-2)  # M_t, t < H
            following = self.value_matrices(params)[0][1:]  # P_{t+1}, t < H
            discounts = self.gamma ** torch.arange(self.horizon, dtype=_DTYPE)
            curvature = (
                self.control_cost + self.gamma * self.control.T @ following @ self.control
            )  # [H, du, du]
            coupling = (
                curvature @ gain + self.gamma * self.control.T @ following @ self.dynamics
            )  # [H, du, dx]
            grad_gain = -2.0 * torch.einsum("t,tux,txy->uy", discounts, coupling, second_moments)
            weighted_curvature = torch.einsum("t,tuv->uv", discounts, curvature)
            grad_log_std = -2.0 * torch.exp(2 * log_std) * torch.diagonal(weighted_curvature)
            return {"gain": grad_gain, "log_std": grad_log_std}

    # ------------------------------------------------------------------ sampling
    def sample_episodes(
        self, params: Params, n_episodes: int, generator: torch.Generator | None = None
    ) -> EpisodeBatch:
        """``n_episodes`` episodes of exactly ``horizon`` steps, vectorized over episodes (loop over time only).

        :param params: policy parameters
        :param n_episodes: number of episodes ``N`` (> 0)
        :param generator: torch random generator (``None``: a fresh unseeded one)
        :return: an :class:`EpisodeBatch`, ``T = horizon``, the last step ``terminated``, no padding
        """
        n_episodes = int(check_positive("n_episodes", n_episodes, integer=True))
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        H, N, dx = self.horizon, n_episodes, self.state_dim
        with torch.no_grad():
            self._params(params)
            states = (
                self.initial_mean
                + torch.randn(N, dx, generator=generator, dtype=_DTYPE) @ self._initial_chol.T
            )
            observations, actions, rewards, next_observations = [], [], [], []
            for t in range(H):
                action = self.sample_actions(params, states, generator)
                noise = torch.randn(N, dx, generator=generator, dtype=_DTYPE) @ self._noise_chol.T
                next_states = states @ self.dynamics.T + action @ self.control.T + noise
                observations.append(self._observations(states, t))
                actions.append(action)
                rewards.append(self.reward(states, action))
                next_observations.append(self._observations(next_states, t + 1))
                states = next_states
            terminated = torch.zeros(H, N, dtype=torch.bool)
            terminated[-1] = True
            return EpisodeBatch(
                observations=torch.stack(observations),
                actions=torch.stack(actions),
                rewards=torch.stack(rewards),
                next_observations=torch.stack(next_observations),
                terminated=terminated,
                truncated=torch.zeros(H, N, dtype=torch.bool),
                mask=torch.ones(H, N, dtype=torch.bool),
                timesteps=torch.arange(H).unsqueeze(1).expand(H, N).clone(),
            )

    # ------------------------------------------------------------------ gymnasium API
    def _observation_array(self) -> np.ndarray:
        assert self._state is not None
        if not self.observe_time:
            return self._state.copy()
        return np.append(self._state, self._t / self.horizon)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw :math:`x_0 \\sim \\mathcal{N}(m_0, S_0)`; returns ``(observation, {})``.

        ``options={"state": x, "timestep": t}`` starts from state ``x`` at time ``t`` instead (either key may be
        left out; the initial draw is made either way), e.g. to roll out continuations from a sampled state.
        """
        super().reset(seed=seed)
        self._state = self._np["initial_mean"] + self._np["initial_chol"] @ self.np_random.standard_normal(
            self.state_dim
        )
        self._t = 0
        options = options or {}
        if "state" in options:
            state = np.asarray(options["state"], dtype=np.float64)
            if state.shape != (self.state_dim,):
                raise ValueError(f"options['state'] must have shape ({self.state_dim},), got {state.shape}")
            self._state = state.copy()
        if "timestep" in options:
            timestep = int(options["timestep"])
            if not 0 <= timestep < self.horizon:
                raise ValueError(
                    f"options['timestep'] must be in [0, {self.horizon}), got {options['timestep']!r}"
                )
            self._t = timestep
        return self._observation_array(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Pay :math:`-(x^\\top Q x + u^\\top R u)`, move to :math:`A x + B u + w`; ``terminated`` at ``t + 1 = H``."""
        if self._state is None:
            raise RuntimeError("LinearQuadraticRegulator.step() called before reset()")
        u = np.asarray(action, dtype=np.float64)
        if u.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {u.shape}")
        if self._t >= self.horizon:
            raise RuntimeError(
                "LinearQuadraticRegulator.step() called after the episode terminated; call reset()"
            )
        x = self._state
        reward = -float(x @ self._np["state_cost"] @ x + u @ self._np["control_cost"] @ u)
        noise = self._np["noise_chol"] @ self.np_random.standard_normal(self.state_dim)
        self._state = self._np["dynamics"] @ x + self._np["control"] @ u + noise
        self._t += 1
        return self._observation_array(), reward, self._t >= self.horizon, False, {}
