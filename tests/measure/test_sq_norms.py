"""The squared-norm trick against the vmap route: exact per-sample norms, sums, and the layers it must refuse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgvar.measure import (
    flatten,
    flatten_per_sample,
    gradient_statistics,
    gradient_statistics_from_norms,
    per_sample_grad_sq_norms,
    per_sample_gradients,
)
from pgvar.measure.sq_norms import _sq_norms_and_grad_sum
from tests.measure.conftest import is_actor_param, pg_loss, sb3_pg_loss


def vmap_sq_norms(module, loss_fn, inputs, **kwargs) -> torch.Tensor:
    return (
        flatten_per_sample(per_sample_gradients(module, loss_fn, inputs, **kwargs)).double().square().sum(1)
    )


def test_matches_vmap_on_gaussian_mlp_with_log_std(gaussian_batch):
    policy, inputs = gaussian_batch
    torch.testing.assert_close(
        per_sample_grad_sq_norms(policy, pg_loss, inputs),
        vmap_sq_norms(policy, pg_loss, inputs),
        rtol=1e-12,
        atol=0,
    )


def test_sum_of_gradients_matches_batched_backward(gaussian_batch):
    policy, inputs = gaussian_batch
    _, grad_sum, _ = _sq_norms_and_grad_sum(
        policy, pg_loss, inputs, params=None, chunk_size=None, max_memory_bytes=None
    )
    named = dict(policy.named_parameters())
    batched = torch.autograd.grad(pg_loss(policy, *inputs), list(named.values()))
    for name, g in zip(named, batched):
        torch.testing.assert_close(grad_sum[name], g, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "params", [["head.weight"], ["head.bias", "log_std"], lambda n: n.startswith("body.0")]
)
def test_param_selection_matches_vmap(gaussian_batch, params):
    policy, inputs = gaussian_batch
    torch.testing.assert_close(
        per_sample_grad_sq_norms(policy, pg_loss, inputs, params=params),
        vmap_sq_norms(policy, pg_loss, inputs, params=params),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunked_equals_unchunked(gaussian_batch, chunk_size):
    policy, inputs = gaussian_batch
    whole = per_sample_grad_sq_norms(policy, pg_loss, inputs)
    torch.testing.assert_close(
        per_sample_grad_sq_norms(policy, pg_loss, inputs, chunk_size=chunk_size), whole, rtol=1e-13, atol=0
    )
    torch.testing.assert_close(
        per_sample_grad_sq_norms(policy, pg_loss, inputs, max_memory_bytes=1000), whole, rtol=1e-13, atol=0
    )


class SequenceNet(nn.Module):
    """Linear layers on ``[B, T, in]`` rows, a layer called twice, and a non-Linear parameter.

    Per sample (``T = 6``): ``embed``, ``shared`` (12 rows over two calls) and ``readout`` have
    ``T^2 > in * out`` and take the per-sample outer-product path; ``wide`` sees one pooled row.
    """

    input_shape = (6, 4)

    def __init__(self, width: int = 3, out: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.shared = nn.Linear(width, width)
        self.readout = nn.Linear(width, out, bias=False)
        self.wide = nn.Linear(width, 8)
        self.scale = nn.Parameter(torch.tensor([0.7, -1.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 4]
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.shared(h)) + torch.tanh(self.shared(h * 0.5))
        pooled = h.mean(dim=1)
        return (self.readout(h).sum(dim=1) * self.scale).sum(-1) + self.wide(pooled).sum(-1)


class ShortSequenceNet(nn.Module):
    """A Linear on a short sequence: ``T^2 = 9 <= in * out = 30`` takes the Gram form."""

    input_shape = (3, 6)

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, 6]
        return torch.tanh(self.proj(x)).square().sum(dim=(1, 2))


@pytest.mark.parametrize("net_cls", [SequenceNet, ShortSequenceNet])
def test_multi_row_and_multi_call_layers_match_vmap(net_cls):
    torch.manual_seed(3)
    net = net_cls().double()
    x = torch.randn(7, *net_cls.input_shape, dtype=torch.float64)
    target = torch.randn(7, dtype=torch.float64)

    def loss_fn(m, xb, yb):
        return ((m(xb) - yb) ** 2).sum()

    torch.testing.assert_close(
        per_sample_grad_sq_norms(net, loss_fn, (x, target)),
        vmap_sq_norms(net, loss_fn, (x, target)),
        rtol=1e-11,
        atol=0,
    )
    fast = gradient_statistics_from_norms(net, loss_fn, (x, target))
    full = gradient_statistics(per_sample_gradients(net, loss_fn, (x, target)))
    torch.testing.assert_close(fast.mean, full.mean, rtol=1e-11, atol=1e-14)
    assert math.isclose(fast.covariance_trace, full.covariance_trace, rel_tol=1e-10)


class TiedNet(nn.Module):
    """Weights tied between two Linear modules, and a Linear whose forward never runs (used through F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.unused_forward = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return F.linear(h, self.unused_forward.weight, self.unused_forward.bias).sum(-1)


def test_tied_weights_and_functional_only_layers_fall_back_to_exact_vmap():
    torch.manual_seed(4)
    net = TiedNet().double()
    x = torch.randn(9, 3, dtype=torch.float64)

    def loss_fn(m, xb):
        return (m(xb) ** 2).sum()

    torch.testing.assert_close(
        per_sample_grad_sq_norms(net, loss_fn, x), vmap_sq_norms(net, loss_fn, x), rtol=1e-12, atol=0
    )


class MisusedLinear(nn.Module):
    """A Linear that runs its forward AND whose weight is also used through F.linear: the hooks miss a path."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) + F.linear(x.flip(-1), self.lin.weight)).sum(-1)


def test_weight_used_outside_its_forward_fails_loudly():
    net = MisusedLinear().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"cannot handle parameter 'lin.weight'.*outside its layer's forward"
    ):
        per_sample_grad_sq_norms(net, lambda m, xb: (m(xb) ** 2).sum(), x)
    # excluding it works, and agrees with vmap on the rest
    torch.testing.assert_close(
        per_sample_grad_sq_norms(net, lambda m, xb: (m(xb) ** 2).sum(), x, params=["lin.bias"]),
        vmap_sq_norms(net, lambda m, xb: (m(xb) ** 2).sum(), x, params=["lin.bias"]),
        rtol=1e-12,
        atol=0,
    )


def test_only_non_linear_parameters():
    scale = nn.Module()
    scale.w = nn.Parameter(torch.tensor([1.5, -0.5], dtype=torch.float64))
    x = torch.randn(6, 2, dtype=torch.float64)

    def loss_fn(m, xb):
        return ((m.w * xb).sum() - 1.0) ** 2

    torch.testing.assert_close(
        per_sample_grad_sq_norms(scale, loss_fn, x), vmap_sq_norms(scale, loss_fn, x), rtol=1e-12, atol=0
    )


def test_sb3_policy_norms_route_agrees_with_vmap_route(sb3_batch):
    """DiagGaussian (Pendulum, with ``log_std``) and Categorical (CartPole): trace, mean and SNR agree."""
    policy, inputs = sb3_batch
    fast = gradient_statistics_from_norms(policy, sb3_pg_loss, inputs, params=is_actor_param)
    grads = per_sample_gradients(policy, sb3_pg_loss, inputs, params=is_actor_param)
    full = gradient_statistics(grads)
    assert fast.n == full.n == inputs[0].shape[0]
    assert math.isclose(fast.covariance_trace, full.covariance_trace, rel_tol=1e-5)
    assert math.isclose(fast.snr, full.snr, rel_tol=1e-4)
    assert math.isclose(fast.snr_debiased, full.snr_debiased, rel_tol=1e-4, abs_tol=1e-5)
    torch.testing.assert_close(fast.mean, full.mean, rtol=1e-5, atol=1e-6 * float(full.mean.abs().max()))
    torch.testing.assert_close(
        per_sample_grad_sq_norms(policy, sb3_pg_loss, inputs, params=is_actor_param),
        flatten_per_sample(grads).double().square().sum(1),
        rtol=1e-5,
        atol=0,
    )
    # the mean is that of one ordinary batched backward of the summed loss
    named = {n: p for n, p in policy.named_parameters() if is_actor_param(n)}
    batched = dict(zip(named, torch.autograd.grad(sb3_pg_loss(policy, *inputs), list(named.values()))))
    torch.testing.assert_close(fast.mean, flatten(batched).double() / fast.n, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in policy.parameters())


def test_bad_input_is_rejected(gaussian_batch):
    policy, (obs, act, adv) = gaussian_batch
    with pytest.raises(ValueError, match=r"inputs must have a batch size N >= 1"):
        per_sample_grad_sq_norms(policy, pg_loss, (obs[:0], act[:0], adv[:0]))
    with pytest.raises(ValueError, match=r"inputs must share the batch size"):
        per_sample_grad_sq_norms(policy, pg_loss, (obs, act[:3], adv))
    with pytest.raises(ValueError, match=r"params has unknown parameter names \['head.w'\]"):
        per_sample_grad_sq_norms(policy, pg_loss, (obs, act, adv), params=["head.w"])
    with pytest.raises(ValueError, match=r"module must be an nn.Module"):
        per_sample_grad_sq_norms(pg_loss, pg_loss, (obs, act, adv))
    with pytest.raises(
        ValueError,
        match=r"loss_fn must return a scalar \(0-dim\) tensor per sample, got a tensor of shape \(1,\)",
    ):
        per_sample_grad_sq_norms(policy, lambda m, o, a, A: m.log_prob(o, a) * A, (obs, act, adv))
    with pytest.raises(ValueError, match=r"inputs must hold at least N = 2 samples"):
        gradient_statistics_from_norms(policy, pg_loss, (obs[:1], act[:1], adv[:1]))


class Switchable(nn.Module):
    """Runs its hidden layer once or twice depending on a flag: the same loss code, a different structure."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 3)
        self.twice = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x))
        if self.twice:
            h = torch.tanh(self.hidden(h))
        return h.sum(-1)


