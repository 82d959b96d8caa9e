"""``pgvar decompose --env ID``: the Mirage variance decomposition at checkpoints of a training run.

The numbers come from :func:`pgvar.experiments.decompose_training` (nested rollouts at sampled states,
:mod:`pgvar.rollouts`; the estimators of :func:`pgvar.measure.variance_decomposition`). This module parses, checks,
prints a table and draws the plot; the library is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import math
import shlex
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
    format_number,
    legend,
    plot_scale,
    pyplot,
    result_files,
    save_figure,
    terminal_width,
    text_table,
    with_progress,
    write_result_files,
)

#: :data:`pgvar.experiments.DECOMPOSITION_ALGORITHMS` (kept here so that the parser imports no torch).
ALGORITHMS = ("qproptrpo", "qpropppo", "trpo", "ppo", "a2c")
#: How each baseline of the action term is called in the table and the plot.
BASELINE_LABELS = {
    "none": "no baseline",
    "value": "learned V",
    "mc_value": "Monte Carlo V",
    "qprop": "learned Q-Prop CV",
}
Z_95 = 1.959964


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "decompose",
        help="where the policy-gradient variance comes from (Mirage decomposition)",
        description="Train a policy (or load one with --model) and, at each checkpoint, restore the simulator at "
        "sampled states and roll out independent continuations, to split the variance of the single-sample policy "
        "gradient into the trajectory term Sigma_tau, the action term Sigma_a for each baseline (none, learned V, "
        "Monte Carlo V, Q-Prop's control variate when the model has a critic) and the bound on the state term "
        "Sigma_s (Tucker et al. 2018, arXiv:1802.10031).",
        epilog="Terms are traces summed over the actor's parameters, per sample, with 95%% intervals over states; a "
        "small term can come out negative. exit status: 0 done, 2 usage error, 1 failure while running",
    )
    parser.add_argument("--env", required=True, metavar="ID",
                        help="a gymnasium id whose state can be restored (MuJoCo or classic control)")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None, metavar="PATH.zip", help="a saved model to measure as it is")
    parser.add_argument("--algo", choices=ALGORITHMS, default="qproptrpo",
                        help="the class to train, or that saved --model (default: qproptrpo, which has a critic)")  # fmt: skip
    parser.add_argument("--checkpoints", type=int_at_least(0), nargs="+", default=None, metavar="STEPS",
                        help="training steps at which to measure (default: 10000; 0 = untrained; not with --model)")  # fmt: skip
    parser.add_argument("--n-steps", type=positive_int, default=None, metavar="N",
                        help="rollout steps per update of the trained algorithm (default: the class's)")  # fmt: skip
    parser.add_argument("--states", type=positive_int, default=64, metavar="N",
                        help="sampled states per checkpoint (default: 64; the paper: 2000 = 40 x 50)")  # fmt: skip
    parser.add_argument("--states-per-batch", type=positive_int, default=50, metavar="N",
                        help="states per independent batch, a worker's unit (default: 50)")  # fmt: skip
    parser.add_argument("--horizon", type=positive_int, default=None, metavar="N",
                        help="most steps of one continuation (default: to the time limit)")  # fmt: skip
    parser.add_argument("--gamma", type=unit_interval, default=None, help="discount of the returns (default: the model's)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local", help="local processes (default) or Ray")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N", help="parallel batches (default: 1)")
    parser.add_argument("--address", default=None, metavar="ADDR", help="Ray only: an existing cluster")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default: 0)")
    add_output_options(parser, "pgvar_results", "the JSON, Markdown and PNG")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    add_threads_option(parser)
    parser.set_defaults(run=run)


def _rows(run: Any) -> list[tuple[int, str, float, float]]:
    """``(timesteps, term, estimate, standard error)`` for every term of every checkpoint."""
    rows = []
    for checkpoint in run.checkpoints:
        terms = checkpoint["decomposition"]
        rows.append((checkpoint["timesteps"], "Sigma_tau (trajectory)", terms["trajectory"], terms["trajectory_se"]))
        for name, value in terms["action"].items():
            label = BASELINE_LABELS.get(name, name)
            rows.append((checkpoint["timesteps"], f"Sigma_a, {label}", value, terms["action_se"][name]))
        rows.append((checkpoint["timesteps"], "Sigma_s bound", terms["state_bound"], terms["state_bound_se"]))
    return rows


def render_table(run: Any, width: int = 80) -> str:
    """The decomposition as text: one row per checkpoint and term, estimate and 95% interval."""
    import textwrap

    rows = _rows(run)
    cells = []
    for steps, term, value, se in rows:
        interval = f"[{format_number(value - Z_95 * se, fixed=False)}, {format_number(value + Z_95 * se, fixed=False)}]"
        cells.append([str(steps), term, format_number(value, fixed=False), interval if math.isfinite(se) else "n/a"])
    columns = [Column("steps", "right", 9), Column("term", "left", 9), Column("estimate", "right", 8),
               Column("95% interval", "right", 7)]  # fmt: skip
    table, _ = text_table(columns, cells, width)
    horizon = f"at most {run.horizon} steps" if run.horizon else "to the time limit"
    title = (f"{run.env_id}: {run.algo}, {run.n_states} states per checkpoint, continuations {horizon}, "
             f"gamma {run.gamma}, seed {run.seed}")  # fmt: skip
    notes = legend([
        ("Sigma_tau", "E_{s,a} Var_tau(A g): the variance left by the continuation after (s, a)"),
        ("Sigma_a", "E_s Var_a((Q - b) g) for baseline b: all an action-dependent baseline could remove"),
        ("Sigma_s bound", f"E_s |E_a[Q g]|^2 >= Sigma_s (estimated with the {_state_baseline(run)} baseline)"),
    ], width)  # fmt: skip
    return "\n".join([textwrap.fill(title, width), table, notes])


def _state_baseline(run: Any) -> str:
    name = run.checkpoints[0]["decomposition"]["state_baseline"] if run.checkpoints else "none"
    return BASELINE_LABELS.get(name, name)


def render_markdown(run: Any) -> str:
    from pgvar.cli._render import markdown_table

    cells = [[str(steps), term, format_number(value, fixed=False), format_number(Z_95 * se, fixed=False)]
             for steps, term, value, se in _rows(run)]  # fmt: skip
    table = markdown_table(["steps", "term", "estimate", "± 95%"], cells, ["right", "left", "right", "right"])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(run.versions.items()))
    lines = [f"{run.env_id}, {run.algo}, {run.n_states} states per checkpoint, seed {run.seed}. Versions: {versions}."]
    if run.command:
        lines.append(f"Command: `{run.command}`.")
    if run.machine:
        lines.append(f"Machine: {machine_summary(run.machine)}.")
    return f"{table}\n\n" + "  \n".join(lines) + "\n"


def machine_summary(machine: dict[str, Any]) -> str:
    """A result's ``machine`` record in one line."""
    return ", ".join(f"{key} {machine[key]}" for key in ("cpus", "processor", "platform", "torch_cpu_capability",
                                                          "torch_threads") if key in machine)  # fmt: skip


