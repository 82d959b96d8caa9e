"""Sweep configuration: a TOML file that names learners, environments, seeds and budgets.

TOML, not YAML: Python reads it with the standard library (``tomllib``, 3.11+; ``tomli`` on 3.10), it has one
way to write each value (no YAML "Norway problem", no implicit dates), it never constructs Python objects from
tags, and pgvar's users already write it in ``pyproject.toml``. Nothing in the file is executed: algorithm classes
and activation functions are looked up by name in fixed tables (:data:`ALGORITHMS`, :data:`ACTIVATIONS`).

.. code-block:: toml

    name = "mirage-qprop"
    envs = ["HalfCheetah-v5"]
    seeds = [0, 1, 2, 3, 4]
    total_timesteps = 300_000
    checkpoint_every = 50_000      # environment steps between exact-resume checkpoints
    n_envs = 1

    [learners.TRPO]
    algo = "TRPO"
    kwargs = { n_steps = 5000, gae_lambda = 0.97, policy_kwargs = { net_arch = [100, 50], activation_fn = "tanh" } }

    [learners.QPropTRPO-consistent]
    algo = "QPropTRPO"
    kwargs = { n_steps = 5000, gae_lambda = 0.97, qprop_normalization = "consistent" }

    [reference]                    # optional: published numbers to print beside ours
    source = "Tucker et al. 2018, authors' logs, final 10 of 1000 iterations, 10 seeds, v1 environments"
    [reference.HalfCheetah-v5]
    TRPO = { mean = 1906, sd = 951 }
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgvar._validation import check_positive

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ACTIVATIONS",
    "ALGORITHMS",
    "LearnerSpec",
    "SweepConfig",
    "UnitSpec",
    "load_sweep_config",
    "shipped_configs",
]

#: Algorithm names a config may use -> ``module:attribute`` (looked up, never imported from the file's text).
ALGORITHMS = {
    "PPO": "pgvar:PPO",
    "A2C": "pgvar:A2C",
    "TRPO": "pgvar:TRPO",
    "QPropPPO": "pgvar:QPropPPO",
    "QPropTRPO": "pgvar:QPropTRPO",
    "EntropyPG": "pgvar:EntropyPG",
    "SoftQ": "pgvar:SoftQ",
    "SB3-PPO": "stable_baselines3:PPO",
    "SB3-A2C": "stable_baselines3:A2C",
    "SB3-TRPO": "sb3_contrib:TRPO",
}
#: ``policy_kwargs.activation_fn`` names -> ``torch.nn`` classes.
ACTIVATIONS = {
    "tanh": "Tanh",
    "relu": "ReLU",
    "elu": "ELU",
    "leaky_relu": "LeakyReLU",
    "gelu": "GELU",
    "silu": "SiLU",
}

_TOP_LEVEL_KEYS = {
    "name", "envs", "seeds", "total_timesteps", "checkpoint_every", "n_envs", "learners", "reference",
    "env_kwargs", "final_fraction", "policy", "torch_threads",
}  # fmt: skip
_LEARNER_KEYS = {"algo", "kwargs", "policy"}


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """One learner of a sweep: an algorithm class name and its constructor keyword arguments."""

    name: str
    algo: str
    kwargs: Mapping[str, Any]
    policy: str = "MlpPolicy"


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """One training run: a learner on an environment with a seed. Its result is a function of this spec."""

    learner: LearnerSpec
    env_id: str
    seed: int
    total_timesteps: int
    checkpoint_every: int
    n_envs: int = 1
    env_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    final_fraction: float = 0.1
    torch_threads: int = 1

    @property
    def unit_id(self) -> str:
        """``learner/env/seedK``: also the unit's folder under ``RESULTS/units``."""
        return f"{self.learner.name}/{self.env_id}/seed{self.seed}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        """A hash of everything that determines the unit's result (checked before a rerun resumes or skips it)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UnitSpec:
        fields = dict(data)
        fields["learner"] = LearnerSpec(**fields["learner"])
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A grid of learners x environments x seeds (see the module docstring for the file format)."""

    name: str
    learners: tuple[LearnerSpec, ...]
    envs: tuple[str, ...]
    seeds: tuple[int, ...]
    total_timesteps: int
    checkpoint_every: int
    n_envs: int = 1
    env_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    final_fraction: float = 0.1
    torch_threads: int = 1
    reference: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def units(self) -> list[UnitSpec]:
        """Every unit, environment-major then learner then seed (the order of the results table)."""
        return [
            UnitSpec(
                learner,
                env_id,
                seed,
                self.total_timesteps,
                self.checkpoint_every,
                self.n_envs,
                dict(self.env_kwargs),
                self.final_fraction,
                self.torch_threads,
            )  # fmt: skip
            for env_id in self.envs
            for learner in self.learners
            for seed in self.seeds
        ]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> SweepConfig:
        """Validate a parsed config; errors name the key, the bad value and what is allowed."""
        unknown = set(data) - _TOP_LEVEL_KEYS
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_LEVEL_KEYS)}"
            )
        for key in ("envs", "seeds", "total_timesteps", "learners"):
            if key not in data:
                raise ValueError(f"{source}: missing required key {key!r}")
        envs = data["envs"]
        if not isinstance(envs, list) or not envs or not all(isinstance(env, str) and env for env in envs):
            raise ValueError(f"{source}: envs must be a non-empty list of gymnasium ids, got {envs!r}")
        seeds = data["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
            raise ValueError(f"{source}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{source}: seeds must be distinct, got {seeds!r}")
        total = int(check_positive("total_timesteps", data["total_timesteps"], integer=True))
        every = int(
            check_positive(
                "checkpoint_every", data.get("checkpoint_every", max(total // 10, 1)), integer=True
            )
        )
        n_envs = int(check_positive("n_envs", data.get("n_envs", 1), integer=True))
        threads = int(check_positive("torch_threads", data.get("torch_threads", 1), integer=True))
        final_fraction = float(data.get("final_fraction", 0.1))
        if not 0 < final_fraction <= 1:
            raise ValueError(f"{source}: final_fraction must be in (0, 1], got {final_fraction!r}")
        learners_table = data["learners"]
        if not isinstance(learners_table, dict) or not learners_table:
            raise ValueError(
                f"{source}: learners must be a table of [learners.NAME] sections, got {learners_table!r}"
            )
        learners = tuple(
            _learner(name, table, data.get("policy", "MlpPolicy"), source)
            for name, table in learners_table.items()
        )
        env_kwargs = data.get("env_kwargs", {})
        if not isinstance(env_kwargs, dict):
            raise ValueError(f"{source}: env_kwargs must be a table, got {env_kwargs!r}")
        reference = data.get("reference", {})
        if not isinstance(reference, dict):
            raise ValueError(f"{source}: reference must be a table, got {reference!r}")
        return cls(
            name=str(data.get("name", "sweep")), learners=learners, envs=tuple(envs), seeds=tuple(seeds),
            total_timesteps=total, checkpoint_every=every, n_envs=n_envs, env_kwargs=env_kwargs,
            final_fraction=final_fraction, torch_threads=threads, reference=reference,
        )  # fmt: skip


def _learner(name: str, table: Any, default_policy: str, source: str) -> LearnerSpec:
    if not isinstance(table, dict):
        raise ValueError(f"{source}: [learners.{name}] must be a table, got {table!r}")
    unknown = set(table) - _LEARNER_KEYS
    if unknown:
        raise ValueError(
            f"{source}: [learners.{name}] has unknown key(s) {sorted(unknown)}; allowed: {sorted(_LEARNER_KEYS)}"
        )
    if "/" in name or not name:
        raise ValueError(f"{source}: learner names must be non-empty and contain no '/', got {name!r}")
    algo = table.get("algo")
    if algo not in ALGORITHMS:
        raise ValueError(
            f"{source}: [learners.{name}] algo must be one of {sorted(ALGORITHMS)}, got {algo!r}"
        )
    kwargs = table.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"{source}: [learners.{name}] kwargs must be a table, got {kwargs!r}")
    for forbidden in ("seed", "env", "policy"):
        if forbidden in kwargs:
            raise ValueError(
                f"{source}: [learners.{name}] kwargs must not set {forbidden!r}: the sweep sets it"
            )
    activation = kwargs.get("policy_kwargs", {}).get("activation_fn")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"{source}: [learners.{name}] policy_kwargs.activation_fn must be one of {sorted(ACTIVATIONS)}, "
            f"got {activation!r}"
        )
    return LearnerSpec(name=name, algo=algo, kwargs=kwargs, policy=str(table.get("policy", default_policy)))


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with pgvar, by name (``pgvar sweep mirage-qprop`` finds them)."""
    folder = Path(__file__).parent / "configs"
    return {path.stem: path for path in sorted(folder.glob("*.toml"))}


def load_sweep_config(
    path_or_name: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
) -> SweepConfig:
    """Read a sweep config from a TOML file, or a shipped config by name (:func:`shipped_configs`).

    :param path_or_name: a ``.toml`` path, or the name of a shipped config
    :param overrides: top-level keys replacing the file's (e.g. ``{"seeds": [0, 1], "total_timesteps": 1000}``)
    """
    shipped = shipped_configs()
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in shipped:
        path = shipped[str(path_or_name)]
    if not path.is_file():
        raise ValueError(
            f"config {str(path_or_name)!r} is neither a file nor a shipped config; shipped: {sorted(shipped)}"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config {str(path)!r} is not valid TOML: {error}") from None
    data.update(overrides or {})
    return SweepConfig.from_dict(data, source=str(path))
