"""Per-sample gradients with :mod:`torch.func`, flat parameter views, and per-sample squared gradient norms.

Two routes to the per-sample gradients ``G_i = grad_theta l_i(theta)`` of a loss that is a sum of per-sample
terms ``L = sum_i l_i``:

- :func:`per_sample_gradients`: ``vmap(grad(l_i))`` over the batch, in chunks. It materializes ``G`` with
  shape ``[N, *param.shape]`` per parameter and works on any module that :mod:`torch.func` can trace (SB3
  policies included).
- :func:`~pgvar.measure.per_sample_grad_sq_norms` (in :mod:`pgvar.measure.sq_norms`): only ``||G_i||^2``, from one vmapped forward and backward that stops at
  each ``nn.Linear`` output and uses the closed form of the layer's per-sample gradient (Goodfellow 2015,
  arXiv:1510.01799). Enough for the covariance trace and the SNR
  (:func:`pgvar.measure.gradient_statistics_from_norms`) at 1.5-2x the cost of one batched backward.

Gradients are keyed by parameter **name** (SB3's ``ActorCriticPolicy`` lists ``log_std`` first: never rely on
position). :func:`flatten` and :func:`flatten_per_sample` concatenate them in **sorted name order**, so two
dicts with the same names flatten the same way, whatever order the module registered them in.

This module imports torch only (no SB3): a policy is just an ``nn.Module`` and a ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from pgvar._validation import check_positive

__all__ = [
    "DEFAULT_STREAMING_MEMORY_BYTES",
    "flat_names",
    "flatten",
    "flatten_per_sample",
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
