"""Checkpoints that resume training exactly: model, optimizer, replay buffer, RNG states and the environments.

SB3's ``save`` / ``load`` keep the model's parameters and optimizer, but a run continued from them is not the run
that was interrupted: the global torch / numpy / Python random streams, the environments' own random generators
and simulator states (an episode is mid-way), their wrappers' counters (``TimeLimit``, ``Monitor``), a
``VecNormalize``'s running statistics and, for Q-Prop, the replay buffer are lost or restarted. A checkpoint
written by :func:`save_checkpoint` holds all of them, and :func:`load_checkpoint` puts them back, so that

.. code-block:: python

    model.learn(total)                      # uninterrupted

    model.learn(k, callback=ExactCheckpointCallback(save_freq, "run.ckpt"))   # interrupted at some point ...
    model = load_checkpoint("run.ckpt", env=make_env())                       # ... in a fresh process
    model.learn(total - model.num_timesteps, reset_num_timesteps=False)

end with parameters that are ``torch.equal`` (tested for PPO and QPropTRPO on seeded environments, and on
MuJoCo). Checkpoints are taken at rollout boundaries (:meth:`ExactCheckpointCallback._on_rollout_start`), where
the rollout buffer is empty.

File format: one zip (written atomically) with ``model.zip`` (the model's own ``save``), ``replay_buffer``
(``save_replay_buffer``, when the model has a replay buffer), ``state.json`` (plain values) and ``arrays.npz``
(arrays, read with ``allow_pickle=False``). The environments' state is read attribute by attribute from every
wrapper (plain numbers, strings, lists, dicts and arrays; other objects are skipped), the simulator through
MuJoCo's ``mj_getState`` (full integration state) or the classic-control ``state`` attribute. The algorithm class
is looked up by name among pgvar's and SB3's classes, never imported from the file.

Limits: the environments must live in this process (``DummyVecEnv``, possibly under ``VecNormalize`` or other
``VecEnvWrapper`` s); ``SubprocVecEnv`` is refused with a clear error. gSDE noise and custom state that a user's
wrapper keeps in objects other than plain values are not restored.
"""

from __future__ import annotations

import io
import json
import os
import random
import zipfile
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper

from pgvar._io import atomic_write
from pgvar._validation import check_positive

__all__ = ["ExactCheckpointCallback", "load_checkpoint", "save_checkpoint"]

_FORMAT = "pgvar-checkpoint/1"

