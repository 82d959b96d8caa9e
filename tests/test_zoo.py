"""The rl-zoo3 plugin (``--gym-packages pgvar.zoo``): the zoo trains pgvar's classes with pgvar's options from its
hyperparameter YAML, and ``-optimize`` samples them. Skipped without rl-zoo3 (the ``zoo`` extra, not in CI's
``dev``: it pulls in optuna, huggingface_hub and moviepy with ffmpeg, about 230 MB)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rl_zoo3")
optuna = pytest.importorskip("optuna")

REPO_ROOT = Path(__file__).resolve().parents[1]

HYPERPARAMS = """\
CartPole-v1:
  n_envs: 1
  n_timesteps: 256
  policy: 'MlpPolicy'
  n_steps: 128
  batch_size: 64
  n_epochs: 1
  policy_kwargs: "dict(net_arch=[16])"
  baseline: optimal
  normalize_advantage: none
"""


def _zoo(args: list[str], cwd: Path, module: str = "rl_zoo3.train") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.slow
def test_zoo_trains_a_pgvar_ppo_with_pgvar_options_from_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "hyperparams.yml").write_text(HYPERPARAMS)
    args = ["--algo", "ppo", "--env", "CartPole-v1", "-n", "256", "--gym-packages", "pgvar.zoo",
            "-conf", "hyperparams.yml", "-f", "logs", "--seed", "0", "--eval-freq", "-1", "--num-threads", "1",
            "--verbose", "0"]  # fmt: skip
    result = _zoo(args, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    (saved,) = (tmp_path / "logs" / "ppo").glob("CartPole-v1_*/CartPole-v1.zip")

    import pgvar

    model = pgvar.PPO.load(saved, device="cpu")
    assert type(model) is pgvar.PPO
    assert model.baseline == "optimal" and model.advantage_normalization == "none"
    assert model.num_timesteps == 256


@pytest.mark.slow
def test_zoo_optimize_samples_pgvar_options_without_key_error(tmp_path: Path) -> None:
    (tmp_path / "hyperparams.yml").write_text(HYPERPARAMS)
    # One trial, its parameters fixed in advance (enqueued) so that it is tiny: a rollout of 32 steps.
    storage_path = tmp_path / "study.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage_path)))
    study = optuna.create_study(study_name="pgvar", storage=storage, direction="maximize")
    study.enqueue_trial(
        {
            "batch_size_pow": 5,
            "n_steps_pow": 5,
            "one_minus_gamma": 0.01,
            "one_minus_gae_lambda": 0.05,
            "learning_rate": 3e-4,
            "ent_coef": 1e-6,
            "clip_range": 0.2,
            "n_epochs": 1,
            "max_grad_norm": 0.5,
            "net_arch": "tiny",
            "activation_fn": "tanh",
            "baseline": "mean",
        }  # fmt: skip
    )
    args = ["--algo", "ppo", "--env", "CartPole-v1", "-n", "64", "--gym-packages", "pgvar.zoo",
            "-conf", "hyperparams.yml", "-f", "logs", "--seed", "0", "-optimize", "--n-trials", "1",
            "--n-evaluations", "1", "--eval-episodes", "1", "--sampler", "random", "--pruner", "none",
            "--no-optim-plots", "--storage", str(storage_path), "--study-name", "pgvar", "--num-threads", "1",
            "--verbose", "0"]  # fmt: skip
    result = _zoo(args, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "KeyError" not in result.stderr
    (trial,) = optuna.load_study(study_name="pgvar", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, (trial.state, result.stdout[-3000:])
    # A constant baseline is sampled with normalization off (centring would cancel it): not a parameter.
    assert trial.params["baseline"] == "mean" and "normalize_advantage" not in trial.params


def test_plugin_rebinds_the_zoo_names_and_samples_every_pgvar_algorithm() -> None:
    import rl_zoo3.hyperparams_opt as zoo_opt
    import rl_zoo3.utils as zoo_utils

    import pgvar
    import pgvar.zoo

    assert zoo_utils.ALGOS["ppo"] is pgvar.PPO and zoo_utils.ALGOS["a2c"] is pgvar.A2C
    assert zoo_utils.ALGOS["trpo"] is pgvar.TRPO and zoo_utils.ALGOS["qprop_trpo"] is pgvar.QPropTRPO
    pgvar.zoo.install()  # idempotent: the samplers still wrap the zoo's own, once
    seen_baselines = set()
    for name in pgvar.zoo.ALGOS:
        study = optuna.create_study(
            sampler=optuna.samplers.RandomSampler(seed=0)
        )  # one per algorithm's space
        for _ in range(12):
            trial = study.ask()
            sampled = zoo_opt.HYPERPARAMS_SAMPLER[name](trial, 1, 1, {"using_her_replay_buffer": False})
            converted = zoo_opt.HYPERPARAMS_CONVERTER[name](dict(trial.params))
            # the zoo's own hyperparameters (converted) and pgvar's options, the same from both
            assert "learning_rate" in sampled and "policy_kwargs" in sampled, name
            for key in ("baseline", "normalize_advantage"):
                assert sampled[key] == converted[key], (name, key)
            if sampled["baseline"] not in ("value", "horizon"):
                assert sampled["normalize_advantage"] == "none", sampled
            assert ("qprop_eta" in sampled) == name.startswith("qprop_"), name
            assert not (name.startswith("qprop_") and sampled["baseline"] == "horizon"), sampled
            seen_baselines.add(sampled["baseline"])
            study.tell(trial, 0.0)
    assert seen_baselines == {"value", "none", "mean", "optimal", "horizon"}


def test_plugin_conversion_of_pgvar_options() -> None:
    import pgvar.zoo

    assert pgvar.zoo.convert_pgvar_options({"baseline": "optimal"}) == {
        "baseline": "optimal",
        "normalize_advantage": "none",
    }
    assert pgvar.zoo.convert_pgvar_options({"baseline": "value", "gamma": 0.9}) == {
        "baseline": "value",
        "gamma": 0.9,
    }


@pytest.mark.slow
def test_qprop_names_need_the_plugin_before_the_zoo_parses_algo(tmp_path: Path) -> None:
    result = _zoo(["--help"], tmp_path, module="pgvar.zoo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qprop_trpo" in result.stdout and "qprop_ppo" in result.stdout
