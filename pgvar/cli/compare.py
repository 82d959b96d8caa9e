"""``pgvar compare``: arguments in; a table, a JSON file and a PNG plot out.

On a built-in problem the numbers come from :func:`pgvar.compare.compare_on_problem` (exact gradient); with
``--env`` from :func:`pgvar.compare.compare_on_env`. This module only parses, checks, prints and draws. It imports
the library (torch, SB3) only when the command runs, so that ``pgvar --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgvar.cli._args import (
    add_output_options,
    add_threads_option,
    apply_threads,
    check_env_id,
    int_at_least,
    load_model,
    positive_int,
    unit_interval,
)
from pgvar.cli._render import (
    Column,
    UsageError,
    check_output_files,
    format_column,
    format_number,
    format_with_error,
    legend,
    plot_scale,
    pyplot,
    save_figure,
    terminal_width,
    text_table,
    write_json,
)

#: The names of :data:`pgvar.compare.PROBLEMS` and :data:`pgvar.compare.ESTIMATORS` (kept here so that building
#: the parser imports no torch; ``tests/test_cli.py`` checks they equal the library's).
PROBLEMS = ("tabular", "bandit", "lqr")
ESTIMATORS = (
    "none", "mean", "optimal", "exact_value", "gae_fitted_value", "gae1_fitted_value", "qprop_fitted_critic",
    "qprop_fixed_eta", "qprop_adaptive_eta", "qprop_consistent", "qprop_as_published",
)  # fmt: skip
#: Algorithms ``pgvar compare --model`` can load.
ALGORITHMS = ("ppo", "a2c", "trpo")

#: Options of a built-in problem and of ``--env``, with their defaults (``None`` in the parser: "not given").
PROBLEM_OPTIONS = {"problem": "tabular", "estimators": list(ESTIMATORS), "batch_size": 32, "gae_lambda": 0.95}
ENV_OPTIONS = {"model": None, "algo": "ppo", "train_steps": 20_000, "n_envs": 8, "n_steps": 256, "reference_batches": 30}

PROBLEM_COLUMNS = (
    ("|bias|", "distance from the mean of the batch estimates to the exact gradient"),
    ("bias-z", "largest |bias| / standard error over coordinates: a few units for an unbiased estimator"),
    ("variance", "tr Var of one batch estimate, measured across the batches"),
    ("ratio", "variance / the first row's variance"),
    ("SNR", "|grad J|^2 / variance (exact gradient: no plug-in bias)"),
    ("cos-exact", "mean cosine of a batch estimate to the exact gradient, ± its standard error"),
    ("cos-pair", "mean cosine between two batch estimates (Ilyas et al. 2020)"),
)
ENV_COLUMNS = (
    ("SNR", "|mean|^2 / tr Var of one batch estimate (plug-in)"),
    ("SNR-debiased", "the same minus the mean's own noise, tr Var / K: can be negative when the signal is lost"),
    ("cos-ref", "mean cosine of a batch estimate to the reference gradient, ± its standard error"),
    ("cos-pair", "mean cosine between two batch estimates"),
)
SAME_ROWS = "= NAME: the estimator(s) named give the numbers of the row above to the digits shown"


def add_parser(commands: Any) -> None:
    epilog = "columns of the table:\n" + "\n".join(f"  {name:<13} {text}" for name, text in PROBLEM_COLUMNS)
    epilog += "\nwith --env:\n" + "\n".join(f"  {name:<13} {text}" for name, text in ENV_COLUMNS)
    epilog += "\n\nexit status: 0 done, 2 a usage error (one line on stderr), 1 a failure while running"
    parser = commands.add_parser(
        "compare",
        help="compare gradient estimators on shared batches",
        description=(
            "Sample many independent batches at a fixed policy, feed the same batches to every estimator, and "
            "report bias against the exact gradient, gradient variance, SNR and cosine to the exact gradient."
        ),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    problem = parser.add_argument_group("built-in problems (not with --env)")
    problem.add_argument("--problem", choices=PROBLEMS, default=None, help="built-in problem (default: tabular)")
    problem.add_argument(
        "--estimators", nargs="+", choices=ESTIMATORS, default=None, metavar="NAME",
        help=f"estimators to compare, the first is the reference of 'ratio' (default: all of {', '.join(ESTIMATORS)})",
    )  # fmt: skip
    problem.add_argument("--batch-size", type=positive_int, default=None, help="episodes per batch (default: 32)")
    problem.add_argument("--gae-lambda", type=unit_interval, default=None, help="lambda of the GAE estimator (default: 0.95)")
    parser.add_argument(
        "--n-batches", type=int_at_least(2), default=None,
        help="independent batches, at least 2 (default: 400 on a problem, 30 with --env)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_output_options(parser, "pgvar_results", "the JSON and PNG")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    add_threads_option(parser)
    env = parser.add_argument_group(
        "real environments",
        "With --env, a policy is trained briefly with pgvar.PPO (or loaded with --model) and held fixed; each "
        "baseline x normalization choice is measured on the same batches against a large-batch reference.",
    )
    env.add_argument("--env", metavar="ID", help="a gymnasium environment id, e.g. CartPole-v1 or HalfCheetah-v5")
    env.add_argument("--model", type=Path, default=None, metavar="PATH.zip", help="a saved SB3/pgvar model to measure (no training)")
    env.add_argument("--algo", choices=ALGORITHMS, default=None, help="the algorithm that saved --model (default: ppo)")
    env.add_argument("--train-steps", type=int_at_least(0), default=None, help="training steps before measuring (default: 20000)")
    env.add_argument("--n-envs", type=positive_int, default=None, help="parallel environments (default: 8)")
    env.add_argument("--n-steps", type=positive_int, default=None, help="steps per environment per batch (default: 256)")
    env.add_argument(
        "--reference-batches", type=positive_int, default=None, help="batches in the reference gradient (default: 30)"
    )
    parser.set_defaults(run=run)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resolve_options(args: argparse.Namespace) -> None:
    """Refuse the options that do not apply to the chosen mode, and fill in the defaults of those that do."""
    used, unused = (ENV_OPTIONS, PROBLEM_OPTIONS) if args.env is not None else (PROBLEM_OPTIONS, ENV_OPTIONS)
    given = [_flag(dest) for dest in unused if getattr(args, dest) is not None]
    if given:
        mode = f"with --env {args.env}" if args.env is not None else "without --env (on a built-in problem)"
        verb = "does" if len(given) == 1 else "do"
        raise UsageError(f"{' and '.join(given)} {verb} not apply {mode}")
    if args.model is not None and args.train_steps is not None:
        raise UsageError("--train-steps does not apply with --model (a saved model is measured as it is)")
    for dest, default in used.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.n_batches is None:
        args.n_batches = 30 if args.env is not None else 400


def _check_spaces(model: Any, env_id: str) -> None:
    import gymnasium as gym

    env = gym.make(env_id)
    try:
        if model.observation_space.shape != env.observation_space.shape or model.action_space != env.action_space:
            raise UsageError(
                f"--model was trained on observations {model.observation_space} and actions {model.action_space}; "
                f"--env {env_id} has {env.observation_space} and {env.action_space}"
            )
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------------- tables
def merge_identical(names: Sequence[str], cells: Sequence[Sequence[str]]) -> list[tuple[str, list[str], list[str]]]:
    """Rows whose printed numbers are all equal shown once: ``(name, cells, names of the same rows)``, in the
    order of first appearance."""
    merged: list[tuple[str, list[str], list[str]]] = []
    for name, row in zip(names, cells):
        for first in merged:
            if first[1] == list(row):
                first[2].append(name)
                break
        else:
            merged.append((name, list(row), []))
    return merged


def _table_rows(merged: list[tuple[str, list[str], list[str]]], n_name_cells: int) -> list[list[str]]:
    rows: list[list[str]] = []
    for name, cells, same in merged:
        rows.append([name, *cells])
        if same:
            rows.append([f"  = {', '.join(same)}"] + [""] * (len(cells) + n_name_cells - 1))
    return rows


def render_table(result: Any, width: int = 80) -> str:
    """The text of a problem comparison: title, table (at most ``width`` columns), legend of every column."""
    rows = result.estimators
    numbers = [
        format_column([r.bias_norm for r in rows]),
        format_column([r.bias_max_abs_z for r in rows]),
        format_column([r.variance for r in rows]),
        format_column([r.variance_ratio for r in rows]),
        format_column([r.snr for r in rows]),
        [format_with_error(r.cosine, r.cosine_se) for r in rows],
        format_column([r.pairwise_cosine for r in rows]),
    ]
    cells = [list(row) for row in zip(*numbers)]
    merged = merge_identical([r.name for r in rows], cells)
    columns = [Column("estimator", "left", 9)] + [
        Column(header, "right", priority) for (header, _), priority in zip(PROBLEM_COLUMNS, (2, 6, 7, 5, 4, 8, 3))
    ]
    table, left_out = text_table(columns, _table_rows(merged, 1), width)
    title = (
        f"{result.problem}: {result.n_batches} batches x {result.batch_size} episodes, seed {result.seed}, "
        f"|grad J| = {format_number(result.exact_gradient_norm)}"
    )
    entries = [entry for entry in PROBLEM_COLUMNS if entry[0] not in left_out]
    if any(same for _, _, same in merged):
        entries.append(("= NAME", SAME_ROWS[len("= NAME: ") :]))
    return _assemble(title, table, entries, left_out, width)


def render_env_table(result: Any, width: int = 80) -> str:
    """The text of an environment comparison (one row per baseline x normalization; rows identical as printed are
    shown once: every constant baseline gives the same gradient under normalization)."""
    rows = result.estimators
    numbers = [
        format_column([r.snr for r in rows]),
        format_column([r.snr_debiased for r in rows]),
        [format_with_error(r.cosine, r.cosine_se) for r in rows],
        format_column([r.pairwise_cosine for r in rows]),
    ]
    cells = [[r.normalization, *row] for r, row in zip(rows, zip(*numbers))]
    merged = merge_identical([r.baseline for r in rows], cells)
    columns = [Column("baseline", "left", 9), Column("normalization", "left", 8)] + [
        Column(header, "right", priority) for (header, _), priority in zip(ENV_COLUMNS, (5, 7, 6, 4))
    ]
    table, left_out = text_table(columns, _table_rows(merged, 1), width)
    title = (
        f"{result.env_id}: policy after {result.trained_steps} steps; {result.n_batches} batches x "
        f"{result.batch_steps} steps, seed {result.seed}; reference: {result.reference}"
    )
    entries = [entry for entry in ENV_COLUMNS if entry[0] not in left_out]
    if any(same for _, _, same in merged):
        entries.append(("= NAME", "the baseline(s) named give the numbers of the row above to the digits shown "
                                  "(normalizing subtracts the batch mean, which removes any constant baseline)"))  # fmt: skip
    return _assemble(title, table, entries, left_out, width)


def _assemble(title: str, table: str, entries: list[tuple[str, str]], left_out: list[str], width: int) -> str:
    import textwrap

    parts = [textwrap.fill(title, width), table, legend(entries, width)]
    if left_out:
        parts.append(textwrap.fill(f"(left out for a {width}-column terminal: {', '.join(left_out)}; set COLUMNS "
                                   "for more, every number is in the JSON)", width))  # fmt: skip
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------- plots
def plot_comparison(result: Any, path: Any) -> None:
    """Two panels, one row per estimator: variance relative to the first estimator (points on a log scale when the
    ratios span more than a decade) and cosine to the exact gradient (bars), each with a 95% interval."""
    plt = pyplot()
    rows = result.estimators
    names = [row.name for row in rows]
    ratios = [row.variance_ratio for row in rows]
    # A sample variance from K batches: the log of it has a standard error of about sqrt(2 / (K - 1)).
    log_se = (2.0 / (result.n_batches - 1)) ** 0.5
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True, constrained_layout=True)
    y = list(range(len(rows)))
    finite = [r if math.isfinite(r) and r > 0 else math.nan for r in ratios]
    errors = [[r - r * math.exp(-2 * log_se) for r in finite], [r * math.exp(2 * log_se) - r for r in finite]]
    # Points, not bars: a bar on a log axis has no natural start, and its length would mean nothing.
    left.errorbar(finite, y, xerr=errors, fmt="o", color="tab:blue", capsize=3)
    left.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    scale = plot_scale(r for r in finite if math.isfinite(r))
    if scale != "linear":
        left.set_xscale("log")
    shown = [r for r in finite if math.isfinite(r)]
    uppers = [r * math.exp(2 * log_se) if math.isfinite(r) else math.nan for r in finite]
    if shown:
        high = max(u for u in uppers if math.isfinite(u))
        low = min(r * math.exp(-2 * log_se) for r in shown)
        left.set_xlim((low / 1.5, high * 3.0) if scale != "linear" else (0.0, high * 1.3))
    for i, r in enumerate(ratios):
        if math.isfinite(finite[i]):
            left.annotate(format_number(r), (uppers[i], i), xytext=(4, 0), textcoords="offset points", va="center",
                          fontsize=8)  # fmt: skip
        else:  # a zero reference variance: the ratio is inf or nan, not a point
            left.annotate(f"{format_number(r)} (not drawn)", (left.get_xlim()[0], i), xytext=(4, 0),
                          textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    left.set_xlabel(f"tr Var relative to {names[0]} (95% interval)")
    left.set_title("gradient variance (lower is better)")
    cosines = [row.cosine for row in rows]
    right.barh(y, cosines, xerr=[2 * row.cosine_se for row in rows], color="tab:green", capsize=3)
    right.axvline(0.0, color="black", linewidth=0.8)
    low = min([0.0] + [row.cosine - 2 * row.cosine_se for row in rows])
    high = max([1.0] + [row.cosine + 2 * row.cosine_se for row in rows])
    right.set_xlim(low - 0.02 * (high - low), high + 0.02 * (high - low))
    right.set_xlabel("cosine to the exact gradient (± 2 SE)")
    right.set_title("direction (higher is better)")
    left.set_yticks(y, names)
    left.invert_yaxis()
    fig.suptitle(f"pgvar compare: {result.problem}, batch {result.batch_size}, {result.n_batches} batches")
    save_figure(fig, path)


def plot_env_comparison(result: Any, path: Any) -> None:
    """Grouped bars per baseline (one colour per normalization): debiased SNR, drawn with its sign (a symmetric log
    scale when values span decades), and cosine to the reference."""
    plt = pyplot()
    baselines = list(dict.fromkeys(row.baseline for row in result.estimators))
    modes = list(dict.fromkeys(row.normalization for row in result.estimators))
    width = 0.8 / len(modes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    values = [row.snr_debiased for row in result.estimators]
    for j, mode in enumerate(modes):
        rows = [result.summary(b, mode) for b in baselines]
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(baselines))]
        left.bar(xs, [r.snr_debiased for r in rows], width, label=f"normalize: {mode}")
        right.bar(xs, [r.cosine for r in rows], width, yerr=[2 * r.cosine_se for r in rows], capsize=3, label=mode)
    scale = plot_scale(values)
    if scale == "log":
        left.set_yscale("log")
    elif scale == "symlog":
        smallest = min(abs(v) for v in values if v != 0.0 and math.isfinite(v))
        left.set_yscale("symlog", linthresh=smallest)
    for axis in (left, right):
        axis.set_xticks(range(len(baselines)), baselines)
        axis.set_xlabel("baseline")
        axis.axhline(0.0, color="black", linewidth=0.8)
    left.set_ylabel("debiased SNR of one batch estimate")
    left.set_title("signal-to-noise (higher is better; < 0: lost in noise)")
    left.legend(fontsize=8)
    right.set_ylabel("cosine to the reference gradient (± 2 SE)")
    right.set_title("direction (higher is better)")
    low = min([0.0] + [r.cosine - 2 * r.cosine_se for r in result.estimators])
    high = max([1.0] + [r.cosine + 2 * r.cosine_se for r in result.estimators])
    right.set_ylim(low - 0.02 * (high - low), high + 0.02 * (high - low))
    fig.suptitle(f"pgvar compare: {result.env_id}, {result.n_batches} batches of {result.batch_steps} steps")
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------- run
def _progress_bar() -> Any:
    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(stderr=True), transient=True)


def run(args: argparse.Namespace) -> int:
    resolve_options(args)
    stem = args.output / f"compare_{args.env if args.env is not None else args.problem}_seed{args.seed}"
    outputs = [stem.with_suffix(".json")] + ([] if args.no_plot else [stem.with_suffix(".png")])
    model = None
    if args.env is not None:
        check_env_id(args.env)
        if args.model is not None:
            model = load_model(args.model, args.algo)
            _check_spaces(model, args.env)
    check_output_files(outputs, overwrite=args.overwrite)
    apply_threads(args.threads)
    if args.env is not None:
        result = _run_env(args, model)
        text, plot = render_env_table(result, terminal_width()), plot_env_comparison
    else:
        result = _run_problem(args)
        text, plot = render_table(result, terminal_width()), plot_comparison
    write_json(outputs[0], result.to_dict())
    if not args.no_plot:
        plot(result, outputs[1])
    print(text)
    print(f"numbers: {outputs[0]}")
    if not args.no_plot:
        print(f"plot:    {outputs[1]}")
    return 0


def _run_problem(args: argparse.Namespace) -> Any:
    from pgvar.compare import compare_on_problem

    with _progress_bar() as bar:
        task = bar.add_task(f"sampling {args.problem}", total=args.n_batches)
        return compare_on_problem(
            args.problem, estimators=args.estimators, batch_size=args.batch_size, n_batches=args.n_batches,
            seed=args.seed, gae_lambda=args.gae_lambda, progress=lambda done: bar.update(task, completed=done),
        )  # fmt: skip


def _run_env(args: argparse.Namespace, model: Any) -> Any:
    from pgvar.compare import compare_on_env

    with _progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{stage} on {args.env}", total=total)
            bar.update(tasks[stage], completed=done)

        return compare_on_env(
            args.env, model=model, train_steps=args.train_steps, n_envs=args.n_envs, n_steps=args.n_steps,
            n_batches=args.n_batches, reference_batches=args.reference_batches, seed=args.seed, progress=progress,
        )  # fmt: skip

