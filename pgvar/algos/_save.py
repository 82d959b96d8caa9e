"""One save/load contract for every pgvar algorithm: :class:`SaveLoadMixin`.

What it adds to SB3's ``save()`` / ``load()`` (same zip format; SB3 loads pgvar's files and pgvar loads SB3's):

* **Atomic save** through :func:`pgvar._io.atomic_write`: a crash, a kill or a full disk mid-save leaves the previous
  file intact; symlinks and permission bits are kept; no temporary file is left behind. Saving into a missing folder
  creates it with SB3's warning.
* **A clear error on a file that is not a model** (:func:`check_model_archive`).
* **The saving class is checked.** The zip gets one more entry, ``pgvar.json``, naming the algorithm (the nearest
  pgvar class in the saving class's MRO: ``PPO``, ``A2C``, ``TRPO``, ``QPropPPO``, ``QPropTRPO``, ``EntropyPG``
  or ``SoftQ``), which ``load()`` compares with its own; a file without it (saved by stable-baselines3, or by pgvar
  before 0.2) is identified by the keys of its ``data`` entry (``qprop_eta``: Q-Prop; ``tau`` and ``n_step``:
  EntropyPG (which has ``normalize_advantage``) or SoftQ; ``cg_max_steps``: TRPO; ``clip_range``: PPO; on-policy
  ``n_steps`` and ``gae_lambda`` otherwise: A2C; ``learning_starts``/``buffer_size``: an off-policy algorithm) and
  the module of its policy class (sb3-contrib's recurrent and maskable policies). So ``stable_baselines3.PPO``,
  ``stable_baselines3.A2C`` and ``sb3_contrib.TRPO`` files load into ``pgvar.PPO``, ``pgvar.A2C`` and
  ``pgvar.TRPO`` (and pgvar's files into them), and any other pair raises ``ValueError`` before anything is built.
* **A pickle-free load**, ``load(path, allow_pickle=False)``: SB3 stores the fields it cannot write as JSON as
  cloudpickle blobs and ``load()`` unpickles them, which runs whatever code the file's author chose. With
  ``allow_pickle=False`` nothing is unpickled: each such field is taken from ``custom_objects`` or from the JSON
  copy that pgvar's ``save()`` writes in ``pgvar.json`` (:mod:`pgvar.algos._json_fields`), and a field that has
  neither raises ``ValueError`` naming it. The parameters (``*.pth``) are read by SB3 with
  ``torch.load(weights_only=True)`` in both modes.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import warnings
import zipfile
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, TypeVar

import torch as th
from stable_baselines3.common.type_aliases import GymEnv

from pgvar import __version__
from pgvar._io import atomic_write
from pgvar.algos._json_fields import allowed_classes, decode, encode, qualified_name

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    _Base = BaseAlgorithm
else:
    _Base = object

__all__ = ["PGVAR_ENTRY", "SaveLoadMixin", "algorithm_name", "atomic_save", "check_model_archive"]

#: Entries every SB3 / pgvar model archive holds (``BaseAlgorithm.save``).
REQUIRED_ENTRIES = ("data", "policy.pth")
#: The zip entry pgvar adds: ``{"format", "algorithm", "class", "pgvar_version", "fields", "unencodable"}``.
PGVAR_ENTRY = "pgvar.json"
FORMAT = 1

SelfSaveLoad = TypeVar("SelfSaveLoad", bound="SaveLoadMixin")
FileOrPath = str | os.PathLike[str] | io.BufferedIOBase


# ------------------------------------------------------------------------------------------------- writing
def _final_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """Where SB3's ``save_to_zip_file`` would write ``path``, with SB3's warnings: ``.zip`` appended when there is
    no suffix, ``<path>_2`` when ``path`` is a folder, a missing parent folder created."""
    final = pathlib.Path(path)
    if final.suffix == "":
        final = final.with_name(final.name + ".zip")
    if final.is_dir():
        warnings.warn(f"Path '{final}' is a folder. Will save instead to {final}_2", stacklevel=4)
        final = pathlib.Path(f"{final}_2")
    if not final.parent.exists():
        warnings.warn(f"Path '{final.parent}' does not exist. Will create it.", stacklevel=4)
        final.parent.mkdir(parents=True, exist_ok=True)
    return final


def atomic_save(write: Callable[[IO[bytes]], None], path: FileOrPath) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it over ``path`` in one step
    (:func:`pgvar._io.atomic_write`, with SB3's path rules: ``.zip`` appended, missing folder created with a
    warning). File objects are written directly.

    :param write: writes the whole archive into the given binary file object
    :param path: destination path (``.zip`` is appended when it has no suffix, as SB3 does) or a file object
    """
    if not isinstance(path, (str, os.PathLike)):
        write(path)  # type: ignore[arg-type]
        return
    atomic_write(_final_path(path), write)


