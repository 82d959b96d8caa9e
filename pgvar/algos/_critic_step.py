"""The pieces of one TD step of Q-Prop's off-policy critic: the target, a cheaper step with the same arithmetic
as autograd and ``Adam.step``, and the soft target update.

Q-Prop takes one critic gradient step per environment step on a minibatch of 64 transitions through a 100x100
MLP (Gu et al. 2017, the official defaults). At that size a CPU spends more time in bookkeeping than in arithmetic:
building and walking the autograd graph, and ``Optimizer.step``'s per-call work (hooks, profiler ranges, the
per-parameter state gathering of ``_init_group``). This module removes both for the default critic:

- :func:`plain_mlp` recognizes a head that is an ``nn.Sequential`` of ``nn.Linear`` layers (with bias) separated
  by ``nn.ReLU`` (what SB3's ``create_mlp`` builds for ``ContinuousCritic`` and ``QNetwork``);
- :func:`mlp_forward` and :func:`mlp_mse_gradients` run its forward pass and the backward pass of the MSE loss by
  hand (the chain rule written out: ``dW = delta^T h``, ``db = sum delta``, ``delta <- (delta W) * [h > 0]``);
- :class:`AdamStep` calls the functional ``torch.optim.adam.adam`` on the optimizer's own state, with the
  hyperparameters of its parameter group, so ``optimizer.state_dict()`` (and with it save/load and resuming)
  is exactly what ``optimizer.step()`` would leave.

Both the hand path and the autograd path (:class:`pgvar.algos.qprop_critic.QPropCritic` chooses one when it is
built) compute their regression targets with :func:`td_targets` and move the target critic with
:func:`polyak_update`.

A head of any other structure (another activation, batch norm, dropout) or a features extractor with weights
is not matched, and the caller takes the autograd path for the gradients; an optimizer that is not a fused Adam
gets them through ``param.grad`` and its own ``step()``. The caller uses this on CPU only (where it is tested and
where the bookkeeping dominates). ``tests/algos/test_critic_step.py``
checks that the gradients equal autograd's bit for bit, and that training with them equals training with
``autograd.grad`` + ``optimizer.step()`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch as th
from stable_baselines3.common.utils import polyak_update as sb3_polyak_update
from torch import nn
from torch.optim.adam import adam as functional_adam

__all__ = ["AdamStep", "mlp_forward", "mlp_mse_gradients", "plain_mlp", "polyak_update", "td_targets"]

#: ``(weight, bias)`` of each linear layer, input to output.
Layers = Sequence[tuple[th.Tensor, th.Tensor]]


def td_targets(
    rewards: th.Tensor, discounts: th.Tensor, next_q: th.Tensor, next_probs: th.Tensor | None = None
) -> th.Tensor:
    """DDPG-style TD targets of the critic, ``[B, 1]`` (Gu et al. 2017, arXiv:1611.02247, Eq. 13).

    .. math::

        y = r + \\gamma (1 - \\text{terminated})\\, Q_{w'}(s', \\mu_\\theta(s'))
        \\quad\\text{(Box)}, \\qquad
        y = r + \\gamma (1 - \\text{terminated}) \\sum_{a'} \\pi_\\theta(a'|s')\\, Q_{w'}(s', a')
        \\quad\\text{(Discrete)}.

    No gradient flows through the result when ``next_q`` has none (the target critic's parameters do not require
    gradients). A time-limit truncation bootstraps: SB3's replay buffer stores ``done * (1 - truncated)``.

    :param rewards: ``[B, 1]`` environment rewards
    :param discounts: ``[B, 1]``, ``gamma * (1 - terminated)``
    :param next_q: ``[B, 1]`` target critic at ``(s', mu(s'))`` (Box), or ``[B, n]`` over all actions (Discrete)
    :param next_probs: ``[B, n]`` policy probabilities at ``s'`` (Discrete), None for Box
    :return: ``[B, 1]``

    >>> td_targets(th.tensor([[1.0], [2.0]]), th.tensor([[0.5], [0.0]]), th.tensor([[4.0], [4.0]]))
    tensor([[3.],
            [2.]])
    """
    if next_probs is not None:
        next_q = (next_probs * next_q).sum(dim=1, keepdim=True)
    return th.addcmul(rewards, discounts, next_q)


def polyak_update(
    target_params: list[th.Tensor],
    params: list[th.Tensor],
    tau: float,
    target_stats: Sequence[th.Tensor] = (),
    stats: Sequence[th.Tensor] = (),
) -> None:
    """The soft target update ``w' <- (1 - tau) w' + tau w`` in one multi-tensor call (in place, no gradient).

    Batch-norm running statistics (``stats``) are copied, as SB3's off-policy algorithms do (polyak with 1.0).

    :param target_params: the target critic's parameters
    :param params: the critic's parameters, in the same order
    :param tau: the update rate, in ``(0, 1]``
    :param target_stats: the target critic's batch-norm running statistics (empty without batch norm)
    :param stats: the critic's, in the same order
    """
    with th.no_grad():
        th._foreach_lerp_(target_params, params, tau)
    if stats:
        sb3_polyak_update(stats, target_stats, 1.0)


def plain_mlp(module: nn.Module) -> list[tuple[th.Tensor, th.Tensor]] | None:
    """The ``(weight, bias)`` pairs of ``module`` if it is ``Linear (ReLU Linear)*`` as an ``nn.Sequential``, else None.

    :param module: a critic's head (``ContinuousCritic.q_networks[0]`` or ``QNetwork.q_net``)
    :return: the layers, input to output, in the order of ``module.parameters()`` when flattened; None when the
        module has any other structure (then use autograd)
    """
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        return None
    children = list(module)
    linears = children[0::2]
    activations = children[1::2]
    if len(linears) != len(activations) + 1:
        return None
    if not all(type(layer) is nn.Linear and layer.bias is not None for layer in linears):
        return None
    if not all(type(layer) is nn.ReLU for layer in activations):
        return None
    return [(layer.weight, layer.bias) for layer in linears]  # type: ignore[misc]


def mlp_forward(layers: Layers, inputs: th.Tensor) -> th.Tensor:
    """``W_L relu(... relu(W_1 x + b_1) ...) + b_L`` without autograd, ``[B, out]``.

    :param layers: from :func:`plain_mlp`
    :param inputs: ``[B, in]``
    """
    with th.no_grad():
        hidden = inputs
        for weight, bias in layers[:-1]:
            hidden = th.addmm(bias, hidden, weight.t()).relu_()
        weight, bias = layers[-1]
        return th.addmm(bias, hidden, weight.t())


def mlp_mse_gradients(
    layers: Layers, inputs: th.Tensor, targets: th.Tensor, taken: th.Tensor | None = None
) -> tuple[th.Tensor, list[th.Tensor]]:
    """The MSE ``mean((q - y)^2)`` and its gradient with respect to every weight and bias, by the chain rule.

    ``q = mlp(x)`` (``[B, 1]``), or ``q = mlp(x).gather(1, taken)`` for a Q-network over all actions. With
    ``delta_L = 2 (q - y) / B`` (scattered into the taken actions' columns), each layer from the output down gives
    ``dW_l = delta_l^T h_{l-1}``, ``db_l = sum_rows delta_l`` and ``delta_{l-1} = (delta_l W_l) * [h_{l-1} > 0]``,
    the same products autograd's ``addmm`` and ``threshold_backward`` take.

    :param layers: from :func:`plain_mlp`
    :param inputs: ``[B, in]``, no gradient needed
    :param targets: ``[B, 1]``
    :param taken: ``[B, 1]`` integer column of each row's action, or None when the output is already ``[B, 1]``
    :return: the loss (0-dim, detached) and the gradients as ``[dW_1, db_1, ..., dW_L, db_L]``
    """
    with th.no_grad():
        hiddens = [inputs]
        for weight, bias in layers[:-1]:
            hiddens.append(th.addmm(bias, hiddens[-1], weight.t()).relu_())
        weight, bias = layers[-1]
        outputs = th.addmm(bias, hiddens[-1], weight.t())
        q = outputs if taken is None else outputs.gather(1, taken)
        error = q.sub_(targets) if taken is None else q - targets
        loss = error.square().mean()
        error.mul_(2.0 / error.numel())
        delta = error if taken is None else th.zeros_like(outputs).scatter_(1, taken, error)
        grads: list[th.Tensor] = []
        for index in range(len(layers) - 1, -1, -1):
            weight, _ = layers[index]
            hidden = hiddens[index]
            grads.append(delta.sum(dim=0))
            grads.append(delta.t().mm(hidden))
            if index > 0:
                # ReLU's backward as autograd takes it (a boolean mask costs 4x more on a CPU at this size)
                delta = th.ops.aten.threshold_backward(delta.mm(weight), hidden, 0)
        grads.reverse()
        return loss, grads


class AdamStep:
    """Steps of a critic's optimizer with given gradients: the functional fused Adam on the optimizer's own state
    when it can, else ``param.grad = grad`` and ``optimizer.step()``.

    The functional path is taken for a ``torch.optim.Adam`` with one parameter group holding exactly ``params``,
    ``fused=True`` and no amsgrad / maximize / differentiable / capturable, once its state exists (until then calls
    go through ``optimizer.step()``, which creates it). Every call reads ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` from the group, so changing them (a schedule) works as with ``step()``, and it updates the
    same state tensors, so ``optimizer.state_dict()`` is what ``step()`` would leave.

    :param optimizer: the critic's optimizer
    :param params: the parameters, in the order of the optimizer's group
    """

    def __init__(self, optimizer: th.optim.Optimizer, params: list[th.Tensor]) -> None:
        self.optimizer = optimizer
        self.params = params
        group = optimizer.param_groups[0] if len(optimizer.param_groups) == 1 else None
        self.group = group
        self.fusable = (
            type(optimizer) is th.optim.Adam
            and group is not None
            and bool(group["fused"])
            and not (group["amsgrad"] or group["maximize"] or group["differentiable"] or group["capturable"])
            and len(group["params"]) == len(params)
            and all(a is b for a, b in zip(group["params"], params))
        )
        self._state: tuple[list[th.Tensor], list[th.Tensor], list[th.Tensor]] | None = None
        self._bind_state()

    def _bind_state(self) -> None:
        """Hold the optimizer's state tensors when the functional path can be taken and the state exists."""
        if self.fusable and all(param in self.optimizer.state for param in self.params):
            states = [self.optimizer.state[param] for param in self.params]
            self._state = (
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [state["step"] for state in states],
            )

    @property
    def functional(self) -> bool:
        """Whether the next call takes the functional path (False: ``optimizer.step()``)."""
        return self._state is not None

    def __call__(self, grads: Sequence[th.Tensor | None]) -> None:
        """One optimizer step with ``grads`` (one per parameter; None for an unused one, which ``step()`` skips)."""
        if self._state is None or any(grad is None for grad in grads):
            for param, grad in zip(self.params, grads):
                param.grad = grad
            self.optimizer.step()
            for param in self.params:  # keep no stale gradients on the critic
                param.grad = None
            if self._state is None:
                self._bind_state()
            return
        group = self.group
        assert group is not None
        exp_avgs, exp_avg_sqs, steps = self._state
        beta1, beta2 = group["betas"]
        with th.no_grad():
            functional_adam(
                self.params,
                list(grads),  # type: ignore[arg-type]
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                fused=True,
                decoupled_weight_decay=group.get("decoupled_weight_decay", False),
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
