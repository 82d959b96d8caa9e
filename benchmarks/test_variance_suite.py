"""The variance benchmark suite: every estimator, on exact problems and real environments at several training
stages, as pytest-benchmark comparisons on shared batches.

One test per (environment x checkpoint x estimator). The group's batches are sampled once (the first test of a
group does it; every estimator of the group then reads the same estimates: a paired comparison), the timed body is
ONE gradient estimate of the estimator on one of the group's batches, and ``benchmark.extra_info`` holds the
variance metrics of its batch estimates (:func:`_variance.group_rows`): variance of one batch estimate with its
standard error, variance ratio to the reference (learned V + GAE 0.95), SNR plug-in and debiased, cosine to the
exact gradient (problems) or to a large-batch reference (environments) with its standard error, pairwise cosine,
the gradient noise scale B_simple and, on exact problems, the bias, its largest z-score and the flag
``flag_biased`` (|z| >= 4).

Run (the default full size; writes the JSON the report reads)::

    python -m pytest benchmarks/test_variance_suite.py --benchmark-enable --benchmark-json=variance.json
    python benchmarks/variance_report.py variance.json

Smaller: ``--variance-size small``; the README's test command runs the smoke size (benchmarks disabled: every
code path once, tiny batches, seconds). ``-k HalfCheetah`` selects one environment, ``-k "HalfCheetah and late"``
one group. See ``docs/results.md`` for what each part costs.
"""

from __future__ import annotations

import math
import time

import _variance
import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    """``PGVAR_BENCH_THREADS`` torch threads (default 1: the machine is shared, and ratios are what we report)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_variance.THREADS)
    yield
    torch.set_num_threads(threads)


_GROUP_CACHE: dict[tuple[str, str], tuple[dict[str, dict], object, float]] = {}


def _cases(config: pytest.Config) -> list:
    size = _variance.SIZES[_variance.size_name(config)]
    models = _variance.user_models(config)
    with_mc = bool(config.getoption("variance_mc", default=False))
    cases = []
    for env_id, checkpoint in _variance.groups(size, models, with_mc):
        for estimator in _variance.estimators_of(env_id, size, with_mc):
            marks = [pytest.mark.slow] if env_id in _variance.MUJOCO else []
            cases.append(pytest.param(env_id, checkpoint, estimator.name, id=f"{env_id}-{checkpoint}-{estimator.name}",
                                      marks=marks))  # fmt: skip
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"env_id", "checkpoint", "estimator"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("env_id", "checkpoint", "estimator"), _cases(metafunc.config))


def _group(config: pytest.Config, env_id: str, checkpoint: str):
    """``(rows, paired, seconds)`` of a group, computed once per session."""
    key = (env_id, checkpoint)
    if key not in _GROUP_CACHE:
        size_name = _variance.size_name(config)
        size = _variance.SIZES[size_name]
        with_mc = bool(config.getoption("variance_mc", default=False))
        start = time.perf_counter()
        paired = _variance.sample_group(env_id, checkpoint, size, _variance.user_models(config), with_mc)
        names = [e.name for e in _variance.estimators_of(env_id, size, with_mc)]
        rows = _variance.group_rows(paired, names, f"{env_id}|{checkpoint}", checkpoint, size_name)
        _GROUP_CACHE.clear()  # one group at a time in memory (the tests of a group are contiguous)
        _GROUP_CACHE[key] = (rows, paired, time.perf_counter() - start)
    return _GROUP_CACHE[key]


def test_variance(benchmark, request, env_id, checkpoint, estimator):
    rows, paired, group_seconds = _group(request.config, env_id, checkpoint)
    row = dict(rows[estimator])
    suite_estimator = _variance.BY_NAME[estimator]
    engine = _variance.engine_name(suite_estimator, paired.exact)
    size = _variance.SIZES[row["size"]]
    rounds = 1 if engine == "mc_value" else size.rounds
    benchmark.group = row["group"]
    benchmark.extra_info.update(row)
    benchmark.extra_info["group_wall_seconds"] = round(group_seconds, 3)
    estimate = benchmark.pedantic(paired.time_one, args=(engine,), rounds=rounds, iterations=1)

    # The timed body computes what the suite measured: the same estimate as on that batch in the loop.
    assert estimate.shape == paired.reference.shape and bool(estimate.isfinite().all())
    torch.testing.assert_close(estimate, paired.estimates[engine][0].to(estimate.dtype), rtol=1e-5, atol=1e-8)
    assert math.isfinite(row["variance"]) and row["variance"] >= 0.0
    for key in ("snr", "snr_debiased", "cosine", "cosine_se", "pairwise_cosine", "b_simple", "variance_se"):
        assert key in row, key
    if paired.exact and row["size"] != "smoke":
        # Acceptance: on exact problems every unbiased estimator passes |bias z| < 4, and as-published is flagged.
        if suite_estimator.unbiased:
            assert row["bias_max_abs_z"] < _variance.BIAS_Z, row
        if estimator == "qprop_as_published":
            assert row["flag_biased"], row
