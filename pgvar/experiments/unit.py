"""One sweep unit: a training run that writes its curve, result and checkpoints, and resumes exactly.

Folder of a unit, under ``RESULTS/units/<learner>/<env>/seed<k>/`` (every file written atomically):

- ``unit.json``: the :class:`~pgvar.experiments.config.UnitSpec` and its digest;
- ``checkpoint.ckpt``: the latest exact-resume checkpoint (:mod:`pgvar.checkpoint`), every ``checkpoint_every``
  steps at a rollout boundary;
- ``curve.json``: the training episodes so far, ``[timestep, return, length]`` each, written with each checkpoint;
- ``model.zip``: the trained model, at the end;
- ``result.json``: written once, at the end (last): final return, the curve, versions, machine, wall and CPU time;
- ``error.json``: the error of a failed run (removed when a rerun succeeds).

A rerun skips a unit whose ``result.json`` has the same digest, resumes a unit that has a checkpoint from it, and
refuses a folder that belongs to a different spec. A unit's result is a function of its spec on one machine:
torch runs with ``torch_threads`` threads (default 1), the model and environments are seeded from the unit's seed,
and the checkpoint restores every random stream (tested: an interrupted-and-resumed unit equals an
uninterrupted one).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from pgvar._io import atomic_write_bytes
from pgvar.experiments.config import ACTIVATIONS, ALGORITHMS, UnitSpec

__all__ = ["UnitFolderMismatch", "read_json", "run_unit", "unit_folder", "write_json"]


class UnitFolderMismatch(ValueError):
    """The results folder holds a unit with the same id but a different spec."""


def unit_folder(results: str | os.PathLike[str], unit: UnitSpec) -> Path:
    return Path(results) / "units" / unit.unit_id


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON, atomically (a crash leaves the previous file)."""
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def library_versions() -> dict[str, str]:
    import gymnasium
    import mujoco
    import sb3_contrib
    import stable_baselines3
    import torch

    import pgvar

    return {
        "pgvar": pgvar.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "stable_baselines3": stable_baselines3.__version__, "sb3_contrib": sb3_contrib.__version__,
        "gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__,
    }  # fmt: skip


