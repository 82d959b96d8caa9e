"""QPropCritic on its own (path chosen once, hand path == autograd path through the object's API), its replay
buffer's file (no pickle, atomic), the memory check of the replay buffer, and Q-Prop's TensorBoard run names."""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
from stable_baselines3.common.torch_layers import FlattenExtractor

import pgvar.algos.qprop_critic as qprop_critic_module
from pgvar.algos import PPO, QPropCritic, QPropPPO, QPropTRPO
from pgvar.algos.qprop_critic import CriticTrainStats, replay_buffer_nbytes

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = {"n_steps": 32, "batch_size": 32, "seed": 0, "policy_kwargs": {"net_arch": [8]},
         "qprop_critic_net_arch": [8], "qprop_warmup_steps": 32, "qprop_buffer_size": 1000}  # fmt: skip


def make_critic(observation_space, action_space, *, by_hand=True, learned=False, n_envs=2, seed=0):
    def features():
        if learned:
            return _LearnedFeatures(observation_space)
        return FlattenExtractor(observation_space)

    return QPropCritic(observation_space, action_space, features, net_arch=[16, 16], batch_size=8, tau=0.1,
                       buffer_size=200, n_envs=n_envs, seed=seed, by_hand=by_hand)  # fmt: skip


class _LearnedFeatures(FlattenExtractor):
    def __init__(self, observation_space):
        super().__init__(observation_space)
        self.linear = torch.nn.Linear(self.features_dim, self.features_dim)

    def forward(self, observations):
        return torch.tanh(self.linear(super().forward(observations)))


