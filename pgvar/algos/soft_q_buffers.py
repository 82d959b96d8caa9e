"""Rollout buffers that hold the KL-regularized signal of :class:`~pgvar.algos.soft_q.EntropyPG` and
:class:`~pgvar.algos.soft_q.SoftQ` (computed by the algorithm, stored when SB3's ``collect_rollouts`` asks the buffer
for advantages)."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer

__all__ = ["KLRegularizedDictRolloutBuffer", "KLRegularizedRolloutBuffer", "KLRegularizedSignalMixin"]


class KLRegularizedSignalMixin:
    """Puts the KL-regularized n-step advantages (and returns ``V + Delta``) in the buffer when SB3's
    ``collect_rollouts`` computes advantages, i.e. before ``callback.on_rollout_end()``: callbacks that read
    ``advantages`` (e.g. ``pgvar.callbacks.GradientVarianceCallback``) see the signal the update uses."""

    signal_ready: bool = False
    _signal: weakref.WeakMethod | None = None
    advantages: np.ndarray
    returns: np.ndarray

    def attach(self, signal: Any) -> None:
        self._signal = weakref.WeakMethod(signal)

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.signal_ready = False

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        signal = None if self._signal is None else self._signal()
        if signal is None:
            super().compute_returns_and_advantage(last_values, dones)  # type: ignore[misc]
            return
        advantages, values = signal()
        self.advantages[:] = advantages.cpu().numpy()
        self.returns[:] = (values + advantages).cpu().numpy()
        self.signal_ready = True


class KLRegularizedRolloutBuffer(KLRegularizedSignalMixin, RolloutBuffer):
    """SB3's ``RolloutBuffer`` whose advantages are :class:`EntropyPG`/:class:`SoftQ`'s KL-regularized signal."""


class KLRegularizedDictRolloutBuffer(KLRegularizedSignalMixin, DictRolloutBuffer):
    """SB3's ``DictRolloutBuffer`` whose advantages are the KL-regularized signal (``Dict`` observations)."""
