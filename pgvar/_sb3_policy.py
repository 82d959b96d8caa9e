r"""What pgvar knows about stable-baselines3 policies and rollout buffers, in one place.

A ground-floor module: every package of pgvar may import it (the callback, the algorithms, the comparison engine,
the rollout samplers). It holds three pieces of knowledge about SB3 that used to be copied:

1. **Which parameters are the actor's** (:func:`is_actor_parameter`, :func:`actor_parameter_names`): the
   parameters through which :math:`\pi_\theta(a|s)` can change, the ones a policy-gradient statistic is over.
2. **The log-probability as a loss** (:func:`policy_log_prob`, :func:`log_prob_loss`): ``log pi(a|s)`` of a
   batch through the policy's ``get_distribution``, with SB3's action convention (a ``Discrete`` action is
   flattened to a ``long`` vector, as SB3's ``train()`` does), as a per-sample vector or as the summed loss
   ``loss_fn(module, *batch)`` that :mod:`pgvar.measure` takes.
3. **Acting like SB3**: the env sees a ``Box`` action clipped to the space, the buffer stores the raw sample
   (:func:`env_actions`).
4. **Rollout flattening**: ``[T, N, ...]`` buffer arrays to ``[T * N, ...]`` rows, time-major
   (:func:`flatten_time_major`, a plain reshape) or in SB3's env-major ``swap_and_flatten`` order, the order
   of the rows that ``RolloutBuffer.get()`` yields (:func:`buffer_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from torch import Tensor, nn

__all__ = [
    "detached_policy_copy",
    "actor_parameter_names",
    "buffer_rows",
    "env_actions",
    "flatten_time_major",
    "is_actor_parameter",
    "log_prob_loss",
    "policy_log_prob",
    "preprocess_actor_observations",
]

Observations = Tensor | dict[str, Tensor]


# ---------------------------------------------------------------------------------------- actor parameters
def is_actor_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` of an SB3 ``ActorCriticPolicy`` can change ``pi(a|s)``.

    **The rule** (the only one in pgvar): the name contains no ``"value"`` and does not start with
    ``"vf_features_extractor"``. :func:`actor_parameter_names` adds ``requires_grad``.

    **Why this rule.** ``"value" not in name`` is sb3-contrib TRPO's rule (``_compute_actor_grad``): it drops
    ``mlp_extractor.value_net.*`` and ``value_net.*`` and keeps ``log_std``, ``mlp_extractor.policy_net.*``,
    ``action_net.*`` and a shared features extractor. With ``share_features_extractor=False`` SB3 builds a
    second extractor for the critic, ``vf_features_extractor.*``, whose name has no ``"value"``: TRPO's loop
    visits it and gets a ``None`` gradient (``allow_unused=True``). pgvar leaves it out by name, so that a
    statistic over the actor's parameters spends no work on coordinates whose policy gradient is zero by
    construction; every number is the same as with TRPO's rule (the dropped coordinates are exactly 0). Frozen
    parameters (``requires_grad=False``) are left out too: no optimizer step moves them and autograd cannot
    differentiate them. Earlier versions had three variants of this rule that differed only on these two
    kinds of parameters, so no measured value changes. A custom policy whose actor parameters have
    ``"value"`` in their name needs its own selection (``params=`` of :mod:`pgvar.measure`).

    :param name: a name from ``policy.named_parameters()``
    :return: whether it is an actor parameter

    >>> is_actor_parameter("action_net.weight"), is_actor_parameter("mlp_extractor.value_net.0.bias")
    (True, False)
    >>> is_actor_parameter("vf_features_extractor.cnn.0.weight")
    False
    """
    return "value" not in name and not name.startswith("vf_features_extractor")


def actor_parameter_names(policy: nn.Module) -> list[str]:
    """Return the names of the policy's actor parameters: those with ``requires_grad`` that
    :func:`is_actor_parameter` keeps (see there for the rule and why).

    :param policy: an SB3 policy (any ``nn.Module``)
    :return: parameter names, in ``named_parameters`` order
    """
    return [name for name, param in policy.named_parameters() if param.requires_grad and is_actor_parameter(name)]


