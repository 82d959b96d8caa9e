"""``pgvar sweep CONFIG`` and ``pgvar aggregate RESULTS``: run a grid of training runs, then summarize it.

``sweep`` calls :func:`pgvar.experiments.run_sweep` (units idempotent and resumable: a rerun of the same command
continues where the last one stopped) and shows a live progress line and, at the end, every failed unit with its
error. ``aggregate`` calls :func:`pgvar.experiments.aggregate_results` and writes a Markdown table, the JSON and a
PNG of the learning curves. The library is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from pgvar.cli._args import check_env_id, int_at_least, positive_int
from pgvar.cli._render import (
    UsageError,
    check_output_files,
    format_column,
    format_number,
    markdown_table,
    pyplot,
    save_figure,
    write_json,
    write_text,
)

#: The file in a results folder that records the ``pgvar sweep`` command that last ran there.
COMMAND_FILE = "command.json"


def add_parsers(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run a grid of learners x environments x seeds (resumable)",
        description="Run every unit (learner x environment x seed) of a sweep config that has no result yet. Units "
        "are idempotent: rerunning the same command skips finished units and resumes interrupted ones from their "
        "last checkpoint. CONFIG is a TOML file or the name of a shipped config (mirage-qprop, normalization).",
        epilog="exit status: 0 every unit done, 1 some unit failed (each is listed with its error), 2 usage error",
    )
    sweep.add_argument("config", metavar="CONFIG", help="a sweep config (.toml path) or a shipped config's name")
    sweep.add_argument("--results", type=Path, default=None, metavar="DIR",
                       help="results folder (default: ./pgvar_results/<config name>)")  # fmt: skip
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local process pool (default) or a Ray cluster")  # fmt: skip
    sweep.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="units run at once (default: the CPU count; with Ray, the CPUs of a local cluster)")  # fmt: skip
    sweep.add_argument("--address", default=None, metavar="ADDR",
                       help="Ray only: an existing cluster ('auto' or ray://host:10001); default starts a local one")  # fmt: skip
    reduce = sweep.add_argument_group("overrides of the config (reduced runs)")
    seeds = reduce.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=positive_int, default=None, metavar="N", help="seeds 0 .. N-1")
    seeds.add_argument("--seed-list", type=int_at_least(0), nargs="+", default=None, metavar="S", help="these seeds")
    reduce.add_argument("--envs", nargs="+", default=None, metavar="ID", help="these environments")
    reduce.add_argument("--total-timesteps", type=positive_int, default=None, metavar="N", help="steps per unit")
    sweep.set_defaults(run=run_sweep_command)

    aggregate = commands.add_parser(
        "aggregate",
        help="aggregate a sweep's results: Markdown table, JSON, learning curves",
        description="Per environment and learner: the final return over seeds (mean and IQM with stratified "
        "bootstrap intervals, rliable-style), the probability of improvement between learners, and learning curves "
        "with bootstrap bands. Writes aggregate.md, aggregate.json and aggregate.png.",
        epilog="exit status: 0 done, 2 usage error",
    )
    aggregate.add_argument("results", type=Path, metavar="RESULTS", help="a folder written by pgvar sweep")
    aggregate.add_argument("--reference", action="store_true",
                           help="put the config's published [reference] numbers beside ours")  # fmt: skip
    aggregate.add_argument("--output", type=Path, default=None, metavar="DIR", help="folder for the files (default: RESULTS)")
    aggregate.add_argument("--overwrite", action="store_true", help="replace the files of an earlier aggregate")
    aggregate.add_argument("--reps", type=int_at_least(100), default=2000, help="bootstrap resamples (default: 2000)")
    aggregate.add_argument("--no-plot", action="store_true", help="write no PNG")
    aggregate.set_defaults(run=run_aggregate_command)


# ----------------------------------------------------------------------------------------------------- sweep
def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.seeds is not None:
        overrides["seeds"] = list(range(args.seeds))
    if args.seed_list is not None:
        overrides["seeds"] = list(args.seed_list)
    if args.envs is not None:
        overrides["envs"] = list(args.envs)
    if args.total_timesteps is not None:
        overrides["total_timesteps"] = args.total_timesteps
    return overrides


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(state: Any) -> str:
    """``units 3/12 done (1 skipped), 2 running, 0 failed, ETA 4m10s`` for a :class:`~pgvar.experiments.SweepProgress`."""
    skipped = f" ({state.skipped} already finished)" if state.skipped else ""
    return (f"units {state.done}/{state.total} done{skipped}, {state.running} running, {state.failed} failed, "
            f"ETA {_duration(state.eta_seconds)}")  # fmt: skip


def run_sweep_command(args: argparse.Namespace) -> int:
    from pgvar.experiments import load_sweep_config, run_sweep

    if args.address is not None and args.backend != "ray":
        raise UsageError(f"--address is for --backend ray, got --backend {args.backend}")
    args.library_names = {"total_timesteps": "--total-timesteps"}
    config = load_sweep_config(args.config, _overrides(args))
    for env_id in config.envs:
        check_env_id(env_id, flag="--envs" if args.envs is not None else "config envs:")
    results = args.results if args.results is not None else Path("pgvar_results") / config.name
    check_output_files([results / COMMAND_FILE], overwrite=True, flag="--results")
    write_json(results / COMMAND_FILE, {"command": sweep_command(args, results), "config": str(args.config)})
    n_units = len(config.units())
    print(f"sweep {config.name}: {len(config.learners)} learners x {len(config.envs)} envs x {len(config.seeds)} seeds "
          f"= {n_units} units of {config.total_timesteps} steps, backend {args.backend}; results: {results}")  # fmt: skip
    state = _run_with_progress(config, results, args, run_sweep)
    print(f"sweep {config.name}: {progress_line(state).split(', ETA')[0]}")
    for failure in state.failures:
        print(f"FAILED {failure['unit_id']}: {failure['error']}")
    if state.failures:
        print(f"(tracebacks in {results}/units/<unit>/error.json; fix the cause and rerun the same command: finished "
              "units are skipped)")  # fmt: skip
        return 1
    print(f"next: pgvar aggregate {results}")
    return 0


def sweep_command(args: argparse.Namespace, results: Path) -> str:
    """The ``pgvar sweep`` command line that reproduces this run (recorded in the results folder)."""
    words = ["pgvar", "sweep", str(args.config), "--results", str(results)]
    for flag, value in (("--seeds", args.seeds), ("--total-timesteps", args.total_timesteps)):
        if value is not None:
            words += [flag, str(value)]
    for flag, values in (("--seed-list", args.seed_list), ("--envs", args.envs)):
        if values is not None:
            words += [flag, *map(str, values)]
    return shlex.join(words)


def _run_with_progress(config: Any, results: Path, args: argparse.Namespace, run_sweep: Any) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console(stderr=True)
    kwargs = {"backend": args.backend, "workers": args.workers, "address": args.address}
    if not console.is_terminal:  # a log file: one line per change
        return run_sweep(config, results, progress=lambda s: print(progress_line(s), file=sys.stderr, flush=True), **kwargs)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[line]}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(config.name, total=len(config.units()), line="starting")

        def progress(state: Any) -> None:
            bar.update(task, completed=state.finished, line=progress_line(state))

        return run_sweep(config, results, progress=progress, **kwargs)


# ------------------------------------------------------------------------------------------------- aggregate
def _interval(point: float, low: float, high: float, *, fixed: bool) -> str:
    return f"{format_number(point, fixed=fixed)} [{format_number(low, fixed=fixed)}, {format_number(high, fixed=fixed)}]"


def _fixed(values: list[float]) -> bool:
    return all("e" not in text for text in format_column(values))


def render_aggregate(aggregate: Any, reference: bool, command: str) -> str:
    """The Markdown of an aggregate: the results table, probabilities of improvement, and how it was made."""
    rows = aggregate.rows
    config = aggregate.sweep["config"]
    numbers = [row[key] for row in rows for key in ("mean", "mean_low", "mean_high", "iqm", "iqm_low", "iqm_high") if key in row]
    fixed = _fixed(numbers)
    headers = ["env", "learner", "n", "mean [95% CI]", "IQM [95% CI]"]
    if reference:
        headers.append("reference mean ± SD")
    cells = []
    for row in rows:
        line = [row["env"], row["learner"], str(row["n"])]
        for key in ("mean", "iqm"):
            line.append(_interval(row[key], row[f"{key}_low"], row[f"{key}_high"], fixed=fixed) if key in row else "n/a")
        if reference:
            published = row.get("reference")
            line.append(f"{format_number(published['mean'], fixed=fixed)} ± {format_number(published['sd'], fixed=fixed)}"
                        if published else "")  # fmt: skip
        cells.append(line)
    parts = [f"## {aggregate.sweep.get('name', 'sweep')}: final return", "",
             markdown_table(headers, cells, ["left", "left", "right", "right", "right", "right"][: len(headers)])]  # fmt: skip
    fraction = config.get("final_fraction", 0.1)
    parts += ["", f"n: seeds that finished. Final return: the mean return of the episodes that ended in the last "
              f"{100 * fraction:g}% of the {config['total_timesteps']} steps; mean and IQM (interquartile "
              "mean) over seeds with 95% stratified-bootstrap percentile intervals (Agarwal et al. 2021)."]  # fmt: skip
    if reference:
        source = config.get("reference", {}).get("source")
        parts.append(f"Reference: {source}." if source else "Reference: the config has no [reference] source.")
    for env_id, pairs in aggregate.improvement.items():
        names = list(dict.fromkeys(a for a, _ in pairs))
        table = [[a] + [_interval(*pairs[a, b], fixed=True) if (a, b) in pairs else "" for b in names] for a in names]
        parts += ["", f"Probability that the row's learner improves on the column's, {env_id} (95% CI):", "",
                  markdown_table(["P(row > column)", *names], table, ["left"] + ["right"] * len(names))]  # fmt: skip
    if aggregate.missing:
        shown = ", ".join(aggregate.missing[:5]) + (" ..." if len(aggregate.missing) > 5 else "")
        parts += ["", f"Missing (failed or not finished): {len(aggregate.missing)} units: {shown}."]
    parts += ["", *provenance_lines(aggregate, command)]
    return "\n".join(parts) + "\n"


def provenance_lines(aggregate: Any, command: str) -> list[str]:
    config = aggregate.sweep["config"]
    lines = [f"Command: `{command}`.", f"Seeds: {config['seeds']}; {config['total_timesteps']} steps per unit."]
    for versions in aggregate.provenance.get("versions", []):
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
    for machine in aggregate.provenance.get("machine", []):
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in sorted(machine.items())) + ".")
    return [line + "  " for line in lines[:-1]] + lines[-1:]  # Markdown line breaks


def plot_curves(aggregate: Any, reference: bool, path: Path) -> None:
    """One panel per environment: each learner's mean learning curve over seeds with its bootstrap band (and the
    published mean ± SD at the end of training with ``reference``)."""
    plt = pyplot()
    envs = list(dict.fromkeys(env for env, _ in aggregate.curves))
    fig, axes = plt.subplots(1, max(len(envs), 1), figsize=(5.5 * max(len(envs), 1), 4), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for axis, env_id in zip(axes[0], envs):
        for index, ((env, learner), curve) in enumerate(item for item in aggregate.curves.items() if item[0][0] == env_id):
            colour = f"C{index}"
            axis.plot(curve["steps"], curve["mean"], color=colour, label=learner)
            axis.fill_between(curve["steps"], curve["low"], curve["high"], color=colour, alpha=0.2, linewidth=0)
            published = next((row.get("reference") for row in aggregate.rows
                              if row["env"] == env and row["learner"] == learner), None)  # fmt: skip
            if reference and published:
                axis.errorbar([curve["steps"][-1]], [published["mean"]], yerr=[published["sd"]], fmt="s",
                              color=colour, capsize=3, markerfacecolor="none")  # fmt: skip
        axis.set_title(env_id)
        axis.set_xlabel("environment steps")
        axis.set_ylabel("episode return (mean over seeds, 95% band)")
        axis.legend(fontsize=8)
    fig.suptitle(f"pgvar aggregate: {aggregate.sweep.get('name', 'sweep')}"
                 + ("  (squares: published mean ± SD)" if reference else ""))  # fmt: skip
    save_figure(fig, path)


def run_aggregate_command(args: argparse.Namespace) -> int:
    if not args.results.is_dir():
        raise UsageError(f"RESULTS: no such folder: {str(args.results)!r}")
    if not (args.results / "sweep.json").is_file():
        raise UsageError(f"RESULTS {str(args.results)!r} is not a folder written by pgvar sweep (no sweep.json)")
    output = args.output if args.output is not None else args.results
    files = [output / "aggregate.md", output / "aggregate.json"] + ([] if args.no_plot else [output / "aggregate.png"])
    check_output_files(files, overwrite=args.overwrite)
    from pgvar.experiments import aggregate_results

    aggregate = aggregate_results(args.results, reps=args.reps)
    if not aggregate.rows:
        raise UsageError(f"RESULTS {str(args.results)!r}: no unit has finished yet")
    command = _aggregate_command(args)
    text = render_aggregate(aggregate, args.reference, command)
    write_text(files[0], text)
    write_json(files[1], aggregate.to_dict())
    if not args.no_plot:
        plot_curves(aggregate, args.reference, files[2])
    print(text, end="")
    print(f"\nwritten: {', '.join(str(path) for path in files)}")
    return 0


def _aggregate_command(args: argparse.Namespace) -> str:
    import json

    sweep_command = ""
    recorded = args.results / COMMAND_FILE
    if recorded.is_file():
        sweep_command = json.loads(recorded.read_text()).get("command", "") + "; "
    options = " --reference" if args.reference else ""
    return f"{sweep_command}pgvar aggregate {args.results}{options}"
