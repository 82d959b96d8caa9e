"""gradient_moments against the per-sample reference: per-coordinate mean and second moment, both routes."""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.measure import (
    GradientMoments,
    flatten_per_sample,
    gradient_moments,
    gradient_statistics,
    gradient_statistics_from_norms,
    mean_gsnr,
    per_sample_gradients,
)
from tests.measure.conftest import is_actor_param, pg_loss, sb3_pg_loss
from tests.measure.test_sq_norms import SequenceNet, ShortSequenceNet


def reference_moments(module, loss_fn, inputs, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean of squares of the materialized ``vmap`` per-sample gradients ``[N, P]``."""
    g = flatten_per_sample(per_sample_gradients(module, loss_fn, inputs, **kwargs)).double()
    return g.mean(0), g.square().mean(0)


def autograd_loop_moments(module, loss_fn, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from one ordinary ``autograd.grad`` per sample (no torch.func at all)."""
    named = sorted(dict(module.named_parameters()).items())
    rows = []
    for i in range(inputs[0].shape[0]):
        grads = torch.autograd.grad(loss_fn(module, *(x[i : i + 1] for x in inputs)), [p for _, p in named])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    g = torch.stack(rows).double()
    return g.mean(0), g.square().mean(0)


@pytest.mark.parametrize("method", ["norms", "vmap"])
def test_matches_per_sample_reference_on_gaussian_mlp(gaussian_batch, method):
    policy, inputs = gaussian_batch
    moments = gradient_moments(policy, pg_loss, inputs, method=method)
    mean, second = autograd_loop_moments(policy, pg_loss, inputs)
    assert moments.n == inputs[0].shape[0]
    torch.testing.assert_close(moments.mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(moments.second_moment, second, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("net_cls", [SequenceNet, ShortSequenceNet])
def test_multi_row_layers_match_vmap(net_cls):
    torch.manual_seed(3)
    net = net_cls().double()
    inputs = (torch.randn(7, *net_cls.input_shape, dtype=torch.float64), torch.randn(7, dtype=torch.float64))

    def loss_fn(m, xb, yb):
        return ((m(xb) - yb) ** 2).sum()

    mean, second = reference_moments(net, loss_fn, inputs)
    moments = gradient_moments(net, loss_fn, inputs, chunk_size=3)
    torch.testing.assert_close(moments.mean, mean, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(moments.second_moment, second, rtol=1e-11, atol=1e-14)


def test_sb3_policy_float32(sb3_batch):
    policy, inputs = sb3_batch
    mean, second = reference_moments(policy, sb3_pg_loss, inputs, params=is_actor_param)
    for method in ("norms", "vmap"):
        moments = gradient_moments(policy, sb3_pg_loss, inputs, params=is_actor_param, method=method)
        torch.testing.assert_close(moments.mean, mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(moments.second_moment, second, rtol=1e-5, atol=1e-7)


def test_statistics_and_gsnr_agree_with_the_other_routes(gaussian_batch):
    policy, inputs = gaussian_batch
    moments = gradient_moments(policy, pg_loss, inputs)
    stats = moments.statistics()
    g = per_sample_gradients(policy, pg_loss, inputs)
    full = gradient_statistics(g)
    norms = gradient_statistics_from_norms(policy, pg_loss, inputs)
    assert math.isclose(stats.covariance_trace, full.covariance_trace, rel_tol=1e-10)
    assert math.isclose(stats.covariance_trace, norms.covariance_trace, rel_tol=1e-12)
    assert math.isclose(stats.snr, full.snr, rel_tol=1e-10)
    assert math.isclose(moments.mean_gsnr(), mean_gsnr(g), rel_tol=1e-10)
    assert math.isclose(moments.mean_gsnr(epsilon=0.0), mean_gsnr(g, epsilon=0.0), rel_tol=1e-10)
    assert moments.per_coordinate_gsnr().shape == full.mean.shape


def test_chunked_equals_unchunked(gaussian_batch):
    policy, inputs = gaussian_batch
    whole = gradient_moments(policy, pg_loss, inputs)
    for method in ("norms", "vmap"):
        parts = gradient_moments(policy, pg_loss, inputs, method=method, chunk_size=5)
        torch.testing.assert_close(parts.second_moment, whole.second_moment, rtol=1e-12, atol=1e-15)


def test_known_values_and_bad_input():
    net = torch.nn.Linear(1, 1, bias=False).double()
    net.weight.data.fill_(0.0)
    x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    moments = gradient_moments(net, lambda m, xb: m(xb).sum(), x)  # G_i = x_i
    assert isinstance(moments, GradientMoments)
    torch.testing.assert_close(moments.mean, torch.tensor([7 / 3], dtype=torch.float64))
    torch.testing.assert_close(moments.second_moment, torch.tensor([7.0], dtype=torch.float64))
    assert math.isclose(moments.statistics().covariance_trace, 7 / 3, rel_tol=1e-12)  # torch.var(x)
    with pytest.raises(ValueError, match="method must be one of 'norms', 'vmap'; got 'backpack'"):
        gradient_moments(net, lambda m, xb: m(xb).sum(), x, method="backpack")
    with pytest.raises(ValueError, match="N = 2"):
        gradient_moments(net, lambda m, xb: m(xb).sum(), x[:1]).statistics()