# ------------------------------------------------------------------------------------------------- reading
def _source(path: str | os.PathLike[str]) -> pathlib.Path:
    """The file SB3's loader opens: ``path``, or ``path + ".zip"`` when only that exists."""
    source = pathlib.Path(path)
    if not source.exists() and pathlib.Path(f"{source}.zip").exists():
        source = pathlib.Path(f"{source}.zip")
    return source


def check_model_archive(path: FileOrPath) -> None:
    """Raise ``ValueError`` unless ``path`` is a zip archive with the entries of an SB3 / pgvar model.

    A missing file is left to SB3's loader (``FileNotFoundError``), which also tries ``path + ".zip"``.

    :param path: path or readable, seekable binary file object
    """
    names: list[str]
    not_a_zip = (
        f"{str(path)!r} is not a zip archive, so it is not a pgvar / stable-baselines3 model "
        "(models are the .zip files written by model.save())"
    )
    if isinstance(path, (str, os.PathLike)):
        source = _source(path)
        if not source.is_file():
            return
        if not zipfile.is_zipfile(source):
            raise ValueError(not_a_zip)
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    else:
        start = path.tell()
        try:
            if not zipfile.is_zipfile(path):
                raise ValueError(not_a_zip)
            path.seek(start)
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        finally:
            path.seek(start)
    missing = [entry for entry in REQUIRED_ENTRIES if entry not in names]
    if missing:
        shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
        raise ValueError(
            f"{str(path)!r} is a zip archive but not a pgvar / stable-baselines3 model: it has no "
            f"{', '.join(repr(m) for m in missing)} entry (entries: {shown or 'none'})"
        )


def _read_json_entries(path: FileOrPath) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The archive's ``data`` (raw JSON: pickled fields stay base64 text) and ``pgvar.json`` (or ``None``)."""

    def read(archive: zipfile.ZipFile) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            data = json.loads(archive.read("data").decode())
            meta = json.loads(archive.read(PGVAR_ENTRY).decode()) if PGVAR_ENTRY in archive.namelist() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{str(path)!r} has a 'data' or {PGVAR_ENTRY!r} entry that is not JSON: {error}") from None
        if not isinstance(data, dict) or not (meta is None or isinstance(meta, dict)):
            raise ValueError(f"{str(path)!r} has a malformed 'data' or {PGVAR_ENTRY!r} entry (not a JSON object)")
        return data, meta

    if isinstance(path, (str, os.PathLike)):
        with zipfile.ZipFile(_source(path)) as archive:
            return read(archive)
    start = path.tell()
    try:
        with zipfile.ZipFile(path) as archive:
            return read(archive)
    finally:
        path.seek(start)


# ----------------------------------------------------------------------------------------- identification
def algorithm_name(cls: type) -> str:
    """The algorithm a class saves and loads: the name of the nearest pgvar class in its MRO (a user's subclass
    of ``pgvar.PPO`` is a ``"PPO"``), or the class's own name outside pgvar.

    >>> from pgvar.algos import PPO, QPropPPO
    >>> algorithm_name(PPO), algorithm_name(QPropPPO)
    ('PPO', 'QPropPPO')
    """
    for klass in cls.__mro__:
        if klass.__module__.startswith("pgvar.") and not klass.__name__.startswith("_"):
            return klass.__name__
    return cls.__name__


