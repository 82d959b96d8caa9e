"""The networks of :class:`~pgvar.algos.soft_q.EntropyPG` and :class:`~pgvar.algos.soft_q.SoftQ`.

:class:`SoftQPolicy` (and its CNN / ``Dict``-observation variants) is a Q-network acting with its Boltzmann policy
:math:`\\pi_Q \\propto \\bar\\pi\\, e^{Q/\\tau}`; ``actor_critic_soft_outputs`` reads an SB3 actor-critic as the dueling
form :math:`Q = V + \\tau \\log(\\pi/\\bar\\pi)` (Schulman, Chen, Abbeel 2017, arXiv:1704.06440, Sec. 6.3). Both give
:class:`SoftPolicyOutputs`: what the two losses need. Discrete action spaces only; the argument checks for the
temperature's reference policy live here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
    create_mlp,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from pgvar._validation import check_positive
from pgvar.estimators.soft_q import boltzmann_log_probs, soft_value

__all__ = ["MultiInputSoftQPolicy", "SoftPolicyOutputs", "SoftQCnnPolicy", "SoftQPolicy"]


# ----------------------------------------------------------------------------------------------- validation
def check_discrete_actions(owner: str, action_space: spaces.Space | None) -> None:
    if action_space is not None and not isinstance(action_space, spaces.Discrete):
        raise ValueError(
            f"{owner} supports only Discrete action spaces (gymnasium.spaces.Discrete: the soft value and the KL "
            f"sum over the actions), got {action_space!r}"
        )


def check_ref_policy(ref_policy: Any, n_actions: int) -> tuple[float, ...] | None:
    """``None`` (uniform) or the reference probabilities as a tuple: 1-D, ``n_actions`` long, finite, > 0, sum 1."""
    if ref_policy is None or (isinstance(ref_policy, str) and ref_policy == "uniform"):
        return None
    if isinstance(ref_policy, str):
        raise ValueError(
            f"ref_policy must be None, 'uniform' or {n_actions} probabilities, got {ref_policy!r}"
        )
    try:
        probs = np.asarray(
            ref_policy.detach().cpu() if isinstance(ref_policy, th.Tensor) else ref_policy, dtype=np.float64
        )
    except (TypeError, ValueError):
        raise ValueError(
            f"ref_policy must be None, 'uniform' or a sequence of {n_actions} probabilities, got {ref_policy!r}"
        ) from None
    if probs.ndim != 1 or probs.shape[0] != n_actions:
        raise ValueError(
            f"ref_policy must be a distribution over the {n_actions} actions of the action space (1-D, length "
            f"{n_actions}), got shape {probs.shape}: {ref_policy!r}"
        )
    if not np.all(np.isfinite(probs)) or not np.all(probs > 0):
        raise ValueError(
            f"ref_policy must hold finite probabilities > 0 (a zero makes the KL of a softmax policy infinite), "
            f"got {probs.tolist()}"
        )
    if abs(probs.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"ref_policy must sum to 1 (a distribution over the actions), got sum {probs.sum():.8g}"
        )
    return tuple(float(p) for p in probs)


def reference_log_probs(ref_policy: tuple[float, ...] | None, device: th.device | str = "cpu") -> th.Tensor | None:
    if ref_policy is None:
        return None
    log_probs = th.log(th.as_tensor(ref_policy, dtype=th.float64))
    return (log_probs - th.logsumexp(log_probs, 0)).to(device=device, dtype=th.float32)


# ----------------------------------------------------------------------------------------------- policies
class SoftPolicyOutputs(NamedTuple):
    """What both losses need at a batch of states (all differentiable in the policy's parameters)."""

    log_probs: th.Tensor
    """``[B, A]`` log-probabilities of the acting policy."""
    values: th.Tensor
    """``[B]`` state values :math:`V(s)` (the soft value for a Q-network)."""
    q_values: th.Tensor
    """``[B, A]`` :math:`Q(s, a) = V(s) + \\tau \\log(\\pi(a|s)/\\bar\\pi(a))`."""


class SoftQPolicy(BasePolicy):
    """A Q-network acting with its Boltzmann policy: :math:`\\pi_Q(a|s) \\propto \\bar\\pi(a) e^{Q(s,a)/\\tau}`,
    value :math:`V_Q(s) = \\tau \\log \\mathbb{E}_{\\bar\\pi} e^{Q(s,\\cdot)/\\tau}` (an SB3 policy: ``forward``,
    ``evaluate_actions``, ``predict_values``, ``get_distribution``, ``predict``; Discrete actions only).

    :param observation_space: observation space
    :param action_space: action space (``Discrete``)
    :param lr_schedule: learning-rate schedule (``lr_schedule(1)`` is the initial rate)
    :param net_arch: hidden layer sizes of the Q-network (default ``[64, 64]``, ``[]`` after a NatureCNN)
    :param activation_fn: activation function (default ``nn.Tanh``, like SB3's actor-critic policies)
    :param ortho_init: orthogonal initialization (gain sqrt(2), output layer 0.01: a near-uniform first policy)
    :param use_sde: must be False (no gSDE for discrete actions)
    :param features_extractor_class: features extractor (``FlattenExtractor`` by default)
    :param features_extractor_kwargs: its keyword arguments
    :param normalize_images: divide image observations by 255
    :param optimizer_class: optimizer (``th.optim.Adam`` by default, eps 1e-5)
    :param optimizer_kwargs: its keyword arguments, excluding the learning rate
    :param tau: temperature :math:`\\tau > 0` of the Boltzmann policy (set by :class:`SoftQ`/:class:`EntropyPG`)
    :param ref_policy: reference probabilities :math:`\\bar\\pi` over the actions, or ``None`` (uniform)
    """

    action_space: spaces.Discrete
    ref_log_probs: th.Tensor | None  # a non-persistent buffer: rebuilt from ``ref_policy``, not saved

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        tau: float = 1.0,
        ref_policy: Sequence[float] | None = None,
    ) -> None:
        check_discrete_actions(type(self).__name__, action_space)
        if use_sde:
            raise ValueError(
                "use_sde must be False: gSDE is for continuous actions, SoftQPolicy is discrete-only"
            )
        if optimizer_kwargs is None:
            optimizer_kwargs = {"eps": 1e-5} if optimizer_class == th.optim.Adam else {}
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=normalize_images,
        )
        n_actions = int(action_space.n)  # type: ignore[attr-defined]
        self.tau = float(check_positive("tau", tau))
        self.ref_policy = check_ref_policy(ref_policy, n_actions)
        self.register_buffer("ref_log_probs", reference_log_probs(self.ref_policy), persistent=False)
        if net_arch is None:
            net_arch = [] if features_extractor_class == NatureCNN else [64, 64]
        self.net_arch = list(net_arch)
        self.activation_fn = activation_fn
        self.ortho_init = ortho_init
        self.features_extractor = self.make_features_extractor()
        self.features_dim = self.features_extractor.features_dim
        self.q_net = nn.Sequential(*create_mlp(self.features_dim, n_actions, self.net_arch, activation_fn))
        self.action_dist = CategoricalDistribution(n_actions)
        if ortho_init:
            self.features_extractor.apply(lambda m: self.init_weights(m, gain=np.sqrt(2)))
            self.q_net.apply(lambda m: self.init_weights(m, gain=np.sqrt(2)))
            self.init_weights(self.q_net[-1], gain=0.01)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                activation_fn=self.activation_fn,
                ortho_init=self.ortho_init,
                lr_schedule=self._dummy_schedule,
                features_extractor_class=self.features_extractor_class,
                features_extractor_kwargs=self.features_extractor_kwargs,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
                tau=self.tau,
                ref_policy=self.ref_policy,
            )
        )
        return data

    def q_values(self, obs: PyTorchObs) -> th.Tensor:
        """``[B, A]`` action values :math:`Q(s, \\cdot)`."""
        return self.q_net(self.extract_features(obs, self.features_extractor))

    def soft_outputs(self, obs: PyTorchObs) -> SoftPolicyOutputs:
        """Boltzmann log-probabilities, soft values and Q-values at ``obs`` (differentiable)."""
        q_values = self.q_values(obs)
        log_probs = boltzmann_log_probs(q_values, self.tau, self.ref_log_probs)
        return SoftPolicyOutputs(log_probs, soft_value(q_values, self.tau, self.ref_log_probs), q_values)

    def _distribution(self, log_probs: th.Tensor) -> CategoricalDistribution:
        return self.action_dist.proba_distribution(action_logits=log_probs)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions sampled from (or the mode of) the Boltzmann policy, soft values ``[B, 1]``, log-probs ``[B]``."""
        log_probs, values, _ = self.soft_outputs(obs)
        distribution = self._distribution(log_probs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values.unsqueeze(-1), distribution.log_prob(actions)

    def get_distribution(self, obs: PyTorchObs) -> CategoricalDistribution:
        return self._distribution(self.soft_outputs(obs).log_probs)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Soft values ``[B, 1]``, log-probabilities of ``actions`` ``[B]`` and entropies ``[B]``."""
        log_probs, values, _ = self.soft_outputs(obs)
        distribution = self._distribution(log_probs)
        return values.unsqueeze(-1), distribution.log_prob(actions), distribution.entropy()

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Soft values ``[B, 1]`` (what SB3 bootstraps truncated episodes with)."""
        return self.soft_outputs(obs).values.unsqueeze(-1)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)


class SoftQCnnPolicy(SoftQPolicy):
    """:class:`SoftQPolicy` with SB3's NatureCNN features extractor (image observations)."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


class MultiInputSoftQPolicy(SoftQPolicy):
    """:class:`SoftQPolicy` with SB3's CombinedExtractor (``Dict`` observations)."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


def actor_critic_soft_outputs(
    policy: ActorCriticPolicy, obs: PyTorchObs, tau: float, ref_log_probs: th.Tensor | None
) -> SoftPolicyOutputs:
    """Softmax policy and value head of an SB3 actor-critic; ``Q = V + tau (log pi - log pi_ref)`` derived."""
    features = policy.extract_features(obs)
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        pi_features, vf_features = features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
    log_probs = th.log_softmax(policy.action_net(latent_pi), dim=-1)
    values = policy.value_net(latent_vf).squeeze(-1)
    ref = -np.log(log_probs.shape[-1]) if ref_log_probs is None else ref_log_probs
    return SoftPolicyOutputs(log_probs, values, values.unsqueeze(-1) + tau * (log_probs - ref))
