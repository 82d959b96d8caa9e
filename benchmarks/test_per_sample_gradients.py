"""Cost of per-sample gradient statistics on SB3's MLP policy, as a ratio to one batched backward.

Cases, on HalfCheetah-v5 data (see ``_data.py``) and the actor of SB3's default ``ActorCriticPolicy``
(pi=[64, 64], P = 5,708), loss ``-sum_i log pi(a_i|s_i) A_i`` through ``policy.evaluate_actions``:

- ``batched backward``: the reference, one ordinary forward + ``autograd.grad`` of the batch loss;
- ``norms-trick statistics``: :func:`pgvar.measure.gradient_statistics_from_norms` (trace, mean, SNR), target
  <= 2x the backward at N = 2048;
- ``vmap full per-sample tensor``: :func:`pgvar.measure.per_sample_gradients` (``[N, P]`` materialized),
  target <= 15x;
- ``streaming statistics``: :func:`pgvar.measure.gradient_statistics_streaming` (chunked vmap, float64
  accumulators), and at the largest N its peak extra memory in a fresh process (target < 0.5 GB at N = 32768,
  where the full tensor alone is 748 MB).

Beside the field's libraries, on a bare 17-64-64-6 tanh MLP (``nn.Sequential`` of ``nn.Linear``, the same
HalfCheetah data, the loss ``sum_i A_i ||a_i - mu(s_i)||^2 / 2``: a unit-variance Gaussian ``-A log pi`` up to a
constant), so that SB3's ``evaluate_actions`` does not hide the cost of the statistics; every row computes the
covariance trace and the mean gradient, and all rows must agree:

- ``bare MLP: batched backward``: the reference of these rows;
- ``bare MLP: pgvar norms route``: :func:`pgvar.measure.gradient_statistics_from_norms`;
- ``bare MLP: pgvar moments``: :func:`pgvar.measure.gradient_moments` (adds the per-coordinate second moment);
- ``bare MLP: pgvar vmap``: :func:`pgvar.measure.per_sample_gradients` (``[N, P]``) and its statistics;
- ``bare MLP: BackPACK BatchL2Grad``: the ``extend``-ed module, ``BatchL2Grad`` norms and ``.grad``;
- ``bare MLP: Opacus GradSampleModule``: ``grad_sample`` (``[N, P]``), ``loss_reduction="sum"``.

BackPACK (``backpack-for-pytorch``) and Opacus are the ``bench`` extra; their rows are skipped when the package is
not installed (CI does not install them).

Run: ``python -m pytest benchmarks/test_per_sample_gradients.py --benchmark-enable -s`` (full) or
``python -m pytest benchmarks -q`` (smoke). Speeds are reported, not asserted (the machine is shared); the memory
bound is asserted in the full run.
"""

from __future__ import annotations

import time
import warnings

import _data
import pytest
import torch
from torch import nn

