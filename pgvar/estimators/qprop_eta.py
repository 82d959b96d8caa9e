r"""The weight :math:`\eta` of the Q-Prop control variate (Gu et al. 2017), with the scope of its estimate.

Q-Prop subtracts :math:`\eta \bar A` from the advantage and adds back :math:`\eta` times the analytic
expectation (:mod:`pgvar.estimators.control_variates`). The estimate is unbiased for any :math:`\eta` that is
independent of the samples it weights: :func:`qprop_eta` chooses :math:`\eta` by the paper's rules, and its
``scope`` decides which samples the covariance it needs comes from (cross-fitted by default).
"""

from __future__ import annotations

import torch

from pgvar._validation import check_choice, check_float_tensor, check_mask, check_same_shape, is_concrete
from pgvar.estimators.control_variates import _masked_mean

__all__ = ["QPROP_ETA_RULES", "QPROP_ETA_SCOPES", "qprop_eta"]

#: Rules for the Q-Prop weight :math:`\eta` (:func:`qprop_eta`).
QPROP_ETA_RULES = ("fixed", "conservative", "aggressive", "adaptive")
#: Where :func:`qprop_eta` estimates :math:`\operatorname{Cov}(\hat A, \bar A)`: from the other folds of the batch
#: (unbiased, the default), from the whole batch (biased by :math:`O(1/\sqrt N)`) or from each sample (as published).
QPROP_ETA_SCOPES = ("crossfit", "batch", "sample")