def plot_decomposition(run: Any, path: Path) -> None:
    """Each term with its 95% interval, one marker colour per checkpoint; a log scale when the terms span decades
    (a symmetric log scale when one is negative: negative estimates are drawn as they are)."""
    plt = pyplot()
    rows = _rows(run)
    terms = list(dict.fromkeys(term for _, term, _, _ in rows))
    steps = list(dict.fromkeys(step for step, _, _, _ in rows))
    fig, axis = plt.subplots(figsize=(9, 0.45 * len(terms) + 1.8), constrained_layout=True)
    offset = 0.6 / max(len(steps), 1)
    for j, step in enumerate(steps):
        mine = [row for row in rows if row[0] == step]
        y = [terms.index(term) + (j - (len(steps) - 1) / 2) * offset for _, term, _, _ in mine]
        axis.errorbar([row[2] for row in mine], y, xerr=[Z_95 * row[3] for row in mine], fmt="o", capsize=3,
                      label=f"after {step} steps")  # fmt: skip
    values = [row[2] for row in rows] + [row[2] + s * Z_95 * row[3] for row in rows for s in (-1, 1)]
    scale = plot_scale([v for v in values if math.isfinite(v)])
    if scale == "log":
        axis.set_xscale("log")
    elif scale == "symlog":
        smallest = min(abs(row[2]) for row in rows if row[2] != 0.0 and math.isfinite(row[2]))
        axis.set_xscale("symlog", linthresh=smallest)
        axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(terms)), terms)
    axis.invert_yaxis()
    axis.set_xlabel("trace of the variance term, per sample (95% interval over states)")
    axis.set_title(f"pgvar decompose: {run.env_id}, {run.algo}, {run.n_states} states per checkpoint")
    axis.legend(fontsize=8)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    args.library_names = {"n_states": "--states", "env_id": "--env"}
    if args.model is not None and args.checkpoints is not None:
        raise UsageError("--checkpoints does not apply with --model (a saved model is measured as it is)")
    if args.model is not None and args.n_steps is not None:
        raise UsageError("--n-steps does not apply with --model (no training)")
    if args.address is not None and args.backend != "ray":
        raise UsageError(f"--address is for --backend ray, got --backend {args.backend}")
    checkpoints = args.checkpoints if args.checkpoints is not None else ([0] if args.model is not None else [10_000])
    if checkpoints != sorted(set(checkpoints)):
        raise UsageError(f"--checkpoints must be increasing, got {' '.join(map(str, checkpoints))}")
    check_env_id(args.env)
    model = None
    if args.model is not None:
        model = load_model(args.model, args.algo)
    stem = args.output / f"decompose_{args.env}_seed{args.seed}"
    outputs = result_files(stem, plot=not args.no_plot)
    check_output_files(outputs, overwrite=args.overwrite)
    apply_threads(args.threads)
    result = _decompose(args, model, checkpoints)
    result.command = decompose_command(args)
    write_result_files(outputs, result.to_dict(), render_markdown(result),
                       lambda path: plot_decomposition(result, path), render_table(result, terminal_width()))  # fmt: skip
    return 0


