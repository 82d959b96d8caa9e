"""``pgvar frontier``: true reward against divergence from a reference policy, one curve per regularizer.

Exact on :class:`~pgvar.problems.GoodhartBandit` and :class:`~pgvar.problems.RewardHackingMDP`
(:func:`pgvar.experiments.exact_frontier`, with the k1 / k3 gradient variance), measured on a MuJoCo task with a
speed-limit proxy (:func:`pgvar.experiments.env_frontier`). This module parses, checks, prints a table, writes the
JSON and the Markdown table and draws the plot; the library is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from pgvar.cli._args import (
    add_output_options,
    add_threads_option,
    apply_threads,
    check_env_id,
    int_at_least,
    positive_int,
)
from pgvar.cli._render import (
    Column,
    UsageError,
    check_output_files,
    format_number,
    markdown_table,
    pyplot,
    result_files,
    save_figure,
    terminal_width,
    text_table,
    with_progress,
    write_json,
    write_result_files,
)

#: :data:`pgvar.experiments.EXACT_PROBLEMS` (kept here so that the parser imports no torch).
PROBLEMS = ("goodhart", "reward_hacking")
#: :data:`pgvar.experiments.FRONTIER_FAMILIES`: how each curve is called in the table and the plot.
FAMILY_LABELS = {
    "reference": "reference",
    "kl": "KL penalty (coef)",
    "odds_ratio_cap": "odds-ratio cap (c)",
    "early_stopping": "early stopping (step)",
    "om_sqrt_chi2": "state-OM sqrt(chi2) penalty (coef)",
}
#: Options of the exact problems and of ``--env`` (``None`` in the parser: "not given").
EXACT_ONLY = ("kl_budgets", "variance_episodes")
ENV_ONLY = ("checkpoints", "reference_steps", "train_steps", "eval_episodes", "cap_coef", "threshold", "penalty")
#: ``--smoke`` settings of ``--env`` (seconds).
ENV_SMOKE: dict[str, Any] = {"reference_steps": 256, "train_steps": 256, "checkpoints": [128, 256], "eval_episodes": 2,
             "kl_coefs": [1.0], "caps": [2.0], "om_coefs": [1.0], "n_steps": 128}  # fmt: skip


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not (value >= 0.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _nonnegative(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _cap(text: str) -> float:
    value = _nonnegative(text)
    if value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a cap >= 1, got {text!r}")
    return value


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "frontier",
        help="true reward vs divergence from a reference: KL penalty, odds-ratio cap, early stopping, OM penalty",
        description="The frontier of true reward against the divergence from a reference policy for each "
        "regularizer: exact on the Goodhart bandit (light- and heavy-tailed proxy errors) and the reward-hacking MDP "
        "(with the gradient variance of the KL penalty as k1 in the reward vs k3 in the loss), or measured with "
        "pgvar.PPO on a MuJoCo task whose proxy reward ignores Safety-Gymnasium's speed limit (--env).",
        epilog="x-axis: the action KL E_s KL(pi(.|s) || pi_ref(.|s)) (exact; with --env averaged over the states the "
        "policy visits in the evaluation episodes). exit status: 0 done, 2 usage error, 1 failure while running",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--problem", choices=PROBLEMS, default=None,
                      help="an exact problem (default: reward_hacking)")  # fmt: skip
    mode.add_argument("--env", default=None, metavar="ID",
                      help="a MuJoCo locomotion id with a Safety-Gymnasium speed limit (Hopper-v5, HalfCheetah-v5)")  # fmt: skip
    parser.add_argument("--kl-coefs", type=_positive, nargs="+", default=None, metavar="C", help="KL coefficients")
    parser.add_argument("--caps", type=_cap, nargs="+", default=None, metavar="C", help="odds-ratio caps >= 1")
    parser.add_argument("--checkpoints", type=positive_int, nargs="+", default=None, metavar="N",
                        help="--env: early stopping: PPO steps at which the unregularized run is evaluated")  # fmt: skip
    parser.add_argument("--kl-budgets", type=_positive, nargs="+", default=None, metavar="KL",
                        help="exact: early stopping: the ascent is read where its action KL first reaches each")  # fmt: skip
    parser.add_argument("--om-coefs", type=_positive, nargs="+", default=None, metavar="C",
                        help="state-occupancy sqrt(chi2) coefficients (reward_hacking, or --env: ref_measure='state')")  # fmt: skip
    parser.add_argument("--variance-episodes", type=int_at_least(2), default=None, metavar="N",
                        help="episodes of the k1 / k3 gradient-variance measurement (exact; default 4000)")  # fmt: skip
    parser.add_argument("--reference-steps", type=positive_int, default=None, metavar="N",
                        help="--env: PPO steps of the reference on the true reward (default 50000)")  # fmt: skip
    parser.add_argument("--train-steps", type=positive_int, default=None, metavar="N",
                        help="--env: PPO steps of each run on the proxy reward (default 30000)")  # fmt: skip
    parser.add_argument("--eval-episodes", type=int_at_least(2), default=None, metavar="N",
                        help="--env: seeded evaluation episodes per point (default 10)")  # fmt: skip
    parser.add_argument("--cap-coef", type=_nonnegative, default=None, metavar="C",
                        help="--env: coefficient of the odds-ratio hinge penalty (default 1)")  # fmt: skip
    parser.add_argument("--threshold", type=_positive, default=None, metavar="V",
                        help="--env: the speed limit (default: Safety-Gymnasium's)")  # fmt: skip
    parser.add_argument("--penalty", type=_nonnegative, default=None, metavar="W",
                        help="--env: the true reward's price of a step above the limit (default 1)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds), for tests")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default: 0)")
    add_output_options(parser, "pgvar_results", "the JSON, Markdown and PNG")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    add_threads_option(parser)
    parser.set_defaults(run=run)


# ------------------------------------------------------------------------------------------------ tables
def _value(point: dict[str, Any], name: str, env: bool) -> str:
    if name not in point:
        return ""
    text = format_number(point[name])
    return f"{text} ± {format_number(point[name + '_se'], 2)}" if env and name + "_se" in point else text


def _parameter(point: dict[str, Any]) -> str:
    parameter = point["parameter"]
    return "" if parameter is None else format(parameter, "g")


def _point_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    env = result["mode"] == "env"
    names = ["true_return", "proxy_return", "kl"]
    headers = ["true return", "proxy return", "action KL"]
    if env:
        names.append("cost_rate")
        headers.append("steps over the limit")
    elif any("kl_state" in point for point in result["points"]):
        names += ["kl_state", "sqrt_chi2_state"]
        headers += ["state-OM KL", "state-OM sqrt(chi2)"]
    first = [] if env else ["problem"]
    rows = [([] if env else [point["problem"]]) + [FAMILY_LABELS.get(point["family"], point["family"]),
            _parameter(point)] + [_value(point, name, env) for name in names] for point in result["points"]]  # fmt: skip
    return [*first, "regularizer", "parameter", *headers], rows, ["left"] * (len(first) + 1) + ["right"] * (len(names) + 1)


def _variance_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for entry in result.get("gradient_variance", []):
        rows.append([entry["problem"], entry["estimator"], format(entry["coef"], "g"),
                     f"{format_number(entry['variance_trace'])} ± {format_number(entry['variance_trace_se'], 2)}",
                     f"{format_number(entry['penalty_variance_trace'])} ± "
                     f"{format_number(entry['penalty_variance_trace_se'], 2)}",
                     format_number(entry["bias_norm"]), format_number(entry["max_abs_z"])])  # fmt: skip
    return rows


VARIANCE_HEADERS = ["problem", "estimator", "coef", "tr Var (per episode)", "penalty's tr Var", "|bias|", "bias-z"]


def _title(result: dict[str, Any]) -> str:
    settings = result["settings"]
    if result["mode"] == "env":
        return (f"{settings['env_id']}: proxy = the task's reward, true = proxy - {settings['penalty']:g} per step "
                f"faster than {settings['threshold']:g}; reference: PPO {settings['reference_steps']} steps on the "
                f"true reward; each run: PPO {settings['train_steps']} steps on the proxy from the reference; "
                f"{settings['eval_episodes']} evaluation episodes (mean ± standard error), seed {settings['seed']}")
    what = (f"GoodhartBandit, {settings['n_arms']} arms" if result["mode"] == "goodhart"
            else "RewardHackingMDP (defaults)")  # fmt: skip
    return f"{what}: every point exact; seed {settings['seed']}{' (smoke)' if settings['smoke'] else ''}"


def render_markdown(result: dict[str, Any]) -> str:
    """The frontier (and the gradient variance) as Markdown, from the JSON that ``pgvar frontier`` writes."""
    headers, rows, align = _point_rows(result)
    parts = [f"{_title(result)}.", "", markdown_table(headers, rows, align)]
    variance = _variance_rows(result)
    if variance:
        first = result["gradient_variance"][0]
        twin = f" (of a {first['n_arms']}-arm bandit drawn with the same seed)" if first["n_arms"] else ""
        parts += ["", f"Gradient of the KL-penalized objective, k1 in the reward vs k3 in the loss: "
                  f"{first['episodes']} sampled episodes at the policy {first['policy']}{twin}; ± one standard "
                  "error; bias-z = the largest |bias| / standard error over coordinates.", "",
                  markdown_table(VARIANCE_HEADERS, variance, ["left", "left"] + ["right"] * 5)]  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in sorted(result["versions"].items()))
    if "command" in result:
        parts += ["", f"Command: `{result['command']}`. Versions: {versions}."]
    else:
        parts += ["", f"Versions: {versions}."]
    return "\n".join(parts) + "\n"


def render_table(result: dict[str, Any], width: int = 80) -> str:
    import textwrap

    headers, rows, align = _point_rows(result)
    columns = [Column(h, a, 9 - i) for i, (h, a) in enumerate(zip(headers, align))]
    table, _ = text_table(columns, rows, width)
    out = [textwrap.fill(_title(result), width), table]
    variance = _variance_rows(result)
    if variance:
        columns = [Column(h, a, 9 - i) for i, (h, a) in
                   enumerate(zip(VARIANCE_HEADERS, ["left", "left"] + ["right"] * 5))]  # fmt: skip
        out += ["", text_table(columns, variance, width)[0]]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------- plot
def plot_frontier(result: dict[str, Any], path: Path) -> None:
    """True return against the action KL, one panel per problem, one marker set per regularizer."""
    plt = pyplot()
    problems = list(dict.fromkeys(point.get("problem", result["settings"].get("env_id")) for point in result["points"]))
    fig, axes = plt.subplots(1, len(problems), figsize=(max(7.0, 5.2 * len(problems)), 4.4), constrained_layout=True,
                             squeeze=False)  # fmt: skip
    markers = {"kl": "o-", "odds_ratio_cap": "s-", "early_stopping": "^--", "om_sqrt_chi2": "D-"}
    colors = {"kl": "C0", "odds_ratio_cap": "C1", "early_stopping": "C2", "om_sqrt_chi2": "C3"}  # the same in every plot
    for axis, problem in zip(axes[0], problems):
        mine = [p for p in result["points"] if p.get("problem", result["settings"].get("env_id")) == problem]
        for family in dict.fromkeys(p["family"] for p in mine):
            points = sorted((p for p in mine if p["family"] == family), key=lambda p: p["kl"])
            kl = [p["kl"] for p in points]
            true = [p["true_return"] for p in points]
            label = FAMILY_LABELS.get(family, family)
            if family == "reference":
                axis.plot(kl, true, "k*", markersize=12, label=label, zorder=5)
            elif "true_return_se" in points[0]:
                axis.errorbar(kl, true, yerr=[p["true_return_se"] for p in points], fmt=markers.get(family, "o-"),
                              color=colors.get(family), capsize=3, label=label)  # fmt: skip
            else:
                axis.plot(kl, true, markers.get(family, "o-"), color=colors.get(family), label=label)
        axis.set_xscale("symlog", linthresh=1e-2)
        axis.set_xlabel("action KL to the reference")
        axis.set_ylabel("true return")
        axis.set_title(problem)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("pgvar frontier: true reward against divergence from the reference")
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- run
def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def run(args: argparse.Namespace) -> int:
    args.library_names = {"kl_coefs": "--kl-coefs", "om_coefs": "--om-coefs", "kl_budgets": "--kl-budgets",
                          "env_id": "--env"}  # fmt: skip
    if args.env is not None:
        wrong = _given(args, EXACT_ONLY)
        if wrong:
            raise UsageError(f"{wrong[0]} does not apply with --env {args.env}")
        check_env_id(args.env)
        from pgvar.problems import SAFETY_VELOCITY_THRESHOLDS

        name = args.env.split("-v")[0]
        if args.threshold is None and name not in SAFETY_VELOCITY_THRESHOLDS:
            raise UsageError(f"--env {args.env}: no Safety-Gymnasium speed limit is known for it (known: "
                             f"{', '.join(sorted(SAFETY_VELOCITY_THRESHOLDS))}); pass --threshold")  # fmt: skip
        label = args.env
    else:
        args.problem = args.problem or "reward_hacking"
        wrong = _given(args, ENV_ONLY)
        if wrong:
            raise UsageError(f"{wrong[0]} does not apply with --problem {args.problem}")
        if args.om_coefs is not None and args.problem != "reward_hacking":
            raise UsageError(f"--om-coefs does not apply with --problem {args.problem} (a bandit has one state)")
        label = args.problem
    if args.checkpoints is not None and args.checkpoints != sorted(set(args.checkpoints)):
        raise UsageError(f"--checkpoints must be increasing, got {' '.join(map(str, args.checkpoints))}")
    stem = args.output / f"frontier_{label}_seed{args.seed}"
    outputs = result_files(stem, plot=not args.no_plot)
    check_output_files(outputs, overwrite=args.overwrite)
    apply_threads(args.threads)
    result = _run_env(args, outputs[0]) if args.env is not None else _run_exact(args)
    result["command"] = _command(args)
    write_result_files(outputs, result, render_markdown(result), lambda path: plot_frontier(result, path),
                       render_table(result, terminal_width()))  # fmt: skip
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line, rebuilt from the options given (without --output, --overwrite, --threads)."""
    parts = ["pgvar frontier", f"--env {args.env}" if args.env else f"--problem {args.problem}"]
    for name in ("kl_coefs", "caps", "checkpoints", "kl_budgets", "om_coefs", "variance_episodes", "reference_steps",
                 "train_steps", "eval_episodes", "cap_coef", "threshold", "penalty"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            text = " ".join(format(v, "g") for v in value) if isinstance(value, list) else format(value, "g")
            parts.append(f"--{name.replace('_', '-')} {text}")
    parts += (["--smoke"] if args.smoke else []) + [f"--seed {args.seed}"]
    return " ".join(parts)


def _run_exact(args: argparse.Namespace) -> dict[str, Any]:
    from pgvar.experiments import exact_frontier

    options = {name: getattr(args, name) for name in ("kl_coefs", "caps", "om_coefs", "kl_budgets")}
    if args.variance_episodes is not None:
        options["variance_episodes"] = args.variance_episodes
    return with_progress(lambda progress: exact_frontier(args.problem, smoke=args.smoke, seed=args.seed,
                                                          progress=progress, **options))  # fmt: skip


def _run_env(args: argparse.Namespace, json_path: Path) -> dict[str, Any]:
    """Train and evaluate; the points found so far are written to the JSON as they come (``"complete": false``)."""
    from pgvar.experiments import default_env_learners, env_frontier

    smoke = ENV_SMOKE if args.smoke else {}
    kl_coefs = args.kl_coefs or smoke.get("kl_coefs") or [0.03, 0.3, 3.0]
    caps = args.caps or smoke.get("caps") or [1.5, 4.0]
    learners = default_env_learners(kl_coefs, caps, 1.0 if args.cap_coef is None else args.cap_coef,
                                    args.om_coefs or smoke.get("om_coefs") or ())
    options: dict[str, Any] = {
        "reference_steps": args.reference_steps or smoke.get("reference_steps", 50_000),
        "train_steps": args.train_steps or smoke.get("train_steps", 30_000),
        "checkpoints": args.checkpoints or smoke.get("checkpoints"),
        "eval_episodes": args.eval_episodes or smoke.get("eval_episodes", 10),
        "threshold": args.threshold,
        "penalty": 1.0 if args.penalty is None else args.penalty,
    }
    if args.smoke:
        options["ppo_kwargs"] = {"n_steps": smoke["n_steps"], "batch_size": 64}
    points: list[dict[str, Any]] = []

    def on_point(point: dict[str, Any]) -> None:
        points.append(point)
        write_json(json_path, {"mode": "env", "complete": False, "points": points})

    return with_progress(lambda progress: env_frontier(args.env, learners=learners, seed=args.seed,
                                                        progress=progress, on_point=on_point, **options))  # fmt: skip
