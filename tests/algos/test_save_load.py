"""save()/load(): round trips of the new arguments, files from stable-baselines3, bad files, atomic saving."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import pickle
import signal
import stat
import time
import zipfile

import numpy as np
import pytest
import sb3_contrib
import stable_baselines3
import torch

import pgvar._io
from pgvar.algos import A2C, PPO, TRPO, EntropyPG, QPropPPO, QPropTRPO, SoftQ

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
    buffer.seek(0)
    assert_same_predictions(model, PPO.load(buffer, allow_pickle=False), "CartPole-v1")
    buffer.seek(0)
    with pytest.raises(ValueError, match="holds a PPO model"):
        A2C.load(buffer)
    assert buffer.tell() == 0  # the checks leave the file object where they found it


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


# ------------------------------------------------------------------------------- one contract, seven classes
ALL_CLASSES = {
    PPO: {"batch_size": 8, "n_epochs": 1},
    A2C: {},
    TRPO: {"batch_size": 8, "n_critic_updates": 1},
    QPropPPO: {"batch_size": 8, "n_epochs": 1, "qprop_buffer_size": 64, "qprop_warmup_steps": 8},
    QPropTRPO: {"batch_size": 8, "n_critic_updates": 1, "qprop_buffer_size": 64, "qprop_warmup_steps": 8},
    EntropyPG: {},
    SoftQ: {},
}
SB3_TWINS = {stable_baselines3.PPO: PPO, stable_baselines3.A2C: A2C, sb3_contrib.TRPO: TRPO}


def tiny(algo_class, **kwargs):
    arguments = {"n_steps": 8, "seed": 0, "policy_kwargs": {"net_arch": [8]},
                 **ALL_CLASSES[SB3_TWINS.get(algo_class, algo_class)], **kwargs}
    return algo_class("MlpPolicy", "CartPole-v1", **arguments)


def same_parameters(model_a, model_b) -> bool:
    state_a, state_b = model_a.policy.state_dict(), model_b.policy.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """One trained file per pgvar class and per SB3 twin (module-scoped: built once)."""
    folder = tmp_path_factory.mktemp("models")
    files = {}
    for algo_class in [*ALL_CLASSES, *SB3_TWINS]:
        model = tiny(algo_class)
        model.learn(16)
        files[algo_class] = folder / f"{algo_class.__module__}.{algo_class.__name__}.zip"
        model.save(files[algo_class])
    return files


@pytest.mark.parametrize("algo_class", list(ALL_CLASSES), ids=lambda c: c.__name__)
def test_every_class_loads_its_own_file_without_env_and_in_both_modes(saved_files, algo_class):
    path = saved_files[algo_class]
    loaded = algo_class.load(path)  # no env= (EntropyPG / SoftQ used to raise AttributeError 'action_space')
    safe = algo_class.load(path, allow_pickle=False)
    assert type(loaded) is type(safe) is algo_class
    assert same_parameters(loaded, safe)
    assert loaded.policy_class is safe.policy_class
    assert loaded.observation_space == safe.observation_space and loaded.action_space == safe.action_space
    assert loaded.policy_kwargs == safe.policy_kwargs
    assert loaded.lr_schedule(0.3) == safe.lr_schedule(0.3)
    assert list(loaded.ep_info_buffer) == list(safe.ep_info_buffer)
    np.testing.assert_array_equal(loaded._last_obs, safe._last_obs)
    if hasattr(loaded, "clip_range"):
        assert loaded.clip_range(0.3) == safe.clip_range(0.3)
    safe.set_env(stable_baselines3.common.env_util.make_vec_env("CartPole-v1", n_envs=1, seed=3))
    safe.learn(16)  # trains on


@pytest.mark.parametrize("file_class", [*ALL_CLASSES, *SB3_TWINS], ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_a_file_of_another_algorithm_is_refused_before_anything_is_built(saved_files, file_class):
    own = SB3_TWINS.get(file_class, file_class)
    for algo_class in ALL_CLASSES:
        if algo_class is own:
            assert type(algo_class.load(saved_files[file_class])) is algo_class
            continue
        with pytest.raises(ValueError, match=rf"holds a {own.__name__} model.*not a {algo_class.__name__} one"):
            algo_class.load(saved_files[file_class])


def without_pgvar_entry(path, folder):
    """The file as pgvar wrote it before the pgvar.json entry existed (or as SB3 writes it)."""
    old = folder / f"old_{path.name}"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w") as target:
        for name in source.namelist():
            if name != "pgvar.json":
                target.writestr(name, source.read(name))
    return old


@pytest.mark.parametrize("file_class", list(ALL_CLASSES), ids=lambda c: c.__name__)
def test_files_without_the_pgvar_entry_are_identified_by_their_keys(saved_files, tmp_path, file_class):
    old = without_pgvar_entry(saved_files[file_class], tmp_path)
    for algo_class in ALL_CLASSES:
        if algo_class is file_class:
            assert type(algo_class.load(old)) is algo_class
        else:
            with pytest.raises(ValueError, match=rf"holds a {file_class.__name__} model"):
                algo_class.load(old)


def test_a_file_of_an_off_policy_sb3_algorithm_is_refused(tmp_path):
    stable_baselines3.DQN("MlpPolicy", "CartPole-v1", buffer_size=100, learning_starts=0,
                          policy_kwargs={"net_arch": [8]}).save(tmp_path / "dqn.zip")
    with pytest.raises(ValueError, match="holds a an off-policy algorithm|holds an? .*off-policy algorithm"):
        PPO.load(tmp_path / "dqn.zip")


@pytest.mark.parametrize("algo_class", [PPO, EntropyPG, SoftQ], ids=lambda c: c.__name__)
def test_saving_into_a_missing_folder_warns_like_stable_baselines3(tmp_path, algo_class):
    with pytest.warns(UserWarning) as sb3_warnings:
        stable_baselines3.PPO("MlpPolicy", "CartPole-v1", n_steps=8, batch_size=8).save(tmp_path / "sb3" / "model")
    with pytest.warns(UserWarning) as our_warnings:
        tiny(algo_class).save(tmp_path / "ours" / "deeper" / "model")
    assert [str(w.message) for w in sb3_warnings] == [f"Path '{tmp_path / 'sb3'}' does not exist. Will create it."]
    assert [str(w.message) for w in our_warnings] == [
        f"Path '{tmp_path / 'ours' / 'deeper'}' does not exist. Will create it."
    ]
    assert type(algo_class.load(tmp_path / "ours" / "deeper" / "model.zip")) is algo_class


# ------------------------------------------------------------------------------ atomic save for every family
TEMP = "pgvar-tmp"


@pytest.mark.parametrize("algo_class", [PPO, EntropyPG, SoftQ, QPropTRPO], ids=lambda c: c.__name__)
def test_a_full_disk_midway_leaves_the_old_file_byte_identical(tmp_path, monkeypatch, algo_class):
    path = tmp_path / "model.zip"
    old = tiny(algo_class)
    old.save(path)
    path.chmod(0o600)
    old_bytes = path.read_bytes()
    new = tiny(algo_class, seed=1)
    real_fdopen = os.fdopen

    class FullDisk:
        """The temporary file, on a disk that fills up after half of the archive."""

        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(bytes(data)[: len(data) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

    monkeypatch.setattr(pgvar._io.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as raised:
        new.save(path)
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["model.zip"]  # no temporary file left behind
    new.save(path)
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(0o600)  # the save kept the file's permission bits
    assert same_parameters(algo_class.load(path), new)


@pytest.mark.skipif(os.name != "posix", reason="symlinks and permission bits")
def test_saving_through_a_symlink_keeps_the_link_and_the_permission_bits(tmp_path):
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "run_7.zip"
    tiny(SoftQ).save(target)
    target.chmod(0o600)
    link = tmp_path / "latest.zip"
    link.symlink_to(target)
    new = tiny(SoftQ, seed=1)
    new.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert oct(stat.S_IMODE(target.stat().st_mode)) == oct(0o600)
    assert same_parameters(SoftQ.load(link), new)
    assert [name for name in os.listdir(tmp_path / "runs") if TEMP in name] == []


def kill_during_save_trials(algo_class, path, trials: int, seed: int) -> tuple[int, int]:
    """Fork a process that saves ``algo_class`` models over ``path`` in a loop, SIGKILL it at a random moment,
    and check that ``path`` still loads with the saved parameters. Returns (files lost, kills that left a temp file)."""
    model = tiny(algo_class)
    model.save(path)
    rng = np.random.default_rng(seed)
    lost = interrupted_writes = 0
    for _ in range(trials):
        pid = os.fork()
        if pid == 0:  # the saving process: save until killed
            try:
                while True:
                    model.save(path)
            finally:
                os._exit(1)
        time.sleep(float(rng.uniform(0.2, 0.6)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        interrupted_writes += any(TEMP in name for name in os.listdir(path.parent))
        try:
            lost += not same_parameters(algo_class.load(path), model)
        except Exception:
            lost += 1
    return lost, interrupted_writes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")
@pytest.mark.parametrize("algo_class", [PPO, EntropyPG, SoftQ], ids=lambda c: c.__name__)
def test_a_save_killed_midway_never_loses_the_previous_file(tmp_path, algo_class):
    path = tmp_path / "model.zip"
    lost, interrupted_writes = kill_during_save_trials(algo_class, path, trials=5, seed=0)
    assert lost == 0
    # The kills did land while the file was being written (a killed save leaves its temporary file) ...
    assert interrupted_writes >= 1
    # ... and the next save removes the temporary files of the killed ones.
    tiny(algo_class).save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.zip"]


# ----------------------------------------------------------------------------------- allow_pickle=False
class Payload:
    """Unpickling this creates ``marker``: it stands for any code a crafted model file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def with_pickled_payload(path, crafted, marker, *, key="policy_class", drop_pgvar_entry=False):
    """A copy of the model file at ``path`` whose pickled ``key`` field runs the payload when unpickled."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(crafted, "w") as target:
        for name in source.namelist():
            content = source.read(name)
            if name == "pgvar.json" and drop_pgvar_entry:
                continue
            if name == "data":
                data = json.loads(content)
                data[key] = {":type:": "<class 'type'>",
                             ":serialized:": base64.b64encode(pickle.dumps(Payload(marker))).decode()}
                content = json.dumps(data).encode()
            target.writestr(name, content)
    return crafted


def test_a_pickle_payload_runs_with_allow_pickle_true_and_never_with_false(saved_files, tmp_path):
    marker = tmp_path / "payload_ran"
    crafted = with_pickled_payload(saved_files[PPO], tmp_path / "crafted.zip", marker)
    # allow_pickle=False: the pickled field is ignored, its JSON copy in pgvar.json is used; the model loads.
    model = PPO.load(crafted, allow_pickle=False)
    assert not marker.exists()
    assert model.policy_class is stable_baselines3.common.policies.ActorCriticPolicy
    # The payload is real: SB3's unpickling runs it (what allow_pickle=True, the default, does).
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever the payload's object breaks afterwards)
        PPO.load(crafted)
    assert marker.exists()


def test_a_file_without_pickle_free_copies_is_refused_clearly_without_running_it(saved_files, tmp_path):
    marker = tmp_path / "payload_ran"
    crafted = with_pickled_payload(saved_files[PPO], tmp_path / "crafted.zip", marker, drop_pgvar_entry=True)
    with pytest.raises(ValueError, match=r"was not saved by pgvar .*fields .*policy_class.* are pickled, which "
                                         r"allow_pickle=False refuses to load"):
        PPO.load(crafted, allow_pickle=False)
    assert not marker.exists()
    # stable-baselines3's own files: the same clear error, and custom_objects are the way through.
    with pytest.raises(ValueError, match="was not saved by pgvar"):
        PPO.load(saved_files[stable_baselines3.PPO], allow_pickle=False)
    reference = stable_baselines3.PPO.load(saved_files[stable_baselines3.PPO])
    pickled = ["policy_class", "observation_space", "action_space", "lr_schedule", "clip_range", "ep_info_buffer",
               "ep_success_buffer", "_last_obs", "_last_episode_starts", "rollout_buffer_class"]
    loaded = PPO.load(saved_files[stable_baselines3.PPO], allow_pickle=False,
                      custom_objects={key: getattr(reference, key) for key in pickled})
    assert same_parameters(loaded, reference)


def test_a_pgvar_entry_naming_an_untrusted_class_is_refused(saved_files, tmp_path):
    crafted = tmp_path / "crafted.zip"
    with zipfile.ZipFile(saved_files[A2C]) as source, zipfile.ZipFile(crafted, "w") as target:
        for name in source.namelist():
            content = source.read(name)
            if name == "pgvar.json":
                meta = json.loads(content)
                meta["fields"]["policy_class"] = {"__pgvar__": "class", "name": "subprocess.Popen"}
                content = json.dumps(meta).encode()
            target.writestr(name, content)
    with pytest.raises(ValueError, match=r"policy_class \(it holds the class 'subprocess.Popen', which is not one"):
        A2C.load(crafted, allow_pickle=False)


def test_a_field_with_no_pickle_free_form_is_named(tmp_path):
    model = tiny(EntropyPG, learning_rate=lambda progress: 1e-3 * progress)
    model.save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match=r"learning_rate \(it holds a value of type builtins.function"):
        EntropyPG.load(tmp_path / "model.zip", allow_pickle=False)
    loaded = EntropyPG.load(tmp_path / "model.zip", allow_pickle=False,
                            custom_objects={"learning_rate": 1e-3, "lr_schedule": None})
    assert loaded.lr_schedule(0.5) == 1e-3