def decompose_command(args: argparse.Namespace) -> str:
    """The ``pgvar decompose`` command line that reproduces this run (recorded in its JSON; the output options,
    ``--backend``, ``--workers`` and ``--address`` are left out: they do not change the numbers)."""
    words = ["pgvar", "decompose", "--env", args.env]
    if args.model is not None:
        words += ["--model", str(args.model)]
    words += ["--algo", args.algo]
    if args.checkpoints is not None:
        words += ["--checkpoints", *map(str, args.checkpoints)]
    for flag, value in (("--n-steps", args.n_steps), ("--states", args.states),
                        ("--states-per-batch", args.states_per_batch), ("--horizon", args.horizon),
                        ("--gamma", args.gamma), ("--seed", args.seed)):  # fmt: skip
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def _decompose(args: argparse.Namespace, model: Any, checkpoints: list[int]) -> Any:
    from pgvar.experiments import decompose_training

    algo_kwargs = {"n_steps": args.n_steps} if args.n_steps is not None else {}
    return with_progress(lambda progress: decompose_training(
        args.env, model=model, algo=args.algo, algo_kwargs=algo_kwargs, checkpoints=checkpoints,
        n_states=args.states, states_per_batch=args.states_per_batch, horizon=args.horizon, gamma=args.gamma,
        backend=args.backend, workers=args.workers, address=args.address, seed=args.seed, progress=progress,
    ))  # fmt: skip