def qprop_eta(
    adv_hat: torch.Tensor,
    adv_bar: torch.Tensor,
    rule: str = "fixed",
    scope: str = "crossfit",
    action_variance: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    folds: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The weight :math:`\eta` of the Q-Prop control variate, by one of the paper's rules.

    The variance of the learning signal :math:`\hat A - \eta \bar A` is, per state (Gu et al., Eq. 11),
    :math:`\operatorname{Var}_a(\hat A) - 2\eta \operatorname{Cov}_a(\hat A, \bar A) + \eta^2
    \operatorname{Var}_a(\bar A)`, so :math:`\eta` should follow the sign of the covariance:

    .. math::

        \text{fixed: } \eta = 1, \quad
        \text{conservative: } \eta = \mathbf{1}[\widehat{\mathrm{Cov}} > 0], \quad
        \text{aggressive: } \eta = \operatorname{sign}(\widehat{\mathrm{Cov}}), \quad
        \text{adaptive: } \eta = \widehat{\mathrm{Cov}} / \widehat{\mathrm{Var}}(\bar A).

    The Q-Prop estimate is unbiased for any :math:`\eta` that is independent of the samples it weights.
    ``scope`` says where :math:`\widehat{\mathrm{Cov}}` comes from:

    - ``"crossfit"`` (the default; unbiased): the batch is split into folds (``folds``), and the :math:`\eta`
      of a sample in fold :math:`k` uses only the other folds,
      :math:`\widehat{\mathrm{Cov}}_{-k} = \sum_{i \notin k} \hat A_i \bar A_i / |\{i \notin k\}|` (and, for the
      adaptive rule, :math:`\eta_{-k} = \sum_{i \notin k} \hat A_i \bar A_i / \sum_{i \notin k}
      \operatorname{Var}_a(\bar A \mid s_i)`). When the folds are independent (different environments, or
      different episodes), :math:`\eta_{-k}` is independent of fold :math:`k`'s samples and the estimate is
      exactly unbiased. Cross-fitting as in double machine learning (Chernozhukov et al. 2018).
    - ``"batch"``: one covariance for the whole batch, :math:`\widehat{\mathrm{Cov}} = \frac1N \sum_i \hat A_i
      \bar A_i` (:math:`\bar A` has conditional mean 0, so this estimates :math:`\mathbb{E}_s[\operatorname{Cov}_a
      (\hat A, \bar A)]`, Eq. 12). Each sample enters the :math:`\eta` it is weighted with. For the adaptive rule
      (a smooth function of the covariance) the bias is :math:`O(1/N)`; for the conservative and aggressive rules
      it is :math:`O(1/\sqrt N)` where the covariance is near 0, because the indicator or sign then follows the
      noise of the batch's own estimate: about 15% (conservative) and 35% (aggressive) of one batch's standard
      deviation, at every batch size (``tests/estimators/test_control_variates.py::test_batch_scope_eta_is_biased``).
    - ``"sample"`` (as published; the official code's ``adapt1``/``adapt2``): the single-sample product
      :math:`\widehat{\mathrm{Cov}}_t = \hat A_t \bar A_t`. Then :math:`\eta_t` depends on the sampled action and
      the estimator is **biased**: its expectation moves by
      :math:`\mathbb{E}[\eta \nabla_a Q_w \nabla_\theta \mu] - \mathbb{E}[g\, \eta \bar A]
      = -\mathbb{E}_s[\operatorname{Cov}_a(\eta, g \bar A)]`, which is not 0 in general (measured in
      ``docs/guide/qprop.md``). The adaptive rule divides by the exact ``action_variance`` of each sample.

    ``"fixed"`` ignores ``scope``. An adaptive :math:`\eta` is 0 where the variance is 0 (no control variate).

    Gradient flow: detached (:math:`\eta` is held constant in both Q-Prop terms).

    :param adv_hat: :math:`\hat A` (Monte Carlo or GAE advantages), any shape, e.g. ``[T, N]``
    :param adv_bar: :math:`\bar A` from :func:`qprop_control_variate`, the shape of ``adv_hat``
    :param rule: ``"fixed"``, ``"conservative"``, ``"aggressive"`` or ``"adaptive"``
    :param scope: ``"crossfit"`` (the default: unbiased), ``"batch"`` (the batch's own estimate: biased by
        :math:`O(1/\sqrt N)` for the conservative and aggressive rules) or ``"sample"`` (the per-sample product of
        the official code: biased)
    :param action_variance: :math:`\operatorname{Var}_a(\bar A \mid s)` from :func:`qprop_action_variance`, the
        shape of ``adv_hat``; required by ``rule="adaptive"``, ignored otherwise
    :param mask: bool tensor of ``adv_hat``'s shape selecting the real samples for the batch statistics
        (padding is excluded); ``None``: all
    :param folds: ``scope="crossfit"`` only: an integer tensor of ``adv_hat``'s shape with each sample's fold
        index in ``[0, K)``, ``K >= 2``. ``None``: two folds, the first and second half of the environments
        (last dimension) when there are at least two, otherwise the first and second half of the first
        dimension (time). Folds must be independent for an exactly unbiased estimate: environment halves are;
        time halves of one environment are, except for the one episode that may cross the cut.
    :return: :math:`\eta`, the shape and dtype of ``adv_hat`` (constant over the batch for ``scope="batch"``,
        constant over each fold for ``scope="crossfit"``)

    Reference: Gu et al. (2017), arXiv:1611.02247, Sec. 3.2, Eq. 9-12 (adaptive, conservative and aggressive
    Q-Prop); official code ``rllab/sampler/base.py::process_samples`` (``qprop_eta_option``: ``ones``,
    ``adapt1``, ``adapt2``). Cross-fitting: Chernozhukov et al. (2018), arXiv:1608.00060, Sec. 3.

    >>> adv_hat, adv_bar = torch.tensor([1.0, -2.0, 0.5, 2.0]), torch.tensor([0.5, 1.0, 1.0, 1.0])
    >>> qprop_eta(adv_hat, adv_bar, "conservative", "sample")  # products 0.5, -2, 0.5, 2
    tensor([1., 0., 1., 1.])
    >>> qprop_eta(adv_hat, adv_bar, "conservative", "batch")  # mean product 0.25
    tensor([1., 1., 1., 1.])
    >>> qprop_eta(adv_hat, adv_bar, "conservative", "crossfit")  # folds [0, 0, 1, 1]: means 1.25 and -0.75
    tensor([1., 1., 0., 0.])
    >>> # sum of products 1 over sum of variances 2
    >>> qprop_eta(adv_hat, adv_bar, "adaptive", "batch", action_variance=torch.tensor([0.5, 0.5, 0.5, 0.5]))
    tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    check_choice("rule", rule, QPROP_ETA_RULES)
    check_choice("scope", scope, QPROP_ETA_SCOPES)
    adv_hat = check_float_tensor("adv_hat", adv_hat)
    adv_bar = check_float_tensor("adv_bar", adv_bar)
    check_same_shape("adv_bar", adv_bar, "adv_hat", adv_hat)
    mask = check_mask("mask", mask, adv_hat.shape)
    if action_variance is not None:
        action_variance = check_float_tensor("action_variance", action_variance)
        check_same_shape("action_variance", action_variance, "adv_hat", adv_hat)
        if is_concrete(action_variance) and bool((action_variance < 0).any()):
            raise ValueError(
                f"action_variance must be >= 0 (a variance), got a minimum of {float(action_variance.min())}"
            )
    if rule == "adaptive" and action_variance is None:
        raise ValueError(
            "action_variance is required by rule='adaptive' (eta = Cov / Var_a(A_bar)); compute it with "
            "qprop_action_variance(grad_q_at_mean, std), got None"
        )
    if folds is not None and scope != "crossfit":
        raise ValueError(f"folds is used by scope='crossfit' only, got scope={scope!r} with folds")
    adv_hat, adv_bar = adv_hat.detach(), adv_bar.detach()
    if rule == "fixed":
        return torch.ones_like(adv_hat)
    products = adv_hat * adv_bar
    if scope == "crossfit":
        membership, weights = _fold_membership(folds, adv_hat, mask)
        covariance = _leave_fold_out_mean(products, membership, weights)
    elif scope == "batch":
        covariance = _masked_mean(products, mask).expand(adv_hat.shape)
    else:
        covariance = products
    if rule == "conservative":
        return (covariance > 0).to(adv_hat.dtype)
    if rule == "aggressive":
        return torch.sign(covariance)
    assert action_variance is not None
    variance = action_variance.detach()
    if scope == "crossfit":
        variance = _leave_fold_out_mean(variance, membership, weights)
    elif scope == "batch":
        variance = _masked_mean(variance, mask).expand(adv_hat.shape)
    safe = torch.where(variance > 0, variance, torch.ones_like(variance))
    return torch.where(variance > 0, covariance / safe, torch.zeros_like(covariance))


def _default_crossfit_folds(shape: torch.Size | tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Two folds for :func:`qprop_eta`'s ``scope="crossfit"``: halves of the environments, else halves of time.

    With ``shape = [T, N]`` and ``N >= 2`` the fold of a sample is ``n * 2 // N`` (environments ``0 .. N/2 - 1``
    against the rest: independent streams); otherwise ``t * 2 // T`` along the first dimension.

    >>> _default_crossfit_folds((2, 4))
    tensor([[0, 0, 1, 1],
            [0, 0, 1, 1]])
    >>> _default_crossfit_folds((5,))
    tensor([0, 0, 0, 1, 1])
    """
    shape = tuple(shape)
    dim = len(shape) - 1 if len(shape) >= 2 and shape[-1] >= 2 else 0
    size = shape[dim] if shape else 0
    if size < 2:
        raise ValueError(
            f"scope='crossfit' needs at least 2 samples along the environment or time dimension to form two folds, "
            f"got a batch of shape {shape}"
        )
    index = torch.arange(size, device=device) * 2 // size
    view = [1] * len(shape)
    view[dim] = size
    return index.reshape(view).expand(shape)


def _fold_membership(
    folds: torch.Tensor | None, like: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, *like.shape]`` fold membership of every sample, and the same restricted to real samples (float)."""
    if folds is None:
        folds = _default_crossfit_folds(like.shape, like.device)
    else:
        if not isinstance(folds, torch.Tensor) or folds.dtype.is_floating_point or folds.dtype == torch.bool:
            raise TypeError(
                f"folds must be an integer tensor of fold indices, got "
                f"{folds.dtype if isinstance(folds, torch.Tensor) else type(folds).__name__}"
            )
        check_same_shape("folds", folds, "adv_hat", like)
    n_folds = int(folds.max()) + 1 if is_concrete(folds) else 2
    if is_concrete(folds) and (int(folds.min()) < 0 or n_folds < 2):
        raise ValueError(
            f"folds must hold indices in [0, K) with K >= 2 folds, got values in [{int(folds.min())}, {n_folds - 1}]"
        )
    membership = folds.unsqueeze(0) == torch.arange(n_folds, device=like.device).reshape(-1, *([1] * like.dim()))
    weights = (membership if mask is None else membership & mask.unsqueeze(0)).to(like.dtype)
    if is_concrete(weights):
        counts = weights.flatten(1).sum(1)
        if bool((counts.sum() - counts == 0).any()):
            raise ValueError(
                "scope='crossfit' needs real samples in at least two folds (each fold's eta comes from the "
                f"others), got fold sizes {counts.tolist()}"
            )
    return membership.to(like.dtype), weights


def _leave_fold_out_mean(values: torch.Tensor, membership: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """For each sample, the mean of ``values`` over the real samples (``weights``) of the *other* folds."""
    fold_sums = (weights * values.unsqueeze(0)).flatten(1).sum(1)
    fold_counts = weights.flatten(1).sum(1)
    per_fold = (fold_sums.sum() - fold_sums) / (fold_counts.sum() - fold_counts)
    return torch.einsum("k,k...->...", per_fold, membership)
