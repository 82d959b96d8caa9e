"""The file format of Q-Prop's replay buffer: numpy arrays and JSON metadata in one zip, never a pickle.

A pickle runs code when it is loaded, so a replay buffer from somewhere else could run anything. The file written
here is a zip archive that ``numpy.load(path, allow_pickle=False)`` opens as an ``.npz``: one ``.npy`` entry per
array (observations, next observations, actions, rewards, dones, timeouts; only the rows filled so far) and a
``metadata.json`` entry (format name and version, buffer class, capacity, ``n_envs``, write position, whether it
wrapped around, the observation keys of a dict observation space). Reading never unpickles: a file that holds a
pickle (an SB3 ``save_replay_buffer`` file, an object array) is refused with a ``ValueError``.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer

__all__ = ["FORMAT", "read_replay_buffer", "replay_file_path", "write_replay_buffer"]

#: The ``format`` field of the metadata (with ``version``).
FORMAT = "pgvar.qprop_replay_buffer"
_VERSION = 1
_METADATA = "metadata.json"
#: The per-step arrays of SB3's ``ReplayBuffer`` (``optimize_memory_usage=False``), besides the observations.
_FIELDS = ("actions", "rewards", "dones", "timeouts")


def replay_file_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """``path`` with ``.npz`` appended when it has no suffix (where :func:`write_replay_buffer` writes)."""
    final = pathlib.Path(path)
    return final.with_name(final.name + ".npz") if final.suffix == "" else final


def _observation_arrays(replay: ReplayBuffer) -> dict[str, np.ndarray]:
    """``{"observations": ..., "next_observations": ...}``; dict observations as ``observations.<i>`` by key order."""
    arrays: dict[str, np.ndarray] = {}
    for field in ("observations", "next_observations"):
        value = getattr(replay, field)
        if isinstance(value, dict):
            arrays.update({f"{field}.{index}": array for index, array in enumerate(value.values())})
        else:
            arrays[field] = value
    return arrays


def _filled_rows(replay: ReplayBuffer) -> int:
    return replay.buffer_size if replay.full else int(replay.pos)


def write_replay_buffer(replay: ReplayBuffer) -> Callable[[IO[bytes]], None]:
    """A writer of ``replay`` for :func:`pgvar.algos._save.atomic_save` (it writes the rows filled so far).

    :param replay: an SB3 ``ReplayBuffer`` or ``DictReplayBuffer`` with ``optimize_memory_usage=False``
    """
    metadata = {
        "format": FORMAT,
        "version": _VERSION,
        "buffer_class": type(replay).__name__,
        "buffer_size": int(replay.buffer_size),
        "n_envs": int(replay.n_envs),
        "pos": int(replay.pos),
        "full": bool(replay.full),
        "observation_keys": list(replay.observations) if isinstance(replay, DictReplayBuffer) else None,
    }
    rows = _filled_rows(replay)

    def write(file: IO[bytes]) -> None:
        arrays = {**_observation_arrays(replay), **{field: getattr(replay, field) for field in _FIELDS}}
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.writestr(_METADATA, json.dumps(metadata))
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(array)[:rows], allow_pickle=False)

    return write


def _not_a_replay_file(path: object, why: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} is not a pgvar replay-buffer file ({why}). save_replay_buffer writes a zip of numpy arrays "
        "and JSON metadata; pgvar never unpickles a replay buffer, because a pickle can run code when it is loaded "
        "(SB3's save_replay_buffer and earlier pgvar versions wrote pickles: if you wrote such a file yourself and "
        "trust it, set model.qprop_critic.replay_buffer = stable_baselines3.common.save_util.load_from_pkl(path) and save it "
        "again with save_replay_buffer)"
    )


def read_replay_buffer(
    path: str | os.PathLike[str] | io.BufferedIOBase, make_buffer: Callable[[dict[str, Any]], ReplayBuffer]
) -> ReplayBuffer:
    """Read a file of :func:`write_replay_buffer` into a new buffer, without unpickling anything.

    :param path: the file (``.npz`` is tried too when ``path`` does not exist) or a readable, seekable file object
    :param make_buffer: builds an empty buffer of the metadata's capacity for the model (and raises ``ValueError``
        when the metadata do not fit the model); the file's arrays must have its arrays' shapes and dtypes
    :return: the filled buffer
    """
    source: Any = path
    if isinstance(path, (str, os.PathLike)):
        source = pathlib.Path(path)
        if not source.exists() and replay_file_path(source).exists():
            source = replay_file_path(source)
        if not source.is_file():
            raise FileNotFoundError(f"no replay-buffer file at {str(path)!r}")
        is_zip = zipfile.is_zipfile(source)
    else:
        start = path.tell()
        is_zip = zipfile.is_zipfile(path)
        path.seek(start)
    if not is_zip:
        raise _not_a_replay_file(path, "it is not a zip archive")
    try:
        with np.load(source, allow_pickle=False) as archive:
            if _METADATA not in archive.files:
                raise _not_a_replay_file(path, f"it has no {_METADATA} entry")
            metadata = json.loads(archive[_METADATA])
            if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
                raise _not_a_replay_file(path, f"its metadata do not say format={FORMAT!r}")
            if metadata.get("version") != _VERSION:
                raise ValueError(
                    f"{str(path)!r} is a replay-buffer file of format version {metadata.get('version')!r}; this pgvar "
                    f"reads version {_VERSION}"
                )
            replay = make_buffer(metadata)
            replay.pos, replay.full = int(metadata["pos"]), bool(metadata["full"])
            if not 0 <= replay.pos < replay.buffer_size:
                raise ValueError(f"{str(path)!r}: pos={replay.pos} does not fit buffer_size={replay.buffer_size}")
            rows = _filled_rows(replay)
            targets = {**_observation_arrays(replay), **{field: getattr(replay, field) for field in _FIELDS}}
            for name, target in targets.items():
                if name not in archive.files:
                    raise _not_a_replay_file(path, f"it has no {name}.npy entry")
                array = archive[name]  # allow_pickle=False: an object array raises ValueError here
                if array.shape != (rows, *target.shape[1:]) or array.dtype != target.dtype:
                    raise ValueError(
                        f"{str(path)!r}: {name} has shape {array.shape} and dtype {array.dtype}, the model's replay "
                        f"buffer needs {(rows, *target.shape[1:])} and {target.dtype}"
                    )
                target[:rows] = array
    except (zipfile.BadZipFile, json.JSONDecodeError, KeyError, TypeError) as error:
        raise _not_a_replay_file(path, f"{type(error).__name__}: {error}") from error
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise _not_a_replay_file(path, "it holds a pickled object array") from error
        raise
    return replay