def test_repeated_calls_reuse_the_probe_and_a_changed_structure_fails_loudly():
    torch.manual_seed(6)
    net = Switchable().double()
    x = torch.randn(8, 3, dtype=torch.float64)

    def loss_fn(m, xb):
        return (m(xb) ** 2).sum()

    first = per_sample_grad_sq_norms(net, loss_fn, x)
    again = per_sample_grad_sq_norms(net, loss_fn, x)  # reuses what the first call learned
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first, vmap_sq_norms(net, loss_fn, x), rtol=1e-12, atol=0)
    net.twice = True
    with pytest.raises(ValueError, match=r"nn.Linear 'hidden' ran .* on call 2.*same layer calls and shapes"):
        per_sample_grad_sq_norms(net, loss_fn, x)
    # a new loss function (a new code object) probes again and handles the new structure
    torch.testing.assert_close(
        per_sample_grad_sq_norms(net, lambda m, xb: (m(xb) ** 2).sum(), x),
        vmap_sq_norms(net, loss_fn, x),
        rtol=1e-12,
        atol=0,
    )


def _batched_flags(net):
    from pgvar.measure.sq_norms import _PROBE_CACHE

    return [batched for _, batched in _PROBE_CACHE[net].values()]


def test_all_linear_network_with_a_sum_loss_takes_the_batched_route_and_agrees_with_vmap():
    """After the first call (vmap, and a check on 4 samples), an all-Linear network runs one ordinary batched
    backward: its output gradients are the per-sample deltas when the loss is a sum over samples."""
    from pgvar.measure import gradient_moments

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, a, adv = torch.randn(9, 3).double(), torch.randn(9, 2).double(), torch.randn(9).double()

    def loss_fn(m, xb, ab, advb):
        return (advb * (m(xb) - ab).square().sum(-1)).sum()

    first = per_sample_grad_sq_norms(net, loss_fn, (x, a, adv))
    assert _batched_flags(net) == [True]
    reference = vmap_sq_norms(net, loss_fn, (x, a, adv))
    for chunk_size in (None, 4):
        again = per_sample_grad_sq_norms(net, loss_fn, (x, a, adv), chunk_size=chunk_size)  # batched
        torch.testing.assert_close(again, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(first, reference, rtol=1e-12, atol=0)
    fast = gradient_statistics_from_norms(net, loss_fn, (x, a, adv))
    full = gradient_statistics(per_sample_gradients(net, loss_fn, (x, a, adv)))
    torch.testing.assert_close(fast.mean, full.mean, rtol=1e-12, atol=1e-14)
    g = flatten_per_sample(per_sample_gradients(net, loss_fn, (x, a, adv)))
    moments = gradient_moments(net, loss_fn, (x, a, adv))
    torch.testing.assert_close(moments.second_moment, g.square().mean(0), rtol=1e-12, atol=1e-15)


def test_a_loss_that_is_not_a_sum_over_samples_keeps_the_vmap_route():
    """A mean over the batch is a sum for a batch of one (the contract) but not on a batch: the check refuses it."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def mean_loss(m, xb):
        return (m(xb) ** 2).mean()

    per_sample_grad_sq_norms(net, mean_loss, x)
    assert _batched_flags(net) == [False]
    torch.testing.assert_close(
        per_sample_grad_sq_norms(net, mean_loss, x), vmap_sq_norms(net, mean_loss, x), rtol=1e-12, atol=0
    )