def _file_algorithm(data: dict[str, Any], meta: dict[str, Any] | None) -> str:
    """The algorithm that saved an archive (see the module doc), or a description of a foreign one."""
    if meta is not None:
        return str(meta.get("algorithm"))
    keys = set(data)
    policy_class = data.get("policy_class")
    policy_module = str(policy_class.get("__module__", "")) if isinstance(policy_class, dict) else ""
    if "qprop_eta" in keys:
        return "QPropTRPO" if "cg_max_steps" in keys else "QPropPPO"
    if "learning_starts" in keys or "buffer_size" in keys:
        return "an off-policy algorithm (DQN, SAC, TD3, ...)"
    if policy_module.startswith("sb3_contrib.common.recurrent"):
        return "RecurrentPPO"
    if policy_module.startswith("sb3_contrib.common.maskable"):
        return "MaskablePPO"
    if {"tau", "n_step"} <= keys:
        return "EntropyPG" if "normalize_advantage" in keys else "SoftQ"
    if "cg_max_steps" in keys:
        return "TRPO"
    if "clip_range" in keys:
        return "PPO"
    if {"n_steps", "gae_lambda"} <= keys:
        return "A2C"
    return "an unknown algorithm"


def _pgvar_entry(model: Any, archive: io.BytesIO) -> dict[str, Any]:
    """``pgvar.json`` for a model: its algorithm and a JSON copy of each field SB3 pickled into ``data``."""
    with zipfile.ZipFile(archive) as zipped:
        data = json.loads(zipped.read("data").decode())
    fields, unencodable = {}, {}
    for key, item in data.items():
        if isinstance(item, dict) and ":serialized:" in item:
            try:
                fields[key] = encode(getattr(model, key))
            except (TypeError, AttributeError) as error:
                unencodable[key] = f"it holds {error}, which has no pickle-free form"
    return {
        "format": FORMAT,
        "algorithm": algorithm_name(type(model)),
        "class": qualified_name(type(model)),
        "pgvar_version": __version__,
        "fields": fields,
        "unencodable": unencodable,
    }


