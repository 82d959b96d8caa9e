"""rl-zoo3 plugin: train and tune pgvar's algorithms with the RL Baselines3 Zoo.

rl-zoo3 imports every module named by ``--gym-packages`` before it builds the experiment; importing this one
points the zoo's algorithm names at pgvar's drop-in classes and registers hyperparameter samplers for
``-optimize``::

    python -m rl_zoo3.train --algo ppo --env CartPole-v1 --gym-packages pgvar.zoo -conf my_hyperparams.yml
    python -m rl_zoo3.train --algo ppo --env CartPole-v1 --gym-packages pgvar.zoo -optimize --n-trials 20

- ``ppo``, ``a2c``, ``trpo`` train :class:`pgvar.PPO`, :class:`pgvar.A2C`, :class:`pgvar.TRPO` (with the
  defaults, bit for bit SB3's); pgvar's options go into the hyperparameter YAML like any SB3 argument
  (``baseline: optimal``, ``normalize_advantage: none``);
- ``qprop_ppo`` and ``qprop_trpo`` train :class:`pgvar.QPropPPO` and :class:`pgvar.QPropTRPO`. rl-zoo3 checks
  ``--algo`` before it imports plugins, so these two names need the plugin loaded first:
  ``python -m pgvar.zoo --algo qprop_trpo ...`` (``rl_zoo3.train`` with its arguments, after this import);
- ``-optimize`` samples the zoo's own hyperparameters of PPO / A2C / TRPO plus ``baseline`` and
  ``normalize_advantage`` (and ``qprop_eta`` for Q-Prop, except ``"adaptive"``: Box actions only). A constant baseline is sampled with
  ``normalize_advantage="none"`` only: centring the advantages would cancel it.

Importing is idempotent. It needs rl-zoo3 (``pip install "pgvar[zoo]"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from rl_zoo3 import hyperparams_opt as _zoo_opt
    from rl_zoo3 import utils as _zoo_utils
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError('pgvar.zoo is a plugin for rl-zoo3: pip install "pgvar[zoo]" (or rl_zoo3)') from error

from pgvar.algos import A2C, BASELINES, PPO, TRPO, QPropPPO, QPropTRPO
from pgvar.algos.buffers import VALUE_BASELINES
from pgvar.estimators import CONSTANT_BASELINES, NORMALIZATION_MODES, QPROP_ETA_RULES

Sampler = Callable[[Any, int, int, dict], dict[str, Any]]
Converter = Callable[[dict[str, Any]], dict[str, Any]]

#: The zoo's algorithm names and the pgvar classes they train once this module is imported.
ALGOS: dict[str, type] = {
    "ppo": PPO,
    "a2c": A2C,
    "trpo": TRPO,
    "qprop_ppo": QPropPPO,
    "qprop_trpo": QPropTRPO,
}

# The zoo's sampler and converter each pgvar name builds on (Q-Prop samples what PPO / TRPO sample).
_ZOO_BASE = {"ppo": "ppo", "a2c": "a2c", "trpo": "trpo", "qprop_ppo": "ppo", "qprop_trpo": "trpo"}
# Q-Prop's eta rules that optuna samples: "adaptive" works with Box actions only (set it in the YAML instead).
_SAMPLED_QPROP_ETA = tuple(rule for rule in QPROP_ETA_RULES if rule != "adaptive")


def sample_pgvar_options(trial: Any, qprop: bool = False) -> dict[str, Any]:
    """pgvar's options for one optuna trial: the baseline, then the advantage normalization it allows.

    A constant baseline (``"none"``, ``"mean"``, ``"optimal"``) is only sampled with ``normalize_advantage =
    "none"``: centring the learning signal per minibatch or per batch subtracts its mean, which cancels any
    constant. With a learned value baseline (``"value"``, ``"horizon"``; not ``"horizon"`` for Q-Prop) the three
    normalization modes are sampled.

    :param trial: an ``optuna.Trial``.
    :param qprop: also sample Q-Prop's ``qprop_eta`` rule.
    :return: keyword arguments of the pgvar class.
    """
    # Q-Prop's classes have their own train() and refuse the horizon-aware value (baseline="horizon").
    choices = [name for name in BASELINES if not (qprop and name == "horizon")]
    options: dict[str, Any] = {"baseline": trial.suggest_categorical("baseline", choices)}
    if options["baseline"] in VALUE_BASELINES:
        options["normalize_advantage"] = trial.suggest_categorical(
            "normalize_advantage", list(NORMALIZATION_MODES)
        )
    if qprop:
        options["qprop_eta"] = trial.suggest_categorical("qprop_eta", list(_SAMPLED_QPROP_ETA))
    return convert_pgvar_options(options)


def convert_pgvar_options(params: dict[str, Any]) -> dict[str, Any]:
    """The class arguments of sampled pgvar options (what the zoo's ``HYPERPARAMS_CONVERTER`` does for its own).

    A constant baseline gets ``normalize_advantage="none"`` (it was not sampled: see
    :func:`sample_pgvar_options`); other keys are returned unchanged.

    :param params: sampled values (an optuna trial's ``params``).
    :return: a new dict.
    """
    converted = dict(params)
    if converted.get("baseline") in CONSTANT_BASELINES:
        converted.setdefault("normalize_advantage", "none")
    return converted


def _sampler(name: str, zoo_sampler: Sampler) -> Sampler:
    qprop = name.startswith("qprop_")

    def sample(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
        return {
            **zoo_sampler(trial, n_actions, n_envs, additional_args),
            **sample_pgvar_options(trial, qprop),
        }

    sample.__name__ = f"sample_pgvar_{name}_params"
    sample.__doc__ = (
        f"The zoo's {_ZOO_BASE[name]} sampler plus pgvar's options (:func:`sample_pgvar_options`)."
    )
    return sample


def _converter(name: str, zoo_converter: Converter) -> Converter:
    def convert(params: dict[str, Any]) -> dict[str, Any]:
        return convert_pgvar_options(zoo_converter(params))

    convert.__name__ = f"convert_pgvar_{name}_params"
    return convert


def install() -> None:
    """Point rl-zoo3's ``ALGOS``, ``HYPERPARAMS_SAMPLER`` and ``HYPERPARAMS_CONVERTER`` at pgvar (idempotent).

    The zoo's dicts are updated in place: its modules imported them by name, so rebinding would not reach them.
    """
    _zoo_utils.ALGOS.update(ALGOS)
    if getattr(_zoo_opt.HYPERPARAMS_SAMPLER["ppo"], "__name__", "").startswith("sample_pgvar_"):
        return  # installed already (``python -m pgvar.zoo`` with ``--gym-packages pgvar.zoo`` imports it twice)
    # Every pgvar sampler wraps the zoo's own (read before any is replaced).
    samplers = {name: _sampler(name, _zoo_opt.HYPERPARAMS_SAMPLER[_ZOO_BASE[name]]) for name in ALGOS}
    converters = {name: _converter(name, _zoo_opt.HYPERPARAMS_CONVERTER[_ZOO_BASE[name]]) for name in ALGOS}
    _zoo_opt.HYPERPARAMS_SAMPLER.update(samplers)
    _zoo_opt.HYPERPARAMS_CONVERTER.update(converters)


install()

if (
    __name__ == "__main__"
):  # python -m pgvar.zoo --algo qprop_trpo ...: the zoo's train command, after install()
    from rl_zoo3.train import train

    train()
