"""Argument checks shared by every layer: each error names the argument, the bad value and what is allowed.

Numbers: :func:`check_positive`, :func:`check_nonnegative`, :func:`check_unit_interval`, :func:`check_eps`,
:func:`check_choice`. Tensors: :func:`as_tensor` (numpy arrays are accepted), :func:`check_float_tensor`,
:func:`check_finite`, :func:`check_shape`, :func:`check_same_shape`, :func:`check_time_major`,
:func:`check_zero_one_flags`, :func:`check_mask` (bool only), :func:`check_log_normalized`. Distributions over an
action axis: :func:`check_action_tensor`, :func:`check_reference_log_probs`. Checks that read tensor *values* are
skipped inside ``torch.func`` transforms (:func:`is_concrete`), where values cannot be read; :func:`working_dtype`
is the dtype 16-bit floats are computed in.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def check_unit_interval(name: str, value: float, *, open_low: bool = False) -> float:
    """Return ``float(value)`` or raise ``ValueError`` unless ``0 <= value <= 1`` (``0 < value`` if ``open_low``)."""
    interval = "(0, 1]" if open_low else "[0, 1]"
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}") from None
    if not 0.0 <= as_float <= 1.0 or (open_low and as_float == 0.0):  # also rejects NaN
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
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


def check_nonnegative(name: str, value: float) -> float:
    """Return ``float(value)`` or raise ``ValueError`` unless it is a finite number >= 0 (bools are not numbers)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_cap(name: str, value: float) -> float:
    """Return ``float(value)`` or raise ``ValueError`` unless it is a finite odds-ratio cap ``c >= 1``.

    A cap below 1 is infeasible: :math:`\\sum_a \\pi(a) \\le c \\sum_a \\pi_{\\text{ref}}(a) = c < 1`.

    >>> check_cap("cap", 0.5)
    Traceback (most recent call last):
    ...
    ValueError: cap must be a finite number >= 1 (pi <= cap * pi_ref must leave room for a distribution), got 0.5
    """
    message = f"{name} must be a finite number >= 1 (pi <= cap * pi_ref must leave room for a distribution)"
    try:
        as_float = float(check_positive(name, value))
    except ValueError:
        raise ValueError(f"{message}, got {value!r}") from None
    if as_float < 1.0:
        raise ValueError(f"{message}, got {value!r}")
    return as_float


