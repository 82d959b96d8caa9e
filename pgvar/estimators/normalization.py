r"""Advantage normalization: per minibatch, per batch, or none.

Normalizing :math:`A \mapsto (A - \bar A) / (s_A + \epsilon)` changes the estimator in two ways: it subtracts the
batch mean (a constant baseline, unbiased up to :math:`O(1/N)`) and divides the whole gradient by :math:`s_A`
(a step-size change that varies from batch to batch). Applied to only *some* terms of an estimator it changes
its expectation (the Q-Prop trap of Tucker et al. 2018): apply it to every term, or know which terms it skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pgvar._validation import check_choice, check_eps, check_float_tensor, check_mask, working_dtype

__all__ = ["NORMALIZATION_MODES", "normalize_advantages"]

NORMALIZATION_MODES = ("minibatch", "batch", "none")


def _standardize(values: torch.Tensor, eps: float) -> torch.Tensor:
    if values.numel() <= 1:  # one sample: (A - mean) / std is 0 / 0; SB3 also skips it
        return values
    return (values - values.mean()) / (values.std() + eps)


def normalize_advantages(
    advantages: torch.Tensor,
    mode: str = "batch",
    *,
    minibatch_indices: Sequence[torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Centre and scale advantages to unit standard deviation (or leave them alone).

    .. math:: \tilde A_i = \frac{A_i - \bar A}{s_A + \epsilon}, \qquad
              s_A^2 = \frac{1}{n - 1} \sum_i (A_i - \bar A)^2

    with the mean and the (Bessel-corrected, as in SB3) standard deviation taken over the whole batch
    (``"batch"``) or over each minibatch (``"minibatch"``, SB3 PPO's default); ``"none"`` returns the input.
    A group of one element is returned unchanged instead of :math:`0/0`. float16 and bfloat16 advantages are
    normalized in float32 and returned in their own dtype (``eps = 1e-8`` is 0 in float16).

    ``"batch"`` and ``"minibatch"`` compute the same statistic over the tensor they are given and differ in
    where an algorithm calls them: once on the rollout, or on every minibatch. To normalize a full rollout
    minibatch by minibatch at once, pass ``minibatch_indices`` (index tensors into ``advantages.reshape(-1)``);
    entries in no minibatch are left unchanged.

    :param advantages: advantages of any shape
    :param mode: ``"minibatch"``, ``"batch"`` or ``"none"``
    :param minibatch_indices: with ``"minibatch"``, the minibatches as index tensors into the flattened input
    :param mask: bool tensor of ``advantages``' shape; statistics use only ``True`` entries, and the others are
        returned unchanged (padding). An integer 0/1 mask is a ``TypeError``.
    :param eps: added to the standard deviation; a finite number > 0
    :return: a new tensor of ``advantages``' shape

    Reference: SB3 ``PPO.train`` (advantage normalization, GH #485, #762); Tucker et al. (2018),
    arXiv:1802.10031, Sec. 5 on what it does to action-dependent control variates.

    >>> normalize_advantages(torch.tensor([1.0, 2.0, 3.0]), "batch")
    tensor([-1.,  0.,  1.])
    >>> normalize_advantages(torch.tensor([5.0]), "minibatch")
    tensor([5.])
    """
    check_choice("mode", mode, NORMALIZATION_MODES)
    advantages = check_float_tensor("advantages", advantages)
    if minibatch_indices is not None and mode != "minibatch":
        raise ValueError(f"minibatch_indices is only allowed with mode='minibatch', got mode={mode!r}")
    mask = check_mask("mask", mask, advantages.shape)
    compute_dtype = working_dtype(advantages.dtype)
    eps = check_eps("eps", eps, compute_dtype)
    if mode == "none":
        return advantages.clone()
    flat = advantages.reshape(-1).to(compute_dtype, copy=True)
    valid = None if mask is None else mask.reshape(-1)
    groups = [torch.arange(flat.numel(), device=flat.device)] if minibatch_indices is None else minibatch_indices
    for group in groups:
        if valid is not None:
            group = group[valid[group]]
        flat[group] = _standardize(flat[group], eps)
    return flat.reshape(advantages.shape).to(advantages.dtype)
