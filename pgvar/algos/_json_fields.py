"""Pickle-free JSON copies of the model fields SB3 pickles, read by ``load(..., allow_pickle=False)``.

SB3's ``save()`` writes every attribute that is not plain JSON (spaces, classes, schedules, numpy arrays, deques)
as a cloudpickle blob inside the zip's ``data`` entry, and ``load()`` unpickles it: whoever wrote the file decides
what code runs. pgvar's ``save()`` also writes a JSON encoding of those same fields (entry ``pgvar.json``) for the
kinds of values a model holds, and a load with ``allow_pickle=False`` reads them from there:

* JSON values as they are; lists item by item; everything else as a tagged object ``{"__pgvar__": kind, ...}``:
  ``dict``, ``tuple``, ``deque``, ``ndarray`` / ``scalar`` (numeric and bool dtypes only), ``space`` (gymnasium
  ``Box``, ``Discrete``, ``MultiDiscrete``, ``MultiBinary``, ``Dict``, ``Tuple``), ``schedule`` (SB3's
  ``ConstantSchedule``, ``LinearSchedule``, ``FloatSchedule``) and ``class`` (by qualified name);
* decoding builds only those values; a ``class`` is looked up among classes that are already imported and either
  come from torch.nn / torch.optim / stable-baselines3 / sb3-contrib / pgvar (policies, networks, activations,
  features extractors, optimizers, buffers) or are a policy alias of the loading class. Nothing is imported and
  nothing is unpickled. A value it cannot encode (a lambda as ``learning_rate``, a space of another kind) is listed
  as such, and the safe load names it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule, LinearSchedule
from torch import nn

__all__ = ["allowed_classes", "decode", "encode", "qualified_name"]

TAG = "__pgvar__"
#: Packages whose (already imported) classes a safe load may name.
TRUSTED_PACKAGES = ("torch.nn", "torch.optim", "stable_baselines3", "sb3_contrib", "pgvar")
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class (what a ``class`` entry stores)."""
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------------------ encode
def encode(value: Any) -> Any:
    """A JSON-serializable encoding of ``value`` (see the module doc); ``TypeError`` if it has none."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [encode(item) for item in value]}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"a dict key of type {type(key).__name__}")
        return {TAG: "dict", "items": [[key, encode(item)] for key, item in value.items()]}
    if isinstance(value, collections.deque):
        return {TAG: "deque", "maxlen": value.maxlen, "items": [encode(item) for item in value]}
    if isinstance(value, np.ndarray):
        _check_dtype(value.dtype)
        return {TAG: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape), "data": value.tolist()}
    if isinstance(value, np.generic):
        _check_dtype(value.dtype)
        return {TAG: "scalar", "dtype": value.dtype.str, "value": value.item()}
    if isinstance(value, spaces.Space):
        return {TAG: "space", **_encode_space(value)}
    if isinstance(value, (ConstantSchedule, LinearSchedule, FloatSchedule)):
        return {TAG: "schedule", **_encode_schedule(value)}
    if isinstance(value, type):
        return {TAG: "class", "name": qualified_name(value)}
    raise TypeError(f"a value of type {type(value).__module__}.{type(value).__qualname__}")


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"a numpy array of dtype {dtype}")


def _encode_space(space: spaces.Space) -> dict[str, Any]:
    if isinstance(space, spaces.Box):
        return {"kind": "Box", "low": encode(space.low), "high": encode(space.high)}
    if isinstance(space, spaces.Discrete):
        return {"kind": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"kind": "MultiDiscrete", "nvec": encode(space.nvec), "start": encode(space.start)}
    if isinstance(space, spaces.MultiBinary):
        return {"kind": "MultiBinary", "n": encode(space.n)}
    if isinstance(space, spaces.Dict):
        return {"kind": "Dict", "items": [[key, encode(sub)] for key, sub in space.spaces.items()]}
    if isinstance(space, spaces.Tuple):
        return {"kind": "Tuple", "items": [encode(sub) for sub in space.spaces]}
    raise TypeError(f"a gymnasium space of type {type(space).__name__}")


def _encode_schedule(schedule: ConstantSchedule | LinearSchedule | FloatSchedule) -> dict[str, Any]:
    if isinstance(schedule, ConstantSchedule):
        return {"kind": "constant", "val": encode(schedule.val)}
    if isinstance(schedule, LinearSchedule):
        return {"kind": "linear", "start": schedule.start, "end": schedule.end, "end_fraction": schedule.end_fraction}
    return {"kind": "float", "value_schedule": encode(schedule.value_schedule)}


# ------------------------------------------------------------------------------------------------ decode
def allowed_classes(extra: Iterable[type] = ()) -> dict[str, type]:
    """Classes a safe load may name, by qualified name: imported subclasses of ``nn.Module``,
    ``th.optim.Optimizer`` and SB3's ``BaseBuffer`` from :data:`TRUSTED_PACKAGES`, plus ``extra``."""
    found: dict[str, type] = {}
    stack: list[type] = [nn.Module, th.optim.Optimizer, BaseBuffer]
    while stack:
        cls = stack.pop()
        module = getattr(cls, "__module__", "")
        if any(module == root or module.startswith(f"{root}.") for root in TRUSTED_PACKAGES):
            found.setdefault(qualified_name(cls), cls)
        stack.extend(cls.__subclasses__())
    for cls in extra:
        found[qualified_name(cls)] = cls
    return found


