r"""Constant baselines for the score-function estimator :math:`g\,(G - b)`.

Any baseline that does not depend on the sampled action leaves :math:`\mathbb{E}[g\,(G - b)]` unchanged, because
:math:`\mathbb{E}_{a \sim \pi}[\nabla_\theta \log \pi(a|s)] = 0`; it only changes the variance. Learned
state-dependent baselines :math:`V(s)` enter through :func:`pgvar.estimators.gae_advantages`.
"""

from __future__ import annotations

import torch

from pgvar._validation import check_float_tensor, check_mask

__all__ = ["CONSTANT_BASELINES", "batch_mean_baseline", "constant_baseline", "optimal_constant_baseline"]


def batch_mean_baseline(returns: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""The mean return of the batch, used as a constant baseline.

    Cheap and usually close to the variance-optimal constant. Computed from the same batch it is applied to, it
    correlates with each sample and adds an :math:`O(1/N)` bias,
    :math:`-\tfrac{1}{N}\mathbb{E}[g\,G]` per sample; compute it on a separate batch for an exactly unbiased
    estimate.

    .. math:: b = \frac{1}{|\mathcal{B}|} \sum_{i \in \mathcal{B}} G_i

    :param returns: returns of any shape
    :param mask: bool tensor of ``returns``' shape selecting the valid samples (``None``: all)
    :return: scalar tensor

    >>> batch_mean_baseline(torch.tensor([1.0, 2.0, 6.0]))
    tensor(3.)
    """
    returns = check_float_tensor("returns", returns)
    mask = check_mask("mask", mask, returns.shape)
    if returns.numel() == 0:
        raise ValueError("returns must hold at least one sample, got an empty tensor")
    return returns.mean() if mask is None else returns[mask].mean()


def optimal_constant_baseline(
    returns: torch.Tensor, score_sq_norms: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The variance-optimal constant baseline of Greensmith, Bartlett and Baxter.

    Weights each return by the squared norm of its score :math:`g = \nabla_\theta \log \pi(a|s)`, so that samples
    that move the gradient most count most. It minimizes :math:`\operatorname{tr}\operatorname{Var}[g\,(G - b)]`
    over constants :math:`b`, and every other constant pays exactly

    .. math::

        b^* = \frac{\mathbb{E}[\lVert g \rVert^2 G]}{\mathbb{E}[\lVert g \rVert^2]}, \qquad
        \operatorname{tr}\operatorname{Var}(b) = \operatorname{tr}\operatorname{Var}(b^*)
            + \mathbb{E}[\lVert g \rVert^2]\,(b - b^*)^2 .

    The per-coordinate variant :math:`b^*_k = \mathbb{E}[g_k^2 G] / \mathbb{E}[g_k^2]` minimizes each
    coordinate's variance separately; pass the per-coordinate squares ``g ** 2`` (shape ``returns.shape + (P,)``)
    to get it. Where every weight is 0 (a deterministic policy) all baselines are equally good and 0 is returned.

    :param returns: returns :math:`G` of any shape ``S``
    :param score_sq_norms: :math:`\lVert g \rVert^2` of shape ``S`` (scalar baseline), or :math:`g_k^2` of shape
        ``S + (P,)`` (per-coordinate baseline)
    :param mask: bool tensor of shape ``S`` selecting the valid samples (``None``: all)
    :return: scalar tensor, or ``[P]`` for the per-coordinate variant

    Reference: Greensmith, Bartlett, Baxter (2004), "Variance Reduction Techniques for Gradient Estimates in
    Reinforcement Learning", JMLR 5, Theorem 8 (and Weaver & Tao, 2001).

    >>> G = torch.tensor([1.0, 3.0])
    >>> optimal_constant_baseline(G, torch.tensor([3.0, 1.0]))
    tensor(1.5000)
    >>> optimal_constant_baseline(G, torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    tensor([2., 3.])
    """
    returns = check_float_tensor("returns", returns)
    score_sq_norms = check_float_tensor("score_sq_norms", score_sq_norms)
    per_coordinate = score_sq_norms.dim() == returns.dim() + 1
    if score_sq_norms.shape[: returns.dim()] != returns.shape or not (
        per_coordinate or score_sq_norms.dim() == returns.dim()
    ):
        raise ValueError(
            f"score_sq_norms must have the shape of returns {tuple(returns.shape)} or that shape plus one "
            f"parameter dimension, got {tuple(score_sq_norms.shape)}"
        )
    if bool((score_sq_norms < 0).any()):
        raise ValueError("score_sq_norms must be >= 0 (squared norms), got a negative entry")
    mask = check_mask("mask", mask, returns.shape)
    if mask is not None:
        returns, score_sq_norms = returns[mask], score_sq_norms[mask]
    weighted = score_sq_norms * (returns.unsqueeze(-1) if per_coordinate else returns)
    sum_dims = tuple(range(returns.dim()))
    numerator, denominator = weighted.sum(dim=sum_dims), score_sq_norms.sum(dim=sum_dims)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(returns.dtype).tiny), 0.0)



