"""Per-sample squared gradient norms ``||G_i||^2`` by the closed form of ``nn.Linear``'s per-sample gradient.

One vmapped forward and backward that stops at each ``nn.Linear`` output and uses the closed form of the layer's
per-sample gradient (Goodfellow 2015, arXiv:1510.01799): enough for the covariance trace and the SNR
(:func:`pgvar.measure.gradient_statistics_from_norms`) at 1.5-2x the cost of one batched backward, without
materializing the per-sample gradients (:mod:`pgvar.measure.per_sample`). Other parameters go through
``torch.func``.

This module imports torch only (no SB3): a policy is just an ``nn.Module`` and a ``loss_fn``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from pgvar._validation import check_positive
from pgvar.measure.per_sample import (
    _MEMORY_FACTOR,
    _PREFIX,
    DEFAULT_STREAMING_MEMORY_BYTES,
    ParamSelector,
    _check_inputs,
    _check_scalar,
    _describe,
    _LossModule,
    _split_parameters,
)

__all__ = ["per_sample_grad_sq_norms"]


# ------------------------------------------------------------------------------------ squared-norm trick
def per_sample_grad_sq_norms(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    *,
    params: ParamSelector = None,
    chunk_size: int | None = None,
    max_memory_bytes: int | None = None,
) -> Tensor:
    """Return the per-sample squared gradient norms ``||G_i||^2`` ``[N]`` without materializing ``G``.

    For an ``nn.Linear`` layer ``y = h W^T + b``, sample ``i``'s gradient is ``delta_i h_i^T`` with
    ``delta_i = d l_i / d y_i`` (Goodfellow 2015, arXiv:1510.01799), so

    .. math::  \\|\\nabla_W \\ell_i\\|^2 = \\|\\delta_i\\|^2 \\|h_i\\|^2, \\qquad
               \\|\\nabla_b \\ell_i\\|^2 = \\|\\delta_i\\|^2.

    A layer that sees several rows ``t`` per sample (input ``[1, T, in]``, or called ``T`` times) has
    ``G_i = sum_t delta_it h_it^T`` and uses the Gram form
    ``||G_i||^2 = sum_{t,s} (delta_it . delta_is)(h_it . h_is)`` (Li et al. 2022, arXiv:2110.05679,
    "ghost clipping").

    How: ONE vmapped forward and backward over the batch, with the same per-sample ``loss_fn`` as
    :func:`per_sample_gradients` (called on a batch of one sample). Forward hooks record each Linear's input
    ``h`` and add a zero input ``eps`` to its output; the gradient with respect to ``eps`` is ``delta``.
    The expensive per-sample outer products ``delta_i h_i^T`` are never formed. Parameters that are not the
    ``weight``/``bias`` of a Linear (e.g. SB3's state-independent ``log_std``, broadcast over the batch), of a
    Linear that never runs its own ``forward`` (e.g. ``nn.MultiheadAttention.out_proj``) or tied to another
    module get exact per-sample gradients from the same vmapped backward. Measured on SB3's MLP policy
    (HalfCheetah, P = 5,708, ``benchmarks/test_per_sample_gradients.py``, CPU, one thread) the statistics cost
    1.4-1.7x one batched backward of the same loss at N = 2048-32768 (up to 2.2x on a loaded machine), against
    3.5-8.6x for the full :func:`per_sample_gradients`.

    The first call for a given module, ``loss_fn`` (its code), parameter selection and input signature also
    runs ordinary autograd on the first sample: it learns which Linear layers run and their output shapes, and
    checks the closed form against autograd. Later calls reuse what it learned; if the module then runs its
    layers differently, the hooks raise ``ValueError`` instead of returning wrong norms.

    Batched route: when every selected parameter belongs to a Linear whose per-sample calls see one batch row
    (an MLP; SB3's policy on a discrete action space) and ``loss_fn`` on a batch is the sum of its per-sample
    losses, ``d L / d y`` of an ORDINARY batched forward and backward is already the per-sample ``delta``: later
    calls skip vmap (no ``eps``, no ``functional_call``), which removes its fixed cost at small ``N``. The first
    call checks this on 4 samples against the vmap route (a mean over the batch or a normalization across
    samples fails the check and keeps vmap).

    Limits: everything :func:`per_sample_gradients` needs (``torch.func`` can vmap the module); every sample
    must run the same layers with the same shapes (true under vmap); a Linear's parameters must not also be used
    outside its ``forward`` (e.g. ``F.linear(x, layer.weight)``): the first-sample check raises ``ValueError``.

    Gradient flow: nothing is written to ``.grad``; the result is detached, float64.

    :param module: the network, e.g. an SB3 ``ActorCriticPolicy``
    :param loss_fn: ``loss_fn(module, *batch) -> scalar``, called on a batch of one sample (as in
        :func:`per_sample_gradients`)
    :param inputs: a tensor or a sequence of tensors sharing the leading batch dimension ``N >= 1``
    :param params: which parameters count (``None``: all with ``requires_grad``; names; or ``name -> bool``)
    :param chunk_size: samples per vmap call (overrides ``max_memory_bytes``)
    :param max_memory_bytes: bound on the estimated working memory per chunk (default
        ``DEFAULT_STREAMING_MEMORY_BYTES``; the working memory is ``O(N * width)``, not ``O(N * P)``)
    :return: ``[N]`` float64, ``||G_i||^2`` over the selected parameters

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> loss_fn = lambda m, xb: (m(xb) ** 2).sum()
    >>> sq = per_sample_grad_sq_norms(net, loss_fn, x)
    >>> from pgvar.measure import flatten_per_sample, per_sample_gradients
    >>> g = flatten_per_sample(per_sample_gradients(net, loss_fn, x))
    >>> torch.allclose(sq, (g ** 2).sum(1))
    True
    """
    sq_norms, _, _ = _sq_norms_and_grad_sum(
        module, loss_fn, inputs, params=params, chunk_size=chunk_size, max_memory_bytes=max_memory_bytes
    )
    return sq_norms


def _sq_norms_and_grad_sum(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    *,
    params: ParamSelector,
    chunk_size: int | None,
    max_memory_bytes: int | None,
    coordinate_squares: bool = False,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None]:
    """``(||G_i||^2 [N] float64, sum_i G_i as name -> [*shape], sum_i G_i**2 or None)`` by the squared-norm trick.

    With ``coordinate_squares`` the third element holds, per parameter, the float64 sum over samples of the
    squared per-sample gradient, coordinate by coordinate (BackPACK's ``SumGradSquared``): for a Linear layer
    with one row per sample, :math:`\\sum_i (G_i(W))^2 = (\\delta^{\\odot 2})^T (h^{\\odot 2})`; otherwise ``None``.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if not callable(loss_fn) or isinstance(loss_fn, Mapping):
        raise ValueError(f"loss_fn must be loss_fn(module, *batch) -> scalar, got {_describe(loss_fn)}")
    batch, n = _check_inputs(inputs)
    diff, fixed = _split_parameters(module, params)
    if chunk_size is not None:
        check_positive("chunk_size", chunk_size, integer=True)
    if max_memory_bytes is not None:
        check_positive("max_memory_bytes", max_memory_bytes)
    wrapper = _LossModule(module, loss_fn)
    candidates = _linear_candidates(module, diff)
    state: dict[str, Any] = {}
    handles = [
        layer.register_forward_hook(_make_hook(name, state), with_kwargs=True)
        for name, (layer, _, _) in candidates.items()
    ]
    try:
        key = _probe_key(module, loss_fn, diff, batch)
        cached, batched = _PROBE_CACHE.get(module, {}).get(key, (None, False))
        if cached is None:  # probe: ordinary autograd on sample 0 (layer calls, output shapes, a reference)
            state["probe"] = {name: [] for name in candidates}
            probe_leaves = {name: value.clone().requires_grad_(True) for name, value in diff.items()}
            probe_loss = _check_scalar(
                "loss_fn",
                functional_call(
                    wrapper, (_prefixed(probe_leaves), _prefixed(fixed)), tuple(x[:1] for x in batch)
                ),
            )
            probe_grads = {}
            if probe_loss.requires_grad:
                grads = torch.autograd.grad(probe_loss, list(probe_leaves.values()), allow_unused=True)
                probe_grads = {name: g for name, g in zip(probe_leaves, grads) if g is not None}
            calls = state.pop("probe")
        else:
            calls = cached
        linear = {name: spec for name, spec in candidates.items() if calls.get(name)}
        closed_form = {p for _, w, b in linear.values() for p in (w, b) if p is not None}
        others = {name: value for name, value in diff.items() if name not in closed_form}
        held = _prefixed({**fixed, **{name: value for name, value in diff.items() if name in closed_form}})

        def sample_loss(
            other_params: dict[str, Tensor], eps: dict[str, list[Tensor]], *sample: Tensor
        ) -> tuple[Tensor, dict[str, list[Tensor]]]:
            state.update(eps=eps, h={name: [] for name in linear})
            try:
                one = tuple(x.unsqueeze(0) for x in sample)
                return _check_scalar("loss_fn", functional_call(wrapper, (other_params, held), one)), state[
                    "h"
                ]
            finally:
                state.clear()

        grad_fn = vmap(grad(sample_loss, argnums=(0, 1), has_aux=True), in_dims=(None, 0) + (0,) * len(batch))
        per_sample_elems = sum(v.numel() for v in others.values()) + sum(
            shape.numel() // shape[-1] * (linear[name][0].in_features + shape[-1])
            for name in linear
            for shape, _ in calls[name]
        )
        itemsize = next(iter(diff.values())).element_size()
        budget = DEFAULT_STREAMING_MEMORY_BYTES if max_memory_bytes is None else max_memory_bytes
        step = chunk_size or max(1, int(budget // max(1, per_sample_elems * itemsize * _MEMORY_FACTOR)))

        device = next(iter(diff.values())).device
        sq_norms = torch.zeros(n, dtype=torch.float64, device=device)
        grad_sum = {name: torch.zeros_like(value) for name, value in diff.items()}
        grad_sq_sum = (
            {name: torch.zeros_like(value, dtype=torch.float64) for name, value in diff.items()}
            if coordinate_squares
            else None
        )
        first_rows: dict[str, Tensor] = {}
        for start in range(0, n, step):
            chunk = tuple(x[start : start + step] for x in batch)
            rows = chunk[0].shape[0]
            if batched:
                other_grads: dict[str, Tensor] = {}
                deltas, layer_inputs = _batched_deltas(module, loss_fn, chunk, calls, linear, state)
            else:
                eps = {
                    name: [
                        torch.zeros(shape, dtype=dtype, device=device).expand(rows, *shape)
                        for shape, dtype in calls[name]
                    ]
                    for name in linear
                }
                (other_grads, deltas), layer_inputs = grad_fn(_prefixed(others), eps, *chunk)
            part = sq_norms[start : start + rows]
            for key_, g in other_grads.items():
                name = key_[len(_PREFIX) :]
                part += g.reshape(rows, -1).double().square().sum(dim=1)
                grad_sum[name] += g.sum(dim=0)
                if grad_sq_sum is not None:
                    grad_sq_sum[name] += g.double().square().sum(dim=0)
                first_rows[name] = g[0]
            for layer_name, (layer, weight_name, bias_name) in linear.items():
                if len(layer_inputs[layer_name]) != len(calls[layer_name]):
                    raise ValueError(
                        f"nn.Linear {layer_name!r} ran {len(layer_inputs[layer_name])} times per sample under vmap "
                        f"but {len(calls[layer_name])} times on the first sample; per_sample_grad_sq_norms needs "
                        "the same calls for every sample"
                    )
                h = _rows(layer_inputs[layer_name], rows, layer.in_features)  # [rows, T, in]
                d = _rows(deltas[layer_name], rows, layer.out_features)  # [rows, T, out]
                sq, (weight_sum, bias_sum) = _linear_sq_norms_and_sums(
                    h, d, weight_name is not None, bias_name is not None
                )
                part += sq.double()
                if grad_sq_sum is not None:
                    weight_sq, bias_sq = _linear_coordinate_squares(
                        h, d, weight_name is not None, bias_name is not None
                    )
                    if weight_name is not None and weight_sq is not None:
                        grad_sq_sum[weight_name] += weight_sq
                    if bias_name is not None and bias_sq is not None:
                        grad_sq_sum[bias_name] += bias_sq
                if weight_name is not None and weight_sum is not None:
                    grad_sum[weight_name] += weight_sum
                    if start == 0:
                        first_rows[weight_name] = d[0].T @ h[0]
                if bias_name is not None and bias_sum is not None:
                    grad_sum[bias_name] += bias_sum
                    if start == 0:
                        first_rows[bias_name] = d[0].sum(dim=0)
    finally:
        for handle in handles:
            handle.remove()
    if cached is None:
        _check_first_sample(first_rows, probe_grads, closed_form)
        batched = not others and _batched_route_agrees(module, loss_fn, batch, calls, linear, sq_norms, candidates)
        _PROBE_CACHE.setdefault(module, {})[key] = (calls, batched)
    return sq_norms, grad_sum, grad_sq_sum


#: Per module: what the probe learned (Linear calls and per-sample output shapes, and whether the batched route
#: applies) for a loss function, parameter selection and input signature, once the first-sample check has passed. Keys hold ``loss_fn.__code__`` (so new
#: closures of the same function hit) and the parameter ids (so a rebuilt module misses). A stale entry fails
#: loudly in the hooks (shape or call-count mismatch), never silently.
_PROBE_CACHE: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple, tuple[dict[str, list[tuple[torch.Size, torch.dtype]]], bool]]
] = weakref.WeakKeyDictionary()


def _batched_deltas(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    chunk: tuple[Tensor, ...],
    calls: dict[str, list[tuple[torch.Size, torch.dtype]]],
    linear: dict[str, tuple[nn.Linear, str | None, str | None]],
    state: dict[str, Any],
) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """``(delta, h)`` per Linear call from ONE ordinary batched forward and backward of ``loss_fn`` on the chunk.

    For a loss that is the sum of the per-sample losses and layers that see each sample as its own row(s),
    ``d L / d y`` of the batched output IS the per-sample ``delta``: no vmap, no ``eps``. Used only after the
    first call checked it against the vmap route (:func:`_batched_route_agrees`).
    """
    rows = chunk[0].shape[0]
    state["batched"] = {name: ([], [], [(rows, *shape[1:]) for shape, _ in calls[name]]) for name in linear}
    try:
        with torch.enable_grad():
            loss = _check_scalar("loss_fn", loss_fn(module, *chunk))
        recorded = state["batched"]
    finally:
        state.clear()
    outputs = [out for name in linear for out in recorded[name][1]]
    if not loss.requires_grad or not all(out.requires_grad for out in outputs):
        raise ValueError("the batched route needs every Linear output in the loss's graph")
    flat = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
    deltas: dict[str, list[Tensor]] = {}
    for name in linear:
        deltas[name] = []
        for out in recorded[name][1]:
            g = next(flat)
            deltas[name].append(torch.zeros_like(out) if g is None else g)
    for name in linear:
        if len(recorded[name][0]) != len(calls[name]):
            raise ValueError(
                f"nn.Linear {name!r} ran {len(recorded[name][0])} times in the batched pass but "
                f"{len(calls[name])} times on the first sample; per_sample_grad_sq_norms needs the same layer "
                "calls and shapes for every sample"
            )
    return deltas, {name: [h.detach() for h in recorded[name][0]] for name in linear}


def _batched_route_agrees(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: tuple[Tensor, ...],
    calls: dict[str, list[tuple[torch.Size, torch.dtype]]],
    linear: dict[str, tuple[nn.Linear, str | None, str | None]],
    vmap_sq_norms: Tensor,
    candidates: dict[str, tuple[nn.Linear, str | None, str | None]],
) -> bool:
    """Whether the batched route (:func:`_batched_deltas`) gives the vmap route's norms on the first samples.

    It applies when every per-sample Linear output has a leading dimension of 1 and ``loss_fn`` on a batch is
    the sum of its per-sample losses (a mean over the batch, or a normalization across samples, fails the check).
    """
    k = min(batch[0].shape[0], 4)
    if k < 2 or not linear or any(shape[0] != 1 for name in linear for shape, _ in calls[name]):
        return False
    state: dict[str, Any] = {}
    handles = [
        layer.register_forward_hook(_make_hook(name, state), with_kwargs=True)
        for name, (layer, _, _) in candidates.items()
    ]
    try:
        chunk = tuple(x[:k] for x in batch)
        deltas, inputs = _batched_deltas(module, loss_fn, chunk, calls, linear, state)
    except (ValueError, RuntimeError):
        return False
    finally:
        for handle in handles:
            handle.remove()
    sq = torch.zeros(k, dtype=torch.float64, device=vmap_sq_norms.device)
    for name, (layer, weight_name, bias_name) in linear.items():
        h, d = _rows(inputs[name], k, layer.in_features), _rows(deltas[name], k, layer.out_features)
        sq += _linear_sq_norms_and_sums(h, d, weight_name is not None, bias_name is not None)[0].double()
    reference = vmap_sq_norms[:k]
    rtol = 1e-4 if inputs[next(iter(linear))][0].dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    return bool(((sq - reference).abs() <= rtol * reference.abs().max() + 1e-30).all())


def _probe_key(
    module: nn.Module, loss_fn: Callable[..., Tensor], diff: dict[str, Tensor], batch: tuple[Tensor, ...]
) -> tuple:
    code = getattr(loss_fn, "__code__", None)
    return (
        code if code is not None else id(loss_fn),
        tuple(diff),
        tuple(id(p) for p in module.parameters()),
        tuple((tuple(x.shape[1:]), x.dtype, x.device) for x in batch),
        module.training,
    )


def _linear_candidates(
    module: nn.Module, diff: dict[str, Tensor]
) -> dict[str, tuple[nn.Linear, str | None, str | None]]:
    """``nn.Linear`` layers owning a selected ``weight``/``bias`` that no other module shares (tied weights are not)."""
    registrations: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        registrations[id(p)] = registrations.get(id(p), 0) + 1
    candidates: dict[str, tuple[nn.Linear, str | None, str | None]] = {}
    for layer_name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        owned: list[str | None] = []
        for attr in ("weight", "bias"):
            full = f"{layer_name}.{attr}" if layer_name else attr
            value = layer._parameters.get(attr)
            shared = value is None or registrations.get(id(value), 0) != 1
            owned.append(None if shared or full not in diff else full)
        if owned[0] is not None or owned[1] is not None:
            candidates[layer_name] = (layer, owned[0], owned[1])
    return candidates


def _make_hook(layer_name: str, state: dict[str, Any]) -> Callable[..., Tensor | None]:
    """Forward hook: in the probe, record the call's output shape; under vmap, record the input and add ``eps``."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        if "batched" in state:  # the batched route: record input and output, check the call against the plan
            inputs, outputs, planned_shapes = state["batched"][layer_name]
            if len(outputs) >= len(planned_shapes) or tuple(output.shape) != planned_shapes[len(outputs)]:
                raise ValueError(
                    f"nn.Linear {layer_name!r} ran with batched output shape {tuple(output.shape)} on call "
                    f"{len(outputs) + 1}, but the first sample planned {planned_shapes}; "
                    "per_sample_grad_sq_norms needs the same layer calls and shapes for every sample"
                )
            inputs.append(args[0] if args else kwargs["input"])
            outputs.append(output)
            return None
        if "probe" in state:
            state["probe"][layer_name].append((output.shape, output.dtype))
            return None
        if "eps" not in state:  # the module runs outside our passes (e.g. inside loss_fn's own no-op calls)
            return None
        seen = state["h"][layer_name]
        planned = state["eps"][layer_name]
        if len(seen) >= len(planned) or output.shape != planned[len(seen)].shape:
            raise ValueError(
                f"nn.Linear {layer_name!r} ran with per-sample output shape {tuple(output.shape)} on call "
                f"{len(seen) + 1}, but the first sample planned {[tuple(e.shape) for e in planned]}; "
                "per_sample_grad_sq_norms needs the same layer calls and shapes for every sample"
            )
        eps = planned[len(seen)]
        seen.append(args[0] if args else kwargs["input"])
        return output + eps

    return hook


def _prefixed(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {_PREFIX + name: value for name, value in params.items()}


def _rows(parts: list[Tensor], rows: int, width: int) -> Tensor:
    """Stack each sample's rows of several calls: ``[rows, T, width]`` (no copy for a single call)."""
    if len(parts) == 1:
        return parts[0].reshape(rows, -1, width)
    return torch.cat([part.reshape(rows, -1, width) for part in parts], dim=1)


def _linear_sq_norms_and_sums(
    h: Tensor, d: Tensor, weight: bool, bias: bool
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """Per-sample ``||G_i(W)||^2 + ||G_i(b)||^2`` ``[N]`` and the summed gradients ``(sum_i G_i(W), sum_i G_i(b))``.

    ``h`` ``[N, T, in]`` holds the layer inputs and ``d`` ``[N, T, out]`` the output gradients of each sample's
    ``T`` rows; ``G_i(W) = sum_t d_it h_it^T`` and ``G_i(b) = sum_t d_it``.
    """
    n, t, d_in = h.shape
    d_out = d.shape[2]
    sq = torch.zeros(n, dtype=h.dtype, device=h.device)
    weight_sum = bias_sum = None
    if t == 1:
        h2, d2 = h.reshape(n, d_in), d.reshape(n, d_out)
        d_sq = d2.square().sum(dim=1)
        if weight:
            sq = sq + d_sq * h2.square().sum(dim=1)
            weight_sum = d2.T @ h2
        if bias:
            sq = sq + d_sq
            bias_sum = d2.sum(dim=0)
        return sq, (weight_sum, bias_sum)
    if weight:
        if t * t <= d_in * d_out:  # Gram form, O(N T^2 (in + out))
            sq = sq + (torch.bmm(h, h.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))
        else:  # per-sample [out, in], O(N T in out)
            sq = sq + torch.bmm(d.transpose(1, 2), h).square().sum(dim=(1, 2))
        weight_sum = d.reshape(-1, d_out).T @ h.reshape(-1, d_in)
    if bias:
        d_per_sample = d.sum(dim=1)
        sq = sq + d_per_sample.square().sum(dim=1)
        bias_sum = d_per_sample.sum(dim=0)
    return sq, (weight_sum, bias_sum)


def _linear_coordinate_squares(h: Tensor, d: Tensor, weight: bool, bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-coordinate ``sum_i G_i(W)**2`` ``[out, in]`` and ``sum_i G_i(b)**2`` ``[out]`` (summed in the input
    dtype, returned as float64).

    One row per sample (``T = 1``): ``G_i(W) = d_i h_i^T`` squares coordinate-wise to ``d_i**2 (h_i**2)^T``, so the
    sum over samples is one matrix product ``(d**2)^T (h**2)`` (Dangel et al. 2020, BackPACK's ``SumGradSquared``,
    arXiv:1912.10985): no ``[N, out, in]`` tensor. Several rows per sample: ``G_i(W) = sum_t d_it h_it^T`` is
    formed per sample (``[N, out, in]`` for this chunk) and squared.
    """
    n, t, d_in = h.shape
    d_out = d.shape[2]
    weight_sq = bias_sq = None
    if t == 1:
        d_sq = d.reshape(n, d_out).square()
        if weight:
            weight_sq = (d_sq.T @ h.reshape(n, d_in).square()).double()
        if bias:
            bias_sq = d_sq.sum(dim=0).double()
        return weight_sq, bias_sq
    if weight:
        weight_sq = torch.bmm(d.transpose(1, 2), h).double().square().sum(dim=0)
    if bias:
        bias_sq = d.sum(dim=1).double().square().sum(dim=0)
    return weight_sq, bias_sq


def _check_first_sample(
    rebuilt: Mapping[str, Tensor], reference: Mapping[str, Tensor], closed_form: set[str]
) -> None:
    """Raise unless the closed-form gradient of sample 0 matches ordinary autograd on sample 0.

    A mismatch means a Linear's parameter is also used outside that layer's ``forward`` (e.g.
    ``F.linear(x, layer.weight)``), a path the hooks cannot see.
    """
    for name in sorted(closed_form):
        ref = reference.get(name)
        ref = torch.zeros_like(rebuilt[name]) if ref is None else ref.detach()
        err = float((rebuilt[name] - ref).norm())
        scale = float(rebuilt[name].norm()) + float(ref.norm())
        rtol = 1e-3 if ref.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        if err > rtol * scale + 1e-30:
            raise ValueError(
                f"per_sample_grad_sq_norms cannot handle parameter {name!r}: on the first sample the nn.Linear "
                f"closed form gives a gradient that differs from autograd by {err:.3g} (norm {scale / 2:.3g}); "
                "the parameter is also used outside its layer's forward (e.g. F.linear(x, layer.weight)). Use "
                "per_sample_gradients / gradient_statistics_streaming, or exclude it with params=."
            )
