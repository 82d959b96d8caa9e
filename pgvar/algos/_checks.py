"""Checks SB3 leaves out, shared by every pgvar algorithm: hyperparameter values, ``total_timesteps``, finite data.

* :func:`check_sb3_arguments`: SB3 arguments that SB3 takes unchecked (``clip_range=-0.2`` trains with an inverted
  clip, ``n_epochs=0`` never updates, ``batch_size=0`` is a ``ZeroDivisionError``) raise ``ValueError`` at
  construction. Called before SB3's ``__init__`` by :class:`~pgvar.algos.OnPolicyEstimatorMixin` (PPO, A2C, TRPO
  and the Q-Prop classes) and by the base class of EntropyPG and SoftQ. SB3's defaults all pass.
* :class:`RolloutChecksMixin`: ``learn(total_timesteps=...)`` must be a whole number >= 0, and every observation an
  environment returns (the first one from ``reset()`` and each one from ``step()``, including the final observation
  of an episode that SB3 bootstraps from) must be finite: a NaN raises ``ValueError`` naming the environment index
  and the step of the rollout, before the policy sees it. One ``np.isfinite`` per step over the batch of
  observations (each key of a ``Dict``); integer observations (images, discrete states) are skipped.
* :func:`check_rewards_finite`: the same message for a non-finite reward of a rollout (the rollout buffers of every
  pgvar algorithm call it once per rollout).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv

from pgvar._validation import check_nonnegative
from pgvar.algos._step_hook import StepHook

if TYPE_CHECKING:
    from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

    _Base = OnPolicyAlgorithm
else:
    _Base = object

__all__ = [
    "RolloutChecksMixin",
    "check_observations_finite",
    "check_rewards_finite",
    "check_sb3_arguments",
    "check_total_timesteps",
]


# ------------------------------------------------------------------------------------- hyperparameters
def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _count(name: str, value: Any) -> None:
    if not (
        isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and int(value) >= 1
    ):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _positive_or_schedule(name: str, value: Any) -> None:
    if callable(value):  # an SB3 schedule: progress_remaining -> value
        return
    if not (_is_number(value) and math.isfinite(float(value)) and value > 0):
        raise ValueError(
            f"{name} must be a number > 0 or a schedule (a callable of the remaining progress), got {value!r}"
        )


def _max_grad_norm(name: str, value: Any) -> None:
    if not (_is_number(value) and value > 0):  # also rejects NaN; inf turns clipping off
        raise ValueError(
            f"{name} must be a number > 0 (float('inf') turns gradient clipping off), got {value!r}"
        )


def _positive_or_none(name: str, value: Any) -> None:
    if value is not None and not (_is_number(value) and math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")


def _open_unit_interval(name: str, value: Any) -> None:
    if not (_is_number(value) and 0 < value < 1):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


#: The rule for each SB3 / sb3-contrib argument checked here (none of them is checked by SB3).
SB3_ARGUMENT_RULES: dict[str, Callable[[str, Any], Any]] = {
    "learning_rate": _positive_or_schedule,
    "clip_range": _positive_or_schedule,
    "n_steps": _count,
    "batch_size": _count,
    "n_epochs": _count,
    "cg_max_steps": _count,
    "line_search_max_iter": _count,
    "n_critic_updates": _count,
    "sub_sampling_factor": _count,
    "ent_coef": check_nonnegative,
    "vf_coef": check_nonnegative,
    "cg_damping": check_nonnegative,
    "max_grad_norm": _max_grad_norm,
    "target_kl": _positive_or_none,
    "line_search_shrinking_factor": _open_unit_interval,
}


def check_sb3_arguments(**arguments: Any) -> None:
    """Raise ``ValueError`` naming the first argument whose value SB3 would take silently and train wrongly with.

    ``learning_rate`` and ``clip_range``: a number > 0 or a schedule; ``n_steps``, ``batch_size``, ``n_epochs``
    (and TRPO's ``cg_max_steps``, ``line_search_max_iter``, ``n_critic_updates``, ``sub_sampling_factor``): an
    integer >= 1; ``ent_coef``, ``vf_coef``, ``cg_damping``: a number >= 0; ``max_grad_norm``: a number > 0
    (``inf`` allowed); ``target_kl``: a number > 0 or ``None``; ``line_search_shrinking_factor``: in ``(0, 1)``.

    >>> check_sb3_arguments(clip_range=-0.2)
    Traceback (most recent call last):
    ...
    ValueError: clip_range must be a number > 0 or a schedule (a callable of the remaining progress), got -0.2
    """
    for name, value in arguments.items():
        SB3_ARGUMENT_RULES[name](name, value)


def check_total_timesteps(total_timesteps: Any) -> None:
    """Raise ``ValueError`` unless ``total_timesteps`` is a whole number >= 0 (``1e5`` is fine; 0 trains nothing,
    as in SB3)."""
    if not (
        _is_number(total_timesteps)
        and math.isfinite(float(total_timesteps))
        and float(total_timesteps).is_integer()
        and total_timesteps >= 0
    ):
        raise ValueError(f"total_timesteps must be a whole number >= 0, got {total_timesteps!r}")


# -------------------------------------------------------------------------------------------- finite data
def _first_non_finite(observations: Any) -> tuple[int, str, float] | None:
    """``(env index, where in the observation, value)`` of the first non-finite entry of a batch (env axis first)
    of observations (an array or a dict of arrays), or ``None`` when every entry is finite."""
    parts = observations.items() if isinstance(observations, dict) else [(None, observations)]
    found: list[tuple[int, str, float]] = []
    for key, part in parts:
        array = np.asarray(part)
        if array.dtype.kind not in "fc" or np.isfinite(array).all():
            continue
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        where = "" if key is None else f"key {key!r}, "
        found.append((index[0], f"{where}index {index[1:]}", array[index].item()))
    return min(found, key=lambda item: item[0]) if found else None


def check_observations_finite(observations: Any, describe: Callable[[int, str, float], str]) -> None:
    """Raise ``ValueError(describe(env_index, where, value))`` if a batch of observations holds NaN or +-inf.

    :param observations: ``[n_envs, ...]`` array, or a dict of them (``Dict`` observation spaces)
    :param describe: the message, from the env index, the place in its observation and the bad value
    """
    bad = _first_non_finite(observations)
    if bad is not None:
        raise ValueError(describe(*bad))


def check_rewards_finite(rewards: np.ndarray) -> None:
    """Raise ``ValueError`` naming the env and the step of the first non-finite reward of a ``[T, N]`` rollout."""
    finite = np.isfinite(rewards)
    if not finite.all():
        n_steps, n_envs = rewards.shape
        step, env_index = (int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"env {env_index} returned a non-finite reward ({rewards[step, env_index]}) at step {step} of "
            f"the rollout (0-based; n_steps={n_steps}, n_envs={n_envs}); rewards must be finite. The "
            "stored reward includes SB3's time-limit bootstrap gamma * V(final observation), so a non-finite "
            "value at a truncation shows up here too."
        )


class _FiniteObservations(StepHook):
    """Checks the observations ``env.step`` returned (and the final observations of finished episodes)."""

    def __init__(self, callback: BaseCallback, n_rollout_steps: int) -> None:
        super().__init__(callback)
        self.n_rollout_steps = n_rollout_steps

    def before_step(self, step_locals: dict[str, Any]) -> None:
        dones, infos = step_locals["dones"], step_locals["infos"]
        n_envs = len(dones)

        def at() -> str:  # built only for an error: this runs at every environment step
            return f"at step {step_locals['n_steps']} of the rollout (0-based; n_steps={self.n_rollout_steps}, n_envs={n_envs})"

        def describe(env_index: int, where: str, value: float) -> str:
            after_reset = (
                " Its episode had just ended: this is the first observation of its next episode (the VecEnv's "
                "automatic reset)."
                if dones[env_index]
                else ""
            )
            return (
                f"env {env_index} returned a non-finite observation ({value} at {where}) {at()}; observations must "
                f"be finite.{after_reset}"
            )

        check_observations_finite(step_locals["new_obs"], describe)
        if dones.any():
            for env_index in (int(i) for i in np.flatnonzero(dones)):
                final = infos[env_index].get("terminal_observation")
                if final is not None:
                    check_observations_finite(_one_env_batch(final), _describe_final(env_index, at()))


def _one_env_batch(observation: Any) -> Any:
    """One env's observation (an array or a dict of arrays) as a batch of one."""
    if isinstance(observation, dict):
        return {key: np.asarray(value)[None] for key, value in observation.items()}
    return np.asarray(observation)[None]


def _describe_final(env_index: int, at: str) -> Callable[[int, str, float], str]:
    def describe(_: int, where: str, value: float) -> str:
        return (
            f"env {env_index} returned a non-finite final observation of an episode "
            f"(infos[{env_index}]['terminal_observation']: {value} at {where}) {at}; observations must be finite."
        )

    return describe


class RolloutChecksMixin(_Base):
    """Checks ``learn``'s ``total_timesteps`` and every observation the environments return (see the module doc).

    Goes before an SB3 ``OnPolicyAlgorithm`` in the bases (through :class:`~pgvar.algos.OnPolicyEstimatorMixin`
    for PPO, A2C, TRPO and Q-Prop; directly for EntropyPG and SoftQ).
    """

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        check_total_timesteps(total_timesteps)
        resets = reset_num_timesteps or self._last_obs is None
        result = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if resets:
            check_observations_finite(
                self._last_obs,
                lambda env_index, where, value: (
                    f"env {env_index} returned a non-finite observation ({value} at {where}) from reset() at the "
                    "start of learn(); observations must be finite."
                ),
            )
        return result

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """SB3's ``collect_rollouts``; each step's observations are checked right after ``env.step``."""
        return super().collect_rollouts(
            env, _FiniteObservations(callback, n_rollout_steps), rollout_buffer, n_rollout_steps
        )
