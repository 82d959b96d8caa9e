"""What the full grids cost: measured CPU seconds per environment step, and the CPU-hours of each shipped config.

1. Measure (``python benchmarks/grid_cost.py``, about 5 CPU-minutes here): for every shipped sweep config, its
   first learner of each algorithm class runs as a sweep unit (:func:`pgvar.experiments.run_unit`: one torch
   thread, the unit's own environment, model and ``result.json``) on each of the config's environments for whole
   rollouts of at least ``--min-steps`` steps; the unit's CPU time (``time.process_time``) over its steps is the cost
   of a step. The Mirage decomposition is measured the same way: :func:`pgvar.experiments.decompose_training` on
   one batch of ``--decompose-states`` states of an untrained QPropTRPO on HalfCheetah-v5 (six continuations per
   state, each to the time limit). Everything goes to ``benchmarks/results/grid-cost.json`` with the versions, the
   machine and its load average, then to the table.
2. Table (``python benchmarks/grid_cost.py --table``): ``benchmarks/results/grid-cost.md`` from that JSON only;
   the docs pages show it between ``BEGIN GENERATED`` markers (``benchmarks/publish_results.py``), and
   ``tests/test_published_results.py`` fails when it differs from what this command writes.

A grid's CPU-hours are the sum over its learners and environments of seeds x steps x the measured cost of a step
of that learner's algorithm class (learners of one class differ only in their estimator, which costs little next
to the simulator and the networks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # so that `python benchmarks/grid_cost.py` measures pgvar from this checkout
    sys.path.insert(0, str(REPO))
JSON_PATH = REPO / "benchmarks" / "results" / "grid-cost.json"
TABLE_PATH = REPO / "benchmarks" / "results" / "grid-cost.md"
#: The Mirage decomposition at the paper's resolution: 40 batches of 50 states at every 100 of 1000 iterations.
PAPER_STATES = 2000
PAPER_CHECKPOINTS = 10
DECOMPOSE_ENV = "HalfCheetah-v5"
CLUSTER_CPUS = 32


# ---------------------------------------------------------------------------------------------- measuring
def grids() -> list[Any]:
    """Every shipped config."""
    from pgvar.experiments import load_sweep_config, shipped_configs

    return [load_sweep_config(name) for name in shipped_configs()]


def _rollout_steps(learner: Any, n_envs: int) -> int:
    import importlib
    import inspect

    from pgvar.experiments.config import ALGORITHMS

    module, attribute = ALGORITHMS[learner.algo].split(":")
    cls = getattr(importlib.import_module(module), attribute)
    default = inspect.signature(cls.__init__).parameters["n_steps"].default
    return int(learner.kwargs.get("n_steps", default)) * n_envs


def measure_unit(config: Any, learner: Any, env_id: str, min_steps: int) -> dict[str, Any]:
    """CPU seconds per step of one sweep unit of whole rollouts of at least ``min_steps`` steps."""
    from pgvar.experiments import UnitSpec, run_unit

    rollout = _rollout_steps(learner, config.n_envs)
    steps = rollout * math.ceil(min_steps / rollout)
    unit = UnitSpec(learner, env_id, 0, steps, config.checkpoint_every, config.n_envs, dict(config.env_kwargs),
                    config.final_fraction, 1)  # fmt: skip
    with tempfile.TemporaryDirectory() as results:
        result = run_unit(unit, results)
    return {"config": config.name, "learner": learner.name, "algo": learner.algo, "env": env_id, "steps": steps,
            "cpu_seconds": result["cpu_seconds"], "wall_seconds": result["wall_seconds"],
            "cpu_seconds_per_step": result["cpu_seconds"] / steps}  # fmt: skip


def measure_decomposition(n_states: int) -> dict[str, Any]:
    """CPU seconds per sampled state of the decomposition (one batch, untrained QPropTRPO, one thread)."""
    import torch

    from pgvar.experiments import decompose_training

    torch.set_num_threads(1)
    started = time.process_time()
    run = decompose_training(DECOMPOSE_ENV, algo="qproptrpo", checkpoints=[0], n_states=n_states,
                             states_per_batch=n_states)  # fmt: skip
    cpu = time.process_time() - started
    return {"env": DECOMPOSE_ENV, "algo": run.algo, "n_states": n_states, "cpu_seconds": cpu,
            "continuation_steps": run.checkpoints[0]["continuation_steps"], "cpu_seconds_per_state": cpu / n_states}  # fmt: skip


def measure(min_steps: int, decompose_states: int) -> dict[str, Any]:
    import torch

    from pgvar.experiments.unit import library_versions, machine

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    configs, units = [], []
    for config in grids():
        representatives: dict[str, Any] = {}
        for learner in config.learners:
            representatives.setdefault(learner.algo, learner)
        configs.append({"name": config.name, "envs": list(config.envs), "seeds": len(config.seeds),
                        "total_timesteps": config.total_timesteps,
                        "learners": {learner.name: learner.algo for learner in config.learners}})  # fmt: skip
        for env_id in config.envs:
            for learner in representatives.values():
                units.append(measure_unit(config, learner, env_id, min_steps))
                print(f"{config.name}: {learner.algo} on {env_id}: {units[-1]['cpu_seconds_per_step'] * 1e3:.3f} "
                      "ms/step", flush=True)  # fmt: skip
    decomposition = measure_decomposition(decompose_states)
    print(f"decomposition: {decomposition['cpu_seconds_per_state']:.3f} s/state", flush=True)
    return {
        "command": shlex.join(["python", "benchmarks/grid_cost.py", *sys.argv[1:]]),
        "configs": configs, "units": units, "decomposition": decomposition,
        "versions": library_versions(), "machine": machine(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class GridCost:
    name: str
    units: int
    total_timesteps: int
    cpu_hours: float
    unit_hours: float  # the longest unit


def grid_costs(data: dict[str, Any]) -> list[GridCost]:
    """Each config's CPU-hours from the measured cost per step of its learners' classes on its environments."""
    per_step = {(u["config"], u["algo"], u["env"]): u["cpu_seconds_per_step"] for u in data["units"]}
    costs = []
    for config in data["configs"]:
        unit_seconds = [config["total_timesteps"] * per_step[(config["name"], algo, env)]
                        for env in config["envs"] for algo in config["learners"].values()]  # fmt: skip
        costs.append(GridCost(config["name"], len(unit_seconds) * config["seeds"], config["total_timesteps"],
                              sum(unit_seconds) * config["seeds"] / 3600, max(unit_seconds) / 3600))  # fmt: skip
    return costs


def _hours(value: float) -> str:
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def render_table(data: dict[str, Any]) -> str:
    """``grid-cost.md``: the per-step costs, the grids' CPU-hours and the decomposition's, from the JSON alone."""
    envs = list(dict.fromkeys(u["env"] for u in data["units"]))
    algos = list(dict.fromkeys((u["config"], u["algo"]) for u in data["units"]))
    per_step = {(u["config"], u["algo"], u["env"]): u["cpu_seconds_per_step"] for u in data["units"]}
    lines = ["| config | class | " + " | ".join(envs) + " |", "|---|---|" + "---:|" * len(envs)]
    for config, algo in algos:
        cells = [f"{per_step[(config, algo, env)] * 1e3:.2f}" if (config, algo, env) in per_step else ""
                 for env in envs]  # fmt: skip
        lines.append(f"| {config} | {algo} | " + " | ".join(cells) + " |")
    step_table = "\n".join(lines)

    lines = ["| grid | units | steps per unit | CPU-hours | longest unit (h) | "
             f"wall hours on {CLUSTER_CPUS} CPUs |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    configs = {c["name"]: c for c in data["configs"]}
    for cost in grid_costs(data):
        config = configs[cost.name]
        shape = f"{len(config['learners'])} learners x {len(config['envs'])} envs x {config['seeds']} seeds"
        wall = math.ceil(cost.units / CLUSTER_CPUS) * cost.unit_hours
        lines.append(f"| `{cost.name}` ({shape}) | {cost.units} | {cost.total_timesteps:,} | {_hours(cost.cpu_hours)} "
                     f"| {_hours(cost.unit_hours)} | {_hours(wall)} |")  # fmt: skip
    d = data["decomposition"]
    per_checkpoint = PAPER_STATES * d["cpu_seconds_per_state"] / 3600
    train = per_step.get(("mirage-qprop", "QPropTRPO", d["env"]))
    lines.append(f"| `decompose` {d['env']}, {PAPER_STATES} states (40 x 50) at one checkpoint | 40 batches | | "
                 f"{_hours(per_checkpoint)} | | {_hours(per_checkpoint / 40 * math.ceil(40 / CLUSTER_CPUS))} |")  # fmt: skip
    if train is not None:  # training runs in the driver, one core; each checkpoint's batches run at once
        training = 5_000_000 * train / 3600
        total = PAPER_CHECKPOINTS * per_checkpoint + training
        wall = training + PAPER_CHECKPOINTS * per_checkpoint / 40 * math.ceil(40 / CLUSTER_CPUS)
        lines.append(f"| `decompose` as the paper: {PAPER_CHECKPOINTS} checkpoints of a 5M-step QPropTRPO run | | "
                     f"5,000,000 | {_hours(total)} | {_hours(training)} | {_hours(wall)} |")  # fmt: skip
    grid_table = "\n".join(lines)

    m, load = data["machine"], data["load_average"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(data["versions"].items()))
    notes = (
        f"CPU milliseconds per environment step of a sweep unit, one torch thread (the first learner of each class "
        f"in each config; whole rollouts of {min(u['steps'] for u in data['units']):,} steps or more). The "
        f"decomposition: {d['cpu_seconds_per_state']:.3f} CPU seconds per state ({d['n_states']} states of an "
        f"untrained {d['algo']} on {d['env']}, {d['continuation_steps'] / d['n_states']:.0f} continuation steps per "
        f"state). CPU-hours: seeds x steps x the cost per step, summed over learners and environments; wall hours on "
        f"{CLUSTER_CPUS} CPUs: one unit (or one batch of 50 states) per CPU, in waves.\n\n"
        f"Command: `{data['command']}`, {data['date']}; seed 0. Versions: {versions}. Machine: {m['processor']}, "
        f"{m['cpus']} cores, {m['platform']}, torch CPU capability {m['torch_cpu_capability']}, "
        f"load average {load['before'][0]:.1f} before and {load['after'][0]:.1f} after (the machine was shared: "
        "an idle core is faster)."
    )
    return f"{step_table}\n\n{grid_table}\n\n{notes}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help=f"only write {TABLE_PATH.name} from the saved JSON")
    parser.add_argument("--min-steps", type=int, default=10_000, help="steps per measured unit (whole rollouts)")
    parser.add_argument("--decompose-states", type=int, default=50, help="states of the decomposition measurement")
    args = parser.parse_args(argv)
    if not args.table:
        data = measure(args.min_steps, args.decompose_states)
        JSON_PATH.write_text(json.dumps(data, indent=2) + "\n")
        print(f"written: {JSON_PATH.relative_to(REPO)}")
    TABLE_PATH.write_text(render_table(json.loads(JSON_PATH.read_text())))
    print(f"written: {TABLE_PATH.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
