"""Sweeps: idempotent units, exact resume after a kill, both backends give identical results, failures reported."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import zipfile

import numpy as np
import pytest
import torch

from pgvar.experiments import SweepConfig, load_sweep_config, run_sweep, run_unit, shipped_configs
from pgvar.experiments.unit import UnitFolderMismatch, read_json, unit_folder

TINY = {
    "name": "tiny",
    "envs": ["CartPole-v1"],
    "seeds": [0, 1],
    "total_timesteps": 128,
    "checkpoint_every": 64,
    "learners": {
        "PPO": {"algo": "PPO", "kwargs": {"n_steps": 64, "batch_size": 64, "n_epochs": 2,
                                          "policy_kwargs": {"net_arch": [16], "activation_fn": "tanh"}}},
        "A2C": {"algo": "A2C", "kwargs": {"n_steps": 8, "policy_kwargs": {"net_arch": [16]}}},
    },
}  # fmt: skip


def finals(results) -> dict[str, tuple[float, list]]:
    out = {}
    for unit in SweepConfig.from_dict(TINY).units():
        result = read_json(unit_folder(results, unit) / "result.json")
        out[unit.unit_id] = (result["final_return"], result["episodes"])
    return out


def policy_parameters(path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(path) as archive, archive.open("policy.pth") as file:
        return torch.load(file, weights_only=True)


def test_local_sweep_is_idempotent_and_reproducible(tmp_path):
    config = SweepConfig.from_dict(TINY)
    seen = []
    state = run_sweep(config, tmp_path / "a", workers=2, progress=lambda p: seen.append((p.done, p.failed)))
    assert (state.done, state.failed, state.skipped) == (4, 0, 0)
    assert seen[-1] == (4, 0)
    first = finals(tmp_path / "a")
    assert all(np.isfinite(value) for value, _ in first.values())
    mtimes = {path: path.stat().st_mtime_ns for path in (tmp_path / "a").rglob("result.json")}
    again = run_sweep(config, tmp_path / "a", workers=2)
    assert (again.done, again.skipped) == (4, 4)  # nothing ran again
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "a").rglob("result.json")} == mtimes
    # A unit's result is a function of its spec: the same unit run again elsewhere gives the same numbers.
    unit = config.units()[0]
    rerun = run_unit(unit, tmp_path / "b")
    assert (rerun["final_return"], rerun["episodes"]) == first[unit.unit_id]


def test_ray_backend_gives_the_same_results_as_local(tmp_path):
    pytest.importorskip("ray")
    config = SweepConfig.from_dict(TINY)
    run_sweep(config, tmp_path / "local", workers=2)
    state = run_sweep(config, tmp_path / "ray", backend="ray", workers=2)
    assert (state.done, state.failed) == (4, 0)
    assert finals(tmp_path / "ray") == finals(tmp_path / "local")


def _run_unit_in_child(unit_json, results):
    from pgvar.experiments.config import UnitSpec

    run_unit(UnitSpec.from_json(unit_json), results)


def test_killed_unit_resumes_and_ends_equal_to_an_uninterrupted_one(tmp_path):
    data = dict(TINY, total_timesteps=1536, checkpoint_every=128, seeds=[0])
    data["learners"] = {"PPO": TINY["learners"]["PPO"]}
    config = SweepConfig.from_dict(data)
    unit = config.units()[0]
    folder = unit_folder(tmp_path / "killed", unit)
    child = multiprocessing.get_context("spawn").Process(
        target=_run_unit_in_child, args=(unit.to_json(), str(tmp_path / "killed"))
    )
    child.start()
    deadline = time.time() + 120
    while not (folder / "checkpoint.ckpt").exists() and time.time() < deadline and child.is_alive():
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert (folder / "checkpoint.ckpt").exists() and not (folder / "result.json").exists(), "killed too late"
    state = run_sweep(config, tmp_path / "killed", workers=1)
    assert (state.done, state.failed) == (1, 0)
    resumed = read_json(folder / "result.json")
    assert resumed["resumed_from"] is not None and 0 < resumed["resumed_from"] < 1536

    straight = run_unit(unit, tmp_path / "straight")
    assert straight["resumed_from"] is None
    assert resumed["episodes"] == straight["episodes"] and resumed["final_return"] == straight["final_return"]
    a, b = (
        policy_parameters(folder / "model.zip"),
        policy_parameters(unit_folder(tmp_path / "straight", unit) / "model.zip"),
    )
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_failed_unit_is_reported_and_the_others_finish(tmp_path):
    data = dict(TINY, seeds=[0])
    data["learners"] = dict(
        TINY["learners"], broken={"algo": "PPO", "kwargs": {"n_steps": 64, "clip_range_vf": "x"}}
    )
    state = run_sweep(SweepConfig.from_dict(data), tmp_path, workers=2)
    assert (state.done, state.failed) == (2, 1)
    assert state.failures[0]["unit_id"] == "broken/CartPole-v1/seed0"
    assert "Error" in state.failures[0]["error"]
    assert (tmp_path / "units" / "broken" / "CartPole-v1" / "seed0" / "error.json").exists()


def test_rerun_with_a_different_spec_in_the_same_folder_is_refused(tmp_path):
    data = dict(TINY, seeds=[0], learners={"A2C": TINY["learners"]["A2C"]})
    run_unit(SweepConfig.from_dict(data).units()[0], tmp_path)
    changed = SweepConfig.from_dict(dict(data, total_timesteps=64)).units()[0]
    with pytest.raises(UnitFolderMismatch, match="different spec"):
        run_unit(changed, tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"envs": []}, "envs must be a non-empty list"),
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"total_timesteps": 0}, "total_timesteps must be"),
        ({"learners": {"x": {"algo": "SAC9"}}}, "algo must be one of"),
        ({"learners": {"x": {"algo": "PPO", "kwargs": {"seed": 3}}}}, "must not set 'seed'"),
        (
            {"learners": {"x": {"algo": "PPO", "kwargs": {"policy_kwargs": {"activation_fn": "os.system"}}}}},
            "activation_fn must be one of",
        ),  # fmt: skip
        ({"unknown_key": 1}, "unknown key"),
    ],
)
def test_bad_config_is_refused_with_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig.from_dict(dict(TINY, **change))


def test_shipped_configs_load():
    shipped = shipped_configs()
    assert {"mirage-qprop", "normalization", "horizon-aware"} <= set(shipped)
    for name in shipped:
        config = load_sweep_config(name)
        assert config.units()
    with pytest.raises(ValueError, match="neither a file nor a shipped config"):
        load_sweep_config("no-such-config")


def test_horizon_aware_config_compares_trpo_with_and_without_the_horizon_aware_value(tmp_path):
    """The shipped config: TRPO with the standard V vs baseline="horizon" at the paper's settings and reference
    numbers; a tiny version of it (same learners, small batches) runs one unit of each through the sweep engine."""
    config = load_sweep_config("horizon-aware")
    assert config.envs == ("HalfCheetah-v5", "Walker2d-v5", "Humanoid-v5") and len(config.seeds) == 5
    assert config.total_timesteps == 200 * 25_000 and config.final_fraction == 0.05
    standard, horizon = config.learners
    for learner in (standard, horizon):
        assert learner.algo == "TRPO"
        assert {key: learner.kwargs[key] for key in ("n_steps", "gamma", "gae_lambda")} == {
            "n_steps": 25_000, "gamma": 0.99, "gae_lambda": 1.0}  # fmt: skip
    assert "baseline" not in standard.kwargs and horizon.kwargs["baseline"] == "horizon"
    published = {"HalfCheetah-v5": ((2030, 117), (2864, 229)), "Walker2d-v5": ((2761, 326), (3226, 398)),
                 "Humanoid-v5": ((738, 69), (830, 54))}  # fmt: skip
    for env_id, numbers in published.items():
        rows = config.reference[env_id]
        assert ((rows[standard.name]["mean"], rows[standard.name]["sd"]),
                (rows[horizon.name]["mean"], rows[horizon.name]["sd"])) == numbers  # fmt: skip

    small = {"n_steps": 64, "batch_size": 32, "n_critic_updates": 2, "cg_max_steps": 3,
             "policy_kwargs": {"net_arch": [8], "activation_fn": "tanh"}}  # fmt: skip
    tiny = load_sweep_config(
        "horizon-aware",
        overrides={
            "envs": ["HalfCheetah-v5"], "seeds": [0], "total_timesteps": 128, "checkpoint_every": 64,
            "learners": {learner.name: {"algo": learner.algo, "kwargs": {**learner.kwargs, **small}}
                         for learner in config.learners},
        },
    )  # fmt: skip
    state = run_sweep(tiny, tmp_path, workers=1)
    assert (state.done, state.failed) == (2, 0), state.failures
    for unit in tiny.units():
        result = read_json(unit_folder(tmp_path, unit) / "result.json")
        assert result["status"] == "done" and unit.learner.kwargs["gae_lambda"] == 1.0