#: The constant baselines, by the names of pgvar's ``baseline`` constructor option (its non-constant choice is
#: ``"value"``, a learned state value through :func:`pgvar.estimators.gae_advantages`).
CONSTANT_BASELINES = ("none", "mean", "optimal")


def constant_baseline(
    kind: str,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    score_sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The constant baseline ``b`` called ``kind``, to subtract from ``returns`` (:math:`g\,(G - b)`).

    One dispatch for every caller (the rollout buffer, both comparison engines), in the vocabulary of the
    ``baseline`` constructor option:

    .. math::
        b_{\text{none}} = 0, \qquad
        b_{\text{mean}} = \frac{1}{|\mathcal{B}|}\sum_{i \in \mathcal{B}} G_i, \qquad
        b_{\text{optimal}} = \frac{\sum_i \lVert g_i \rVert^2 G_i}{\sum_i \lVert g_i \rVert^2}

    (:func:`batch_mean_baseline` and :func:`optimal_constant_baseline`, Greensmith et al. 2004, whose docstrings
    give the bias and variance of each).

    :param kind: one of :data:`CONSTANT_BASELINES`: ``"none"``, ``"mean"`` or ``"optimal"``
    :param returns: returns :math:`G` of any shape ``S``
    :param mask: bool tensor of shape ``S`` selecting the valid samples (``None``: all; ``"none"`` needs no samples
        and ignores it)
    :param score_sq_norms: needed by ``"optimal"`` (ignored otherwise): :math:`\lVert g \rVert^2` of shape ``S``,
        or :math:`g_k^2` of shape ``S + (P,)`` for the per-coordinate baseline
    :return: scalar tensor (``[P]`` for the per-coordinate optimal baseline), ``returns``' dtype

    >>> G = torch.tensor([1.0, 2.0, 6.0])
    >>> constant_baseline("none", G), constant_baseline("mean", G)
    (tensor(0.), tensor(3.))
    >>> constant_baseline("optimal", G, score_sq_norms=torch.tensor([0.0, 1.0, 1.0]))
    tensor(4.)
    """
    if kind not in CONSTANT_BASELINES:
        raise ValueError(f"kind must be one of {', '.join(map(repr, CONSTANT_BASELINES))}; got {kind!r}")
    if kind == "mean":
        return batch_mean_baseline(returns, mask)
    if kind == "optimal":
        if score_sq_norms is None:
            raise ValueError(
                "score_sq_norms must be given for kind='optimal' (the per-sample squared score norms "
                "||grad log pi(a|s)||^2 that weight the returns), got None"
            )
        return optimal_constant_baseline(returns, score_sq_norms, mask)
    returns = check_float_tensor("returns", returns)
    return torch.zeros((), dtype=returns.dtype, device=returns.device)