# ------------------------------------------------------------------------------------------------ the mixin
class SaveLoadMixin(_Base):
    """Atomic ``save``, checked ``load`` (file type, saving algorithm, optional pickle-free mode); see the module doc.

    Goes before the SB3 class in the bases of a pgvar algorithm, e.g.
    ``class PPO(SaveLoadMixin, OnPolicyEstimatorMixin, stable_baselines3.PPO)``; subclasses (``QPropPPO``) inherit
    it. SB3's hooks (``_excluded_save_params``, ``_get_torch_save_params``) keep deciding what is saved.
    """

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """Save the model like SB3 (same zip format, loadable by SB3), atomically.

        The archive is written to a temporary file in the destination folder and moved over ``path`` with
        ``os.replace``: a failure or a crash mid-save never leaves a broken file and never touches an existing one
        (:mod:`pgvar._io`). The zip also holds ``pgvar.json``: the saving algorithm and pickle-free copies of the
        pickled fields, for ``load(..., allow_pickle=False)``.

        :param path: path to the file (``.zip`` is appended when it has no suffix; a missing folder is created, with
            a warning, as SB3 does) or a file object
        :param exclude: names of attributes not to save, in addition to the default ones
        :param include: names of attributes to save even if they are excluded by default
        """
        parent_save = super().save

        def write(file: IO[bytes]) -> None:
            archive = io.BytesIO()
            parent_save(archive, exclude=exclude, include=include)
            entry = json.dumps(_pgvar_entry(self, archive))
            with zipfile.ZipFile(archive, mode="a") as zipped:
                zipped.writestr(PGVAR_ENTRY, entry)
            file.write(archive.getvalue())

        atomic_save(write, path)

    @classmethod
    def load(  # noqa: PLR0913 (SB3's signature plus one argument)
        cls: type[SelfSaveLoad],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        allow_pickle: bool = True,
        **kwargs: Any,
    ) -> SelfSaveLoad:
        """Load a model saved by this algorithm (pgvar's class or, for PPO/A2C/TRPO, its SB3 / sb3-contrib twin).

        Raises ``ValueError`` for a file that is not a model zip, for a model of another algorithm, and, with
        ``allow_pickle=False``, for a pickled field that has no pickle-free copy. ``env`` is optional for every
        class (``set_env`` later to train). Only load files from sources you trust, or pass ``allow_pickle=False``.

        :param path: path to the file (``.zip`` is tried when ``path`` does not exist) or a file object
        :param env: environment to run the loaded model in (checked against the saved spaces), or ``None``
        :param device: device of the loaded model
        :param custom_objects: values that replace fields of the file (those are never unpickled)
        :param print_system_info: print the system info of the machine that saved the model
        :param force_reset: reset the environment before training (SB3's default, see SB3's ``load``)
        :param allow_pickle: ``True`` (default, SB3's behaviour): fields SB3 pickled (spaces, policy class,
            schedules, ...) are unpickled, which runs code chosen by the file's author. ``False``: nothing is
            unpickled; each such field comes from ``custom_objects`` or from the JSON copy pgvar's ``save()``
            writes; a file without one (e.g. saved by stable-baselines3) raises ``ValueError`` naming the fields.
        :param kwargs: attributes to change on load (e.g. ``baseline``), as in SB3
        """
        check_model_archive(path)
        data, meta = _read_json_entries(path)
        expected, found = algorithm_name(cls), _file_algorithm(data, meta)
        if found != expected:
            saved_by = f" (saved by {meta.get('class')})" if meta is not None else ""
            raise ValueError(
                f"{str(path)!r} holds a {found} model{saved_by}, not a {expected} one: load it with the class that "
                f"saved it. (Files of stable_baselines3.PPO / A2C and sb3_contrib.TRPO load into pgvar.PPO / A2C / "
                f"TRPO and back; other algorithms do not share files.)"
            )
        saved_baseline = data.get("baseline", "value")
        if "baseline" in kwargs and (kwargs["baseline"] == "horizon") != (saved_baseline == "horizon"):
            raise ValueError(
                f"baseline={kwargs['baseline']!r} cannot be chosen at load for a model saved with "
                f"baseline={saved_baseline!r}: 'horizon' changes the policy's value network (a second head), so "
                "the saved parameters do not fit; train a new model instead"
            )
        if not allow_pickle:
            custom_objects = _pickle_free_objects(cls, path, data, meta, custom_objects)
        return super().load(
            path,
            env=env,
            device=device,
            custom_objects=custom_objects,
            print_system_info=print_system_info,
            force_reset=force_reset,
            **kwargs,
        )


def _pickle_free_objects(
    cls: type,
    path: FileOrPath,
    data: dict[str, Any],
    meta: dict[str, Any] | None,
    custom_objects: dict[str, Any] | None,
) -> dict[str, Any]:
    """``custom_objects`` completed so that SB3's ``load`` unpickles nothing; ``ValueError`` if it cannot be."""
    objects = dict(custom_objects or {})
    needed = [key for key, item in data.items() if isinstance(item, dict) and ":serialized:" in item]
    needed = [key for key in needed if key not in objects]
    if not needed:
        return objects
    if meta is None:
        raise ValueError(
            f"{str(path)!r} was not saved by pgvar (it has no {PGVAR_ENTRY!r} entry), and its fields "
            f"{', '.join(needed)} are pickled, which allow_pickle=False refuses to load. Pass them in custom_objects, "
            "or load the file once with allow_pickle=True where you trust it and save it again with pgvar."
        )
    fields: dict[str, Any] = meta["fields"] if isinstance(meta.get("fields"), dict) else {}
    unencodable: dict[str, Any] = meta["unencodable"] if isinstance(meta.get("unencodable"), dict) else {}
    classes = allowed_classes(getattr(cls, "policy_aliases", {}).values())
    problems = []
    for key in needed:
        if key not in fields:
            reason = unencodable.get(key, f"the file has no pickle-free copy of it in {PGVAR_ENTRY!r}")
            problems.append(f"{key} ({reason})")
            continue
        try:
            objects[key] = decode(fields[key], classes)
        except ValueError as error:
            problems.append(f"{key} (it holds {error})")
    if problems:
        raise ValueError(
            f"{str(path)!r} cannot be loaded with allow_pickle=False: these fields exist only pickled: "
            f"{'; '.join(problems)}. Pass them in custom_objects, or use allow_pickle=True for a file you trust."
        )
    return objects
