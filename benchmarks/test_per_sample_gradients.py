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

Run: ``python -m pytest benchmarks --benchmark-enable`` (full) or ``python -m pytest benchmarks -q`` (smoke).
Speeds are reported, not asserted (the machine is shared); the memory bound is asserted in the full run.
"""

from __future__ import annotations

import time

import _data
import pytest
import torch

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