RESULTS, THREADS = _data.RESULTS, _data.THREADS
ROUNDS = {2048: 30, 8192: 10, 32768: 3}
MEMORY_LIMIT_MB = 512.0


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def min_seconds(fn, repeats: int) -> tuple[float, float]:
    """``(min wall seconds, min CPU seconds of this process)`` of ``fn`` over ``repeats`` calls after a warm-up."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = _clocks()
        fn()
        w1, c1 = _clocks()
        wall, cpu = min(wall, w1 - w0), min(cpu, c1 - c0)
    return wall, cpu


def run_case(benchmark, smoke, case, n, fn, reference_fn, *, target=None, note=""):
    """Time ``fn`` with pytest-benchmark (once in smoke mode) and the reference just before; record the ratio.

    The ratio uses the CPU time of this process (``time.process_time``, one torch thread), which other processes
    on a shared machine disturb far less than wall time; the wall-time ratio is stored too.
    """
    reference_wall, reference_cpu = min_seconds(reference_fn, repeats=2 if smoke else 2 * ROUNDS.get(n, 3))
    walls: list[float] = []
    cpus: list[float] = []

    def timed():
        w0, c0 = _clocks()
        out = fn()
        w1, c1 = _clocks()
        walls.append(w1 - w0)
        cpus.append(c1 - c0)
        return out

    rounds = 1 if smoke else ROUNDS.get(n, 3)
    result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0 if smoke else 1)
    row = {
        "case": case,
        "n": n,
        "seconds": min(cpus),
        "reference_seconds": reference_cpu,
        "ratio": min(cpus) / reference_cpu,
        "wall_ratio": min(walls) / reference_wall,
        "target": target,
        "note": note,
    }
    benchmark.extra_info.update(
        {
            "ratio_to_batched_backward": row["ratio"],
            "wall_ratio_to_batched_backward": row["wall_ratio"],
            "batched_backward_cpu_seconds": reference_cpu,
            "n": n,
            "threads": THREADS,
        }
    )
    RESULTS.append(row)
    return result


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def inputs(halfcheetah, n_samples):
    return (
        halfcheetah["obs"][:n_samples],
        halfcheetah["actions"][:n_samples],
        halfcheetah["advantages"][:n_samples],
    )


def test_batched_backward(benchmark, smoke, policy, inputs, n_samples):
    backward = lambda: _data.route("backward", policy, inputs)  # noqa: E731
    run_case(benchmark, smoke, "batched backward (reference)", n_samples, backward, backward)


def test_norms_trick_statistics(benchmark, smoke, policy, inputs, n_samples):
    stats = run_case(
        benchmark,
        smoke,
        "norms-trick statistics",
        n_samples,
        lambda: _data.route("norms", policy, inputs),
        lambda: _data.route("backward", policy, inputs),
        target=2.0 if n_samples == 2048 else None,
    )
    assert stats.n == n_samples and stats.covariance_trace > 0
    RESULTS[-1]["note"] = (
        f"trace {stats.covariance_trace:.4g}, |mean| {stats.mean_norm:.4g}, SNR {stats.snr:.3f}"
    )


def test_vmap_full_per_sample_tensor(benchmark, smoke, policy, inputs, n_samples):
    grads = run_case(
        benchmark,
        smoke,
        "vmap full per-sample tensor",
        n_samples,
        lambda: _data.route("vmap", policy, inputs),
        lambda: _data.route("backward", policy, inputs),
        target=15.0,
    )
    assert sum(g[0].numel() for g in grads.values()) == 5708
    RESULTS[-1]["note"] = f"G = N x 5708 x 4 B = {n_samples * 5708 * 4 / 1e6:.1f} MB"


def test_streaming_statistics(benchmark, smoke, policy, inputs, n_samples):
    stats = run_case(
        benchmark,
        smoke,
        "streaming statistics (chunked)",
        n_samples,
        lambda: _data.route("streaming", policy, inputs),
        lambda: _data.route("backward", policy, inputs),
    )
    reference = _data.route("norms", policy, inputs)  # two exact routes: same numbers
    assert stats.covariance_trace == pytest.approx(reference.covariance_trace, rel=1e-4)


@pytest.mark.parametrize("route_name", ["streaming", "norms", "vmap"])
def test_peak_memory_at_largest_batch(halfcheetah, smoke, route_name):
    """Each route in its own fresh process (freed pages of one route would hide the next one's peak)."""
    if smoke and route_name != "streaming":
        pytest.skip(
            "smoke mode: only the streaming route's memory probe runs (a fresh process costs seconds)"
        )
    n = halfcheetah["obs"].shape[0]
    measured = _data.peak_rss_in_subprocess(route_name, n, threads=THREADS)
    note = {
        "streaming": f"target < {MEMORY_LIMIT_MB:.0f} MB",
        "norms": "O(N x width)",
        "vmap": f"holds G: {n * 5708 * 4 / 2**20:.0f} MB",
    }[route_name]
    RESULTS.append({"case": f"{route_name} route", **measured, "note": note})
    if route_name == "streaming" and not smoke:
        assert measured["extra_peak_mb"] < MEMORY_LIMIT_MB


# ------------------------------------------------------------------------ bare MLP, beside BackPACK and Opacus
def bare_mlp() -> nn.Sequential:
    """17-64-64-6 tanh MLP, seeded: every row gets a module with the same weights."""
    torch.manual_seed(_data.SEED)
    return nn.Sequential(nn.Linear(17, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 6))


def bare_loss(module: nn.Module, obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i ||a_i - mu(s_i)||^2 / 2``: ``-sum_i A_i log N(a_i; mu(s_i), I)`` up to a constant."""
    return (advantages * 0.5 * (module(obs) - actions).square().sum(-1)).sum()


def bare_route(name: str, module: nn.Module, inputs):
    """One bare-MLP route: ``(covariance trace, mean gradient [P])`` (statistics for all but the reference)."""
    from pgvar.measure import (
        flatten_per_sample,
        gradient_moments,
        gradient_statistics,
        gradient_statistics_from_norms,
        gradient_statistics_from_sq_norms,
        per_sample_gradients,
    )

    n = inputs[0].shape[0]
    if name == "backward":
        return torch.autograd.grad(bare_loss(module, *inputs) / n, list(module.parameters()))
    if name == "norms":
        return gradient_statistics_from_norms(module, bare_loss, inputs)
    if name == "moments":
        return gradient_moments(module, bare_loss, inputs).statistics()
    if name == "vmap":
        return gradient_statistics(per_sample_gradients(module, bare_loss, inputs))
    if name == "backpack":
        from backpack import backpack
        from backpack.extensions import BatchL2Grad

        loss = bare_loss(module, *inputs)
        with backpack(BatchL2Grad()):
            loss.backward()
        params = [p for _, p in sorted(module.named_parameters())]  # pgvar's flat order: sorted by name
        sq_norms = torch.stack([p.batch_l2 for p in params]).sum(0)
        mean = torch.cat([p.grad.reshape(-1) for p in params]) / n
        module.zero_grad(set_to_none=True)
        return gradient_statistics_from_sq_norms(sq_norms, mean)
    if name == "opacus":
        bare_loss(module, *inputs).backward()
        grads = {p_name: p.grad_sample for p_name, p in module.named_parameters()}
        module.zero_grad(set_to_none=True)  # also clears grad_sample
        return gradient_statistics(flatten_per_sample(grads))
    raise ValueError(f"route must be a bare-MLP route name, got {name!r}")


def _backpack_module() -> nn.Module:
    backpack = pytest.importorskip(
        "backpack", reason="BackPACK (backpack-for-pytorch, the bench extra) is not installed: row skipped"
    )
    return backpack.extend(bare_mlp())


def _opacus_module() -> nn.Module:
    opacus = pytest.importorskip("opacus", reason="Opacus (the bench extra) is not installed: row skipped")
    return opacus.GradSampleModule(bare_mlp(), loss_reduction="sum")


BARE_ROUTES = {
    "norms": ("bare MLP: pgvar norms route", bare_mlp),
    "moments": ("bare MLP: pgvar moments (+GSNR)", bare_mlp),
    "vmap": ("bare MLP: pgvar vmap", bare_mlp),
    "backpack": ("bare MLP: BackPACK BatchL2Grad", _backpack_module),
    "opacus": ("bare MLP: Opacus GradSampleModule", _opacus_module),
}


def test_bare_mlp_batched_backward(benchmark, smoke, inputs, n_samples):
    module = bare_mlp()
    backward = lambda: bare_route("backward", module, inputs)  # noqa: E731
    run_case(benchmark, smoke, "bare MLP: batched backward (ref.)", n_samples, backward, backward)


@pytest.mark.parametrize("route_name", list(BARE_ROUTES))
def test_bare_mlp_per_sample_statistics(benchmark, smoke, inputs, n_samples, route_name):
    case, make_module = BARE_ROUTES[route_name]
    module = make_module()
    reference = bare_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK's and Opacus's full-backward-hook warnings
        stats = run_case(
            benchmark,
            smoke,
            case,
            n_samples,
            lambda: bare_route(route_name, module, inputs),
            lambda: bare_route("backward", reference, inputs),
            target=1.5 if route_name == "norms" and n_samples >= 8192 else None,
        )
    exact = bare_route("vmap", bare_mlp(), inputs)  # every route: the same statistics
    assert stats.covariance_trace == pytest.approx(exact.covariance_trace, rel=1e-4)
    torch.testing.assert_close(stats.mean, exact.mean, rtol=1e-4, atol=1e-6)
    RESULTS[-1]["note"] = f"trace {stats.covariance_trace:.4g}, SNR {stats.snr:.3f}"
