"""Argument checks shared by every layer: each error names the argument, the bad value and what is allowed."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def check_unit_interval(name: str, value: float) -> float:
    """Return ``float(value)`` or raise ``ValueError`` unless ``0 <= value <= 1``."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= as_float <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return as_float


def check_positive(name: str, value: float, *, integer: bool = False) -> float:
    """Return ``value`` or raise ``ValueError`` unless it is a finite (whole, when ``integer``) number > 0.

    Python and numpy numbers are accepted (``np.int64(64)``); bools, NaN and infinity are not.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind} > 0, got {value!r}")
    if not math.isfinite(float(value)) and not math.isnan(float(value)):
        raise ValueError(f"{name} must be a finite {kind.split()[-1]} > 0, got {value!r}")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name} must be {kind} > 0, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be {kind} > 0, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` or raise ``ValueError`` listing the allowed values."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` if ``tensor`` holds NaN or +-inf, naming the first bad index."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(
            f"{name} must be finite, got {tensor[tuple(bad)].item()} at index {tuple(bad)} "
            f"(shape {tuple(tensor.shape)})"
        )
    return tensor


def check_shape(
    name: str, tensor: torch.Tensor, shape: tuple[int, ...] | torch.Size, like: str = "rewards"
) -> torch.Tensor:
    """Raise ``ValueError`` unless ``tensor.shape == shape`` (the shape of the argument called ``like``)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (like {like}), got {tuple(tensor.shape)}")
    return tensor


def check_time_major(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` unless ``tensor`` is a floating ``[T, N]`` tensor with ``T >= 1``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [T, N], got {type(tensor).__name__}")
    if tensor.dim() != 2 or tensor.shape[0] < 1:
        raise ValueError(f"{name} must be time-major with shape [T, N] and T >= 1, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (float32 or float64), got {tensor.dtype}")
    return tensor
