"""Benchmark configuration: sizes (full or smoke), threads, shared data, and the results table.

Full run: ``python -m pytest benchmarks --benchmark-enable`` (batch sizes 2048, 8192, 32768).
Smoke run: ``python -m pytest benchmarks -q`` (pytest-benchmark is disabled by the project's addopts) or
``PGVAR_BENCH_SMOKE=1``: tiny sizes, each case runs once, the same code paths.
Variance suite (``benchmarks/test_variance_suite.py``): ``--variance-size smoke|small|full`` (default: smoke when
benchmarks are disabled, full when enabled), ``--variance-model ENV_ID=PATH`` (a saved model instead of the suite's
checkpoints), ``--variance-mc`` (the Monte Carlo "true V" row on every environment, not only the size's own list);
``benchmarks/variance_report.py`` turns the saved JSON into tables.
Threads: ``PGVAR_BENCH_THREADS`` (default 1; other processes share this machine, and ratios are what we report),
set by an autouse fixture of the per-sample gradient benchmark only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data  # noqa: E402

FULL_SIZES = (2048, 8192, 32768)
SMOKE_SIZES = (128, 256, 512)
THREADS = _data.THREADS
RESULTS = _data.RESULTS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgvar variance suite")
    group.addoption("--variance-size", default=None, help="smoke | small | full (default: smoke when benchmarks are "
                    "disabled, full when enabled; or PGVAR_VARIANCE_SIZE)")
    group.addoption("--variance-model", action="append", default=[], metavar="ENV_ID=PATH",
                    help="use this saved SB3 model as the only checkpoint of ENV_ID (repeatable)")
    group.addoption("--variance-mc", action="store_true", default=False,
                    help="measure the Monte Carlo 'true V' row on every environment (slow: continuations per state)")


def is_smoke(config: pytest.Config) -> bool:
    if os.environ.get("PGVAR_BENCH_SMOKE") == "1":
        return True
    try:
        return bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")
    except ValueError:  # pytest-benchmark not installed
        return True


def sizes(config: pytest.Config) -> tuple[int, ...]:
    return SMOKE_SIZES if is_smoke(config) else FULL_SIZES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "n_samples" in metafunc.fixturenames:
        metafunc.parametrize("n_samples", sizes(metafunc.config), ids=lambda n: f"N={n}")


@pytest.fixture(scope="session")
def smoke(request: pytest.FixtureRequest) -> bool:
    return is_smoke(request.config)


@pytest.fixture(scope="session")
def halfcheetah(request: pytest.FixtureRequest) -> dict[str, torch.Tensor]:
    """The largest batch of this run (collected once, cached under .benchmarks/); tests slice prefixes."""
    return _data.load_batch(max(sizes(request.config)))


@pytest.fixture(scope="session")
def policy():
    return _data.make_policy(*_data.spaces())


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not RESULTS or is_smoke(config):  # the README's test command stays quiet; --benchmark-enable prints
        return
    write = terminalreporter.write_line
    mode = "smoke (tiny sizes, one call each)" if is_smoke(config) else "full"
    write("")
    write(
        f"pgvar per-sample gradient benchmark [{mode}]: HalfCheetah-v5, SB3 ActorCriticPolicy pi=[64, 64], "
        f"actor P = 5,708, seed {_data.SEED}, torch threads {THREADS}"
    )
    write("versions: " + ", ".join(f"{k} {v}" for k, v in _data.versions().items()))
    write(
        "ratio = min CPU time of the case / min CPU time of one batched backward of the same loss, measured just "
        "before it (wall-time ratio in brackets)"
    )
    write(
        f"{'case':<34}{'N':>7}{'case ms':>11}{'backward ms':>13}{'ratio':>8}{'(wall)':>9}{'target':>9}  note"
    )
    for r in RESULTS:
        if "ratio" in r:
            target = f"<= {r['target']:g}x" if r.get("target") else ""
            write(
                f"{r['case']:<34}{r['n']:>7}{r['seconds'] * 1e3:>11.2f}{r['reference_seconds'] * 1e3:>13.2f}"
                f"{r['ratio']:>7.2f}x{'(' + format(r['wall_ratio'], '.2f') + 'x)':>9}{target:>9}  {r.get('note', '')}"
            )
    for r in RESULTS:
        if "extra_peak_mb" in r:
            write(
                f"peak extra RSS, {r['case']:<26} N={r['n']:<6} {r['extra_peak_mb']:8.1f} MB "
                f"(RSS before {r['rss_before_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB; {r['method']}) {r.get('note', '')}"
            )
