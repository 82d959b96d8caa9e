r"""Occupancy-measure regularization (ORPO): a discriminator between the policy's and the reference's visits.

With ``ref_measure="state"`` or ``"state_action"`` (:class:`~pgvar.algos.reference.ReferenceOptionsMixin`), a model
regularizes the divergence between the *occupancy measures* :math:`\mu_\pi` and :math:`\mu_{\text{ref}}` of the
policy and the frozen reference (distributions over :math:`x = s` or :math:`x = (s, a)`) instead of the per-state
action distributions (Laidlaw, Singhal, Dragan 2024, "Correlated Proxies", ORPO, arXiv:2403.03185; their code
``cassidylaidlaw/orpo``, ``occupancy_measures/agents/orpo.py``). :class:`OccupancyRegularizer` does, when each
rollout ends and before GAE:

1. **Reference rollouts** (:class:`ReferenceRollouts`): every ``ref_rollout_every`` rollouts, the frozen reference
   policy acts (sampling, like the policy) for ``ref_rollout_steps`` transitions in its own copy of the
   environment; its episodes continue across collections, as SB3's rollouts do. Between collections the last
   reference sample is reused (the reference is frozen: its samples stay samples of :math:`\mu_{\text{ref}}`).
2. **Discriminator step** (:class:`OccupancyDiscriminator`): ``n_epochs`` passes of Adam over the rollout's
   :math:`x` against the reference sample, on :func:`~pgvar.estimators.discriminator_logistic_loss`, whose
   minimizer is :math:`d^* = \log \mu_\pi / \mu_{\text{ref}}`. The discriminator keeps its parameters from rollout
   to rollout (it tracks the moving policy) and is trained before it scores the rollout (ORPO's
   ``train_discriminator_first``).
3. **Penalty**: the rollout's logits :math:`d(x_t)`, clipped to ``[-logit_clip, logit_clip]``, become the
   per-step penalty :math:`-`:func:`~pgvar.estimators.occupancy_penalty_rewards` (``kl``: :math:`\lambda d`,
   ``chi2``: :math:`\lambda(e^d - 1)`, ``sqrt_chi2``: the ``chi2`` one over :math:`\sqrt{\bar\chi^2}`, ``tv``:
   :math:`\lambda \operatorname{sign} d`), subtracted from the rewards before GAE like the action-measure penalty.

The states of a rollout are samples of the *undiscounted* visitation (ORPO's too); on
:class:`~pgvar.problems.RewardHackingMDP` that is its exact occupancy measure with ``gamma=1``.

**Cost.** Per rollout of :math:`n` = ``n_steps * n_envs`` transitions: ``ref_rollout_steps / ref_rollout_every``
extra environment steps and reference forward passes (default ``ref_rollout_steps = n``, every rollout: twice the
environment steps of the unregularized algorithm), and ``n_epochs * ceil(n / batch_size)`` Adam steps of the
discriminator on minibatches of ``2 * batch_size`` samples (default 5 epochs, batch 256, a 256x256 MLP as in ORPO).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import (
    get_action_dim,
    get_flattened_obs_dim,
    get_obs_shape,
    preprocess_obs,
)
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import (
    SubprocVecEnv,
    VecEnv,
    VecEnvWrapper,
    VecNormalize,
    sync_envs_normalization,
)
from torch import nn

from pgvar._sb3_policy import flatten_time_major
from pgvar._validation import check_choice, check_positive
from pgvar.estimators import (
    DIVERGENCES,
    discriminator_logistic_loss,
    occupancy_divergence_estimate,
    occupancy_penalty_rewards,
)

__all__ = [
    "DISCRIMINATOR_DEFAULTS",
    "OCCUPANCY_MEASURES",
    "OCCUPANCY_REGULARIZERS",
    "REFERENCE_SEED_OFFSET",
    "DiscriminatorStats",
    "OccupancyDiscriminator",
    "OccupancyPenalty",
    "ReferenceRollouts",
    "check_discriminator_kwargs",
    "check_measure_options",
    "make_reference_env",
]

#: The occupancy measures a discriminator can separate: states, or state-action pairs.
OCCUPANCY_MEASURES = ("state", "state_action")
#: The divergences of the occupancy measure (:data:`pgvar.estimators.DIVERGENCES`): KL, chi2, sqrt chi2, TV.
OCCUPANCY_REGULARIZERS = DIVERGENCES
#: ``ref_discriminator_kwargs`` and their defaults (ORPO's discriminator: 2 x 256 LeakyReLU units).
DISCRIMINATOR_DEFAULTS: dict[str, Any] = {
    "net_arch": (256, 256),
    "learning_rate": 1e-3,
    "n_epochs": 5,
    "batch_size": 256,
    "logit_clip": 10.0,
}
#: The reference environment is seeded with the model's seed plus this offset (its own random stream).
REFERENCE_SEED_OFFSET = 1_000_003


def check_discriminator_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``DISCRIMINATOR_DEFAULTS`` updated with ``kwargs`` (``ValueError`` naming an unknown key or a bad value)."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"ref_discriminator_kwargs must be None or a dict, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs or {}) - set(DISCRIMINATOR_DEFAULTS))
    if unknown:
        raise ValueError(
            f"ref_discriminator_kwargs has unknown keys {unknown}; allowed: {', '.join(DISCRIMINATOR_DEFAULTS)}"
        )
    options = {**DISCRIMINATOR_DEFAULTS, **(kwargs or {})}
    net_arch = options["net_arch"]
    if not isinstance(net_arch, Sequence) or not all(
        isinstance(width, (int, np.integer)) and not isinstance(width, bool) and width > 0 for width in net_arch
    ):
        raise ValueError(f"ref_discriminator_kwargs['net_arch'] must be a list of integers > 0, got {net_arch!r}")
    options["net_arch"] = [int(width) for width in net_arch]
    check_positive("ref_discriminator_kwargs['learning_rate']", options["learning_rate"])
    check_positive("ref_discriminator_kwargs['logit_clip']", options["logit_clip"])
    for key in ("n_epochs", "batch_size"):
        options[key] = int(check_positive(f"ref_discriminator_kwargs[{key!r}]", options[key], integer=True))
    return options


class DiscriminatorStats:
    """What one discriminator step measured: its last loss and its balanced accuracy after the step."""

    def __init__(self, loss: float, accuracy: float) -> None:
        self.loss, self.accuracy = loss, accuracy


class OccupancyDiscriminator(nn.Module):
    r"""An MLP :math:`d(x)` on :math:`x = s` or :math:`(s, a)` with its Adam optimizer, trained to separate the
    policy's samples (label 1) from the reference's (label 0); at the optimum :math:`d = \log \mu_\pi / \mu_{\text{ref}}`.

    Inputs are preprocessed as SB3 preprocesses observations (one-hot for ``Discrete`` and ``MultiDiscrete``,
    images scaled to ``[0, 1]``, dict entries concatenated in key order); actions the same way with the action
    space (``Box`` actions as they were sampled, before clipping).

    :param observation_space: the model's observation space
    :param action_space: the model's action space, or ``None`` for the state measure
    :param net_arch: hidden layers (LeakyReLU)
    :param learning_rate: Adam's learning rate
    :param n_epochs: passes over the policy's samples per :meth:`train_step`
    :param batch_size: policy samples (and as many reference samples) per Adam step
    :param logit_clip: :meth:`clipped_logits` clamps to ``[-logit_clip, logit_clip]``
    :param device: where the network lives
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space | None,
        *,
        net_arch: Sequence[int],
        learning_rate: float,
        n_epochs: int,
        batch_size: int,
        logit_clip: float,
        device: th.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.observation_space, self.action_space = observation_space, action_space
        self.n_epochs, self.batch_size, self.logit_clip = n_epochs, batch_size, float(logit_clip)
        width = _flat_dim(observation_space) + (0 if action_space is None else _flat_dim(action_space))
        layers: list[nn.Module] = []
        for hidden in net_arch:
            layers += [nn.Linear(width, hidden), nn.LeakyReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers).to(device)
        self.optimizer = th.optim.Adam(self.parameters(), lr=learning_rate)

    @property
    def device(self) -> th.device:
        return next(self.parameters()).device

    def features(self, observations: th.Tensor | dict[str, th.Tensor], actions: th.Tensor | None) -> th.Tensor:
        """``[B, F]`` float inputs from ``[B, ...]`` observations (and actions for the state-action measure)."""
        parts = [_flat_features(observations, self.observation_space)]
        if self.action_space is not None:
            assert actions is not None
            parts.append(_flat_features(actions, self.action_space))
        return th.cat(parts, dim=1)

    def forward(self, features: th.Tensor) -> th.Tensor:
        """Logits ``[B]``, unclipped (what the loss trains)."""
        logits: th.Tensor = self.net(features).squeeze(-1)
        return logits

    def clipped_logits(self, features: th.Tensor) -> th.Tensor:
        """Logits ``[B]`` clamped to ``[-logit_clip, logit_clip]``, without gradient (for penalties and estimates)."""
        with th.no_grad():
            return self(features).clamp(-self.logit_clip, self.logit_clip)

    def train_step(self, policy_features: th.Tensor, reference_features: th.Tensor) -> DiscriminatorStats:
        """``n_epochs`` passes over the policy's samples in shuffled minibatches of ``batch_size``, each against as
        many reference samples (a shuffled cycle through them), on the logistic loss; then the balanced accuracy
        ``(P[d > 0 | policy] + P[d < 0 | reference]) / 2`` on the same samples."""
        n_policy, n_reference = len(policy_features), len(reference_features)
        loss = th.zeros(())
        for _ in range(self.n_epochs):
            order = th.randperm(n_policy, device=policy_features.device)
            reference_order = th.randperm(n_reference, device=reference_features.device)
            for start in range(0, n_policy, self.batch_size):
                rows = order[start : start + self.batch_size]
                reference_rows = reference_order[th.arange(start, start + len(rows)) % n_reference]
                loss = discriminator_logistic_loss(self(policy_features[rows]), self(reference_features[reference_rows]))
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        with th.no_grad():
            accuracy = 0.5 * (
                float((self(policy_features) > 0).float().mean()) + float((self(reference_features) < 0).float().mean())
            )
        return DiscriminatorStats(float(loss.detach()), accuracy)


