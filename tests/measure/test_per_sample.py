"""per_sample_gradients against a Python loop of single-sample backward calls, and the flat views."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pgvar.measure import (
    flat_names,
    flatten,
    flatten_per_sample,
    per_sample_gradients,
    unflatten,
)
from tests.measure.conftest import GaussianMLP, is_actor_param, pg_loss, sb3_pg_loss


def loop_gradients(module: nn.Module, loss_fn, inputs, names=None) -> dict[str, torch.Tensor]:
    """Reference twin: one ordinary backward per sample, on a batch of one."""
    named = dict(module.named_parameters())
    names = list(named) if names is None else list(names)
    rows = []
    for i in range(inputs[0].shape[0]):
        loss = loss_fn(module, *(x[i : i + 1] for x in inputs))
        grads = torch.autograd.grad(loss, [named[n] for n in names], allow_unused=True)
        rows.append([torch.zeros_like(named[n]) if g is None else g for n, g in zip(names, grads)])
    return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}


def test_module_style_equals_loop_float64(gaussian_batch):
    policy, inputs = gaussian_batch
    got = per_sample_gradients(policy, pg_loss, inputs)
    want = loop_gradients(policy, pg_loss, inputs)
    assert list(got) == list(want)  # keyed by name, in named_parameters order (log_std first)
    for name in want:
        assert got[name].shape == (inputs[0].shape[0], *dict(policy.named_parameters())[name].shape)
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_functional_style_equals_loop_float64(gaussian_batch):
    policy, inputs = gaussian_batch
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def fn(p, obs, act, adv):  # one sample, no batch dimension
        return -functional_call(policy, p, (obs, act)) * adv

    got = per_sample_gradients(fn, params, inputs)
    want = loop_gradients(policy, pg_loss, inputs)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_mean_equals_one_batched_backward(gaussian_batch):
    policy, inputs = gaussian_batch
    n = inputs[0].shape[0]
    got = per_sample_gradients(policy, pg_loss, inputs)
    named = dict(policy.named_parameters())
    batched = torch.autograd.grad(pg_loss(policy, *inputs) / n, list(named.values()))
    for name, g in zip(named, batched):
        torch.testing.assert_close(got[name].mean(0), g, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "chunking", [{"chunk_size": 1}, {"chunk_size": 5}, {"chunk_size": 100}, {"max_memory_bytes": 3000}]
)
def test_chunked_equals_unchunked(gaussian_batch, chunking):
    policy, inputs = gaussian_batch
    whole = per_sample_gradients(policy, pg_loss, inputs)
    chunked = per_sample_gradients(policy, pg_loss, inputs, **chunking)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0, atol=1e-14)


def test_param_selectors_hold_the_rest_fixed(gaussian_batch):
    policy, inputs = gaussian_batch
    full = per_sample_gradients(policy, pg_loss, inputs)
    by_names = per_sample_gradients(policy, pg_loss, inputs, params=["head.weight", "log_std"])
    by_predicate = per_sample_gradients(policy, pg_loss, inputs, params=lambda name: name.startswith("body."))
    by_string = per_sample_gradients(policy, pg_loss, inputs, params="head.bias")
    assert set(by_names) == {"head.weight", "log_std"}
    assert set(by_predicate) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
    assert set(by_string) == {"head.bias"}
    for part in (by_names, by_predicate, by_string):
        for name, value in part.items():
            torch.testing.assert_close(value, full[name], rtol=1e-12, atol=1e-13)


def test_frozen_parameters_are_skipped_by_default_and_module_untouched(gaussian_batch):
    policy, inputs = gaussian_batch
    policy.log_std.requires_grad_(False)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    got = per_sample_gradients(policy, pg_loss, inputs)
    assert "log_std" not in got
    assert all(p.grad is None for p in policy.parameters())
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k])
    # naming a frozen parameter explicitly still differentiates it
    assert "log_std" in per_sample_gradients(policy, pg_loss, inputs, params=["log_std"])


def test_sb3_policy_equals_loop(sb3_batch):
    policy, (obs, act, adv) = sb3_batch
    inputs = (obs[:10], act[:10], adv[:10])
    got = per_sample_gradients(policy, sb3_pg_loss, inputs, params=is_actor_param)
    names = [n for n, _ in policy.named_parameters() if is_actor_param(n)]
    want = loop_gradients(policy, sb3_pg_loss, inputs, names)
    assert set(got) == set(names)
    for name in names:
        scale = want[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[name] / scale, want[name] / scale, rtol=0, atol=2e-6)


def test_flatten_uses_sorted_names_not_position():
    grads = {"log_std": torch.tensor([9.0]), "b.weight": torch.tensor([[1.0, 2.0]]), "a": torch.tensor(3.0)}
    assert flat_names(grads) == ["a", "b.weight", "log_std"]
    torch.testing.assert_close(flatten(grads), torch.tensor([3.0, 1.0, 2.0, 9.0]))
    reordered = dict(reversed(list(grads.items())))
    torch.testing.assert_close(flatten(reordered), flatten(grads))


def test_flatten_per_sample_rows_are_flatten_of_each_sample_and_unflatten_inverts(gaussian_batch):
    policy, inputs = gaussian_batch
    grads = per_sample_gradients(policy, pg_loss, inputs)
    matrix = flatten_per_sample(grads)
    p = sum(v.numel() for v in policy.parameters())
    assert matrix.shape == (inputs[0].shape[0], p)
    for i in range(matrix.shape[0]):
        torch.testing.assert_close(matrix[i], flatten({k: v[i] for k, v in grads.items()}), rtol=0, atol=0)
    back = unflatten(matrix, dict(policy.named_parameters()))
    for name in grads:
        assert torch.equal(back[name], grads[name])
    single = unflatten(matrix[3], {k: v.shape[1:] for k, v in grads.items()})
    for name in grads:
        assert torch.equal(single[name], grads[name][3])


# ------------------------------------------------------------------------------------------------ errors
def test_empty_batch_is_rejected(gaussian_batch):
    policy, (obs, act, adv) = gaussian_batch
    with pytest.raises(ValueError, match=r"inputs must have a batch size N >= 1"):
        per_sample_gradients(policy, pg_loss, (obs[:0], act[:0], adv[:0]))


def test_mismatched_batch_sizes_are_rejected(gaussian_batch):
    policy, (obs, act, adv) = gaussian_batch
    with pytest.raises(
        ValueError, match=r"inputs must share the batch size: inputs\[0\] has N = 12 but inputs\[2\] has 11"
    ):
        per_sample_gradients(policy, pg_loss, (obs, act, adv[:11]))


def test_unknown_param_names_are_rejected_listing_allowed(gaussian_batch):
    policy, inputs = gaussian_batch
    with pytest.raises(
        ValueError, match=r"params has unknown parameter names \['nope'\]; allowed names: \['log_std'"
    ):
        per_sample_gradients(policy, pg_loss, inputs, params=["head.weight", "nope"])
    with pytest.raises(ValueError, match=r"params selects no parameter"):
        per_sample_gradients(policy, pg_loss, inputs, params=lambda name: False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, r"chunk_size must be an integer > 0, got 0"),
        ({"chunk_size": 2.5}, r"chunk_size must be an integer > 0, got 2.5"),
        ({"max_memory_bytes": -1}, r"max_memory_bytes must be a number > 0, got -1"),
    ],
)
def test_bad_chunking_is_rejected(gaussian_batch, kwargs, message):
    policy, inputs = gaussian_batch
    with pytest.raises(ValueError, match=message):
        per_sample_gradients(policy, pg_loss, inputs, **kwargs)


def test_call_style_mismatches_are_rejected(gaussian_batch):
    policy, inputs = gaussian_batch
    params = {k: v.detach() for k, v in policy.named_parameters()}
    with pytest.raises(ValueError, match=r"second argument must be loss_fn"):
        per_sample_gradients(policy, params, inputs)
    with pytest.raises(ValueError, match=r"only for the module call style"):
        per_sample_gradients(lambda p, *x: p["log_std"].sum(), params, inputs, params=["log_std"])
    with pytest.raises(ValueError, match=r"second argument must be a dict name -> tensor"):
        per_sample_gradients(lambda p, *x: p["log_std"].sum(), pg_loss, inputs)
    with pytest.raises(ValueError, match=r"inputs\[1\] must be a torch.Tensor"):
        per_sample_gradients(policy, pg_loss, (inputs[0], [1, 2]))


def test_flat_views_reject_bad_input():
    with pytest.raises(ValueError, match=r"grads must be a non-empty dict"):
        flatten({})
    with pytest.raises(ValueError, match=r"same N"):
        flatten_per_sample({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"vector must have shape \[P\] or \[N, P\] with P = 3"):
        unflatten(torch.zeros(4), {"a": (3,)})


def test_gaussian_mlp_lists_log_std_first():
    # the fixture mimics SB3's parameter order, which is what makes name-keyed results necessary
    assert next(iter(dict(GaussianMLP().named_parameters()))) == "log_std"


def test_non_scalar_loss_is_rejected_in_both_call_styles(gaussian_batch):
    policy, inputs = gaussian_batch
    params = {k: v.detach() for k, v in policy.named_parameters()}
    with pytest.raises(
        ValueError,
        match=r"loss_fn must return a scalar \(0-dim\) tensor per sample, got a tensor of shape \(1,\)",
    ):
        per_sample_gradients(policy, lambda m, o, a, A: m.log_prob(o, a) * A, inputs)
    with pytest.raises(
        ValueError, match=r"fn must return a scalar \(0-dim\) tensor per sample, got a tensor of shape \(2,\)"
    ):
        per_sample_gradients(lambda p, o, a, A: p["log_std"] * A, params, inputs)