def fill(critic: QPropCritic, n_steps: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    replay = critic.replay_buffer
    for step in range(n_steps):
        obs = rng.normal(size=(replay.n_envs, *replay.obs_shape)).astype(np.float32)
        next_obs = rng.normal(size=obs.shape).astype(np.float32)
        if isinstance(critic.action_space, gym.spaces.Discrete):
            actions = rng.integers(critic.action_space.n, size=(replay.n_envs, 1))
        else:
            actions = rng.normal(size=(replay.n_envs, replay.action_dim)).astype(np.float32)
        dones = (rng.random(replay.n_envs) < 0.2).astype(np.float32)
        infos = [{"TimeLimit.truncated": bool(step % 7 == 0)} for _ in range(replay.n_envs)]
        replay.add(obs, next_obs, actions, rng.normal(size=replay.n_envs).astype(np.float32), dones, infos)


BOX_OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
SPACES = [(BOX_OBS, gym.spaces.Box(-2.0, 2.0, (2,), np.float32)), (BOX_OBS, gym.spaces.Discrete(3))]


def next_policy_for(action_space):
    def next_policy(observations):  # a fixed "policy" of the observations, no gradient
        out = torch.tanh(observations[:, :2] if isinstance(action_space, gym.spaces.Box) else observations)
        return out if isinstance(action_space, gym.spaces.Box) else torch.softmax(out, dim=1)

    return next_policy


# ------------------------------------------------------------------------------------------- the object
@pytest.mark.parametrize(("observation_space", "action_space"), SPACES)
def test_the_path_is_decided_once_and_both_give_the_same_numbers(observation_space, action_space):
    by_hand = make_critic(observation_space, action_space)
    reference = make_critic(observation_space, action_space, by_hand=False)
    assert by_hand.by_hand and not reference.by_hand
    assert not make_critic(observation_space, action_space, learned=True).by_hand  # learned features: autograd
    for critic in (by_hand, reference):
        fill(critic, 40)
    next_policy = next_policy_for(action_space)
    global_state = np.random.get_state()  # noqa: NPY002
    stats = [critic.train(300, next_policy) for critic in (by_hand, reference)]  # two draws of 256 + 44 steps
    assert np.random.get_state()[1].tolist() == global_state[1].tolist()  # noqa: NPY002 (the private stream)
    assert stats[0] == stats[1] and isinstance(stats[0], CriticTrainStats) and stats[0].n_updates == 300
    for module in ("q_net", "q_net_target"):
        for a, b in zip(getattr(by_hand, module).parameters(), getattr(reference, module).parameters()):
            assert torch.equal(a, b), module
    assert all(p.grad is None for p in by_hand.q_net.parameters())
    assert all(p.grad is None for p in reference.q_net.parameters())


def test_train_refuses_an_empty_replay_buffer():
    critic = make_critic(*SPACES[0])
    with pytest.raises(ValueError, match="non-empty replay buffer"):
        critic.train(1, next_policy_for(SPACES[0][1]))


def test_random_state_round_trips_through_json():
    critic = make_critic(*SPACES[0])
    fill(critic, 20)
    critic.train(10, next_policy_for(SPACES[0][1]))
    data = json.loads(json.dumps(critic.random_state_json))
    other = make_critic(*SPACES[0], seed=5)
    other.random_state = data
    assert other.random_state_json == critic.random_state_json
    np.testing.assert_array_equal(other.random_state[1], critic.random_state[1])


# -------------------------------------------------------------------------------------- replay-buffer file
def trained(cls=QPropPPO, env_id="Pendulum-v1", **kwargs):
    model = cls("MlpPolicy", env_id, **{**SMALL, **kwargs})
    model.learn(64)
    return model


def assert_same_replay(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert (a.pos, a.full, a.buffer_size, a.n_envs) == (b.pos, b.full, b.buffer_size, b.n_envs)
    for field in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, dict):
            assert list(x) == list(y)
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
        else:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("buffer_size", [1000, 50])  # 50: wrapped around (full)
def test_replay_file_is_an_npz_without_pickle_and_round_trips(tmp_path, buffer_size):
    model = trained(qprop_buffer_size=buffer_size)
    assert model.replay_buffer.full is (buffer_size == 50)
    model.save_replay_buffer(tmp_path / "replay")  # .npz appended
    with np.load(tmp_path / "replay.npz", allow_pickle=False) as archive:
        metadata = json.loads(archive["metadata.json"])
        assert metadata["format"] == "pgvar.qprop_replay_buffer" and metadata["pos"] == model.replay_buffer.pos
        rows = 50 if buffer_size == 50 else 64
        assert archive["observations"].shape == (rows, 1, 3)  # only the filled rows are written
    other = QPropPPO("MlpPolicy", "Pendulum-v1", **SMALL)
    other.load_replay_buffer(tmp_path / "replay")  # .npz tried
    assert_same_replay(other.replay_buffer, model.replay_buffer)
    buffer = io.BytesIO()  # file objects too
    model.save_replay_buffer(buffer)
    buffer.seek(0)
    other.load_replay_buffer(buffer)
    assert_same_replay(other.replay_buffer, model.replay_buffer)


class DictObservations(gym.Env):
    observation_space = gym.spaces.Dict({"b": gym.spaces.Box(-1, 1, (2,)), "a": gym.spaces.Box(0, 255, (3,), np.uint8)})
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 1.0, False, bool(self.np_random.random() < 0.1), {}


def test_dict_replay_buffer_round_trips(tmp_path):
    model = QPropTRPO("MultiInputPolicy", DictObservations(), **SMALL)
    model.learn(64)
    assert isinstance(model.replay_buffer, DictReplayBuffer)
    model.save_replay_buffer(tmp_path / "replay.npz")
    other = QPropTRPO("MultiInputPolicy", DictObservations(), **SMALL)
    other.load_replay_buffer(tmp_path / "replay.npz")
    assert_same_replay(other.replay_buffer, model.replay_buffer)
    with pytest.raises(ValueError, match="n_envs=1 and is a DictReplayBuffer.*model n_envs=1 and a ReplayBuffer"):
        QPropPPO("MlpPolicy", "CartPole-v1", **SMALL).load_replay_buffer(tmp_path / "replay.npz")


class Payload:
    """Unpickling this creates a marker folder: proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_is_refused_and_never_run(tmp_path):
    model = QPropPPO("MlpPolicy", "Pendulum-v1", **SMALL)
    marker = tmp_path / "pwned"
    crafted = tmp_path / "replay.pkl"
    crafted.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(ValueError, match="not a pgvar replay-buffer file .*not a zip archive.*pickle can run code"):
        model.load_replay_buffer(crafted)
    # A zip that looks like the format but holds a pickled object array.
    good = tmp_path / "good.npz"
    trained().save_replay_buffer(good)
    crafted_zip = tmp_path / "crafted.npz"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(crafted_zip, "w") as target:
        for name in source.namelist():
            if name == "rewards.npy":
                with target.open(name, "w") as entry:
                    payload = np.empty(1, dtype=object)
                    payload[0] = Payload(str(marker))
                    np.lib.format.write_array(entry, payload, allow_pickle=True)
            else:
                target.writestr(name, source.read(name))
    with pytest.raises(ValueError, match="pickled object array"):
        model.load_replay_buffer(crafted_zip)
    # SB3's own pickle format (what save_replay_buffer wrote before) is refused too, with the way out named.
    sb3_file = tmp_path / "sb3.pkl"
    sb3_file.write_bytes(pickle.dumps(model.replay_buffer))
    with pytest.raises(ValueError, match="load_from_pkl"):
        model.load_replay_buffer(sb3_file)
    assert not marker.exists()
    assert model.replay_buffer.size() == 0


class FailsWhenWritten:
    """Stands in for an array whose serialization fails midway (a full disk, a kill)."""

    def __array__(self, *args, **kwargs):
        raise OSError("no space left on device")

    def __reduce_ex__(self, protocol):
        raise OSError("no space left on device")


def test_a_failing_save_leaves_the_old_file_byte_identical(tmp_path):
    model = trained()
    path = tmp_path / "replay.npz"
    model.save_replay_buffer(path)
    before = path.read_bytes()
    model.learn(32, reset_num_timesteps=False)  # different content
    model.replay_buffer.next_observations = FailsWhenWritten()  # observations are written first, then this fails
    with pytest.raises(OSError, match="no space left"):
        model.save_replay_buffer(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.npz"]  # no temporary file left behind


# ----------------------------------------------------------------------------------------- memory check
@pytest.mark.parametrize(
    ("observation_space", "action_space", "n_envs"),
    [
        (BOX_OBS, gym.spaces.Box(-1, 1, (2,), np.float64), 1),
        (gym.spaces.Box(0, 255, (8, 8, 4), np.uint8), gym.spaces.Discrete(4), 3),
        (gym.spaces.Discrete(5), gym.spaces.Box(-1, 1, (1,)), 2),
        (DictObservations.observation_space, gym.spaces.Discrete(2), 2),
    ],
)
def test_replay_buffer_nbytes_is_what_sb3_allocates(observation_space, action_space, n_envs):
    buffer_class = DictReplayBuffer if isinstance(observation_space, gym.spaces.Dict) else ReplayBuffer
    replay = buffer_class(101, observation_space, action_space, n_envs=n_envs, handle_timeout_termination=True)
    arrays = [replay.actions, replay.rewards, replay.dones, replay.timeouts]
    for field in (replay.observations, replay.next_observations):
        arrays.extend(field.values() if isinstance(field, dict) else [field])
    assert replay_buffer_nbytes(observation_space, action_space, 101, n_envs) == sum(a.nbytes for a in arrays)


class ImageObservations(gym.Env):
    observation_space = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        return np.zeros((84, 84, 4), np.uint8), {}

    def step(self, action):
        return np.zeros((84, 84, 4), np.uint8), 0.0, False, False, {}


def test_a_replay_buffer_larger_than_the_machine_is_refused_up_front():
    # 10 million 84x84x4 transitions: 564 GB, more than any test machine has (the Atari default would be 56 GB).
    with pytest.raises(ValueError, match=r"qprop_buffer_size.*needs 525\.\d+ GiB.*56468 bytes per transition.*more than"):
        QPropPPO("MlpPolicy", ImageObservations(), n_steps=8, batch_size=8, qprop_buffer_size=10_000_000)


def test_a_replay_buffer_larger_than_the_available_memory_warns(monkeypatch):
    needed = replay_buffer_nbytes(BOX_OBS, gym.spaces.Box(-2, 2, (1,)), 1_000_000)  # Pendulum's default buffer
    monkeypatch.setattr(qprop_critic_module, "_system_memory", lambda: (needed // 2, needed * 4))
    with pytest.warns(UserWarning, match=r"qprop_buffer_size.*available now.*about 500000 transitions fit"):
        QPropPPO("MlpPolicy", "Pendulum-v1", n_steps=8, batch_size=8)
    monkeypatch.setattr(qprop_critic_module, "_system_memory", lambda: (needed // 4, needed // 2))
    with pytest.raises(ValueError, match="more than the .* of memory of this machine"):
        QPropTRPO("MlpPolicy", "Pendulum-v1", n_steps=8, batch_size=8)
    monkeypatch.setattr(qprop_critic_module, "_system_memory", lambda: (None, None))  # unknown: built as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QPropPPO("MlpPolicy", "Pendulum-v1", n_steps=8, batch_size=8)


def test_system_memory_is_known_here():
    available, total = qprop_critic_module._system_memory()
    assert available is not None and total is not None and 0 < available <= total


# -------------------------------------------------------------------------------------------- TensorBoard
class FakeSummaryWriter:
    """tensorboard is not a dependency: a writer that only creates its folder, as the real one does."""

    def __init__(self, log_dir=None, **kwargs):
        os.makedirs(log_dir, exist_ok=True)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_tensorboard_runs_are_named_after_the_q_prop_class(tmp_path, monkeypatch):
    import stable_baselines3.common.logger as sb3_logger
    import stable_baselines3.common.utils as sb3_utils

    monkeypatch.setattr(sb3_utils, "SummaryWriter", FakeSummaryWriter)
    monkeypatch.setattr(sb3_logger, "SummaryWriter", FakeSummaryWriter)
    common = {"n_steps": 16, "batch_size": 16, "tensorboard_log": str(tmp_path)}
    PPO("MlpPolicy", "Pendulum-v1", **common).learn(16)
    for _ in range(2):
        QPropPPO("MlpPolicy", "Pendulum-v1", qprop_buffer_size=100, **common).learn(16)
    QPropTRPO("MlpPolicy", "Pendulum-v1", qprop_buffer_size=100, **common).learn(16)
    QPropTRPO("MlpPolicy", "Pendulum-v1", qprop_buffer_size=100, **common).learn(16, tb_log_name="mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PPO_1", "QPropPPO_1", "QPropPPO_2", "QPropTRPO_1", "mine_1"]
