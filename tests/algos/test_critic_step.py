"""The hand-written critic TD step (``pgvar.algos._critic_step``) against autograd and ``torch.optim.Adam.step``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from stable_baselines3.common.torch_layers import create_mlp
from torch import nn

from pgvar import QPropPPO, QPropTRPO
from pgvar.algos._critic_step import (
    AdamStep,
    mlp_forward,
    mlp_mse_gradients,
    plain_mlp,
    polyak_update,
    td_targets,
)


def make_head(in_dim: int, out_dim: int, arch: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*create_mlp(in_dim, out_dim, arch, nn.ReLU))


@pytest.mark.parametrize("arch", [[], [7], [100, 100], [5, 6, 4]])
@pytest.mark.parametrize("n_actions", [None, 3])
def test_gradients_equal_autograd(arch, n_actions):
    head = make_head(9, n_actions or 1, arch)
    layers = plain_mlp(head)
    assert layers is not None and len(layers) == len(arch) + 1
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 9, generator=generator)
    targets = torch.randn(64, 1, generator=generator)
    taken = None if n_actions is None else torch.randint(n_actions, (64, 1), generator=generator)
    q = head(inputs) if taken is None else head(inputs).gather(1, taken)
    loss = F.mse_loss(q, targets)
    expected = torch.autograd.grad(loss, list(head.parameters()))
    got_loss, got = mlp_mse_gradients(layers, inputs, targets, taken)
    torch.testing.assert_close(got_loss, loss.detach(), rtol=0, atol=0)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(mlp_forward(layers, inputs), head(inputs), rtol=0, atol=0)


def test_gradients_equal_finite_differences():
    head = make_head(4, 1, [6, 5]).double()
    layers = plain_mlp(head)
    assert layers is not None
    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(16, 4, generator=generator).double(), torch.randn(16, 1, generator=generator).double()
    _, grads = mlp_mse_gradients(layers, inputs, targets)
    for param, grad in zip(head.parameters(), grads):
        flat, eps = param.data.view(-1), 1e-6
        for index in range(0, flat.numel(), max(1, flat.numel() // 7)):
            original = flat[index].item()
            flat[index] = original + eps
            up = F.mse_loss(head(inputs), targets).item()
            flat[index] = original - eps
            down = F.mse_loss(head(inputs), targets).item()
            flat[index] = original
            assert grad.reshape(-1)[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(3, 1),  # not a Sequential
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1, bias=False)),
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.ReLU()),  # ends in an activation
        nn.Sequential(),
    ],
)
def test_other_heads_are_not_matched(module):
    assert plain_mlp(module) is None


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_equals_optimizer_step(weight_decay):
    head = make_head(5, 1, [8, 8])
    reference = copy.deepcopy(head)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=weight_decay, fused=True)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=weight_decay, fused=True)
    params = list(head.parameters())
    step = AdamStep(optimizer, params)
    assert step.fusable and not step.functional  # no state yet: the first call goes through step()
    generator = torch.Generator().manual_seed(0)
    for index in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        if index == 3:  # a schedule: the next calls read the group's new learning rate
            for group in (*optimizer.param_groups, *ref_optimizer.param_groups):
                group["lr"] = 3e-3
        step(grads)
        assert step.functional
        for param, grad in zip(reference.parameters(), grads):
            param.grad = grad
        ref_optimizer.step()
        for a, b in zip(params, reference.parameters()):
            assert torch.equal(a, b)
    for (key, state), (ref_key, ref_state) in zip(
        optimizer.state_dict()["state"].items(), ref_optimizer.state_dict()["state"].items()
    ):
        assert key == ref_key and state.keys() == ref_state.keys()
        for name in state:
            assert torch.equal(state[name], ref_state[name]), name
    assert AdamStep(optimizer, params).functional  # state exists: functional from the first call


def test_adam_step_falls_back():
    head = make_head(5, 1, [4])
    params = list(head.parameters())
    assert not AdamStep(torch.optim.Adam(params), params).fusable  # not fused
    assert not AdamStep(torch.optim.SGD(params, lr=0.1), params).fusable
    assert not AdamStep(torch.optim.Adam(params, fused=True, amsgrad=True), params).fusable
    assert not AdamStep(torch.optim.Adam(params, fused=True), params[:2]).fusable  # not the group's parameters
    sgd = torch.optim.SGD(params, lr=0.5)
    before = [p.detach().clone() for p in params]
    grads = [torch.ones_like(p) for p in params]
    AdamStep(sgd, params)(grads)
    for b, p in zip(before, params):
        torch.testing.assert_close(p.detach(), b - 0.5)
    # An unused parameter (None gradient) goes through step(), which skips it.
    optimizer = torch.optim.Adam(params, lr=0.1, fused=True)
    step = AdamStep(optimizer, params)
    step([torch.ones_like(p) for p in params])
    frozen = params[0].detach().clone()
    step([None, *[torch.ones_like(p) for p in params[1:]]])
    assert torch.equal(params[0], frozen)


@pytest.mark.parametrize(("cls", "env_id"), [(QPropTRPO, "Pendulum-v1"), (QPropPPO, "CartPole-v1")])
def test_training_by_hand_follows_the_autograd_path(make_short_env, cls, env_id):
    """Two models from the same seed, one taking the TD steps by hand, the other through autograd and step(),
    end bit for bit equal (critic, target, policy, optimizer steps)."""
    models = []
    for by_hand in (True, False):
        model = cls("MlpPolicy", make_short_env(env_id, 2, 10), n_steps=32, batch_size=32, seed=0, qprop_warmup_steps=64,
                    qprop_critic_batch_size=16, policy_kwargs={"net_arch": [16]},
                    qprop_critic_net_arch=[32, 32])  # fmt: skip
        assert model.qprop_critic.by_hand is True
        if not by_hand:
            model.qprop_critic = model._make_qprop_critic(by_hand=False)  # the autograd path, same seed
            assert model.qprop_critic.by_hand is False
        else:
            initial = [p.detach().clone() for p in model.critic.parameters()]
        model.learn(3 * 32 * 2)
        assert model.critic_n_updates == 3 * 32 * 2
        models.append(model)
    by_hand, reference = models
    for a, b in zip(by_hand.critic.parameters(), reference.critic.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(by_hand.critic_target.parameters(), reference.critic_target.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(by_hand.policy.parameters(), reference.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = [s["step"] for s in by_hand.critic.optimizer.state_dict()["state"].values()]
    assert all(float(s) == 3 * 32 * 2 for s in steps)
    moved = [not torch.equal(a, b) for a, b in zip(by_hand.critic.parameters(), initial)]
    assert all(moved)  # the critic really trained


@pytest.mark.parametrize("discrete", [False, True])
def test_td_targets_is_the_ddpg_target(discrete):
    """y = r + gamma (1 - terminated) Q'(s', mu(s')) (Box) or r + gamma (1 - terminated) sum_a' pi(a'|s') Q'(s', a')."""
    generator = torch.Generator().manual_seed(2)
    rewards, terminated = torch.randn(6, 1, generator=generator), torch.tensor([[0.0], [1.0], [0.0], [0.0], [1.0], [0.0]])
    next_q = torch.randn(6, 3 if discrete else 1, generator=generator)
    probs = torch.softmax(torch.randn(6, 3, generator=generator), dim=1) if discrete else None
    got = td_targets(rewards, 0.9 * (1 - terminated), next_q, probs)
    expected = []
    for row in range(6):
        value = sum(probs[row, a] * next_q[row, a] for a in range(3)) if discrete else next_q[row, 0]
        expected.append(rewards[row, 0] + (0.0 if terminated[row, 0] else 0.9 * value))
    torch.testing.assert_close(got, torch.stack(expected).reshape(6, 1))
    assert torch.equal(got[terminated.bool()], rewards[terminated.bool()])  # terminations do not bootstrap


def test_polyak_update_moves_the_target_and_copies_batch_norm_statistics():
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.fill_(2.0)
        online.running_mean.fill_(5.0)
    stats = [online.state_dict()[n] for n in ("running_mean", "running_var")]
    target_stats = [target.state_dict()[n] for n in ("running_mean", "running_var")]
    polyak_update(list(target.parameters()), list(online.parameters()), 0.25, target_stats, stats)
    torch.testing.assert_close(target.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 2.0))
    torch.testing.assert_close(target.running_mean, torch.full((3,), 5.0))  # copied, not averaged
    assert all(not p.requires_grad or p.grad is None for p in target.parameters())