# ------------------------------------------------------------------------------------------------ log-prob
def _uses_sb3_actor_path(policy: nn.Module) -> bool:
    return isinstance(policy, ActorCriticPolicy) and type(policy).get_distribution is ActorCriticPolicy.get_distribution


def preprocess_actor_observations(policy: nn.Module, observations: Observations) -> tuple[Observations, bool]:
    """Run SB3's parameter-free observation preprocessing once, outside a differentiated function.

    ``torch.func`` cannot trace SB3's one-hot encoding of discrete observations; for SB3's own
    ``ActorCriticPolicy`` (``get_distribution`` not overridden) the preprocessing (one-hot encoding, image
    scaling) is applied here, and :func:`policy_log_prob` with ``preprocessed=True`` then follows
    ``get_distribution`` step by step from the features extractor on. Other policies are left to their own
    ``get_distribution``.

    :param policy: an SB3 policy
    :param observations: a batch of raw observations (a tensor, or a dict of tensors)
    :return: ``(observations, preprocessed)``: the (possibly preprocessed) batch and whether it was preprocessed
    """
    if not _uses_sb3_actor_path(policy):
        return observations, False
    assert isinstance(policy, ActorCriticPolicy)
    return preprocess_obs(observations, policy.observation_space, normalize_images=policy.normalize_images), True


def policy_log_prob(policy: Any, observations: Observations, actions: Tensor, *, preprocessed: bool = False) -> Tensor:
    """``log pi(a_i|s_i)`` of a batch, ``[B]``, differentiable in the policy's parameters.

    Goes through the policy's ``get_distribution``. A ``Discrete`` action space's actions are flattened to a
    ``long`` vector first, as SB3's ``train()`` does with the buffer's ``[B, 1]`` float actions.

    :param policy: an SB3 policy (``get_distribution`` and ``action_space``)
    :param observations: ``[B, ...]`` observations (a dict of them for ``Dict`` observation spaces)
    :param actions: ``[B, ...]`` actions as stored by SB3 (float) or as sampled by the policy
    :param preprocessed: the observations went through :func:`preprocess_actor_observations`, which returned
        ``True``: follow SB3's actor path (features extractor, actor MLP, distribution) without preprocessing
    :return: ``[B]``
    """
    if isinstance(getattr(policy, "action_space", None), spaces.Discrete):
        actions = actions.long().flatten()
    if preprocessed:
        latent_pi = policy.mlp_extractor.forward_actor(policy.pi_features_extractor(observations))
        distribution = policy._get_action_dist_from_latent(latent_pi)
    else:
        distribution = policy.get_distribution(observations)
    return distribution.log_prob(actions)


def log_prob_loss(
    observation_keys: Sequence[str] | None = None, *, weighted: bool = True, preprocessed: bool = False
) -> Callable[..., Tensor]:
    r"""A loss ``loss_fn(module, *batch) -> scalar`` built on :func:`policy_log_prob`, a sum over the batch, as
    :mod:`pgvar.measure` takes it (its per-sample gradients are the per-sample terms).

    .. math::  \text{weighted:}\ \ -\sum_i \tilde A_i \log \pi_\theta(a_i|s_i), \qquad
               \text{unweighted:}\ \ \sum_i \log \pi_\theta(a_i|s_i)

    The weighted loss is the policy-gradient surrogate of PPO, A2C and TRPO at ratio 1 (its gradient is
    :math:`-\sum_i \tilde A_i \nabla_\theta \log\pi`); the unweighted one has the scores as per-sample gradients.

    :param observation_keys: the keys of a ``Dict`` observation space, in the order the observation tensors
        are passed (``None``: one observation tensor)
    :param weighted: ``loss_fn(module, advantages, actions, *observations)`` (``True``) or
        ``loss_fn(module, actions, *observations)`` (``False``)
    :param preprocessed: passed to :func:`policy_log_prob`
    :return: the loss function
    """
    keys = None if observation_keys is None else list(observation_keys)

    def log_prob(module: Any, actions: Tensor, observations: tuple[Tensor, ...]) -> Tensor:
        obs: Observations = dict(zip(keys, observations)) if keys is not None else observations[0]
        return policy_log_prob(module, obs, actions, preprocessed=preprocessed)

    if weighted:

        def weighted_loss(module: Any, advantages: Tensor, actions: Tensor, *observations: Tensor) -> Tensor:
            return -(advantages * log_prob(module, actions, observations)).sum()

        return weighted_loss

    def score_loss(module: Any, actions: Tensor, *observations: Tensor) -> Tensor:
        return log_prob(module, actions, observations).sum()

    return score_loss


