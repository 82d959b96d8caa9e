"""Statistics of gradient estimates: covariance trace, SNR and cosines of per-sample gradients and of repeats.

Two levels, as in formulas.md section 6:

- :class:`GradientStatistics` (:func:`gradient_statistics`, :func:`gradient_statistics_streaming`,
  :func:`gradient_statistics_from_norms`): the ``N`` per-sample gradients ``G_i`` of ONE batch. Their mean
  is the batch estimate; ``tr Cov / N`` is its variance *if the samples were independent*.
- :class:`EstimateStatistics` (:func:`estimate_statistics`): ``K`` repeated batch estimates from independent
  batches, the honest variance of an estimator (samples within a trajectory are correlated), its bias
  against a reference gradient, and the cosines used by Ilyas et al. 2020 (arXiv:1811.02553).

All reductions run in float64; tensors in the results are float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pgvar.measure.per_sample import (
    DEFAULT_STREAMING_MEMORY_BYTES,
    ParamSelector,
    _check_grads_dict,
    _chunk_size,
    _common_batch_size,
    _iter_chunks,
    _plan_vmap,
    flat_names,
    flatten,
    flatten_per_sample,
)
from pgvar.measure.sq_norms import _sq_norms_and_grad_sum

__all__ = [
    "EstimateStatistics",
    "GradientStatistics",
    "estimate_statistics",
    "gradient_statistics",
    "gradient_statistics_from_norms",
    "gradient_statistics_streaming",
    "pairwise_cosine",
]

GradientLike = Tensor | Mapping[str, Tensor]

# Entries per slice when reducing a materialized [N, P] matrix (bounds the temporaries to 1 MB in float32).
_BLOCK_ELEMENTS = 2**18


@dataclass(frozen=True, eq=False)
class GradientStatistics:
    """Mean, covariance trace and signal-to-noise ratio of ``N`` per-sample gradients ``G_i`` (``[P]`` each).

    .. math::
        m = \\frac1N \\sum_i G_i, \\qquad
        \\operatorname{tr}\\widehat{\\Sigma} = \\frac{1}{N-1}\\sum_i \\|G_i - m\\|^2
            = \\frac{N}{N-1}\\Big(\\frac1N\\sum_i \\|G_i\\|^2 - \\|m\\|^2\\Big),

        \\mathrm{SNR} = \\frac{\\|m\\|^2}{\\operatorname{tr}\\widehat{\\Sigma}/N}, \\qquad
        \\mathrm{SNR}_{\\text{debiased}} = \\frac{\\|m\\|^2 - \\operatorname{tr}\\widehat{\\Sigma}/N}
            {\\operatorname{tr}\\widehat{\\Sigma}/N} = \\mathrm{SNR} - 1.

    The ``N/(N-1)`` factor makes ``covariance_trace`` unbiased (it equals ``torch.cov(G.T).trace()``). For
    i.i.d. samples ``E||m||^2 = ||g||^2 + tr(Sigma)/N``, so the plug-in SNR has expectation about the true
    SNR ``||g||^2 / (tr(Sigma)/N)`` **plus one**: an SNR near 1 is pure noise. ``snr_debiased`` removes that
    (its numerator is unbiased for ``||g||^2``; it can be negative). Samples from one trajectory are
    correlated, so ``variance_of_mean`` understates the variance of the batch mean: measure that across
    independent batches with :func:`estimate_statistics`.

    :param n: number of samples ``N``
    :param mean: ``[P]`` float64, the mean gradient ``m`` (flattened in sorted name order for dict input)
    :param covariance_trace: ``tr Cov`` (unbiased)
    :param variance_of_mean: ``tr Cov / N``, the variance (trace) of ``m`` for independent samples
    :param snr: ``||m||^2 / (tr Cov / N)`` (``inf`` if the trace is 0 and ``m != 0``; ``nan`` if both are 0)
    :param snr_debiased: ``(||m||^2 - tr Cov / N) / (tr Cov / N)``
    :param mean_norm: ``||m||``
    :param cosine_to_reference: ``cos(m, reference)`` when a reference was given, else ``None``
    """

    n: int
    mean: Tensor
    covariance_trace: float
    variance_of_mean: float
    snr: float
    snr_debiased: float
    mean_norm: float
    cosine_to_reference: float | None = None

    def cosine_to(self, reference: GradientLike) -> float:
        """Return the cosine between the mean gradient and ``reference`` (``[P]`` or a name -> tensor dict).

        ``nan`` if either vector is zero.

        >>> stats = gradient_statistics(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> round(stats.cosine_to(torch.tensor([1.0, 1.0])), 6)  # mean is [1, 1]
        1.0
        """
        return _cosine(self.mean, _as_vector("reference", reference, self.mean.shape[0]))


def gradient_statistics(
    per_sample_grads: GradientLike, *, reference: GradientLike | None = None
) -> GradientStatistics:
    """Return :class:`GradientStatistics` (mean, unbiased covariance trace, SNR) of materialized per-sample grads.

    .. math::  \\operatorname{tr}\\widehat{\\Sigma} = \\frac{1}{N-1}\\sum_i \\|G_i - m\\|^2,
               \\qquad \\mathrm{SNR} = \\frac{\\|m\\|^2}{\\operatorname{tr}\\widehat{\\Sigma}/N}

    The trace is computed from centred rows (no cancellation between ``mean ||G_i||^2`` and ``||m||^2``), in
    blocks of rows so that the temporary stays small, with float64 accumulation.

    :param per_sample_grads: ``[N, P]`` or name -> ``[N, *shape]`` (e.g. from
        :func:`pgvar.measure.per_sample_gradients`; flattened in sorted name order), ``N >= 2``
    :param reference: optional ``[P]`` (or dict) reference gradient for ``cosine_to_reference``
    :return: :class:`GradientStatistics`

    >>> g = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]])
    >>> stats = gradient_statistics(g)
    >>> stats.covariance_trace, stats.variance_of_mean, round(stats.snr, 4), round(stats.snr_debiased, 4)
    (2.0, 0.6666666666666666, 7.5, 6.5)
    """
    if isinstance(per_sample_grads, Mapping):
        _check_grads_dict("per_sample_grads", per_sample_grads)
        n = _common_batch_size("per_sample_grads", per_sample_grads)
        blocks = [per_sample_grads[name].reshape(n, -1) for name in flat_names(per_sample_grads)]
    elif isinstance(per_sample_grads, Tensor):
        if per_sample_grads.dim() != 2:
            raise ValueError(
                "per_sample_grads must have shape [N, P] (or be a dict name -> [N, *shape]), "
                f"got shape {tuple(per_sample_grads.shape)}"
            )
        blocks = [per_sample_grads]
        n = per_sample_grads.shape[0]
    else:
        raise ValueError(
            f"per_sample_grads must be a [N, P] tensor or a dict name -> [N, *shape], got {type(per_sample_grads).__name__}"
        )
    _check_two_samples("per_sample_grads", n)
    mean, m2 = _centred_moments(blocks, n)
    return _statistics(n, mean, m2, reference)


def gradient_statistics_streaming(
    fn_or_module: Callable[..., Tensor] | nn.Module,
    params_or_loss_fn: Mapping[str, Tensor] | Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    *,
    params: ParamSelector = None,
    chunk_size: int | None = None,
    max_memory_bytes: int | None = None,
    reference: GradientLike | None = None,
) -> GradientStatistics:
    """Return :class:`GradientStatistics` of the per-sample gradients, computed chunk by chunk, never all ``N`` rows.

    Same arguments and call styles as :func:`pgvar.measure.per_sample_gradients` (functional:
    ``fn, params, inputs``; module: ``module, loss_fn, inputs, params=...``). Each chunk's ``vmap(grad)``
    rows are reduced to float64 accumulators (count, sum, sum of squared deviations) and discarded; chunks
    are merged with the pairwise update of Chan, Golub & LeVeque (1979):

    .. math::  M_2 = M_2^{(a)} + M_2^{(b)} + \\|m^{(b)} - m^{(a)}\\|^2 \\frac{n_a n_b}{n_a + n_b},
               \\qquad \\operatorname{tr}\\widehat{\\Sigma} = \\frac{M_2}{N - 1}.

    Memory: about ``chunk * P * itemsize * 3`` bytes plus ``3 P`` float64 accumulators. Default chunk:
    ``DEFAULT_STREAMING_MEMORY_BYTES`` (128 MiB) of working memory, i.e. about 2,000 samples for an SB3 MLP
    actor with ``P ~ 5,700`` float32 parameters.

    :param fn_or_module: ``fn(params, *sample) -> scalar`` or an ``nn.Module``
    :param params_or_loss_fn: the parameter dict, or ``loss_fn(module, *batch) -> scalar`` (batch of one sample)
    :param inputs: a tensor or a sequence of tensors sharing the leading batch dimension ``N >= 2``
    :param params: module style only: which parameters (``None``, names, or ``name -> bool``)
    :param chunk_size: samples per chunk (overrides ``max_memory_bytes``)
    :param max_memory_bytes: bound on the estimated working memory per chunk
    :param reference: optional ``[P]`` (or dict) reference gradient for ``cosine_to_reference``
    :return: :class:`GradientStatistics` (``mean`` flattened in sorted name order)

    >>> x = torch.tensor([[1.0], [2.0], [4.0]])
    >>> fn = lambda p, xi: (p["w"] * xi).sum()  # G_i = x_i
    >>> stats = gradient_statistics_streaming(fn, {"w": torch.zeros(1)}, x, chunk_size=2)
    >>> stats.mean, round(stats.covariance_trace, 12)  # torch.var(x) = 7/3
    (tensor([2.3333], dtype=torch.float64), 2.333333333333)
    """
    plan = _plan_vmap(fn_or_module, params_or_loss_fn, inputs, params=params)
    _check_two_samples("inputs", plan.n)
    step = _chunk_size(plan, chunk_size, max_memory_bytes, default_bytes=DEFAULT_STREAMING_MEMORY_BYTES)
    size = sum(int(torch.Size(shape).numel()) for shape, _, _ in plan.specs.values())
    device = next(iter(plan.specs.values()))[2]
    count = 0
    mean = torch.zeros(size, dtype=torch.float64, device=device)
    m2 = torch.zeros((), dtype=torch.float64, device=device)
    for _, chunk in _iter_chunks(plan, step):
        rows = next(iter(chunk.values())).shape[0]
        chunk_mean, chunk_m2 = _centred_moments(
            [chunk[name].reshape(rows, -1) for name in flat_names(chunk)], rows
        )
        total = count + rows
        delta = chunk_mean - mean
        m2 = m2 + chunk_m2 + delta.square().sum() * (count * rows / total)
        mean = mean + delta * (rows / total)
        count = total
    return _statistics(count, mean, m2, reference)


def gradient_statistics_from_norms(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    *,
    params: ParamSelector = None,
    chunk_size: int | None = None,
    max_memory_bytes: int | None = None,
    reference: GradientLike | None = None,
) -> GradientStatistics:
    """Return :class:`GradientStatistics` from per-sample squared norms and one batched backward (no ``G``).

    .. math::  m = \\frac1N \\nabla_\\theta \\sum_i \\ell_i, \\qquad
               \\operatorname{tr}\\widehat{\\Sigma} = \\frac{1}{N-1}\\Big(\\sum_i \\|G_i\\|^2 - N \\|m\\|^2\\Big)

    ``||G_i||^2`` comes from :func:`pgvar.measure.per_sample_grad_sq_norms` (closed form for ``nn.Linear``
    layers, vmap for the few other parameters such as SB3's ``log_std``) and ``m`` from the same batched
    backward, so the cost is about 1.5-2x one batched backward and the memory ``O(N * width)``, not
    ``O(N * P)``. ``loss_fn(module, *batch)`` is called on a batch of one sample, exactly as in
    :func:`gradient_statistics_streaming`, so the two routes agree (to rounding). The difference of two
    accumulated sums loses relative precision ``~ eps * (1 + SNR)`` in the trace; harmless for policy
    gradients (SNR rarely exceeds 1e3), but use :func:`gradient_statistics_streaming` if the SNR is huge.

    :param module: the network, e.g. an SB3 ``ActorCriticPolicy``
    :param loss_fn: ``loss_fn(module, *batch) -> scalar``, called on a batch of one sample
    :param inputs: a tensor or a sequence of tensors sharing the leading batch dimension ``N >= 2``
    :param params: which parameters (``None``: all with ``requires_grad``; names; or ``name -> bool``)
    :param chunk_size: samples per vmap call (overrides ``max_memory_bytes``)
    :param max_memory_bytes: bound on the estimated working memory per chunk
    :param reference: optional ``[P]`` (or dict) reference gradient for ``cosine_to_reference``
    :return: :class:`GradientStatistics` (``mean`` flattened in sorted name order)

    >>> net = torch.nn.Linear(2, 1).double()
    >>> x = torch.randn(50, 2, dtype=torch.float64)
    >>> loss_fn = lambda m, xb: (m(xb) ** 2).sum()
    >>> fast = gradient_statistics_from_norms(net, loss_fn, x)
    >>> full = gradient_statistics_streaming(net, loss_fn, x)
    >>> math.isclose(fast.covariance_trace, full.covariance_trace, rel_tol=1e-9)
    True
    """
    sq_norms, grad_sum, _ = _sq_norms_and_grad_sum(
        module, loss_fn, inputs, params=params, chunk_size=chunk_size, max_memory_bytes=max_memory_bytes
    )
    n = sq_norms.shape[0]
    _check_two_samples("inputs", n)
    mean = flatten(grad_sum).double() / n
    m2 = sq_norms.sum() - n * mean.square().sum()
    return _statistics(n, mean, m2.clamp_min(0.0), reference)


# ---------------------------------------------------------------------------------------------- repeats
@dataclass(frozen=True, eq=False)
class EstimateStatistics:
    """Statistics of ``K`` repeated, independent batch estimates :math:`E_1, \\dots, E_K` (``[P]`` each) of one gradient.

    .. math::
        \\bar E = \\frac1K \\sum_j E_j, \\qquad
        \\operatorname{tr}\\widehat{\\mathrm{Var}} = \\frac{1}{K-1} \\sum_j \\|E_j - \\bar E\\|^2, \\qquad
        \\overline{\\cos} = \\frac{1}{K(K-1)} \\sum_{j \\ne l} \\cos(E_j, E_l)

    and, given a reference gradient ``r`` (e.g. exact, or from many more samples):
    ``bias = E_bar - r`` with per-coordinate standard errors ``se_k = std_k(E) / sqrt(K)`` (unbiased std),
    ``max_abs_z = max_k |bias_k| / se_k`` and the cosine of each repeat to ``r`` (mean and standard error).
    Under an unbiased estimator each ``bias_k / se_k`` is roughly Student-t with ``K-1`` degrees of freedom,
    so ``max_abs_z`` over ``P`` coordinates grows like ``sqrt(2 log P)``: compare it with a Bonferroni
    threshold, not with 2. ``bias_norm ** 2`` has expectation ``||true bias||^2 + variance_trace / K``.

    :param k: number of repeats ``K``
    :param mean: ``[P]`` float64, ``E_bar``
    :param mean_norm: ``||E_bar||``
    :param variance_trace: the unbiased across-repeat variance trace (the variance of ONE batch estimate)
    :param pairwise_cosine: mean cosine between distinct repeats (Ilyas et al. 2020, arXiv:1811.02553)
    :param cosine_to_reference: mean over repeats of ``cos(E_j, r)``, or ``None`` without reference
    :param cosine_to_reference_se: its standard error ``std_j cos(E_j, r) / sqrt(K)``, or ``None``
    :param bias: ``[P]`` ``E_bar - r``, or ``None``
    :param bias_se: ``[P]`` per-coordinate standard error of ``E_bar``, or ``None``
    :param max_abs_z: ``max_k |bias_k| / se_k`` (a coordinate with ``se_k = 0`` counts 0 if its bias is 0,
        else ``inf``), or ``None``
    :param bias_norm: ``||bias||``, or ``None``
    """

    k: int
    mean: Tensor
    mean_norm: float
    variance_trace: float
    pairwise_cosine: float
    cosine_to_reference: float | None = None
    cosine_to_reference_se: float | None = None
    bias: Tensor | None = None
    bias_se: Tensor | None = None
    max_abs_z: float | None = None
    bias_norm: float | None = None


def estimate_statistics(
    estimates: GradientLike, *, reference: GradientLike | None = None
) -> EstimateStatistics:
    """Return :class:`EstimateStatistics` of ``K`` repeated batch estimates: variance, cosines, bias vs a reference.

    .. math::  \\operatorname{tr}\\widehat{\\mathrm{Var}} = \\frac{1}{K-1}\\sum_j \\|E_j - \\bar E\\|^2,
               \\qquad z_k = \\frac{\\bar E_k - r_k}{\\mathrm{std}_k(E) / \\sqrt K}

    This is what ``pgvar compare`` reports per estimator. Vectorized: the pairwise cosine uses the Gram
    matrix of the normalized rows (see :func:`pairwise_cosine`).

    :param estimates: ``[K, P]`` or name -> ``[K, *shape]`` (sorted name order), ``K >= 2``
    :param reference: optional ``[P]`` (or dict) reference gradient
    :return: :class:`EstimateStatistics` (float64)

    >>> est = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> s = estimate_statistics(est, reference=torch.tensor([1.0, 1.0]))
    >>> round(s.variance_trace, 6), round(s.pairwise_cosine, 4), s.max_abs_z  # bias [-1/3, -1/3]
    (0.666667, 0.4714, 1.0)
    """
    matrix = _as_matrix("estimates", estimates).double()
    k = matrix.shape[0]
    if k < 2:
        raise ValueError(
            f"estimates must hold at least K = 2 repeats (rows) to estimate a variance, got K = {k}"
        )
    mean = matrix.mean(dim=0)
    var = matrix.var(dim=0)  # unbiased, per coordinate
    fields: dict[str, object] = {
        "k": k,
        "mean": mean,
        "mean_norm": float(mean.norm()),
        "variance_trace": float(var.sum()),
        "pairwise_cosine": float(pairwise_cosine(matrix)),
    }
    if reference is not None:
        ref = _as_vector("reference", reference, matrix.shape[1])
        cosines = (matrix @ ref) / (matrix.norm(dim=1) * ref.norm())
        bias = mean - ref
        bias_se = (var / k).sqrt()
        z = torch.where(bias == 0, torch.zeros_like(bias), bias.abs() / bias_se)
        fields |= {
            "cosine_to_reference": float(cosines.mean()),
            "cosine_to_reference_se": float(cosines.std() / math.sqrt(k)),
            "bias": bias,
            "bias_se": bias_se,
            "max_abs_z": float(z.max()),
            "bias_norm": float(bias.norm()),
        }
    return EstimateStatistics(**fields)  # type: ignore[arg-type]


def pairwise_cosine(estimates: GradientLike) -> Tensor:
    """Return the mean cosine similarity between distinct rows of ``estimates`` (0-dim float64 tensor).

    .. math::  \\overline{\\cos} = \\frac{1}{K(K-1)} \\sum_{j \\ne l} \\frac{E_j \\cdot E_l}{\\|E_j\\|\\|E_l\\|}
               = \\frac{\\mathbf 1^T U U^T \\mathbf 1 - \\operatorname{tr}(U U^T)}{K(K-1)},
               \\quad U_j = E_j / \\|E_j\\|

    Ilyas et al. 2020 (arXiv:1811.02553, Fig. 2) use it on 10 repeats to show how noisy batch gradients are.
    ``nan`` if a row is zero.

    :param estimates: ``[K, P]`` or name -> ``[K, *shape]``, ``K >= 2``
    :return: 0-dim float64 tensor

    >>> pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    tensor(0.4714, dtype=torch.float64)
    """
    matrix = _as_matrix("estimates", estimates).double()
    k = matrix.shape[0]
    if k < 2:
        raise ValueError(f"estimates must hold at least K = 2 rows to form a pair, got K = {k}")
    unit = matrix / matrix.norm(dim=1, keepdim=True)
    gram = unit @ unit.T
    return (gram.sum() - gram.diagonal().sum()) / (k * (k - 1))


# ---------------------------------------------------------------------------------------------- helpers
def _centred_moments(blocks: Sequence[Tensor], n: int) -> tuple[Tensor, Tensor]:
    """``(mean [P] float64, sum_i ||G_i - mean||^2 float64)`` of rows split column-wise into ``[N, p_j]`` blocks.

    Works on slices of at most ``_BLOCK_ELEMENTS`` entries in the input dtype (no float64 copy of the rows),
    accumulating across slices in float64.
    """
    means = []
    for block in blocks:
        total = torch.zeros(block.shape[1], dtype=torch.float64, device=block.device)
        for rows in block.split(_rows_per_slice(block)):
            total += rows.sum(dim=0).double()
        means.append(total / n)
    m2 = torch.zeros((), dtype=torch.float64, device=blocks[0].device)
    for block, mean in zip(blocks, means):
        centre = mean.to(block.dtype)
        for rows in block.split(_rows_per_slice(block)):
            centred = rows - centre
            m2 += torch.linalg.vecdot(centred, centred).double().sum()
    return torch.cat(means), m2


def _rows_per_slice(block: Tensor) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, block.shape[1]))


def _statistics(n: int, mean: Tensor, m2: Tensor, reference: GradientLike | None) -> GradientStatistics:
    trace = float(m2) / (n - 1)
    variance_of_mean = trace / n
    mean_sq = float(mean.square().sum())
    if variance_of_mean > 0:
        snr = mean_sq / variance_of_mean
        snr_debiased = (mean_sq - variance_of_mean) / variance_of_mean
    else:
        snr = snr_debiased = math.inf if mean_sq > 0 else math.nan
    cosine = None if reference is None else _cosine(mean, _as_vector("reference", reference, mean.shape[0]))
    return GradientStatistics(
        n=n,
        mean=mean,
        covariance_trace=trace,
        variance_of_mean=variance_of_mean,
        snr=snr,
        snr_debiased=snr_debiased,
        mean_norm=math.sqrt(mean_sq),
        cosine_to_reference=cosine,
    )


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / (a.norm() * b.norm()))


def _check_two_samples(name: str, n: int) -> None:
    if n < 2:
        raise ValueError(
            f"{name} must hold at least N = 2 samples to estimate a covariance (unbiased, N - 1 in the "
            f"denominator), got N = {n}"
        )


def _as_matrix(name: str, value: GradientLike) -> Tensor:
    if isinstance(value, Mapping):
        return flatten_per_sample(value)
    if not isinstance(value, Tensor) or value.dim() != 2:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a [K, P] tensor or a dict name -> [K, *shape], got {shape}")
    return value


def _as_vector(name: str, value: GradientLike, size: int) -> Tensor:
    vector = flatten(value) if isinstance(value, Mapping) else value
    if not isinstance(vector, Tensor) or vector.dim() != 1 or vector.shape[0] != size:
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(
            f"{name} must be a [P] tensor with P = {size} (or a dict of the same names), got {shape}"
        )
    return vector.detach().double()
