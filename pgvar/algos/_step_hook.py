"""A hook into SB3's ``collect_rollouts`` right after each ``env.step``, without copying ``collect_rollouts``.

SB3's ``OnPolicyAlgorithm.collect_rollouts`` calls, on the callback it is given, ``on_rollout_start``, then per step
``update_locals(locals())`` and ``on_step()`` right after ``env.step`` (before the policy sees the new observations
and before the time-limit bootstrap is added to the rewards), and at the end ``update_locals`` and
``on_rollout_end``. :class:`StepHook` wraps that callback: it runs its own :meth:`StepHook.before_step` on the step's
locals, then forwards every call. Used by the finite-observation check (:mod:`pgvar.algos._checks`) and by
Q-Prop's replay feed (:mod:`pgvar.algos._replay_feed`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

__all__ = ["StepHook"]


class StepHook(BaseCallback):
    """Wraps the callback given to ``collect_rollouts``: runs :meth:`before_step`, then forwards each call.

    :param callback: the callback to forward every call to (already initialized by SB3's ``_setup_learn``)
    """

    def __init__(self, callback: BaseCallback) -> None:
        super().__init__()
        self.callback = callback

    @abstractmethod
    def before_step(self, step_locals: dict[str, Any]) -> None:
        """Called with the locals of ``collect_rollouts`` right after each ``env.step``, before ``callback.on_step``."""

    def on_rollout_start(self) -> None:
        self.callback.on_rollout_start()

    def update_locals(self, locals_: dict[str, Any]) -> None:
        self.locals = locals_
        self.callback.update_locals(locals_)

    def on_step(self) -> bool:
        self.before_step(self.locals)
        return self.callback.on_step()

    def on_rollout_end(self) -> None:
        self.callback.on_rollout_end()

    def _on_step(self) -> bool:  # pragma: no cover - on_step is overridden
        return True