# ------------------------------------------------------------------------------------------------ acting
def env_actions(action_space: spaces.Space, actions: np.ndarray) -> np.ndarray:
    """The actions the environment sees: ``Box`` actions clipped to the space, as SB3's ``collect_rollouts``
    does (SB3 stores and scores the raw sample); other spaces unchanged.

    >>> env_actions(spaces.Box(-1.0, 1.0, shape=(2,)), np.array([[0.5, 3.0]]))
    array([[0.5, 1. ]])
    """
    if isinstance(action_space, spaces.Box):
        return np.clip(actions, action_space.low, action_space.high)
    return actions


# ------------------------------------------------------------------------------------------- flattening
def flatten_time_major(
    steps: np.ndarray | Tensor | dict[str, Any], device: torch.device | str | None = None
) -> Any:
    """``[T, N, ...]`` to ``[T * N, ...]`` tensors in time-major row order (row ``t * N + n``): a reshape.

    :param steps: an array or tensor, or a dict of them (``Dict`` observations: each entry is flattened)
    :param device: where the tensors go (``None``: where they are; arrays go to the CPU)
    :return: a tensor, or a dict of tensors
    """
    if isinstance(steps, dict):
        return {key: flatten_time_major(value, device) for key, value in steps.items()}
    flat = steps.reshape(steps.shape[0] * steps.shape[1], *steps.shape[2:])
    return torch.as_tensor(flat, device=device)


def buffer_rows(
    buffer: Any, field: str, flat_indices: np.ndarray | None = None, *, key: str | None = None
) -> np.ndarray:
    """Entries of ``buffer.<field>`` (``[key]`` for dict fields) at flat indices in SB3's env-major
    ``swap_and_flatten`` order (row ``n * T + t``), the rows ``RolloutBuffer.get()`` yields.

    Works before ``get()`` (arrays ``[T, N, ...]``) and after it (already flattened).

    :param buffer: an SB3 ``RolloutBuffer`` or ``DictRolloutBuffer``
    :param field: ``"observations"``, ``"actions"``, ``"advantages"``, ...
    :param flat_indices: the rows to take (``None``: all, ``[T * N, ...]``)
    :param key: the key of a dict field (``Dict`` observations)
    :return: ``[len(flat_indices), ...]``
    """
    array = getattr(buffer, field)
    if key is not None:
        array = array[key]
    n_steps, n_envs = int(buffer.buffer_size), int(buffer.n_envs)
    if getattr(buffer, "generator_ready", False):  # already [n_steps * n_envs, ...]
        return array if flat_indices is None else array[flat_indices]
    if flat_indices is None:
        flat_indices = np.arange(n_steps * n_envs)
    return array[flat_indices % n_steps, flat_indices // n_steps]


def detached_policy_copy(policy: Any) -> Any:
    """A new policy of the same class, with the same constructor arguments and parameters, that pickles.

    An SB3 policy keeps the last action distribution it built (``policy.action_dist.distribution``), whose
    tensors are part of an autograd graph; torch refuses to pickle those across processes. The copy is built as
    SB3's ``BasePolicy.load`` does (``cls(**policy._get_constructor_parameters())``, then the ``state_dict``), in the
    original's training mode, on the CPU. The global torch random stream is left as it was (the constructor's
    weight initialization draws from it).
    """
    with torch.random.fork_rng(devices=[]):
        copy = type(policy)(**policy._get_constructor_parameters())
    copy.load_state_dict({name: value.detach().cpu() for name, value in policy.state_dict().items()})
    copy.set_training_mode(policy.training)
    return copy
