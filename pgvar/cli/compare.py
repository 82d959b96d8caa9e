"""The ``pgvar`` console script: arguments in, a table, a JSON file and a PNG plot out.

``pgvar compare`` runs :func:`pgvar.compare.compare_on_problem` on a built-in problem with an exact gradient.
This module only parses, prints and draws; the numbers come from :mod:`pgvar.compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from pgvar._io import atomic_write
from pgvar.compare import (
    ESTIMATORS,
    PROBLEMS,
    ComparisonResult,
    EnvComparisonResult,
    compare_on_env,
    compare_on_problem,
)

#: Algorithms ``pgvar compare --model`` can load.
ALGORITHMS = ("ppo", "a2c", "trpo")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgvar", description="Measure and reduce the variance of policy-gradient estimators."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare",
        help="compare gradient estimators on shared batches",
        description=(
            "Sample many independent batches at a fixed policy, feed the same batches to every estimator, and "
            "report bias against the exact gradient, gradient variance, SNR and cosine to the exact gradient."
        ),
    )
    compare.add_argument("--problem", choices=sorted(PROBLEMS), default="tabular", help="built-in problem (default: tabular)")
    compare.add_argument(
        "--estimators",
        nargs="+",
        choices=list(ESTIMATORS),
        default=list(ESTIMATORS),
        metavar="NAME",
        help=f"estimators to compare (default: all of {', '.join(ESTIMATORS)})",
    )
    compare.add_argument("--batch-size", type=_positive_int, default=32, help="episodes per batch (default: 32)")
    compare.add_argument(
        "--n-batches", type=_positive_int, default=None, help="independent batches (default: 400 on a problem, 30 with --env)"
    )
    compare.add_argument("--gae-lambda", type=float, default=0.95, help="lambda of the GAE estimator (default: 0.95)")
    compare.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    compare.add_argument(
        "--output", type=Path, default=Path("pgvar_results"), help="folder for the JSON and PNG (default: ./pgvar_results)"
    )
    compare.add_argument("--no-plot", action="store_true", help="write no PNG")
    env = compare.add_argument_group(
        "real environments",
        "With --env, a policy is trained briefly with pgvar.PPO (or loaded with --model) and held fixed; each "
        "baseline x normalization choice is measured on the same batches against a large-batch reference.",
    )
    env.add_argument("--env", metavar="ID", help="a gymnasium environment id, e.g. CartPole-v1 or HalfCheetah-v5")
    env.add_argument("--model", type=Path, metavar="PATH.zip", help="a saved SB3/pgvar model to measure (no training)")
    env.add_argument("--algo", choices=ALGORITHMS, default="ppo", help="the algorithm that saved --model (default: ppo)")
    env.add_argument("--train-steps", type=int, default=20_000, help="training steps before measuring (default: 20000)")
    env.add_argument("--n-envs", type=_positive_int, default=8, help="parallel environments (default: 8)")
    env.add_argument("--n-steps", type=_positive_int, default=256, help="steps per environment per batch (default: 256)")
    env.add_argument(
        "--reference-batches", type=_positive_int, default=30, help="batches in the reference gradient (default: 30)"
    )
    return parser


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through :func:`pgvar._io.atomic_write` (an existing file is never half-written; a new one gets the mode
    ``open()`` would give), creating the output folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def render_table(result: ComparisonResult):
    """A rich table of a comparison (one row per estimator)."""
    from rich.table import Table

    table = Table(
        title=(
            f"{result.problem}: {result.n_batches} batches x {result.batch_size} episodes, seed {result.seed}, "
            f"|grad J| = {result.exact_gradient_norm:.4g}"
        ),
        caption="bias z: largest |bias|/SE over coordinates (unbiased: a few units). variance: tr Var of one batch "
        "estimate. SNR: |grad J|^2 / variance.",
    )
    for column in ("estimator", "|bias|", "bias z", "variance", "vs first", "SNR", "cos to exact", "pairwise cos"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for row in result.estimators:
        table.add_row(
            row.name,
            f"{row.bias_norm:.3g}",
            f"{row.bias_max_abs_z:.1f}",
            f"{row.variance:.4g}",
            f"{row.variance_ratio:.3f}",
            f"{row.snr:.3g}",
            f"{row.cosine:.3f} ± {row.cosine_se:.3f}",
            f"{row.pairwise_cosine:.3f}",
        )
    return table


def plot_comparison(result: ComparisonResult, path: str | os.PathLike[str] | IO[bytes]) -> None:
    """Two panels: gradient variance (log scale) and cosine to the exact gradient, per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.name for row in result.estimators]
    ratios = [row.variance_ratio for row in result.estimators]
    # A sample variance from K batches has a relative standard error of about sqrt(2 / (K - 1)).
    relative_se = (2.0 / (result.n_batches - 1)) ** 0.5
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    bars = left.bar(names, ratios, yerr=[2 * r * relative_se for r in ratios], color="tab:blue", capsize=4)
    left.bar_label(bars, labels=[f"{r:.2f}" for r in ratios], label_type="center", color="white")
    left.set_ylabel(f"tr Var relative to {names[0]} (±2 SE)")
    left.set_title("gradient variance (lower is better)")
    right.bar(
        names,
        [row.cosine for row in result.estimators],
        yerr=[2 * row.cosine_se for row in result.estimators],
        color="tab:green",
        capsize=4,
    )
    right.set_ylim(min(0.0, min(row.cosine for row in result.estimators)), 1.0)
    right.set_ylabel("cosine to the exact gradient (±2 SE)")
    right.set_title("direction (higher is better)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=30)
    fig.suptitle(f"pgvar compare: {result.problem}, batch {result.batch_size}, {result.n_batches} batches")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def render_env_table(result: EnvComparisonResult):
    """A rich table of an environment comparison (one row per baseline x normalization)."""
    from rich.table import Table

    table = Table(
        title=(
            f"{result.env_id}: policy after {result.trained_steps} steps; {result.n_batches} batches x "
            f"{result.batch_steps} steps, seed {result.seed}"
        ),
        caption=f"reference: {result.reference}. SNR = |mean|^2 / tr Var of one batch estimate (debiased: minus "
        "the mean's own noise). Scale-free, so normalized and raw estimates compare.",
    )
    for column in ("baseline", "normalization", "SNR", "SNR debiased", "cos to reference", "pairwise cos"):
        table.add_column(column, justify="left" if column in ("baseline", "normalization") else "right")
    for row in result.estimators:
        table.add_row(
            row.baseline,
            row.normalization,
            f"{row.snr:.3g}",
            f"{row.snr_debiased:.3g}",
            f"{row.cosine:.3f} ± {row.cosine_se:.3f}",
            f"{row.pairwise_cosine:.3f}",
        )
    return table


def plot_env_comparison(result: EnvComparisonResult, path: str | os.PathLike[str] | IO[bytes]) -> None:
    """Grouped bars per baseline (one colour per normalization): debiased SNR and cosine to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = list(dict.fromkeys(row.baseline for row in result.estimators))
    modes = list(dict.fromkeys(row.normalization for row in result.estimators))
    width = 0.8 / len(modes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for j, mode in enumerate(modes):
        rows = [result.summary(b, mode) for b in baselines]
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(baselines))]
        left.bar(xs, [max(r.snr_debiased, 1e-3) for r in rows], width, label=f"normalize: {mode}")
        right.bar(xs, [r.cosine for r in rows], width, yerr=[2 * r.cosine_se for r in rows], capsize=3, label=mode)
    for axis in (left, right):
        axis.set_xticks(range(len(baselines)), baselines)
        axis.set_xlabel("baseline")
    left.set_yscale("log")
    left.set_ylabel("debiased SNR of one batch estimate")
    left.set_title("signal-to-noise (higher is better)")
    left.legend(fontsize=8)
    right.set_ylabel("cosine to the reference gradient (±2 SE)")
    right.set_title("direction (higher is better)")
    right.set_ylim(min(0.0, min(r.cosine for r in result.estimators)), 1.0)
    fig.suptitle(f"pgvar compare: {result.env_id}, {result.n_batches} batches of {result.batch_steps} steps")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _load_model(path: Path, algo: str) -> Any:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from pgvar.algos import A2C, PPO, TRPO

    algorithms: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "trpo": TRPO}
    return algorithms[algo].load(path, device="cpu")


def run_compare_env(args: argparse.Namespace, console) -> EnvComparisonResult:
    from rich.progress import Progress, TaskID

    model = _load_model(args.model, args.algo) if args.model is not None else None
    with Progress(console=console, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{stage} on {args.env}", total=total)
            bar.update(tasks[stage], completed=done)

        return compare_on_env(
            args.env,
            model=model,
            train_steps=args.train_steps,
            n_envs=args.n_envs,
            n_steps=args.n_steps,
            n_batches=args.n_batches,
            reference_batches=args.reference_batches,
            seed=args.seed,
            progress=progress,
        )


def run_compare(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress

    # The problems' tensors are tiny: intra-op threads only add synchronization, and on a loaded machine
    # OpenMP's spin-waiting makes them 10-20x slower. Leave the other cores to other work.
    torch.set_num_threads(1)
    if args.n_batches is None:
        args.n_batches = 30 if args.env is not None else 400

    # Rich wraps at 80 columns when stdout is not a terminal (CI logs, pipes): give the table room there.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    if args.env is not None:
        env_result = run_compare_env(args, console)
        console.print(render_env_table(env_result))
        _write_results(env_result, plot_env_comparison, args.output / f"compare_{args.env}_seed{args.seed}", args, console)
    else:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"sampling {args.problem}", total=args.n_batches)
            result = compare_on_problem(
                args.problem,
                estimators=args.estimators,
                batch_size=args.batch_size,
                n_batches=args.n_batches,
                seed=args.seed,
                gae_lambda=args.gae_lambda,
                progress=lambda done: bar.update(task, completed=done),
            )
        console.print(render_table(result))
        _write_results(result, plot_comparison, args.output / f"compare_{args.problem}_seed{args.seed}", args, console)
    return 0


def _write_results(result: Any, plot: Callable[[Any, IO[bytes]], None], stem: Path, args: argparse.Namespace, console: Any) -> None:
    """Write ``<stem>.json`` (every number) and, unless ``--no-plot``, ``<stem>.png``, each atomically."""
    json_path = stem.with_suffix(".json")
    _atomic_write(json_path, lambda file: file.write(json.dumps(result.to_dict(), indent=2).encode()))
    console.print(f"numbers: {json_path}")
    if not args.no_plot:
        png_path = stem.with_suffix(".png")
        _atomic_write(png_path, lambda file: plot(result, file))
        console.print(f"plot:    {png_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pgvar`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            return run_compare(args)
    except ValueError as error:  # bad input from the user: one line, no traceback
        parser.exit(2, f"pgvar {args.command}: error: {error}\n")
    return 1  # pragma: no cover - argparse enforces the command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