def check_eps(name: str, value: float, dtype: torch.dtype) -> float:
    """Return ``float(value)`` or raise ``ValueError`` unless it is a finite number > 0 that stays > 0 and finite
    in ``dtype`` (``1e-8`` is 0 in float16: ``std + eps`` would be 0 for constant input, and ``0 / 0`` NaN).
    """
    eps = float(check_positive(name, value))
    in_dtype = float(torch.tensor(eps, dtype=dtype))
    if not 0.0 < in_dtype < math.inf:
        info = torch.finfo(dtype)
        raise ValueError(
            f"{name} must be a number > 0 that {dtype} can represent (in [{info.tiny:g}, {info.max:g}]), "
            f"got {value!r}, which is {in_dtype!r} in {dtype}"
        )
    return eps


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` or raise ``ValueError`` listing the allowed values."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` if ``tensor`` holds NaN or +-inf, naming the first bad index (skipped under vmap)."""
    if not is_concrete(tensor):
        return tensor
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
    """Return ``tensor`` (:func:`as_tensor`) or raise ``ValueError`` unless its shape is ``shape`` (that of ``like``)."""
    tensor = as_tensor(name, tensor, f" of shape {tuple(shape)}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (like {like}), got {tuple(tensor.shape)}")
    return tensor


def check_time_major(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` (:func:`as_tensor`) or raise ``ValueError`` unless it is a floating ``[T, N]``, ``T >= 1``."""
    tensor = as_tensor(name, tensor, " of shape [T, N]")
    if tensor.dim() != 2 or tensor.shape[0] < 1:
        raise ValueError(f"{name} must be time-major with shape [T, N] and T >= 1, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def check_zero_one_flags(
    name: str, flags: torch.Tensor | None, like: torch.Tensor, like_name: str = "rewards"
) -> torch.Tensor:
    """``flags`` (bool, or 0/1 of any dtype, of ``like``'s shape) as 0/1 in ``like``'s dtype; ``None``: all 0.

    :param like_name: the argument ``like`` was passed as, for the message
    """
    if flags is None:
        return torch.zeros_like(like)
    flags = check_shape(name, flags, like.shape, like=like_name)
    if flags.dtype != torch.bool and is_concrete(flags) and not bool(((flags == 0) | (flags == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 (or bool) values, got {flags.unique().tolist()[:5]}")
    return flags.to(like.dtype)


def check_same_shape(name: str, tensor: torch.Tensor, reference_name: str, reference: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` or raise ``ValueError`` unless it has the shape of the argument ``reference_name``."""
    if tensor.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, got {tuple(tensor.shape)}"
        )
    return tensor


def check_float_tensor(name: str, tensor: object, what: str = "[...]", *, finite: bool = True) -> torch.Tensor:
    """Return ``tensor`` (:func:`as_tensor`) or raise ``ValueError`` unless it is floating point (and finite).

    :param what: the expected shape, for the message (e.g. ``"[..., d_a]"``)
    :param finite: also reject NaN and +-inf (:func:`check_finite`)
    """
    as_torch = as_tensor(name, tensor, f" (floating point) of shape {what}")
    if not as_torch.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape {what}, got dtype {as_torch.dtype}")
    if finite:
        check_finite(name, as_torch)
    return as_torch


def check_mask(name: str, mask: object, shape: tuple[int, ...] | torch.Size) -> torch.Tensor | None:
    """Return ``mask`` as a bool tensor of shape ``shape`` selecting at least one entry, or ``None`` for ``None``.

    Only bool masks are accepted: an integer 0/1 mask used for indexing (``x[mask]``) selects *elements 0 and 1*,
    not the entries where it is 1, a silent wrong result; it raises ``TypeError`` instead. Numpy bool arrays are
    accepted. Raises ``ValueError`` on a wrong shape or (outside ``torch.func`` transforms) an all-False mask.
    """
    if mask is None:
        return None
    tensor = as_tensor(name, mask, f" (bool) of shape {tuple(shape)}")
    if tensor.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = use the entry), got dtype {tensor.dtype}: an integer or float "
            f"0/1 mask would be used as indices; pass {name}.bool() (or {name} != 0)"
        )
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(shape)}, got shape {tuple(tensor.shape)}")
    if is_concrete(tensor) and not bool(tensor.any()):
        raise ValueError(f"{name} must select at least one sample, got an all-False mask")
    return tensor


#: Largest accepted ``|logsumexp|`` of log-probabilities, by dtype (about the rounding of ``log_softmax``).
_LOG_NORMALIZATION_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def check_log_normalized(name: str, log_probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Return ``log_probs`` or raise ``ValueError`` unless ``logsumexp`` over ``dim`` is 0 within the dtype's tolerance.

    Catches logits and probabilities passed where log-probabilities are expected (both are silently accepted by
    the formulas). Entries of ``-inf`` (probability 0) are allowed. Skipped inside ``torch.func`` transforms.
    """
    if not is_concrete(log_probs) or log_probs.numel() == 0:
        return log_probs
    total = torch.logsumexp(log_probs.detach().double(), dim=dim)
    tol = _LOG_NORMALIZATION_TOLERANCE.get(log_probs.dtype, 1e-4)
    bad = ~(total.abs() <= tol)  # NaN counts as bad
    if bool(bad.any()):
        worst = float(total[bad].abs().max()) if not bool(total[bad].isnan().all()) else math.nan
        raise ValueError(
            f"{name} must be the log of a probability distribution over the {log_probs.shape[dim]} actions "
            f"(exp({name}) summing to 1 over dim {dim}), but its logsumexp is off 0 by up to {worst:.3g} "
            f"(tolerance {tol:g} for {log_probs.dtype}, sums in [{float(total.exp().min()):.6g}, "
            f"{float(total.exp().max()):.6g}]); logits or probabilities are not log-probabilities: pass "
            f"torch.log_softmax(logits, -1) or probs.log()"
        )
    return log_probs


def check_action_tensor(name: str, tensor: object) -> torch.Tensor:
    """Return ``tensor`` (:func:`as_tensor`) as a floating-point ``[*, A]`` tensor with ``A >= 1``, or raise
    ``ValueError``; values are not checked (logits, log-probabilities with ``-inf`` and Q-values all pass)."""
    as_torch = check_float_tensor(name, tensor, "[*, A] (A actions)", finite=False)
    if as_torch.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor of shape [*, A] (A actions), got shape ()")
    if as_torch.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one action on its last axis, got shape {tuple(as_torch.shape)}")
    return as_torch


def check_reference_log_probs(name: str, ref_log_probs: object, like: torch.Tensor) -> torch.Tensor:
    """Return ``ref_log_probs`` in ``like``'s dtype, or raise ``ValueError`` unless it is the log of a reference
    distribution over the last axis of ``like`` (``[*, A]``).

    It must broadcast to ``like.shape`` with the same number of actions, be finite (every action has a positive
    reference probability: a zero makes the KL of any softmax policy infinite) and normalized in ``like``'s
    dtype (:func:`check_log_normalized`). A ``None`` reference (uniform) is the caller's to handle.
    """
    n_actions = like.shape[-1]
    ref = as_tensor(name, ref_log_probs, f" of log-probabilities over the {n_actions} actions")
    if ref.dim() < 1 or ref.shape[-1] != n_actions:
        raise ValueError(
            f"{name} must have the {n_actions} actions on its last axis (shape [A] or broadcastable to "
            f"{tuple(like.shape)}), got shape {tuple(ref.shape)}"
        )
    try:
        torch.broadcast_shapes(ref.shape, like.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(ref.shape)} does not broadcast to {tuple(like.shape)}") from None
    if not ref.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of log-probabilities, got dtype {ref.dtype}")
    ref = ref.to(like.dtype)
    if is_concrete(ref) and not bool(torch.isfinite(ref).all()):
        raise ValueError(
            f"{name} must be finite: every action needs a reference probability > 0 (a zero makes the "
            f"KL of a softmax policy infinite), got {ref_log_probs}"
        )
    return check_log_normalized(name, ref)


def as_tensor(name: str, value: object, what: str = "") -> torch.Tensor:
    """Return ``value`` as a tensor: a ``torch.Tensor`` as is, a numpy array through ``torch.as_tensor`` (sharing
    memory). Anything else raises ``ValueError`` (``what`` describes the expected tensor)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        try:
            return torch.as_tensor(value)
        except TypeError:
            raise ValueError(f"{name} must be a torch.Tensor or a numeric numpy array{what}, got dtype {value.dtype}") from None
    raise ValueError(f"{name} must be a torch.Tensor or a numpy array{what}, got {type(value).__name__}")


def is_concrete(tensor: torch.Tensor) -> bool:
    """False inside ``torch.func`` transforms (vmap/grad), where checks that read tensor values cannot run."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return is_wrapped is None or not bool(is_wrapped(tensor))


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype estimators compute in: float16 and bfloat16 are computed in float32 (results are cast back)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype
