"""Q-Prop's off-policy critic as an object of its own: the Q-network, its target, the optimizer, the replay buffer
and the private random stream of the replay minibatches.

:class:`QPropCritic` is what :class:`~pgvar.algos.qprop.QPropPPO` and :class:`~pgvar.algos.qprop.QPropTRPO` hold
(``model.qprop_critic``). The algorithm feeds every collected transition into :attr:`QPropCritic.replay_buffer`,
reads the critic (:attr:`QPropCritic.q_net`) for the control variate, and calls :meth:`QPropCritic.train` once per
iteration with its current policy as ``next_policy`` (the TD targets use its mean action, or its action
probabilities for Discrete actions); the critic knows nothing else about the algorithm, and imports nothing of it.

One TD step (Gu et al. 2017, arXiv:1611.02247, Eq. 13; DDPG, Lillicrap et al. 2016, arXiv:1509.02971): a
minibatch drawn uniformly (with replacement) from the replay buffer, the targets of
:func:`~pgvar.algos._critic_step.td_targets`

.. math::

    y = r + \\gamma (1 - \\text{terminated})\\, Q_{w'}(s', \\mu_\\theta(s')),

the MSE :math:`\\operatorname{mean}((Q_w(s, a) - y)^2)`, one Adam step, then the polyak update
:math:`w' \\leftarrow (1 - \\tau) w' + \\tau w`. How the gradients are computed is decided once, when the critic
is built: by hand (:mod:`pgvar.algos._critic_step`) for the default critic on CPU, else by autograd; both give
the same numbers bit for bit (``tests/algos/test_critic_step.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
from stable_baselines3.common.policies import ActorCriticPolicy, ContinuousCritic
from stable_baselines3.common.preprocessing import get_action_dim, get_obs_shape
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples, TensorDict
from stable_baselines3.common.utils import get_parameters_by_name
from stable_baselines3.common.vec_env import VecNormalize
from stable_baselines3.dqn.policies import QNetwork
from torch import nn

from pgvar.algos._critic_step import (
    AdamStep,
    mlp_forward,
    mlp_mse_gradients,
    plain_mlp,
    polyak_update,
    td_targets,
)
from pgvar.algos._replay_file import read_replay_buffer, replay_file_path, write_replay_buffer
from pgvar.algos._save import atomic_save

__all__ = ["CriticTrainStats", "NextPolicy", "QPropCritic", "replay_buffer_nbytes"]

#: ``next_policy(next_observations) -> [B, d]``: the policy's mean action (Box) or its action probabilities
#: (Discrete) at the replay minibatches' next observations, without gradient.
NextPolicy = Callable[[th.Tensor | TensorDict], th.Tensor]
#: Critic minibatches drawn from the replay buffer per call of its ``sample`` (bounds the memory of one draw).
STEPS_PER_DRAW = 256
#: Offset between the model's seed and the seed of the critic's private random streams (initialization, replay draws).
SEED_OFFSET = 7_919


class CriticTrainStats(NamedTuple):
    """What one :meth:`QPropCritic.train` call did (what the algorithm logs)."""

    #: TD steps taken
    n_updates: int
    #: mean of the steps' MSE losses
    loss: float


class _Minibatch(NamedTuple):
    """One TD step's inputs (from ``QPropCritic._minibatches``)."""

    #: Q-head inputs (features, with the stored action for Box) or, with learned features, ``(observations,)`` /
    #: ``(observations, actions)``
    inputs: Any
    #: the same at ``s'`` (with ``mu(s')`` for Box)
    next_inputs: Any
    #: Discrete: the taken action's column of each row, ``[B, 1]``; Box: None
    taken: th.Tensor | None
    #: Discrete: ``pi(.|s')``, ``[B, n]``; Box: None
    next_probs: th.Tensor | None
    rewards: th.Tensor
    #: ``gamma * (1 - terminated)``
    discounts: th.Tensor


