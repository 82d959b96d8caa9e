"""save()/load(): round trips of the new arguments, files from stable-baselines3, bad files, atomic saving."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
import sb3_contrib
import stable_baselines3
import torch

from pgvar.algos import A2C, PPO, TRPO

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    # Constant baselines with normalization are legitimate (if redundant) combinations to exercise here.
    pytest.mark.filterwarnings("ignore:baseline=.* is the same estimator as baseline='none'"),
]

SMALL = {"n_steps": 16, "seed": 0, "policy_kwargs": {"net_arch": [8]}}
EXTRA = {PPO: {"batch_size": 16, "n_epochs": 1}, A2C: {}, TRPO: {"batch_size": 16, "n_critic_updates": 1}}
SB3_OF = {PPO: stable_baselines3.PPO, A2C: stable_baselines3.A2C, TRPO: sb3_contrib.TRPO}


def observations(env_id: str) -> np.ndarray:
    import gymnasium as gym

    env = gym.make(env_id)
    env.observation_space.seed(5)
    return np.stack([env.observation_space.sample() for _ in range(8)])


def assert_same_predictions(model_a, model_b, env_id: str) -> None:
    obs = observations(env_id)
    np.testing.assert_array_equal(model_a.predict(obs, deterministic=True)[0], model_b.predict(obs, deterministic=True)[0])
    with torch.no_grad():
        values_a = model_a.policy.predict_values(model_a.policy.obs_to_tensor(obs)[0])
        values_b = model_b.policy.predict_values(model_b.policy.obs_to_tensor(obs)[0])
    assert torch.equal(values_a, values_b)


@pytest.mark.parametrize(
    ("baseline", "normalize_advantage"), [("optimal", "batch"), ("mean", "none"), ("none", "minibatch")]
)
@pytest.mark.parametrize("algo_class", [PPO, A2C, TRPO])
def test_round_trip_keeps_every_new_argument_and_the_predictions(tmp_path, algo_class, baseline, normalize_advantage):
    env_id = "Pendulum-v1"
    model = algo_class("MlpPolicy", env_id, baseline=baseline, normalize_advantage=normalize_advantage,
                       **SMALL, **EXTRA[algo_class])
    model.learn(32)
    model.save(tmp_path / "model")  # no suffix: ".zip" is appended, as SB3 does
    loaded = algo_class.load(tmp_path / "model.zip", env=model.get_env())
    assert (loaded.baseline, loaded.advantage_normalization) == (baseline, normalize_advantage)
    assert loaded.normalize_advantage is (normalize_advantage == "minibatch")
    assert loaded.rollout_buffer.baseline == baseline
    assert loaded.rollout_buffer.normalize_batch is (normalize_advantage == "batch")
    assert (loaded.gamma, loaded.gae_lambda, loaded.n_steps) == (model.gamma, model.gae_lambda, model.n_steps)
    assert_same_predictions(model, loaded, env_id)
    loaded.learn(32)  # and it trains on


@pytest.mark.parametrize(
    ("algo_class", "sb3_kwargs", "expected_mode"),
    [
        (PPO, {}, "minibatch"),
        (PPO, {"normalize_advantage": False}, "none"),
        (A2C, {}, "none"),
        (A2C, {"normalize_advantage": True}, "minibatch"),
        (TRPO, {}, "minibatch"),
    ],
)
def test_a_file_saved_by_stable_baselines3_loads_with_the_default_new_arguments(
    tmp_path, algo_class, sb3_kwargs, expected_mode
):
    env_id = "CartPole-v1"
    reference = SB3_OF[algo_class]("MlpPolicy", env_id, **SMALL, **EXTRA[algo_class], **sb3_kwargs)
    reference.learn(32)
    reference.save(tmp_path / "sb3_model.zip")
    loaded = algo_class.load(tmp_path / "sb3_model.zip", env=reference.get_env())
    assert type(loaded) is algo_class
    assert loaded.baseline == "value" and loaded.advantage_normalization == expected_mode
    assert loaded.normalize_advantage is reference.normalize_advantage
    assert_same_predictions(reference, loaded, env_id)
    loaded.learn(32)


def test_a_file_saved_by_pgvar_loads_into_stable_baselines3(tmp_path):
    model = PPO("MlpPolicy", "CartPole-v1", baseline="mean", **SMALL, **EXTRA[PPO])
    model.save(tmp_path / "pgvar_model.zip")
    loaded = stable_baselines3.PPO.load(tmp_path / "pgvar_model.zip")
    # The file names no pgvar class (rollout_buffer_class was saved as None): SB3 builds its own buffer.
    assert type(loaded.rollout_buffer) is stable_baselines3.common.buffers.RolloutBuffer
    assert_same_predictions(model, loaded, "CartPole-v1")


def test_load_can_change_the_estimator_and_validates_it(tmp_path):
    model = A2C("MlpPolicy", "CartPole-v1", **SMALL)
    model.save(tmp_path / "a2c.zip")
    loaded = A2C.load(tmp_path / "a2c.zip", baseline="mean", normalize_advantage="batch")
    assert (loaded.baseline, loaded.advantage_normalization, loaded.normalize_advantage) == ("mean", "batch", False)
    assert loaded.rollout_buffer.baseline == "mean" and loaded.rollout_buffer.normalize_batch
    with pytest.raises(ValueError, match="baseline must be one of"):
        A2C.load(tmp_path / "a2c.zip", baseline="median")


def test_loading_something_that_is_not_a_model_raises_a_clear_error(tmp_path):
    text_file = tmp_path / "notes.zip"
    text_file.write_text("not a zip at all")
    with pytest.raises(ValueError, match=r"is not a zip archive, so it is not a pgvar / stable-baselines3 model"):
        PPO.load(text_file)
    other_zip = tmp_path / "photos.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("cat.jpg", b"\xff\xd8")
    with pytest.raises(ValueError, match=r"is a zip archive but not a pgvar / stable-baselines3 model: it has no "
                                         r"'data', 'policy.pth' entry \(entries: 'cat.jpg'\)"):
        PPO.load(other_zip)
    with pytest.raises(ValueError, match="not a pgvar / stable-baselines3 model"):
        PPO.load(io.BytesIO(other_zip.read_bytes()))
    with pytest.raises(FileNotFoundError):
        PPO.load(tmp_path / "missing.zip")


def test_save_and_load_through_file_objects():
    model = PPO("MlpPolicy", "CartPole-v1", baseline="none", **SMALL, **EXTRA[PPO])
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    loaded = PPO.load(buffer)
    assert loaded.baseline == "none"
    assert_same_predictions(model, loaded, "CartPole-v1")


def test_a_save_that_fails_midway_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.zip"
    old = PPO("MlpPolicy", "CartPole-v1", **SMALL, **EXTRA[PPO])
    old.save(path)
    old_bytes = path.read_bytes()
    new = PPO("MlpPolicy", "CartPole-v1", baseline="mean", **{**SMALL, "seed": 1}, **EXTRA[PPO])

    real_writestr = zipfile.ZipFile.writestr
    written = []

    def writestr_then_crash(self, name, data, *args, **kwargs):
        real_writestr(self, name, data, *args, **kwargs)
        written.append(name)
        if name == "_stable_baselines3_version":  # after "data" and the parameters: the archive is half done
            raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr_then_crash)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()
    assert "data" in written  # the failure really happened midway
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["model.zip"]  # no temporary file left behind
    assert_same_predictions(old, PPO.load(path), "CartPole-v1")
    # A successful save replaces the file, with ordinary permissions.
    new.save(path)
    assert PPO.load(path).baseline == "mean"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
