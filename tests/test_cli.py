"""The ``pgvar`` command line (issue 15): one-line usage errors, 80-column tables, consistent numbers, honest plots,
fast ``--help``, ``--version``, threads. ``tests/test_compare.py`` runs ``pgvar compare`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pgvar import cli
from pgvar.cli import _args, _render, compare, decompose
from pgvar.compare import ComparisonResult, EnvComparisonResult, EnvEstimatorSummary, EstimatorSummary

REPO_ROOT = Path(__file__).resolve().parents[1]


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def run_cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``pgvar ARGV`` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ --help, --version
def test_help_is_fast_and_imports_neither_torch_nor_the_library():
    probe = "import sys, pgvar.cli; pgvar.cli.build_parser(); print(sorted(m for m in ('torch', 'gymnasium', " \
            "'stable_baselines3', 'matplotlib', 'pgvar.compare', 'pgvar.experiments') if m in sys.modules))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_subprocess_env(), check=True)
    assert out.stdout.strip() == "[]"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pgvar.cli", "--help"], capture_output=True, text=True,
                            env=_subprocess_env(), timeout=60)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and "compare" in result.stdout and "decompose" in result.stdout
    # Measured 0.26 s here (python -X importtime: pgvar.cli 0.1 s); torch alone takes 2-5 s to import.
    assert elapsed < 2.0, elapsed


def test_version(capsys):
    import pgvar

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"pgvar {pgvar.__version__}"


def test_every_command_has_help(capsys):
    for command in ("compare", "sweep", "aggregate", "decompose"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "exit status" in out, command


def test_the_cli_names_match_the_library():
    import pgvar
    from pgvar.compare import ESTIMATORS, PROBLEMS
    from pgvar.experiments import DECOMPOSITION_ALGORITHMS

    assert compare.ESTIMATORS == tuple(ESTIMATORS)
    assert compare.PROBLEMS == tuple(PROBLEMS)
    assert decompose.ALGORITHMS == DECOMPOSITION_ALGORITHMS
    assert all(hasattr(pgvar, name) for name in _args.MODEL_CLASSES.values())


# ---------------------------------------------------------------------------------------------- user errors
@pytest.fixture
def no_run(monkeypatch):
    """Make any comparison fail loudly: a usage error must stop the command before the run."""

    def fail(*args, **kwargs):
        raise AssertionError("the run started before the usage error was reported")

    import pgvar.compare

    monkeypatch.setattr(pgvar.compare, "compare_on_problem", fail)
    monkeypatch.setattr(pgvar.compare, "compare_on_env", fail)


def _error_cases(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad_model = tmp_path / "not_a_model.zip"
    bad_model.write_text("not a zip")
    out = ["--output", str(tmp_path / "out")]
    return {
        "unknown env": (["compare", "--env", "NoSuchEnv-v0", *out], "--env NoSuchEnv-v0: Environment `NoSuchEnv` doesn't exist"),
        "missing model": (["compare", "--env", "CartPole-v1", "--model", "/nonexistent.zip", *out],
                          "--model: no such file: '/nonexistent.zip'"),
        "unreadable model": (["compare", "--env", "CartPole-v1", "--model", str(bad_model), *out], "--model: cannot load"),
        "unwritable output": (["compare", "--output", str(blocker / "sub")], "--output: cannot create the folder"),
        "n-batches 0": (["compare", "--n-batches", "0", *out], "--n-batches: must be a whole number >= 2, got '0'"),
        "n-batches 1": (["compare", "--n-batches", "1", *out], "--n-batches: must be a whole number >= 2, got '1'"),
        "gae-lambda": (["compare", "--gae-lambda", "2", *out], "--gae-lambda: must be in [0, 1], got '2'"),
        "batch-size": (["compare", "--batch-size", "0", *out], "--batch-size: must be a whole number > 0, got '0'"),
        "problem with env": (["compare", "--env", "CartPole-v1", "--problem", "lqr", *out],
                             "--problem does not apply with --env CartPole-v1"),
        "problem options with env": (
            ["compare", "--env", "CartPole-v1", "--estimators", "none", "--batch-size", "4", "--gae-lambda", "0.9", *out],
            "--estimators and --batch-size and --gae-lambda do not apply with --env CartPole-v1"),
        "env options without env": (["compare", "--n-envs", "2", "--train-steps", "5", *out],
                                    "--train-steps and --n-envs do not apply without --env"),
        "train-steps with model": (["compare", "--env", "CartPole-v1", "--model", "m.zip", "--train-steps", "0", *out],
                                   "--train-steps does not apply with --model"),
        "unknown command": (["nope"], "invalid choice: 'nope'"),
        "unknown config": (["sweep", "no-such-config"], "config 'no-such-config' is neither a file nor a shipped config"),
        "sweep unknown env": (["sweep", "mirage-qprop", "--envs", "Nope-v1"], "--envs Nope-v1: Environment `Nope`"),
        "sweep address": (["sweep", "mirage-qprop", "--address", "auto"], "--address is for --backend ray"),
        "sweep seeds": (["sweep", "mirage-qprop", "--seeds", "2", "--seed-list", "1"], "not allowed with argument"),
        "aggregate missing": (["aggregate", str(tmp_path / "nothing")], "RESULTS: no such folder"),
        "aggregate not a sweep": (["aggregate", str(tmp_path)], "is not a folder written by pgvar sweep"),
        "decompose env": (["decompose", "--env", "Nope-v0", *out], "--env Nope-v0: Environment `Nope`"),
        "decompose checkpoints": (["decompose", "--env", "Pendulum-v1", "--checkpoints", "5", "3", *out],
                                  "--checkpoints must be increasing"),
        "decompose model": (["decompose", "--env", "Pendulum-v1", "--model", "/nonexistent.zip", *out],
                            "--model: no such file"),
    }  # fmt: skip


CASES = [
    "unknown env", "missing model", "unreadable model", "unwritable output", "n-batches 0", "n-batches 1", "gae-lambda",
    "batch-size", "problem with env", "problem options with env", "env options without env", "train-steps with model",
    "unknown command", "unknown config", "sweep unknown env", "sweep address", "sweep seeds", "aggregate missing",
    "aggregate not a sweep", "decompose env", "decompose checkpoints", "decompose model",
]  # fmt: skip


def test_the_error_cases_are_all_run(tmp_path):
    assert sorted(CASES) == sorted(_error_cases(tmp_path))


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_and_exit_status_2(case, tmp_path, capsys, no_run):
    argv, expected = _error_cases(tmp_path)[case]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (case, out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and expected in err, err


def test_a_user_error_from_the_console_script_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "pgvar.cli", "compare", "--env", "NoSuchEnv-v0"],
                            capture_output=True, text=True, env=_subprocess_env(), timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pgvar compare: error: --env NoSuchEnv-v0: Environment `NoSuchEnv` doesn't exist."
    ]


def test_library_errors_name_the_flag():
    parser = cli._command_parser(cli.build_parser(), "compare")
    assert _args.flag_names("gae_lambda must be in [0, 1], got 2.0", parser) == "--gae-lambda must be in [0, 1], got 2.0"
    assert _args.flag_names("n_batches must be >= 2 (got 1); see n_batches", parser) == (
        "--n-batches must be >= 2 (got 1); see --n-batches"
    )
    # Names without an underscore only at the start, where pgvar's errors name the argument.
    assert _args.flag_names("seed must be >= 0; the seed of ...", parser) == "--seed must be >= 0; the seed of ..."
    assert _args.flag_names("env_id must be a string", parser, {"env_id": "--env"}) == "--env must be a string"


def test_a_rerun_refuses_to_overwrite_earlier_results(tmp_path, capsys):
    argv = ["compare", "--problem", "bandit", "--n-batches", "3", "--batch-size", "2", "--output", str(tmp_path)]
    assert run_cli(argv, capsys)[0] == 0
    first = (tmp_path / "compare_bandit_seed0.json").read_text()
    code, _, err = run_cli([*argv, "--seed", "0"], capsys)
    assert code == 2 and "exist from an earlier run; pass --overwrite" in err
    assert (tmp_path / "compare_bandit_seed0.json").read_text() == first
    assert run_cli([*argv, "--overwrite", "--batch-size", "3"], capsys)[0] == 0
    assert json.loads((tmp_path / "compare_bandit_seed0.json").read_text())["batch_size"] == 3


# -------------------------------------------------------------------------------------------- tables, numbers
def test_numbers_have_three_significant_digits_and_one_notation_per_column():
    assert _render.format_number(0.017834) == "0.0178"
    assert _render.format_number(21.04) == "21.0"
    assert _render.format_number(1906) == "1910"
    assert _render.format_number(6.0) == "6.00"
    assert _render.format_number(2.5e-5) == "2.50e-5"
    assert _render.format_number(float("inf")) == "inf"
    assert _render.format_column([0.162, 0.0992, 1.0]) == ["0.162", "0.0992", "1.00"]
    assert _render.format_column([29100.0, 725.0, 4.39]) == ["2.91e4", "7.25e2", "4.39e0"]
    assert _render.format_with_error(0.90912, 0.00487) == "0.909±0.005"


def _problem_result(n_rows=8):
    rows = [EstimatorSummary(name, "", 0.0178 * (i + 1), 1.6 + i, 0.162 / (i + 1), 1.0 / (i + 1), 3.8 * (i + 1),
                             0.909, 0.005, 0.826) for i, name in enumerate(compare.ESTIMATORS[:n_rows])]  # fmt: skip
    return ComparisonResult("tabular", 32, 200, 0, 0.9, 0.95, 30, 0.785, rows)


def test_the_compare_table_fits_80_columns_and_explains_every_column(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # as a pipe into a log with COLUMNS=80 (no terminal: 80 as well)
    for problem in ("tabular", "bandit", "lqr"):
        argv = ["compare", "--problem", problem, "--n-batches", "4", "--batch-size", "4", "--no-plot", "--output",
                str(tmp_path / problem)]  # fmt: skip
        code, out, _ = run_cli(argv, capsys)
        assert code == 0
        lines = out.splitlines()
        lines = lines[: next(i for i, line in enumerate(lines) if line.startswith("numbers: "))]  # (then file paths)
        assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
        header = next(line for line in lines if line.startswith("estimator"))
        shown = [column for column, _ in compare.PROBLEM_COLUMNS if column in header]
        assert len(shown) == 7 and len(header.split()) == 1 + 7  # every column at 80 columns
        for column in shown:  # each one explained under the table
            assert any(line.startswith(column + " ") for line in lines[lines.index(header) + 2 :]), column
        assert "qprop_fixed_eta" not in header
        for name in compare.ESTIMATORS:  # every estimator has a row or is named as identical to one
            assert any(line.startswith(name) or line.startswith(f"  = {name}") or f", {name}" in line for line in lines), name
    # Wider terminals get every column; COLUMNS is respected.
    text = compare.render_table(_problem_result(), width=120)
    assert "|bias|" in text.splitlines()[1] and max(map(len, text.splitlines())) <= 120
    narrow = compare.render_table(_problem_result(), width=60)
    assert max(map(len, narrow.splitlines())) <= 60 and "left out for a 60-column terminal" in narrow


def test_identical_rows_are_shown_once_and_named():
    from pgvar.compare import compare_on_problem

    result = compare_on_problem("tabular", estimators=["none", "qprop_fitted_critic", "qprop_fixed_eta"], batch_size=4,
                                n_batches=3)  # fmt: skip
    fitted, fixed = result.summary("qprop_fitted_critic"), result.summary("qprop_fixed_eta")
    assert (fitted.variance, fitted.cosine) == (fixed.variance, fixed.cosine)  # discrete: all-action CV, no eta
    lines = compare.render_table(result).splitlines()
    assert "  = qprop_fixed_eta" in lines
    assert not any(line.startswith("qprop_fixed_eta") for line in lines)
    assert any(line.startswith("= NAME") for line in lines)  # the legend says what "=" means


def _env_result(snr_debiased):
    rows, index = [], 0
    for baseline in ("value", "none", "mean", "optimal"):
        for mode in ("minibatch", "batch", "none"):
            constant = baseline != "value" and mode != "none"
            value = snr_debiased[("none" if constant else baseline, mode)]
            rows.append(EnvEstimatorSummary(baseline, mode, abs(value) + 0.03, value, 0.03, 0.018, 0.015))
            index += 1
    return EnvComparisonResult("HalfCheetah-v5", 2048, 8, 30, 30, 32768, 0, 0.99, 0.95, 64, "GAE(lambda=1), 30 batches",
                               rows)  # fmt: skip


def test_the_env_table_merges_the_constant_baselines_under_normalization():
    values = {(b, m): 0.01 * (i + 1) for i, (b, m) in enumerate(
        (b, m) for b in ("value", "none", "mean", "optimal") for m in ("minibatch", "batch", "none"))}  # fmt: skip
    text = compare.render_env_table(_env_result(values), width=80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert lines.count("  = mean, optimal") == 2  # minibatch and batch: one row each for none = mean = optimal
    assert "removes any constant baseline" in " ".join(text.split())
    assert lines[2].startswith("baseline  normalization")  # the "= ..." lines do not widen the first column


def test_plots_use_a_log_scale_across_decades_and_show_negative_snr(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(compare, "save_figure", lambda fig, path: figures.append(fig))
    values = {(b, m): (-0.004 if b == "none" else 0.05)
              for b in ("value", "none", "mean", "optimal") for m in ("minibatch", "batch", "none")}  # fmt: skip
    compare.plot_env_comparison(_env_result(values), tmp_path / "x.png")
    left = figures[-1].axes[0]
    heights = [patch.get_height() for patch in left.patches]
    assert min(heights) == pytest.approx(-0.004)  # drawn as it is: not clamped to a small positive number
    assert left.get_ylim()[0] < -0.004
    result = _problem_result()  # variance ratios 1 .. 1/8 and a 6.63 outlier: more than a decade
    rows = list(result.estimators)
    rows[-1] = EstimatorSummary(**{**rows[-1].__dict__, "variance_ratio": 6.63})
    compare.plot_comparison(ComparisonResult(**{**result.__dict__, "estimators": rows}), tmp_path / "y.png")
    variance_axis, cosine_axis = figures[-1].axes
    assert variance_axis.get_xscale() == "log"
    low, high = variance_axis.get_xlim()
    assert low < 1 / 8 and high > 6.63  # every point and interval inside the axes
    assert cosine_axis.get_xlim()[0] <= 0.0 and cosine_axis.get_xlim()[1] >= 1.0
    assert _render.plot_scale([0.1, 0.5]) == "linear"
    assert _render.plot_scale([0.01, 0.5]) == "log"
    assert _render.plot_scale([-0.01, 0.5]) == "symlog"


def test_figure_files_are_written_atomically_with_normal_permissions(tmp_path):
    plt = _render.pyplot()
    fig = plt.figure()
    old = os.umask(0o022)
    try:
        _render.save_figure(fig, tmp_path / "f.png")
        _render.write_text(tmp_path / "t.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
    assert oct((tmp_path / "f.png").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "t.md").stat().st_mode & 0o777) == oct(0o644)


# ---------------------------------------------------------------------------------------------------- threads
def test_the_commands_use_one_torch_thread_unless_told(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        _args.apply_threads(None)
        assert torch.get_num_threads() == 1
        _args.apply_threads(2)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        _args.apply_threads(None)  # the user chose: keep it
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