def replay_buffer_nbytes(
    observation_space: spaces.Space, action_space: spaces.Space, buffer_size: int, n_envs: int = 1
) -> int:
    """Bytes of the arrays of an SB3 ``ReplayBuffer`` (``optimize_memory_usage=False``, as Q-Prop builds it).

    ``rows * (2 * observation + action + 3 * 4)`` with ``rows = max(buffer_size // n_envs, 1) * n_envs``: the
    observation and the next observation in the observation space's dtype, the action (``float64`` stored as
    ``float32``), and the reward, done and timeout flags as ``float32``.

    :param observation_space: the environment's observation space (``Dict``: the sum over its keys)
    :param action_space: the environment's action space
    :param buffer_size: capacity in transitions (over all envs)
    :param n_envs: number of environments
    """
    observation_spaces = (
        list(observation_space.spaces.values()) if isinstance(observation_space, spaces.Dict) else [observation_space]
    )
    observation = 0
    for space in observation_spaces:
        shape: Any = get_obs_shape(space)
        observation += math.prod(shape) * np.dtype(space.dtype).itemsize
    action_dtype = np.float32 if action_space.dtype == np.float64 else action_space.dtype
    action = get_action_dim(action_space) * np.dtype(action_dtype).itemsize
    rows = max(buffer_size // n_envs, 1) * n_envs
    return rows * (2 * observation + action + 3 * 4)


def _system_memory() -> tuple[int | None, int | None]:
    """``(available, total)`` bytes of physical memory; None where the system does not tell."""
    with contextlib.suppress(ImportError):
        memory = importlib.import_module("psutil").virtual_memory()
        return int(memory.available), int(memory.total)
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = dict(line.split(":", 1) for line in pathlib.Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    with contextlib.suppress(AttributeError, OSError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    return None, None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


class QPropCritic:
    """Q-Prop's off-policy critic :math:`Q_w` with its target :math:`Q_{w'}`, Adam, replay buffer and random stream.

    ``Box`` actions: SB3's ``ContinuousCritic`` with one Q-network (the action concatenated to the observation
    features); ``Discrete``: DQN's ``QNetwork`` (:math:`Q_w(s, \\cdot)` over all actions). Each has a features
    extractor of its own from ``make_features_extractor``. The networks are initialized from a private torch
    stream, and the replay minibatches are drawn from a private numpy stream, both seeded from ``seed``: the
    global streams the algorithm draws actions and minibatch permutations from are left untouched.

    The hyperparameters ``learning_rate``, ``batch_size``, ``tau`` and ``gamma`` are attributes read at every
    :meth:`train` call (the algorithm sets them from its own options).

    Building the replay buffer checks its memory first (:func:`replay_buffer_nbytes`): ``ValueError`` when it is
    larger than the machine's memory, a ``UserWarning`` when it is larger than the memory available now (numpy
    reserves the pages lazily, so a buffer that is never filled may still fit).

    :param observation_space: the environment's observation space
    :param action_space: ``Box`` or ``Discrete``
    :param make_features_extractor: builds a new features extractor (the policy's class and arguments)
    :param normalize_images: whether the networks divide image observations by 255
    :param net_arch: hidden layers of the Q-network (ReLU)
    :param learning_rate: Adam's learning rate (fused Adam)
    :param batch_size: minibatch size of a TD step
    :param tau: the polyak rate of the target critic, in ``(0, 1]``
    :param gamma: the discount factor of the TD targets
    :param buffer_size: replay capacity in transitions (over all envs)
    :param n_envs: number of environments of a step added to the replay buffer
    :param device: where the networks and the sampled minibatches live
    :param seed: seed of the private random streams (None: unseeded)
    :param by_hand: take the TD steps by hand when the critic allows it (CPU, parameter-free features, no batch
        norm, a plain ReLU MLP head: the default critic); False: always autograd (the reference)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        make_features_extractor: Callable[[], BaseFeaturesExtractor],
        *,
        normalize_images: bool = True,
        net_arch: Sequence[int] = (100, 100),
        learning_rate: float = 1e-3,
        batch_size: int = 64,
        tau: float = 1e-3,
        gamma: float = 0.99,
        buffer_size: int = 1_000_000,
        n_envs: int = 1,
        device: th.device | str = "cpu",
        seed: int | None = None,
        by_hand: bool = True,
    ) -> None:
        if not isinstance(action_space, (spaces.Box, spaces.Discrete)):
            raise ValueError(f"action_space must be a Box or a Discrete space, got {action_space!r}")
        self.observation_space = observation_space
        self.action_space = action_space
        self.discrete = isinstance(action_space, spaces.Discrete)
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.tau = tau
        self.gamma = gamma
        self.n_envs = n_envs
        self.device = th.device(device)
        self.set_random_seed(seed)

        def make_network() -> ContinuousCritic | QNetwork:
            features_extractor = make_features_extractor()
            common: dict[str, Any] = {
                "features_extractor": features_extractor,
                "features_dim": features_extractor.features_dim,
                "net_arch": list(net_arch),
                "activation_fn": nn.ReLU,
                "normalize_images": normalize_images,
            }
            if self.discrete:
                return QNetwork(observation_space, action_space, **common)  # type: ignore[arg-type]
            return ContinuousCritic(
                observation_space,
                action_space,  # type: ignore[arg-type]
                n_critics=1,
                share_features_extractor=False,
                **common,
            )

        # Built on the private torch stream (restored afterwards): the policy's action noise is unchanged.
        with th.random.fork_rng(devices=[]):
            th.default_generator.manual_seed(self._init_seed)
            self.q_net = make_network().to(self.device)
            self.q_net_target = make_network().to(self.device)
        self.q_net_target.load_state_dict(self.q_net.state_dict())
        self.q_net_target.set_training_mode(False)
        self.q_net_target.requires_grad_(False)
        # Fused Adam: one kernel for all parameters (about 0.3 ms less per critic step on a CPU than the default).
        self.optimizer = th.optim.Adam(self.q_net.parameters(), lr=learning_rate, fused=True)
        self.q_net.optimizer = self.optimizer  # SB3's convention (saved as "critic.optimizer")
        self._params: list[th.Tensor] = list(self.q_net.parameters())
        self._target_params: list[th.Tensor] = list(self.q_net_target.parameters())
        self._stats = get_parameters_by_name(self.q_net, ["running_"])
        self._target_stats = get_parameters_by_name(self.q_net_target, ["running_"])
        #: Whether the features extractor has no parameters (then features are computed once per replay draw).
        self.features_are_fixed = not any(True for _ in self.q_net.features_extractor.parameters())
        self._head, self._head_target = self._heads()
        self._hand_layers = self._plain_layers() if by_hand else None
        # The one place the TD step's path is chosen.
        self._td_step = self._step_by_hand if self._hand_layers is not None else self._step_by_autograd
        self._online_module: nn.Module
        self._target_module: nn.Module
        self._online_module, self._target_module = (
            (self._head, self._head_target) if self.features_are_fixed else (self.q_net, self.q_net_target)
        )
        self.replay_buffer = self.make_replay_buffer(buffer_size)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def by_hand(self) -> bool:
        """Whether :meth:`train` takes the TD steps by hand (decided when the critic was built)."""
        return self._hand_layers is not None

    @property
    def replay_size(self) -> int:
        """Transitions in the replay buffer (over all envs)."""
        return self.replay_buffer.size() * self.replay_buffer.n_envs

    @property
    def random_state(self) -> tuple[Any, ...]:
        """The state of the private numpy stream of the replay draws (``np.random.get_state()`` form)."""
        return self._random_state

    @random_state.setter
    def random_state(self, state: tuple[Any, ...] | Sequence[Any] | dict[str, Any]) -> None:
        """Set it from the ``np.random.get_state()`` form or from :attr:`random_state_json`'s."""
        if isinstance(state, dict):
            keys = ("bit_generator", "key", "pos", "has_gauss", "cached_gaussian")
            state = tuple(state[key] for key in keys)
        name, key, pos, has_gauss, cached_gaussian = state
        legacy = (str(name), np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached_gaussian))
        np.random.RandomState().set_state(legacy)  # validates it
        self._random_state: tuple[Any, ...] = legacy

    @property
    def random_state_json(self) -> dict[str, Any]:
        """:attr:`random_state` as JSON-serializable data (the algorithm saves it in the model's zip)."""
        name, key, pos, has_gauss, cached_gaussian = self._random_state
        return {
            "bit_generator": str(name),
            "key": np.asarray(key).tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }

    def set_random_seed(self, seed: int | None) -> None:
        """Reseed the private streams (the replay draws now; the initialization seed is used when built)."""
        seed_sequence = np.random.SeedSequence(None if seed is None else [seed, SEED_OFFSET])
        self._random_state = tuple(np.random.RandomState(np.random.MT19937(seed_sequence)).get_state())
        self._init_seed = int(seed_sequence.generate_state(1)[0])

    # --------------------------------------------------------------------------------------------- build
    def _heads(self) -> tuple[Any, Any]:
        """The Q-networks' MLP heads (the modules after the features extractor)."""
        critic: Any = self.q_net
        target: Any = self.q_net_target
        if self.discrete:
            return critic.q_net, target.q_net
        return critic.q_networks[0], target.q_networks[0]

    def _plain_layers(self) -> tuple[list[tuple[th.Tensor, th.Tensor]], list[tuple[th.Tensor, th.Tensor]]] | None:
        """The critic's and its target's ``(weight, bias)`` layers when the TD steps can be taken by hand: on CPU,
        parameter-free features, no batch norm, a plain ReLU MLP head whose parameters are all of the critic's.
        None otherwise (autograd; on CUDA the products could round differently from autograd's, and that path is
        not tested here)."""
        if not self.features_are_fixed or self._stats or self.device.type != "cpu":
            return None
        layers, target_layers = plain_mlp(self._head), plain_mlp(self._head_target)
        if layers is None or target_layers is None:
            return None
        flat = [tensor for pair in layers for tensor in pair]
        if len(flat) != len(self._params) or not all(a is b for a, b in zip(flat, self._params)):
            return None
        return layers, target_layers

    def make_replay_buffer(self, buffer_size: int) -> ReplayBuffer:
        """An empty replay buffer of ``buffer_size`` transitions for this critic's spaces, its memory checked first.

        :param buffer_size: capacity in transitions (over all envs)
        """
        needed = replay_buffer_nbytes(self.observation_space, self.action_space, buffer_size, self.n_envs)
        available, total = _system_memory()
        what = (
            f"the Q-Prop critic's replay buffer of {buffer_size} transitions (qprop_buffer_size) needs {_gib(needed)} "
            f"({needed // max(buffer_size // self.n_envs, 1) // self.n_envs} bytes per transition: observation and "
            "next observation, action, reward, done and timeout flags)"
        )
        fits = "" if available is None else f" (about {int(buffer_size * available / needed)} transitions fit now)"
        if total is not None and needed > total:
            raise ValueError(
                f"{what}, more than the {_gib(total)} of memory of this machine; pass a smaller qprop_buffer_size{fits}"
            )
        if available is not None and needed > available:
            warnings.warn(
                f"{what}, more than the {_gib(available)} of memory available now; training may run out of memory "
                f"once the buffer fills up. Pass a smaller qprop_buffer_size{fits}",
                stacklevel=2,
            )
        buffer_class: Any = DictReplayBuffer if isinstance(self.observation_space, spaces.Dict) else ReplayBuffer
        try:
            return buffer_class(
                buffer_size,
                self.observation_space,
                self.action_space,
                device=self.device,
                n_envs=self.n_envs,
                optimize_memory_usage=False,
                handle_timeout_termination=True,
            )
        except MemoryError as error:
            raise MemoryError(f"{what}, and allocating it failed; pass a smaller qprop_buffer_size") from error

    # --------------------------------------------------------------------------------------------- train
    def train(
        self, n_updates: int, next_policy: NextPolicy | ActorCriticPolicy, env: VecNormalize | None = None
    ) -> CriticTrainStats:
        """``n_updates`` TD steps on minibatches of ``batch_size`` transitions from the replay buffer.

        Each step: the MSE to :func:`~pgvar.algos._critic_step.td_targets`, one Adam step with ``learning_rate``,
        then :func:`~pgvar.algos._critic_step.polyak_update` of the target critic with ``tau``. The minibatches of
        up to 256 steps are drawn in one ``sample`` call (uniform with replacement, as one by one) from the private
        stream; ``next_policy`` at their next observations is computed once per draw, and so are the observation
        features when the features extractor has no parameters.

        :param n_updates: TD steps to take (> 0; the replay buffer must not be empty)
        :param next_policy: the policy whose mean action (Box) or action probabilities (Discrete) at ``s'`` the
            targets use: an SB3 ``ActorCriticPolicy`` (the algorithm's), or a callable that returns them
            (:data:`NextPolicy`); it must not change during the call
        :param env: the ``VecNormalize`` wrapper whose statistics normalize the sampled observations and rewards
            (the replay buffer stores them raw), or None
        :return: the number of steps and their mean loss
        """
        if n_updates <= 0 or self.replay_buffer.size() == 0:
            raise ValueError(f"train needs n_updates > 0 and a non-empty replay buffer, got n_updates={n_updates} and "
                             f"{self.replay_size} stored transitions")  # fmt: skip
        self.q_net.set_training_mode(True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate
        adam_step = AdamStep(self.optimizer, self._params)
        if isinstance(next_policy, ActorCriticPolicy):
            next_policy = self._policy_output(next_policy)
        losses: list[th.Tensor] = []
        for first in range(0, n_updates, STEPS_PER_DRAW):
            n_draw = min(STEPS_PER_DRAW, n_updates - first)
            with self._private_numpy_random():  # n_draw minibatches at once (uniform with replacement, like one by one)
                drawn = self.replay_buffer.sample(n_draw * self.batch_size, env=env)
            for batch in self._minibatches(drawn, next_policy):
                loss, grads = self._td_step(batch)
                adam_step(grads)
                polyak_update(self._target_params, self._params, self.tau, self._target_stats, self._stats)
                losses.append(loss.detach())
        self.q_net.set_training_mode(False)
        return CriticTrainStats(n_updates, float(th.stack(losses).mean()))

    def _policy_output(self, policy: ActorCriticPolicy) -> NextPolicy:
        """``policy``'s mean action (Box) or action probabilities (Discrete) as a :data:`NextPolicy`."""

        def next_policy(observations: th.Tensor | TensorDict) -> th.Tensor:
            distribution: Any = policy.get_distribution(observations).distribution
            return distribution.probs if self.discrete else distribution.mean

        return next_policy

    def _step_by_hand(self, batch: _Minibatch) -> tuple[th.Tensor, Sequence[th.Tensor | None]]:
        """The MSE to the TD targets and its gradients, written out (:mod:`pgvar.algos._critic_step`)."""
        assert self._hand_layers is not None
        layers, target_layers = self._hand_layers
        targets = td_targets(batch.rewards, batch.discounts, mlp_forward(target_layers, batch.next_inputs), batch.next_probs)
        return mlp_mse_gradients(layers, batch.inputs, targets, batch.taken)

    def _step_by_autograd(self, batch: _Minibatch) -> tuple[th.Tensor, Sequence[th.Tensor | None]]:
        """The MSE to the TD targets and its gradients, one per parameter (None for an unused one), by autograd."""
        with th.no_grad():
            next_q = _q_out(self._target_module, batch.next_inputs)
            targets = td_targets(batch.rewards, batch.discounts, next_q, batch.next_probs)
        q = _q_out(self._online_module, batch.inputs)
        loss = F.mse_loss(q if batch.taken is None else q.gather(1, batch.taken), targets)
        # autograd.grad skips the AccumulateGrad nodes of backward(): about 0.1 ms less per step on a CPU
        return loss, th.autograd.grad(loss, self._params, allow_unused=True)

    def _minibatches(self, drawn: ReplayBufferSamples, next_policy: NextPolicy) -> Iterator[_Minibatch]:
        """The steps' inputs of one draw. With parameter-free features: the Q-heads' inputs, computed once per draw
        (features, with the stored actions for Box; next features with ``mu(s')``). With learned features: the
        observations (with the actions for Box), since the features change with every step."""
        split = lambda tensor: th.split(tensor, self.batch_size)  # noqa: E731 (views, no copies)
        with th.no_grad():
            policy_out = next_policy(drawn.next_observations)
        rewards, discounts = split(drawn.rewards), split(self.gamma * (1.0 - drawn.dones))
        taken = split(drawn.actions.long().reshape(-1, 1)) if self.discrete else None
        probs = split(policy_out) if self.discrete else None
        inputs: Sequence[Any]
        next_inputs: Sequence[Any]
        if self.features_are_fixed:
            with th.no_grad():
                inputs = split(self._head_inputs(self.q_net, drawn.observations, drawn.actions))
                next_inputs = split(self._head_inputs(self.q_net_target, drawn.next_observations, policy_out))
        else:
            starts = range(0, len(drawn.rewards), self.batch_size)
            rows = [slice(first, first + self.batch_size) for first in starts]
            observations = [_rows(drawn.observations, row) for row in rows]
            next_observations = [_rows(drawn.next_observations, row) for row in rows]
            if self.discrete:
                inputs, next_inputs = observations, next_observations
            else:
                actions, next_actions = split(drawn.actions.float()), split(policy_out)
                inputs = list(zip(observations, actions))
                next_inputs = list(zip(next_observations, next_actions))
        for index in range(len(rewards)):
            yield _Minibatch(
                inputs[index],
                next_inputs[index],
                None if taken is None else taken[index],
                None if probs is None else probs[index],
                rewards[index],
                discounts[index],
            )

    def _head_inputs(self, network: Any, observations: th.Tensor | TensorDict, actions: th.Tensor) -> th.Tensor:
        features = network.extract_features(observations, network.features_extractor)
        return features if self.discrete else th.cat([features, actions.float()], dim=1)

    @contextlib.contextmanager
    def _private_numpy_random(self) -> Iterator[None]:
        """Run SB3's replay sampling (which draws from ``np.random``) on the private stream, then restore the global one."""
        # (The legacy global state on purpose: it is what SB3's buffers draw from.)
        saved = np.random.get_state()  # noqa: NPY002
        np.random.set_state(self._random_state)  # noqa: NPY002
        try:
            yield
        finally:
            self._random_state = tuple(np.random.get_state())  # noqa: NPY002
            np.random.set_state(saved)  # noqa: NPY002

    # ----------------------------------------------------------------------------------------- save/load
    def save_replay_buffer(self, path: str | os.PathLike[str] | io.BufferedIOBase) -> None:
        """Write the replay buffer (its filled rows) as numpy arrays and JSON metadata in one zip, atomically.

        :param path: file path (``.npz`` is appended when it has no suffix) or a writable binary file object
        """
        target = replay_file_path(path) if isinstance(path, (str, os.PathLike)) else path
        atomic_save(write_replay_buffer(self.replay_buffer), target)

    def load_replay_buffer(self, path: str | os.PathLike[str] | io.BufferedIOBase) -> None:
        """Replace the replay buffer by one written by :meth:`save_replay_buffer` (never unpickles anything).

        ``ValueError`` for a file that is not such a file (a pickle included) or that does not fit this critic
        (``n_envs``, observation and action shapes, dtypes). The private random stream is not in the file; the
        algorithm saves it with the model.

        :param path: file path (``.npz`` is tried too) or a readable, seekable binary file object
        """
        self.replay_buffer = read_replay_buffer(path, self._buffer_for)

    def _buffer_for(self, metadata: dict[str, Any]) -> ReplayBuffer:
        replay = self.replay_buffer
        keys = list(replay.observations) if isinstance(replay, DictReplayBuffer) else None
        if (
            metadata["n_envs"] != replay.n_envs
            or metadata["buffer_class"] != type(replay).__name__
            or metadata["observation_keys"] != keys
        ):
            raise ValueError(
                f"the replay buffer has n_envs={metadata['n_envs']} and is a {metadata['buffer_class']} (observation "
                f"keys {metadata['observation_keys']}), the model n_envs={replay.n_envs} and a {type(replay).__name__} "
                f"(observation keys {keys}) with observations of shape {replay.obs_shape}"
            )
        size = metadata["buffer_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"the replay buffer's buffer_size must be an integer > 0, got {size!r}")
        return self.make_replay_buffer(size * replay.n_envs)


def _q_out(module: nn.Module, inputs: Any) -> th.Tensor:
    """``module``'s Q-values: ``[B, 1]`` (Box) or ``[B, n]`` (Discrete); ``inputs`` is a tensor, a dict of
    observations, or ``(observations, actions)`` for SB3's ``ContinuousCritic`` (which returns one tensor per
    Q-network)."""
    out = module(*inputs) if isinstance(inputs, tuple) else module(inputs)
    return out[0] if isinstance(out, tuple) else out


def _rows(observations: th.Tensor | TensorDict, rows: slice) -> th.Tensor | TensorDict:
    if isinstance(observations, dict):
        return {key: value[rows] for key, value in observations.items()}
    return observations[rows]