#: attributes never read from or written to an environment or wrapper (structure, spaces, rendering, simulator)
_SKIPPED_ATTRIBUTES = frozenset(
    {
        "env", "venv", "envs", "spec", "_np_random", "np_random", "action_space", "observation_space",
        "_action_space", "_observation_space", "metadata", "_metadata", "_cached_spec", "render_mode", "screen",
        "clock", "model", "data", "results_writer", "_saved_kwargs", "class_attributes", "t_start",
        "episode_times", "renderer", "mujoco_renderer", "viewer",
    }
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ encoding
class _Arrays:
    """Collects the arrays of a state tree; JSON holds ``{"__array__": key}`` in their place."""

    def __init__(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.arrays: dict[str, np.ndarray] = {} if arrays is None else arrays

    def put(self, array: np.ndarray) -> dict[str, str]:
        key = f"a{len(self.arrays)}"
        self.arrays[key] = np.array(array, copy=True)
        return {"__array__": key}


_UNSUPPORTED = object()


def _encode(value: Any, arrays: _Arrays) -> Any:
    """A JSON-able tree for ``value``, or ``_UNSUPPORTED`` (objects, functions, object arrays)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return arrays.put(np.asarray(value)) if value.dtype != object else _UNSUPPORTED
    if isinstance(value, np.ndarray):
        return arrays.put(value) if value.dtype != object else _UNSUPPORTED
    if isinstance(value, (list, tuple)):
        items = [_encode(item, arrays) for item in value]
        if any(item is _UNSUPPORTED for item in items):
            return _UNSUPPORTED
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            return _UNSUPPORTED
        encoded = {key: _encode(item, arrays) for key, item in value.items()}
        if any(item is _UNSUPPORTED for item in encoded.values()):
            return _UNSUPPORTED
        return {"__dict__": encoded, "__ordered__": type(value) is not dict}
    if isinstance(value, RunningMeanStd):
        return {"__object__": _attributes(value, arrays)}
    return _UNSUPPORTED


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, list):
        return [_decode(item, arrays) for item in node]
    if not isinstance(node, dict):
        return node
    if "__array__" in node:
        array = arrays[node["__array__"]]
        return array[()] if array.ndim == 0 else array.copy()
    if "__tuple__" in node:
        return tuple(_decode(item, arrays) for item in node["__tuple__"])
    if "__dict__" in node:
        from collections import OrderedDict

        items = {key: _decode(item, arrays) for key, item in node["__dict__"].items()}
        return OrderedDict(items) if node["__ordered__"] else items
    raise ValueError(f"corrupt checkpoint: unknown node {sorted(node)}")


def _attributes(obj: Any, arrays: _Arrays) -> dict[str, Any]:
    """The plain-data attributes of ``obj`` (see :data:`_SKIPPED_ATTRIBUTES`)."""
    state = {}
    for name, value in vars(obj).items():
        if name in _SKIPPED_ATTRIBUTES:
            continue
        encoded = _encode(value, arrays)
        if encoded is not _UNSUPPORTED:
            state[name] = encoded
    return state


def _restore_attributes(obj: Any, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    for name, node in state.items():
        if isinstance(node, dict) and "__object__" in node:
            _restore_attributes(getattr(obj, name), node["__object__"], arrays)
        elif isinstance(node, dict) and "__dict__" in node and _holds_objects(node):
            target = getattr(obj, name)
            for key, item in node["__dict__"].items():
                _restore_attributes(target[key], item["__object__"], arrays)
        else:
            setattr(obj, name, _decode(node, arrays))


def _holds_objects(node: dict[str, Any]) -> bool:
    return any(isinstance(item, dict) and "__object__" in item for item in node["__dict__"].values())


# ------------------------------------------------------------------------------------------------ environments
def _vec_env_chain(venv: VecEnv) -> tuple[list[VecEnv], DummyVecEnv]:
    chain: list[VecEnv] = []
    while isinstance(venv, VecEnvWrapper):
        chain.append(venv)
        venv = venv.venv
    if not isinstance(venv, DummyVecEnv):
        raise ValueError(
            "exact checkpoints need the environments in this process: the model's env must be a DummyVecEnv "
            f"(possibly under VecNormalize or other VecEnvWrappers), got {type(venv).__name__}"
        )
    return chain, venv


def _gym_env_chain(env: gym.Env) -> list[Any]:
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def _simulator_state(base: Any, arrays: _Arrays) -> dict[str, Any] | None:
    if hasattr(base, "model") and hasattr(base, "data") and hasattr(base, "set_state"):
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        state = np.empty(mujoco.mj_stateSize(base.model, spec), dtype=np.float64)
        mujoco.mj_getState(base.model, base.data, state, spec)
        return {"mujoco": arrays.put(state)}
    return None


def _restore_simulator(base: Any, node: dict[str, Any] | None, arrays: dict[str, np.ndarray]) -> None:
    if node is None:
        return
    import mujoco

    state = arrays[node["mujoco"]["__array__"]]
    mujoco.mj_setState(base.model, base.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(base.model, base.data)


def _env_state(venv: VecEnv, arrays: _Arrays) -> dict[str, Any]:
    chain, dummy = _vec_env_chain(venv)
    envs = []
    for env in dummy.envs:
        layers = _gym_env_chain(env)
        base: Any = layers[-1]
        generator = getattr(base, "_np_random", None)
        envs.append(
            {
                "classes": [type(layer).__name__ for layer in layers],
                "layers": [_attributes(layer, arrays) for layer in layers],
                "np_random": None if generator is None else _encode(generator.bit_generator.state, arrays),
                "simulator": _simulator_state(base, arrays),
            }
        )
    return {
        "vec_classes": [type(layer).__name__ for layer in [*chain, dummy]],
        "vec_layers": [_attributes(layer, arrays) for layer in [*chain, dummy]],
        "envs": envs,
    }


def _restore_env_state(venv: VecEnv, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    chain, dummy = _vec_env_chain(venv)
    vec_layers = [*chain, dummy]
    classes = [type(layer).__name__ for layer in vec_layers]
    if classes != state["vec_classes"] or len(dummy.envs) != len(state["envs"]):
        raise ValueError(
            f"env does not match the checkpoint: it was {state['vec_classes']} with {len(state['envs'])} "
            f"environment(s), got {classes} with {len(dummy.envs)}"
        )
    for layer, layer_state in zip(vec_layers, state["vec_layers"]):
        _restore_attributes(layer, layer_state, arrays)
    for index, (env, env_state) in enumerate(zip(dummy.envs, state["envs"])):
        layers = _gym_env_chain(env)
        if [type(layer).__name__ for layer in layers] != env_state["classes"]:
            raise ValueError(
                f"environment {index} does not match the checkpoint: its wrappers were {env_state['classes']}, got "
                f"{[type(layer).__name__ for layer in layers]}"
            )
        for layer, layer_state in zip(layers, env_state["layers"]):
            _restore_attributes(layer, layer_state, arrays)
        base: Any = layers[-1]
        if env_state["np_random"] is not None:
            bit_state = _decode(env_state["np_random"], arrays)
            bit_generator = getattr(np.random, bit_state["bit_generator"], None)
            if bit_generator is None or not isinstance(bit_generator, type):
                raise ValueError(f"corrupt checkpoint: unknown bit generator {bit_state['bit_generator']!r}")
            base.np_random = np.random.Generator(bit_generator())
            base.np_random.bit_generator.state = bit_state
        _restore_simulator(base, env_state["simulator"], arrays)


# ------------------------------------------------------------------------------------------------ RNG
def _rng_state(arrays: _Arrays) -> dict[str, Any]:
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": arrays.put(torch.get_rng_state().numpy()),
        "numpy": _encode(np.random.get_state(legacy=False), arrays),  # noqa: NPY002 (SB3 shuffles with it)
        "python": [python_version, list(python_internal), python_gauss],
    }


def _restore_rng_state(state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    torch.set_rng_state(torch.from_numpy(_decode(state["torch"], arrays)))
    np.random.set_state(_decode(state["numpy"], arrays))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


# ------------------------------------------------------------------------------------------------ public API
def _algorithm_classes() -> dict[str, type[BaseAlgorithm]]:
    import sb3_contrib
    import stable_baselines3

    import pgvar

    classes: dict[str, type[BaseAlgorithm]] = {}
    for module, names in (
        (stable_baselines3, ("PPO", "A2C", "SAC", "TD3", "DDPG", "DQN")),
        (sb3_contrib, ("TRPO",)),
        (pgvar, ("PPO", "A2C", "TRPO", "QPropPPO", "QPropTRPO", "EntropyPG", "SoftQ")),
    ):
        for name in names:
            cls = getattr(module, name)
            classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return classes


def _class_key(cls: type) -> str:
    for key, known in _algorithm_classes().items():
        if known is cls:
            return key
    for base in cls.__mro__[1:]:
        for key, known in _algorithm_classes().items():
            if known is base:
                return key
    raise ValueError(f"save_checkpoint supports pgvar's and SB3's algorithm classes, got {cls.__qualname__}")


def save_checkpoint(model: BaseAlgorithm, path: str | os.PathLike[str]) -> None:
    """Write everything that :func:`load_checkpoint` needs to continue ``model``'s training exactly.

    Call it between rollouts (:class:`ExactCheckpointCallback` does). The file is written atomically: a crash
    during the save leaves the previous checkpoint intact.

    :param model: an SB3 or pgvar on-policy or off-policy algorithm whose env is a ``DummyVecEnv`` (possibly
        wrapped)
    :param path: the checkpoint file (a zip)
    """
    if model.env is None:
        raise ValueError(
            "save_checkpoint needs the model's env (model.env is None): its state is part of a checkpoint"
        )
    arrays = _Arrays()
    last = {
        name: _encode(getattr(model, name, None), arrays)
        for name in ("_last_obs", "_last_episode_starts", "_last_original_obs")
    }
    state = {
        "format": _FORMAT,
        "algorithm": _class_key(type(model)),
        "num_timesteps": int(model.num_timesteps),
        "last": {name: node for name, node in last.items() if node is not _UNSUPPORTED},
        "rng": _rng_state(arrays),
        "env": _env_state(model.env, arrays),
    }
    model_bytes = io.BytesIO()
    model.save(model_bytes)
    replay_bytes = None
    if getattr(model, "replay_buffer", None) is not None and hasattr(model, "save_replay_buffer"):
        replay_bytes = io.BytesIO()
        model.save_replay_buffer(replay_bytes)
    array_bytes = io.BytesIO()
    np.savez(array_bytes, **arrays.arrays)  # type: ignore[arg-type]

    def write(file: Any) -> None:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("state.json", json.dumps(state, default=_json_default))
            archive.writestr("arrays.npz", array_bytes.getvalue())
            archive.writestr("model.zip", model_bytes.getvalue())
            if replay_bytes is not None:
                archive.writestr("replay_buffer", replay_bytes.getvalue())

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike[str], env: VecEnv | gym.Env, **load_kwargs: Any) -> BaseAlgorithm:
    """Load a checkpoint written by :func:`save_checkpoint` and restore every state that training reads.

    Continue with ``model.learn(total_timesteps - model.num_timesteps, reset_num_timesteps=False)``.

    :param path: the checkpoint file
    :param env: a new environment built like the saved one (same wrappers, same number of environments); its
        state is overwritten with the checkpoint's
    :param load_kwargs: passed to the algorithm's ``load`` (e.g. ``device``)
    :return: the model, with the global random streams of torch, numpy and Python set as they were at the save
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"path={str(path)!r} is not a pgvar checkpoint (a zip written by save_checkpoint): {error}"
        ) from None
    with archive:
        names = set(archive.namelist())
        if not {"state.json", "arrays.npz", "model.zip"} <= names:
            raise ValueError(f"path={str(path)!r} is not a pgvar checkpoint: it holds {sorted(names)}")
        state = json.loads(archive.read("state.json"))
        if state.get("format") != _FORMAT:
            raise ValueError(
                f"path={str(path)!r}: unknown checkpoint format {state.get('format')!r}, expected {_FORMAT!r}"
            )
        with np.load(io.BytesIO(archive.read("arrays.npz")), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        classes = _algorithm_classes()
        if state["algorithm"] not in classes:
            raise ValueError(
                f"checkpoint of an unknown algorithm class {state['algorithm']!r}; known: {sorted(classes)}"
            )
        cls = classes[state["algorithm"]]
        model = cls.load(io.BytesIO(archive.read("model.zip")), env=env, force_reset=False, **load_kwargs)
        if "replay_buffer" in names:
            model.load_replay_buffer(io.BytesIO(archive.read("replay_buffer")))  # type: ignore[attr-defined]
    assert model.env is not None
    _restore_env_state(model.env, state["env"], arrays)
    for name, node in state["last"].items():
        setattr(model, name, _decode(node, arrays))
    _restore_rng_state(state["rng"], arrays)
    return model


class ExactCheckpointCallback(BaseCallback):
    """Write an exact-resume checkpoint (:func:`save_checkpoint`) every ``save_freq`` environment steps.

    The checkpoint is taken at the first rollout boundary after each ``save_freq`` steps (counted in
    ``model.num_timesteps``, all environments together), replacing the previous one atomically.

    :param save_freq: environment steps between checkpoints
    :param path: the checkpoint file
    """

    def __init__(self, save_freq: int, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.save_freq = int(check_positive("save_freq", save_freq, integer=True))
        self.path = path
        self._last_saved_at: int | None = None

    def _on_training_start(self) -> None:
        self._last_saved_at = self.model.num_timesteps

    def _on_rollout_start(self) -> None:
        assert self._last_saved_at is not None
        if self.model.num_timesteps - self._last_saved_at >= self.save_freq:
            self._write()
            self._last_saved_at = self.model.num_timesteps
            self.logger.record("pgvar/checkpoint_timesteps", self.model.num_timesteps)

    def _write(self) -> None:
        """Write the checkpoint (a subclass may write its own files first, e.g. a learning curve)."""
        save_checkpoint(self.model, self.path)

    def _on_step(self) -> bool:
        return True
