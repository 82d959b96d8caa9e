"""Per-sample gradients with :mod:`torch.func`, flat parameter views, and per-sample squared gradient norms.

Two routes to the per-sample gradients ``G_i = grad_theta l_i(theta)`` of a loss that is a sum of per-sample
terms ``L = sum_i l_i``:

- :func:`per_sample_gradients`: ``vmap(grad(l_i))`` over the batch, in chunks. It materializes ``G`` with
  shape ``[N, *param.shape]`` per parameter and works on any module that :mod:`torch.func` can trace (SB3
  policies included).
- :func:`per_sample_grad_sq_norms`: only ``||G_i||^2``, from one vmapped forward and backward that stops at
  each ``nn.Linear`` output and uses the closed form of the layer's per-sample gradient (Goodfellow 2015,
  arXiv:1510.01799). Enough for the covariance trace and the SNR
  (:func:`pgvar.measure.gradient_statistics_from_norms`) at 1.5-2x the cost of one batched backward.

Gradients are keyed by parameter **name** (SB3's ``ActorCriticPolicy`` lists ``log_std`` first: never rely on
position). :func:`flatten` and :func:`flatten_per_sample` concatenate them in **sorted name order**, so two
dicts with the same names flatten the same way, whatever order the module registered them in.

This module imports torch only (no SB3): a policy is just an ``nn.Module`` and a ``loss_fn``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from pgvar._validation import check_positive

__all__ = [
    "DEFAULT_STREAMING_MEMORY_BYTES",
    "flat_names",
    "flatten",
    "flatten_per_sample",
    "per_sample_grad_sq_norms",
    "per_sample_gradients",
    "unflatten",
]

#: Selects the parameters to differentiate: ``None`` (every parameter with ``requires_grad``), an iterable of
#: names (as in ``module.named_parameters()``), or a predicate ``name -> bool``.
ParamSelector = str | Iterable[str] | Callable[[str], bool] | None

#: Working memory per chunk (bytes) that the streaming statistics use when neither ``chunk_size`` nor
#: ``max_memory_bytes`` is given.
DEFAULT_STREAMING_MEMORY_BYTES = 128 * 2**20

# Peak working memory of vmap(grad) per sample, in units of the sample's gradient size: the per-layer
# per-sample grads, autograd's intermediates and the copy into the output coexist (measured ~3x on an SB3
# MLP policy, notes/measured-baseline.md section 4).
_MEMORY_FACTOR = 3

_PREFIX = "module."


# ----------------------------------------------------------------------------------------------- flat views
def flat_names(grads: Mapping[str, Tensor]) -> list[str]:
    """Return the names of ``grads`` in the order :func:`flatten` concatenates them: sorted by name.

    >>> flat_names({"log_std": torch.zeros(2), "action_net.weight": torch.zeros(2, 3)})
    ['action_net.weight', 'log_std']
    """
    return sorted(grads)


def flatten(grads: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a dict of gradients into one vector ``[P]``, in sorted name order (:func:`flat_names`).

    :param grads: name -> tensor of any shape (e.g. ``{n: p.grad for n, p in module.named_parameters()}``)
    :return: ``[P]`` with ``P = sum of numels``

    >>> flatten({"b": torch.tensor([3.0]), "a": torch.tensor([[1.0, 2.0]])})
    tensor([1., 2., 3.])
    """
    _check_grads_dict("grads", grads)
    return torch.cat([grads[name].reshape(-1) for name in flat_names(grads)])


def flatten_per_sample(grads: Mapping[str, Tensor]) -> Tensor:
    """Concatenate per-sample gradients ``name -> [N, *shape]`` into one matrix ``[N, P]`` (sorted name order).

    :param grads: name -> ``[N, *param.shape]``, e.g. the result of :func:`per_sample_gradients`
    :return: ``[N, P]``; row ``i`` is :func:`flatten` of sample ``i``'s gradient

    >>> flatten_per_sample({"w": torch.ones(4, 2, 3), "b": torch.zeros(4, 2)}).shape
    torch.Size([4, 8])
    """
    _check_grads_dict("grads", grads)
    n = _common_batch_size("grads", grads)
    return torch.cat([grads[name].reshape(n, -1) for name in flat_names(grads)], dim=1)