def machine() -> dict[str, Any]:
    """Where a result was computed: the floating-point path (CPU capability torch dispatches to, thread count)
    changes trajectories of chaotic control tasks from the first episode on, so results name it."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "mkl": torch.backends.mkl.is_available()}  # fmt: skip


def code_state() -> dict[str, Any]:
    """The git commit of the pgvar checkout that ran (and whether it had uncommitted changes), when there is one."""
    import subprocess

    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _algorithm_class(name: str) -> Any:
    import importlib

    module, attribute = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def _constructor_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    import torch

    kwargs = json.loads(json.dumps(kwargs))  # a deep copy of plain data
    policy_kwargs = kwargs.get("policy_kwargs")
    if policy_kwargs and "activation_fn" in policy_kwargs:
        policy_kwargs["activation_fn"] = getattr(torch.nn, ACTIVATIONS[policy_kwargs["activation_fn"]])
    return kwargs


def _make_env(unit: UnitSpec) -> Any:
    from stable_baselines3.common.env_util import make_vec_env

    return make_vec_env(unit.env_id, n_envs=unit.n_envs, seed=unit.seed, env_kwargs=dict(unit.env_kwargs))


def final_return(curve: list[list[float]], total_timesteps: int, final_fraction: float) -> float:
    """Mean return of the episodes that ended in the last ``final_fraction`` of the steps (else the last one)."""
    if not curve:
        return math.nan
    start = total_timesteps * (1 - final_fraction)
    late = [episode[1] for episode in curve if episode[0] > start]
    return float(np.mean(late)) if late else float(curve[-1][1])


def _make_callback(unit: UnitSpec, folder: Path, curve: list[list[float]]) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    from pgvar.checkpoint import ExactCheckpointCallback

    class UnitCallback(ExactCheckpointCallback):
        """Records the training episodes, and writes the curve together with each checkpoint."""

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", ()):
                episode = info.get("episode")
                if episode is not None:
                    curve.append([int(self.model.num_timesteps), float(episode["r"]), int(episode["l"])])
            return True

        def _write(self) -> None:
            # The curve first: a crash between the two writes leaves a curve newer than the checkpoint, which
            # a resume cuts back to the checkpoint's step (the other order would lose episodes).
            write_json(folder / "curve.json", {"timesteps": int(self.model.num_timesteps), "episodes": curve})
            super()._write()

    callback: BaseCallback = UnitCallback(unit.checkpoint_every, folder / "checkpoint.ckpt")
    return callback


def run_unit(unit: UnitSpec, results: str | os.PathLike[str]) -> dict[str, Any]:
    """Run (or skip, or resume) one unit and return its ``result.json`` content.

    :raises UnitFolderMismatch: the unit's folder belongs to a different spec
    """
    import torch

    from pgvar.checkpoint import load_checkpoint

    folder = unit_folder(results, unit)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "unit.json"
    if spec_path.exists():
        saved = read_json(spec_path)
        if saved.get("digest") != unit.digest:
            raise UnitFolderMismatch(
                f"{folder} holds unit {unit.unit_id} with a different spec (digest {saved.get('digest')} != "
                f"{unit.digest}); use another results folder, or delete that unit's folder"
            )
    else:
        write_json(spec_path, {"digest": unit.digest, "spec": unit.to_json()})
    result_path = folder / "result.json"
    if result_path.exists():
        return read_json(result_path)

    code = code_state()  # the checkout as the unit starts: the tree may change while a long unit runs
    torch.set_num_threads(unit.torch_threads)
    started_wall, started_cpu = time.time(), time.process_time()
    env = _make_env(unit)
    checkpoint = folder / "checkpoint.ckpt"
    curve: list[list[float]] = []
    resumed_from = None
    if checkpoint.exists():
        model = load_checkpoint(checkpoint, env=env)
        resumed_from = int(model.num_timesteps)
        if (folder / "curve.json").exists():
            curve = [
                episode
                for episode in read_json(folder / "curve.json")["episodes"]
                if episode[0] <= resumed_from
            ]
    else:
        cls = _algorithm_class(unit.learner.algo)
        model = cls(
            unit.learner.policy,
            env,
            seed=unit.seed,
            device="cpu",
            **_constructor_kwargs(dict(unit.learner.kwargs)),
        )
    try:
        model.learn(
            unit.total_timesteps - model.num_timesteps,
            callback=_make_callback(unit, folder, curve),
            reset_num_timesteps=resumed_from is None,
        )
    finally:
        env.close()
    model.save(folder / "model.zip")
    result = {
        "unit_id": unit.unit_id, "digest": unit.digest, "spec": unit.to_json(), "status": "done",
        "final_return": final_return(curve, unit.total_timesteps, unit.final_fraction),
        "num_timesteps": int(model.num_timesteps), "episodes": curve, "resumed_from": resumed_from,
        "versions": library_versions(), "machine": machine(), "code": code,
        "wall_seconds": time.time() - started_wall, "cpu_seconds": time.process_time() - started_cpu,
    }  # fmt: skip
    write_json(result_path, result)
    (folder / "error.json").unlink(missing_ok=True)
    return result


def run_unit_safely(unit_json: dict[str, Any], results: str) -> dict[str, Any]:
    """:func:`run_unit` for a worker process: takes and returns plain data; a failure is returned, not raised."""
    unit = UnitSpec.from_json(unit_json)
    try:
        return run_unit(unit, results)
    except Exception as error:  # noqa: BLE001 - a failed unit must not stop the sweep
        failure = {"unit_id": unit.unit_id, "digest": unit.digest, "status": "failed",
                   "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}  # fmt: skip
        folder = unit_folder(results, unit)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "error.json", failure)
        return failure
