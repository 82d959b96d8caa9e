"""The ``pgvar`` console script: arguments in, a table, a JSON file and a PNG plot out.

``pgvar compare`` runs :func:`pgvar.compare.compare_on_problem` on a built-in problem with an exact gradient.
This module only parses, prints and draws; the numbers come from :mod:`pgvar.compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pgvar.compare import PROBLEMS, STATE_BASELINE_ESTIMATORS, ComparisonResult, compare_on_problem


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
        choices=list(STATE_BASELINE_ESTIMATORS),
        default=list(STATE_BASELINE_ESTIMATORS),
        metavar="NAME",
        help=f"estimators to compare (default: all of {', '.join(STATE_BASELINE_ESTIMATORS)})",
    )
    compare.add_argument("--batch-size", type=_positive_int, default=32, help="episodes per batch (default: 32)")
    compare.add_argument("--n-batches", type=_positive_int, default=400, help="independent batches (default: 400)")
    compare.add_argument("--gae-lambda", type=float, default=0.95, help="lambda of the GAE estimator (default: 0.95)")
    compare.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    compare.add_argument(
        "--output", type=Path, default=Path("pgvar_results"), help="folder for the JSON and PNG (default: ./pgvar_results)"
    )
    compare.add_argument("--no-plot", action="store_true", help="write no PNG")
    return parser


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: an existing file is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def plot_comparison(result: ComparisonResult, path: str | os.PathLike[str]) -> None:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_compare(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress

    # The problems' tensors are tiny: intra-op threads only add synchronization, and on a loaded machine
    # OpenMP's spin-waiting makes them 10-20x slower. Leave the other cores to other work.
    torch.set_num_threads(1)

    # Rich wraps at 80 columns when stdout is not a terminal (CI logs, pipes): give the table room there.
    console = Console() if sys.stdout.isatty() else Console(width=120)
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
    stem = args.output / f"compare_{args.problem}_seed{args.seed}"
    json_path = stem.with_suffix(".json")
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(result.to_dict(), indent=2)))
    console.print(f"numbers: {json_path}")
    if not args.no_plot:
        png_path = stem.with_suffix(".png")
        _atomic_write(png_path, lambda tmp: plot_comparison(result, tmp + ".png") or os.replace(tmp + ".png", tmp))
        console.print(f"plot:    {png_path}")
    return 0


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