def unflatten(vector: Tensor, like: Mapping[str, Tensor | torch.Size | Sequence[int]]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten` (``[P]``) or :func:`flatten_per_sample` (``[N, P]``): split into named views.

    :param vector: ``[P]`` or ``[N, P]``
    :param like: name -> tensor or shape, giving each parameter's shape (e.g. ``dict(module.named_parameters())``)
    :return: name -> ``[*shape]`` (or ``[N, *shape]``), views into ``vector``

    >>> unflatten(torch.arange(3.0), {"b": (1,), "a": (1, 2)})["a"]
    tensor([[0., 1.]])
    """
    shapes = {name: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for name, v in like.items()}
    sizes = [int(torch.Size(shapes[name]).numel()) for name in sorted(shapes)]
    if vector.dim() not in (1, 2) or vector.shape[-1] != sum(sizes):
        raise ValueError(
            f"vector must have shape [P] or [N, P] with P = {sum(sizes)} (the total size of like), "
            f"got {tuple(vector.shape)}"
        )
    lead = tuple(vector.shape[:-1])
    pieces = vector.split(sizes, dim=-1)
    return {name: piece.reshape(lead + shapes[name]) for name, piece in zip(sorted(shapes), pieces)}


# ------------------------------------------------------------------------------------------ per-sample grads
def per_sample_gradients(
    fn_or_module: Callable[..., Tensor] | nn.Module,
    params_or_loss_fn: Mapping[str, Tensor] | Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    *,
    params: ParamSelector = None,
    chunk_size: int | None = None,
    max_memory_bytes: int | None = None,
) -> dict[str, Tensor]:
    """Return the gradient of each sample's loss, ``name -> [N, *param.shape]``, by ``vmap(grad)``.

    .. math::  G_i = \\nabla_\\theta\\, \\ell(\\theta; x_i), \\qquad i = 1, \\dots, N

    Two call styles:

    - **functional**: ``per_sample_gradients(fn, params, inputs)`` with ``fn(params, *sample) -> scalar``,
      ``params`` a dict of tensors and ``sample`` one row of each input (no batch dimension).
    - **module**: ``per_sample_gradients(module, loss_fn, inputs, params=...)`` with
      ``loss_fn(module, *batch) -> scalar``, called on a batch of **one** sample (each input keeps a leading
      dimension of size 1, as SB3 policies require). For an SB3 policy gradient loss::

          loss_fn = lambda pol, obs, act, adv: -(pol.evaluate_actions(obs, act)[1] * adv).sum()

      Parameters selected by ``params`` are differentiated; all others (and buffers) are held fixed at their
      current values through :func:`torch.func.functional_call`, so the module itself is not modified and no
      ``.grad`` is written.

    The batch is processed in chunks of ``chunk_size`` samples; with ``max_memory_bytes`` the chunk is chosen
    so that the working memory, estimated as ``chunk * P * itemsize * 3``, stays below it. Neither given: one
    chunk. The returned tensors (``N * P * itemsize`` bytes) are not counted; for statistics without
    materializing them use :func:`pgvar.measure.gradient_statistics_streaming` or
    :func:`pgvar.measure.gradient_statistics_from_norms`.

    Gradient flow: the result is detached from ``params`` (no graph); it has the dtype and device of the
    parameters. The module is evaluated in its current mode (``train()``/``eval()``); layers that mix samples
    (batch norm in training mode) or draw random numbers cannot be vmapped (torch raises).

    :param fn_or_module: ``fn(params, *sample) -> scalar`` (functional style) or an ``nn.Module`` (module style)
    :param params_or_loss_fn: the parameter dict (functional style) or ``loss_fn(module, *batch) -> scalar``
        (module style)
    :param inputs: a tensor or a sequence of tensors sharing the leading batch dimension ``N >= 1``
    :param params: module style only: which parameters to differentiate (``None``: all with
        ``requires_grad``; an iterable of names; or a predicate ``name -> bool``)
    :param chunk_size: samples per vmap call (overrides ``max_memory_bytes``)
    :param max_memory_bytes: bound on the estimated working memory per chunk
    :return: name -> ``[N, *param.shape]``

    >>> w = {"w": torch.tensor([1.0, -1.0])}
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> per_sample_gradients(lambda p, xi: (p["w"] * xi).sum() ** 2 / 2, w, x)["w"]  # (w.x) x
    tensor([[-1., -2.],
            [-3., -4.]])
    >>> net = torch.nn.Linear(2, 1)
    >>> g = per_sample_gradients(net, lambda m, xb: m(xb).sum(), x, params=["weight"])
    >>> g["weight"].shape, torch.equal(g["weight"][:, 0], x)
    (torch.Size([2, 1, 2]), True)
    """
    plan = _plan_vmap(fn_or_module, params_or_loss_fn, inputs, params=params)
    step = _chunk_size(plan, chunk_size, max_memory_bytes, default_bytes=None)
    if step >= plan.n:
        return plan.call(*plan.inputs)
    out = {
        name: torch.empty((plan.n, *shape), dtype=dtype, device=device)
        for name, (shape, dtype, device) in plan.specs.items()
    }
    for start, chunk in _iter_chunks(plan, step):
        for name, value in chunk.items():
            out[name][start : start + value.shape[0]] = value
    return out


@dataclass(frozen=True)
class _VmapPlan:
    """What every vmap route needs: the vmapped gradient function and the shapes of its outputs."""

    call: Callable[..., dict[str, Tensor]]
    inputs: tuple[Tensor, ...]
    n: int
    specs: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]

    @property
    def bytes_per_sample(self) -> int:
        return sum(
            int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            for shape, dtype, _ in self.specs.values()
        )


class _LossModule(nn.Module):
    """Wraps ``loss_fn(module, *batch)`` as a ``forward`` so that :func:`functional_call` can swap parameters."""

    def __init__(self, module: nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, *batch: Tensor) -> Tensor:
        return self.loss_fn(self.module, *batch)


def _plan_vmap(
    fn_or_module: Callable[..., Tensor] | nn.Module,
    params_or_loss_fn: Mapping[str, Tensor] | Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    *,
    params: ParamSelector,
) -> _VmapPlan:
    batch, n = _check_inputs(inputs)
    in_dims = (None,) + (0,) * len(batch)
    if isinstance(fn_or_module, nn.Module):
        if not callable(params_or_loss_fn) or isinstance(params_or_loss_fn, Mapping):
            raise ValueError(
                "with a module as first argument, the second argument must be loss_fn(module, *batch) -> scalar, "
                f"got {type(params_or_loss_fn).__name__}"
            )
        diff, fixed = _split_parameters(fn_or_module, params)
        wrapper = _LossModule(fn_or_module, params_or_loss_fn)
        fixed_prefixed = {_PREFIX + name: value for name, value in fixed.items()}

        def sample_loss(diff_params: dict[str, Tensor], *sample: Tensor) -> Tensor:
            one = tuple(x.unsqueeze(0) for x in sample)
            return _check_scalar("loss_fn", functional_call(wrapper, (diff_params, fixed_prefixed), one))

        grad_fn = vmap(grad(sample_loss), in_dims=in_dims)
        diff_prefixed = {_PREFIX + name: value for name, value in diff.items()}

        def call(*chunk: Tensor) -> dict[str, Tensor]:
            return {name[len(_PREFIX) :]: value for name, value in grad_fn(diff_prefixed, *chunk).items()}

        specs_from = diff
    else:
        if not callable(fn_or_module):
            raise ValueError(
                "fn_or_module must be fn(params, *sample) -> scalar or an nn.Module, "
                f"got {type(fn_or_module).__name__}"
            )
        if params is not None:
            raise ValueError(
                "params (a parameter selector) is only for the module call style; in the functional style "
                "pass the parameter dict as the second argument"
            )
        if not isinstance(params_or_loss_fn, Mapping):
            raise ValueError(
                "with a function as first argument, the second argument must be a dict name -> tensor of "
                f"parameters, got {type(params_or_loss_fn).__name__}"
            )
        _check_grads_dict("params", params_or_loss_fn)
        specs_from = {name: value.detach() for name, value in params_or_loss_fn.items()}
        user_fn = fn_or_module

        def checked_fn(p: dict[str, Tensor], *sample: Tensor) -> Tensor:
            return _check_scalar("fn", user_fn(p, *sample))

        functional_grad_fn = vmap(grad(checked_fn), in_dims=in_dims)

        def call(*chunk: Tensor) -> dict[str, Tensor]:
            return dict(functional_grad_fn(specs_from, *chunk))

    specs = {name: (tuple(v.shape), v.dtype, v.device) for name, v in specs_from.items()}
    return _VmapPlan(call=call, inputs=batch, n=n, specs=specs)


def _chunk_size(
    plan: _VmapPlan, chunk_size: int | None, max_memory_bytes: int | None, *, default_bytes: int | None
) -> int:
    if chunk_size is not None:
        return int(check_positive("chunk_size", chunk_size, integer=True))
    if max_memory_bytes is not None:
        check_positive("max_memory_bytes", max_memory_bytes)
    budget = max_memory_bytes if max_memory_bytes is not None else default_bytes
    if budget is None:
        return plan.n
    return max(1, int(budget // max(1, plan.bytes_per_sample * _MEMORY_FACTOR)))


def _iter_chunks(plan: _VmapPlan, step: int) -> Iterator[tuple[int, dict[str, Tensor]]]:
    for start in range(0, plan.n, step):
        yield start, plan.call(*(x[start : start + step] for x in plan.inputs))


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
    >>> g = flatten_per_sample(per_sample_gradients(net, loss_fn, x))
    >>> torch.allclose(sq, (g ** 2).sum(1))
    True
    """
    sq_norms, _ = _sq_norms_and_grad_sum(
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
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(||G_i||^2 [N] float64, sum_i G_i as name -> [*shape])`` by the squared-norm trick."""
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
        cached = _PROBE_CACHE.get(module, {}).get(key)
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
        first_rows: dict[str, Tensor] = {}
        for start in range(0, n, step):
            chunk = tuple(x[start : start + step] for x in batch)
            rows = chunk[0].shape[0]
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
        _PROBE_CACHE.setdefault(module, {})[key] = calls
    return sq_norms, grad_sum


#: Per module: what the probe learned (Linear calls and per-sample output shapes) for a loss function, parameter
#: selection and input signature, once the first-sample check has passed. Keys hold ``loss_fn.__code__`` (so new
#: closures of the same function hit) and the parameter ids (so a rebuilt module misses). A stale entry fails
#: loudly in the hooks (shape or call-count mismatch), never silently.
_PROBE_CACHE: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple, dict[str, list[tuple[torch.Size, torch.dtype]]]]
] = weakref.WeakKeyDictionary()


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


# ------------------------------------------------------------------------------------------------ checks
def _check_inputs(inputs: Tensor | Sequence[Tensor]) -> tuple[tuple[Tensor, ...], int]:
    batch = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not batch:
        raise ValueError("inputs must hold at least one tensor with a leading batch dimension, got none")
    for i, x in enumerate(batch):
        if not isinstance(x, Tensor):
            raise ValueError(
                f"inputs[{i}] must be a torch.Tensor with a leading batch dimension, got {_describe(x)}"
            )
        if x.dim() == 0:
            raise ValueError(f"inputs[{i}] must have a leading batch dimension, got a 0-dim tensor")
    n = batch[0].shape[0]
    if n < 1:
        raise ValueError(
            f"inputs must have a batch size N >= 1, got an empty batch (inputs[0] shape {tuple(batch[0].shape)})"
        )
    for i, x in enumerate(batch[1:], start=1):
        if x.shape[0] != n:
            raise ValueError(
                f"inputs must share the batch size: inputs[0] has N = {n} but inputs[{i}] has {x.shape[0]} "
                f"(shape {tuple(x.shape)})"
            )
    return batch, int(n)


def _split_parameters(
    module: nn.Module, params: ParamSelector
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached ``(differentiated, fixed)`` parameter dicts, keyed by ``named_parameters`` names."""
    named = dict(module.named_parameters())
    if params is None:
        chosen = [name for name, p in named.items() if p.requires_grad]
    elif isinstance(params, str):
        chosen = [params]
    elif callable(params):
        chosen = [name for name in named if params(name)]
    else:
        chosen = list(params)
    unknown = [name for name in chosen if name not in named]
    if unknown:
        raise ValueError(f"params has unknown parameter names {unknown}; allowed names: {list(named)}")
    if not chosen:
        raise ValueError(f"params selects no parameter; allowed names: {list(named)}")
    chosen_set = set(chosen)
    diff = {name: named[name].detach() for name in named if name in chosen_set}
    fixed = {name: p.detach() for name, p in named.items() if name not in chosen_set}
    return diff, fixed


def _check_grads_dict(name: str, grads: Mapping[str, Tensor]) -> None:
    if not isinstance(grads, Mapping) or not grads:
        raise ValueError(f"{name} must be a non-empty dict name -> torch.Tensor, got {_describe(grads)}")
    for key, value in grads.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}[{key!r}] must be a torch.Tensor, got {_describe(value)}")


def _common_batch_size(name: str, grads: Mapping[str, Tensor]) -> int:
    sizes = {key: (value.shape[0] if value.dim() > 0 else None) for key, value in grads.items()}
    first_key = next(iter(sizes))
    n = sizes[first_key]
    bad = {key: size for key, size in sizes.items() if size != n}
    if n is None or bad:
        raise ValueError(
            f"{name} must map every name to a [N, *shape] tensor with the same N; {first_key!r} has N = {n} "
            f"but {bad}"
        )
    return int(n)


def _check_scalar(name: str, loss: object) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(f"{name} must return a scalar (0-dim) tensor per sample, got {_describe(loss)}")
    return loss


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]