def _flat_dim(space: spaces.Space) -> int:
    if isinstance(space, spaces.Dict):
        return sum(_flat_dim(space[key]) for key in sorted(space.spaces))
    return int(get_flattened_obs_dim(space))


def _flat_features(values: th.Tensor | dict[str, th.Tensor], space: spaces.Space) -> th.Tensor:
    if isinstance(space, spaces.Dict):
        assert isinstance(values, dict)
        return th.cat([_flat_features(values[key], space[key]) for key in sorted(space.spaces)], dim=1)
    assert isinstance(values, th.Tensor)
    processed = preprocess_obs(values, space, normalize_images=True)
    assert isinstance(processed, th.Tensor)
    return processed.reshape(len(values), -1)


# ------------------------------------------------------------------------------------------ reference rollouts
def make_reference_env(model: Any, ref_env: Any) -> tuple[VecEnv, bool]:
    """The environment the reference acts in, and whether it is a copy of the model's (then its ``VecNormalize``
    statistics are synced from the model's before each collection).

    ``ref_env=None``: a deep copy of the model's environment (``ValueError`` if there is none, if it runs in
    subprocesses, or if it cannot be copied: then pass ``ref_env``). Otherwise ``ref_env`` (an env, a ``VecEnv``
    or an env id), wrapped as SB3 wraps the model's. A copied ``VecNormalize`` stops updating its statistics.
    Seeded with the model's seed plus :data:`REFERENCE_SEED_OFFSET`.
    """
    copied = ref_env is None
    if copied:
        source = model.get_env()
        if source is None:
            raise ValueError(
                "ref_measure needs an environment for the reference rollouts: the model has none; pass env or ref_env"
            )
        venv = source
        while isinstance(venv, VecEnvWrapper):
            venv = venv.venv
        if isinstance(venv, SubprocVecEnv):
            raise ValueError(
                "ref_measure cannot copy an environment that runs in subprocesses (SubprocVecEnv); pass ref_env, an "
                "environment (or env id) for the reference rollouts"
            )
        try:
            env = copy.deepcopy(source)
        except Exception as error:
            raise ValueError(
                f"ref_measure could not copy the model's environment for the reference rollouts ({error}); pass "
                "ref_env, an environment (or env id) for them"
            ) from error
        wrapper: Any = env
        while isinstance(wrapper, VecEnvWrapper):
            if isinstance(wrapper, VecNormalize):
                wrapper.training = False
            wrapper = wrapper.venv
    else:
        from stable_baselines3.common.base_class import maybe_make_env

        env = model._wrap_env(maybe_make_env(ref_env, model.verbose), model.verbose)
    for name in ("observation_space", "action_space"):
        if getattr(env, name) != getattr(model, name):
            raise ValueError(
                f"ref_env has {name} {getattr(env, name)}, but the model's is {getattr(model, name)}: the reference "
                "rollouts must be in the model's spaces"
            )
    if model.seed is not None:
        env.seed(model.seed + REFERENCE_SEED_OFFSET)
    return env, copied


