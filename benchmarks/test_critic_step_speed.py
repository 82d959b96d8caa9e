"""One Q-Prop critic TD step (HalfCheetah sizes: 17 + 6 inputs, 100x100 ReLU, batch 64, fused Adam, polyak):
written out by hand (``pgvar.algos._critic_step``) against ``autograd.grad`` + ``optimizer.step()``, same run.

Full run: ``python -m pytest benchmarks/test_critic_step_speed.py --benchmark-enable -s`` (min CPU time over
interleaved blocks of 256 steps, one torch thread; prints the ratio). Smoke mode (benchmarks disabled, the default
of the test command): a few steps, no assertion on the ratio. Both paths end bit for bit equal. Target: the hand
path is faster (ratio < 1); it is what brings QPropTRPO under 2x TRPO per environment step (issue 5).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from stable_baselines3.common.torch_layers import create_mlp
from torch import nn

from pgvar.algos._critic_step import AdamStep, mlp_forward, mlp_mse_gradients, plain_mlp

IN_DIM, BATCH, TAU, GAMMA = 17 + 6, 64, 1e-3, 0.99


def _critic() -> tuple[nn.Sequential, nn.Sequential, torch.optim.Adam]:
    torch.manual_seed(0)
    head = nn.Sequential(*create_mlp(IN_DIM, 1, [100, 100], nn.ReLU))
    target = copy.deepcopy(head).requires_grad_(False)
    return head, target, torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)


def _stepper(by_hand: bool, n_steps: int) -> tuple[Callable[[], None], nn.Sequential, nn.Sequential]:
    head, target, optimizer = _critic()
    params, target_params = list(head.parameters()), list(target.parameters())
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(n_steps, BATCH, IN_DIM, generator=generator)
    next_inputs = torch.randn(n_steps, BATCH, IN_DIM, generator=generator)
    rewards = torch.randn(n_steps, BATCH, 1, generator=generator)
    discounts = torch.full((BATCH, 1), GAMMA)
    layers, target_layers = plain_mlp(head), plain_mlp(target)
    assert layers is not None and target_layers is not None
    adam_step = AdamStep(optimizer, params)

    def run() -> None:
        for index in range(n_steps):
            if by_hand:
                targets = torch.addcmul(rewards[index], discounts, mlp_forward(target_layers, next_inputs[index]))
                _, grads = mlp_mse_gradients(layers, inputs[index], targets)
                adam_step(grads)
            else:
                with torch.no_grad():
                    targets = torch.addcmul(rewards[index], discounts, target(next_inputs[index]))
                loss = F.mse_loss(head(inputs[index]), targets)
                for param, grad in zip(params, torch.autograd.grad(loss, params)):
                    param.grad = grad
                optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(target_params, params, TAU)

    return run, head, target


def test_critic_step_by_hand_vs_autograd(benchmark, smoke):
    n_steps, blocks = (4, 1) if smoke else (256, 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {name: _stepper(name == "by_hand", n_steps) for name in ("by_hand", "autograd")}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(blocks):  # interleaved blocks, so that load from other processes hits both alike
            for name, (run, _, _) in runs.items():
                start = time.process_time()
                run()
                best[name] = min(best[name], time.process_time() - start)
        for a, b in zip(runs["by_hand"][1].parameters(), runs["autograd"][1].parameters()):
            assert torch.equal(a, b)  # the same steps, bit for bit
        for a, b in zip(runs["by_hand"][2].parameters(), runs["autograd"][2].parameters()):
            assert torch.equal(a, b)
        benchmark.pedantic(runs["by_hand"][0], rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    by_hand_ms, autograd_ms = (best[name] / n_steps * 1e3 for name in ("by_hand", "autograd"))
    ratio = by_hand_ms / autograd_ms
    benchmark.extra_info.update(by_hand_ms=by_hand_ms, autograd_ms=autograd_ms, ratio=ratio, smoke=smoke)
    print(
        f"\nQ-Prop critic TD step ({IN_DIM}-100-100-1 ReLU, batch {BATCH}, fused Adam, polyak; min CPU time of "
        f"{blocks} blocks of {n_steps} steps, 1 thread, torch {torch.__version__}): by hand {by_hand_ms:.3f} ms, "
        f"autograd + optimizer.step() {autograd_ms:.3f} ms, ratio {ratio:.3f}"
    )
    if not smoke:
        assert ratio < 1.0, f"the hand-written critic step is not faster than autograd: ratio {ratio:.3f}"