def decode(value: Any, classes: Mapping[str, type]) -> Any:
    """The value :func:`encode` encoded; ``ValueError`` naming what a safe load will not build."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode(item, classes) for item in value]
    if not isinstance(value, dict) or not isinstance(value.get(TAG), str):
        raise ValueError(f"an entry that is not a pgvar JSON field: {str(value)[:80]}")
    kind = value[TAG]
    try:
        if kind == "tuple":
            return tuple(decode(item, classes) for item in value["items"])
        if kind == "dict":
            return {key: decode(item, classes) for key, item in value["items"]}
        if kind == "deque":
            return collections.deque((decode(item, classes) for item in value["items"]), maxlen=value["maxlen"])
        if kind == "ndarray":
            array = np.array(value["data"], dtype=_dtype(value["dtype"]))
            return array.reshape([int(size) for size in value["shape"]])
        if kind == "scalar":
            return _dtype(value["dtype"]).type(value["value"])
        if kind == "space":
            return _decode_space(value, classes)
        if kind == "schedule":
            return _decode_schedule(value, classes)
    except (KeyError, TypeError) as error:
        raise ValueError(f"a malformed {kind!r} entry ({type(error).__name__}: {error})") from None
    if kind == "class":
        name = value.get("name")
        if not isinstance(name, str) or name not in classes:
            raise ValueError(
                f"the class {name!r}, which is not one of the torch / stable-baselines3 / sb3-contrib / pgvar "
                "classes a safe load may name (pass the class itself in custom_objects)"
            )
        return classes[name]
    raise ValueError(f"an entry of unknown kind {kind!r}")


def _dtype(text: Any) -> np.dtype:
    dtype = np.dtype(str(text))
    if dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"a numpy array of dtype {dtype}, not a numeric or bool one")
    return dtype


def _decode_space(value: dict[str, Any], classes: Mapping[str, type]) -> spaces.Space:
    kind = value["kind"]
    if kind == "Box":
        low, high = decode(value["low"], classes), decode(value["high"], classes)
        return spaces.Box(low=low, high=high, dtype=low.dtype)
    if kind == "Discrete":
        return spaces.Discrete(int(value["n"]), start=int(value["start"]))
    if kind == "MultiDiscrete":
        nvec = decode(value["nvec"], classes)
        return spaces.MultiDiscrete(nvec, dtype=nvec.dtype, start=decode(value["start"], classes))
    if kind == "MultiBinary":
        return spaces.MultiBinary(decode(value["n"], classes))
    if kind == "Dict":
        return spaces.Dict({key: decode(sub, classes) for key, sub in value["items"]})
    if kind == "Tuple":
        return spaces.Tuple([decode(sub, classes) for sub in value["items"]])
    raise ValueError(f"a gymnasium space of unknown kind {kind!r}")


def _decode_schedule(value: dict[str, Any], classes: Mapping[str, type]) -> Any:
    kind = value["kind"]
    if kind == "constant":
        return ConstantSchedule(float(decode(value["val"], classes)))
    if kind == "linear":
        return LinearSchedule(float(value["start"]), float(value["end"]), float(value["end_fraction"]))
    if kind == "float":
        inner = decode(value["value_schedule"], classes)
        if not isinstance(inner, (ConstantSchedule, LinearSchedule, FloatSchedule, float)):
            raise ValueError(f"a FloatSchedule of {type(inner).__name__}")
        return FloatSchedule(inner)
    raise ValueError(f"a schedule of unknown kind {kind!r}")