class ReferenceRollouts:
    """The frozen reference policy acting in its own environment (episodes continue across calls, as in SB3).

    :param reference: the frozen reference policy
    :param env_factory: builds the environment on first use: ``() -> (VecEnv, synced)``
        (:func:`make_reference_env`)
    :param source_env: ``() -> VecEnv | None``, the model's environment, whose ``VecNormalize`` statistics a copied
        environment takes before each collection
    """

    def __init__(
        self,
        reference: BasePolicy,
        env_factory: Callable[[], tuple[VecEnv, bool]],
        source_env: Callable[[], VecEnv | None],
    ) -> None:
        self.reference: Any = reference
        self.env_factory, self.source_env = env_factory, source_env
        self.env: VecEnv | None = None
        self.synced = False
        self._last_obs: Any = None

    def collect(self, n_transitions: int) -> tuple[Any, th.Tensor]:
        """At least ``n_transitions`` transitions (whole vectorized steps): observations and sampled actions, flat
        ``[M, ...]`` tensors (a dict for dict observations) in the rollout buffer's layout."""
        if self.env is None:
            self.env, self.synced = self.env_factory()
        env = self.env
        source = self.source_env()
        if self.synced and source is not None:
            sync_envs_normalization(source, env)
        if self._last_obs is None:
            self._last_obs = env.reset()
        space, action_space = self.reference.observation_space, self.reference.action_space
        obs_shape, action_dim, n_envs = get_obs_shape(space), get_action_dim(action_space), env.num_envs
        observations: list[Any] = []
        actions: list[np.ndarray] = []
        for _ in range(math.ceil(n_transitions / n_envs)):
            with th.no_grad():
                sampled = self.reference.get_distribution(obs_as_tensor(self._last_obs, self.reference.device))
                action = sampled.get_actions().cpu().numpy()
            env_action = action
            if isinstance(action_space, spaces.Box):  # as SB3's collect_rollouts
                if self.reference.squash_output:
                    env_action = self.reference.unscale_action(action)
                else:
                    env_action = np.clip(action, action_space.low, action_space.high)
            observations.append(_reshape_obs(self._last_obs, obs_shape, n_envs))
            actions.append(np.asarray(action).reshape(n_envs, action_dim))
            self._last_obs, _, _, _ = env.step(env_action)
        stacked: Any
        if isinstance(space, spaces.Dict):
            stacked = {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
        else:
            stacked = np.stack(observations)
        device = self.reference.device
        return flatten_time_major(stacked, device), flatten_time_major(np.stack(actions), device)


def _reshape_obs(obs: Any, obs_shape: Any, n_envs: int) -> Any:
    if isinstance(obs, dict):
        return {key: np.array(value).reshape((n_envs, *obs_shape[key])) for key, value in obs.items()}
    return np.array(obs).reshape((n_envs, *obs_shape))


# ------------------------------------------------------------------------------------------ the penalty
class OccupancyPenalty:
    """The discriminator and the reference rollouts of one model, and the step that turns a rollout into a penalty.

    :param discriminator: the :class:`OccupancyDiscriminator` (trained here, saved with the model)
    :param rollouts: the :class:`ReferenceRollouts`
    :param rollout_steps: reference transitions per collection
    :param rollout_every: collect every this many rollouts (reuse the last sample in between)
    """

    def __init__(
        self,
        discriminator: OccupancyDiscriminator,
        rollouts: ReferenceRollouts,
        *,
        rollout_steps: int,
        rollout_every: int,
    ) -> None:
        self.discriminator, self.rollouts = discriminator, rollouts
        self.rollout_steps, self.rollout_every = rollout_steps, rollout_every
        self._reference_features: th.Tensor | None = None
        self._n_rollouts = 0

    @property
    def measure(self) -> str:
        return "state" if self.discriminator.action_space is None else "state_action"

    def reference_features(self) -> th.Tensor:
        """The reference sample's discriminator inputs, collected anew every ``rollout_every`` calls."""
        if self._reference_features is None or self._n_rollouts % self.rollout_every == 0:
            observations, actions = self.rollouts.collect(self.rollout_steps)
            self._reference_features = self.discriminator.features(observations, actions).to(self.discriminator.device)
        self._n_rollouts += 1
        return self._reference_features

    def reward_penalty(
        self, observations: Any, actions: np.ndarray, *, regularizer: str, coef: float
    ) -> tuple[th.Tensor, dict[str, float]]:
        """One discriminator step on the rollout (``[T, N, ...]`` buffer arrays) against the reference sample, then
        the rollout's penalty ``[T, N]`` float64 (to subtract from the rewards) and the statistics
        (``occupancy_<regularizer>``, ``discriminator_accuracy``, ``discriminator_loss``)."""
        steps, n_envs = actions.shape[:2]
        device = self.discriminator.device
        policy_actions = flatten_time_major(actions, device) if self.discriminator.action_space is not None else None
        policy_features = self.discriminator.features(flatten_time_major(observations, device), policy_actions)
        stats = self.discriminator.train_step(policy_features, self.reference_features())
        logits = self.discriminator.clipped_logits(policy_features).double().cpu().reshape(steps, n_envs)
        penalty = -occupancy_penalty_rewards(logits, regularizer, coef)
        values = {
            f"occupancy_{regularizer}": float(occupancy_divergence_estimate(logits, regularizer)),
            "discriminator_accuracy": stats.accuracy,
            "discriminator_loss": stats.loss,
        }
        return penalty, values


def check_measure_options(
    *, measure: str, regularizer: str, estimator: str | None, placement: str, rollout_steps: int | None, every: int
) -> None:
    """The checks of the occupancy options (``ValueError`` naming the argument); the action measure's are
    :func:`~pgvar.algos.reference.check_reference_options`."""
    check_choice("ref_measure", measure, ("action", *OCCUPANCY_MEASURES))
    if rollout_steps is not None:
        check_positive("ref_rollout_steps", rollout_steps, integer=True)
    check_positive("ref_rollout_every", every, integer=True)
    if measure == "action":
        return
    if regularizer not in OCCUPANCY_REGULARIZERS:
        raise ValueError(
            f"ref_regularizer={regularizer!r} is not an occupancy-measure divergence; with ref_measure={measure!r} "
            f"use one of {', '.join(repr(r) for r in OCCUPANCY_REGULARIZERS)}"
        )
    if placement != "reward":
        raise ValueError(
            f"ref_placement={placement!r} with ref_measure={measure!r}: the occupancy penalty is a per-step reward "
            "added before GAE (ORPO); only ref_placement='reward' is available"
        )
    if estimator is not None:
        raise ValueError(
            f"ref_estimator={estimator!r} with ref_measure={measure!r}: the occupancy divergence is estimated by the "
            "discriminator; leave ref_estimator=None"
        )
